"""srn_fast.cpu_memory: freed memory kept for reuse (glibc), and the CLI's --release-memory opt-out."""
import argparse
import os
import subprocess
import sys

import pytest

from srn_fast.cli.common import add_shared_options, apply_cpu_memory


def _glibc() -> bool:
    try:
        return (os.confstr("CS_GNU_LIBC_VERSION") or "").startswith("glibc")
    except (ValueError, AttributeError, OSError):
        return False


GLIBC = _glibc()

# Allocates and frees a 128 MB tensor 5 times and prints the page faults of the last 4 rounds, before and after
# keep_freed_memory(): with glibc's defaults every round maps fresh pages (~32,000 faults of 4 KiB each).
PROBE = r"""
import resource, torch
from srn_fast.cpu_memory import keep_freed_memory, freed_memory_kept

def faults():
    torch.ones(32 << 20)  # 128 MB, written (first touch)
    f0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(4):
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
    assert before > 4 * 20000, before  # 4 x 128 MB of fresh pages (4 KiB each: 32,768 per round)
    assert after < before / 20, (before, after)


def _args(argv):
    p = argparse.ArgumentParser()
    add_shared_options(p)
    return p.parse_args(argv)


def test_release_memory_opts_out_and_other_devices_are_left_alone(monkeypatch):
    calls = []
    monkeypatch.setattr("srn_fast.cpu_memory.keep_freed_memory", lambda: calls.append(1) or True)
    assert apply_cpu_memory(_args(["--device", "cpu", "--release-memory"])) is False
    assert apply_cpu_memory(_args(["--device", "cuda:7"])) is False  # not a CPU run (or no such GPU: its error later)
    assert apply_cpu_memory(argparse.Namespace(no_progress=False)) is False  # a command without --device
    assert calls == []
    assert apply_cpu_memory(_args(["--device", "cpu"])) is True
    assert calls == [1]


def test_commands_without_a_device_have_no_release_memory_option():
    p = argparse.ArgumentParser()
    add_shared_options(p, device=False, backend=False)
    with pytest.raises(SystemExit):
        p.parse_args(["--release-memory"])
