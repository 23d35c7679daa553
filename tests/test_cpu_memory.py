"""srn_fast.cpu_memory: freed memory kept for reuse (glibc), and the CLI's --release-memory opt-out."""
import argparse
import os
import subprocess
import sys

import pytest
import torch

from srn_fast.cli import main
from srn_fast.cli.common import add_shared_options
from srn_fast.cpu_memory import keep_freed_memory_for


def _glibc() -> bool:
    try:
        return (os.confstr("CS_GNU_LIBC_VERSION") or "").startswith("glibc")
    except (ValueError, AttributeError, OSError):
        return False


GLIBC = _glibc()

# Allocates and frees a 128 MB tensor 9 times and prints the page faults of the last 8 rounds, before and after
# keep_freed_memory(): with glibc's defaults every round maps fresh pages (32,768 faults of 4 KiB each); kept, at most
# the first round after the switch does (seen once in CI).
PROBE = r"""
import resource, torch
from srn_fast.cpu_memory import keep_freed_memory, freed_memory_kept

def faults():
    torch.ones(32 << 20)  # 128 MB, written (first touch)
    f0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(8):
        torch.ones(32 << 20)
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0

before = faults()
assert not freed_memory_kept()
ok = keep_freed_memory()
print(before, faults(), ok, freed_memory_kept())
"""


@pytest.mark.skipif(not GLIBC, reason="mallopt is glibc's: elsewhere keep_freed_memory() is a documented no-op")
def test_keep_freed_memory_stops_the_page_faults_of_reallocating():
    out = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, check=True).stdout.split()
    before, after = int(out[0]), int(out[1])
    assert out[2:] == ["True", "True"]
    assert before > 8 * 20000, before  # 8 x 128 MB of fresh pages (4 KiB each: 32,768 per round)
    assert after < before / 4, (before, after)


def test_keep_freed_memory_for_acts_on_the_cpu_only(monkeypatch):
    calls = []
    monkeypatch.setattr("srn_fast.cpu_memory.keep_freed_memory", lambda: calls.append(1) or True)
    assert keep_freed_memory_for("cuda:7") is False  # not a CPU run (or no such GPU: its error comes later)
    assert keep_freed_memory_for("no-such-device") is False  # the command reports a bad --device itself
    assert calls == []
    assert keep_freed_memory_for("cpu") is True and calls == [1]
    assert keep_freed_memory_for(None) is (not torch.cuda.is_available())  # auto: CUDA when there is one


def test_commands_keep_freed_memory_unless_release_memory_is_given(monkeypatch, tmp_path):
    seen = []
    monkeypatch.setattr("srn_fast.cpu_memory.keep_freed_memory_for", lambda device: seen.append(device) or True)
    argv = ["render", "--checkpoint", str(tmp_path / "missing"), "--out", str(tmp_path / "out"), "--device", "cpu"]
    assert main(argv) == 2  # the command itself fails (no checkpoint), after the choice was applied
    assert seen == ["cpu"]
    assert main(argv + ["--release-memory"]) == 2
    assert seen == ["cpu"]


def test_commands_without_a_device_have_no_release_memory_option():
    p = argparse.ArgumentParser()
    add_shared_options(p, device=False, backend=False)
    with pytest.raises(SystemExit):
        p.parse_args(["--release-memory"])
