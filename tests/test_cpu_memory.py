"""srn_fast.cpu_memory: freed memory kept for reuse (glibc), and the CLI's --release-memory opt-out."""
import argparse
import subprocess
import sys

import pytest
import torch

from srn_fast.cli import main
from srn_fast.cli.common import add_shared_options
from srn_fast.cpu_memory import is_glibc, keep_freed_memory_for

# In a fresh interpreter, before and after keep_freed_memory(): how much resident memory freeing a 128 MB tensor gives
# back to the system (glibc's defaults: all of it, munmap), and the page faults of 8 rounds of allocating and freeing
# it (defaults: fresh pages every round, 32,768 faults of 4 KiB each). Kept, the freed block stays resident and
# later rounds reuse it (in most runs none faults after the first one or two; one CI run saw 7 of 8 fault, so the
# fault count is only required to drop).
PROBE = r"""
import resource, torch
from srn_fast.cpu_memory import keep_freed_memory, freed_memory_kept

def rss_kb():
    with open("/proc/self/status") as fh:
        return next(int(line.split()[1]) for line in fh if line.startswith("VmRSS:"))

def given_back_kb():
    t = torch.ones(32 << 20)  # 128 MB, written
    before = rss_kb()
    del t
    return before - rss_kb()

def faults():
    torch.ones(32 << 20)
    f0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(8):
        torch.ones(32 << 20)
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0

row = [given_back_kb(), faults()]
assert not freed_memory_kept()
ok = keep_freed_memory()
print(*row, given_back_kb(), faults(), ok, freed_memory_kept())
"""


@pytest.mark.skipif(not is_glibc(), reason="mallopt is glibc's: elsewhere keep_freed_memory() is a documented no-op")
def test_keep_freed_memory_keeps_freed_blocks_resident_for_reuse():
    out = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, check=True).stdout.split()
    back_default, faults_default, back_kept, faults_kept = map(int, out[:4])
    assert out[4:] == ["True", "True"]
    assert back_default > 100_000, out  # kB: glibc's defaults unmap the freed 128 MB at once
    assert back_kept < 10_000, out  # kept: it stays in the process
    assert faults_default > 8 * 20000, out  # 8 x 128 MB of fresh pages
    assert faults_kept < faults_default - 16384, out  # at least half a round's pages were reused


def test_keep_freed_memory_for_acts_on_the_cpu_only(monkeypatch):
    calls = []
    monkeypatch.setattr("srn_fast.cpu_memory.keep_freed_memory", lambda: calls.append(1) or True)
    assert keep_freed_memory_for("cuda:7") is False  # not a CPU run (or no such GPU: its error comes later)
    assert keep_freed_memory_for("no-such-device") is False  # the command reports a bad --device itself
    assert calls == []
    assert keep_freed_memory_for(None) is False  # not resolved: nothing to act on
    assert calls == []
    assert keep_freed_memory_for("cpu") is True and calls == [1]
    assert keep_freed_memory_for(torch.device("cpu")) is True and calls == [1, 1]


def test_commands_keep_freed_memory_unless_release_memory_is_given(monkeypatch, tmp_path):
    seen = []
    monkeypatch.setattr("srn_fast.cpu_memory.keep_freed_memory_for", lambda device: seen.append(device) or True)
    argv = ["render", "--checkpoint", str(tmp_path / "missing"), "--out", str(tmp_path / "out"), "--device", "cpu"]
    assert main(argv) == 2  # the command itself fails (no checkpoint), after the choice was applied
    assert seen == [torch.device("cpu")]
    assert main(argv + ["--release-memory"]) == 2
    assert seen == [torch.device("cpu")]
    # "auto" is resolved as the command resolves it (cli.common.pick_device): CUDA when there is one
    assert main(argv[:-1] + ["auto"]) == 2
    assert seen[-1] == torch.device("cuda" if torch.cuda.is_available() else "cpu")


def test_commands_without_a_device_have_no_release_memory_option():
    p = argparse.ArgumentParser()
    add_shared_options(p, device=False, backend=False)
    with pytest.raises(SystemExit):
        p.parse_args(["--release-memory"])
