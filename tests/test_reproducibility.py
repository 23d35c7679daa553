"""The same seed gives the same bits from one process to the next. The fused ops choose some things by timing (the
CPU bf16 GEMM route, the wide layers' forward layout, matmul_dtype="auto"), and the choices round differently; a
small weight's layout is never timed, and under ``torch.use_deterministic_algorithms(True)`` nothing is: the route
by the CPU's instructions, the layout addmm, bf16 where the CPU has bf16 instructions."""
import importlib
import json
import os
import subprocess
import sys

import pytest
import torch

import srn_fast
from srn_fast.ops import precision

from op_utils import require_extension

HERE = os.path.dirname(os.path.abspath(__file__))


@pytest.fixture
def deterministic():
    before = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    yield
    torch.use_deterministic_algorithms(before)


def _instruction_route(rates):
    return next(r for r in ("amx", "avx512bf16", "mkl", "widened") if r in rates or r == "widened")


def test_bf16_route_follows_the_instructions_under_deterministic_algorithms(deterministic):
    ext = require_extension()
    ext.set_cpu_bf16_route("auto")
    assert ext.cpu_bf16_route() == _instruction_route(precision.tile_gemm_rates())
    torch.use_deterministic_algorithms(False)
    assert ext.cpu_bf16_route() in ("mkl", "widened", "avx512bf16", "amx")  # the timed choice again


def test_auto_precision_follows_the_instructions_under_deterministic_algorithms(deterministic):
    require_extension()
    has_bf16 = bool({"avx512bf16", "amx"} & set(precision.tile_gemm_rates()))
    assert precision.bf16_pays("cpu") == has_bf16
    assert precision.resolve_matmul_dtype("auto", "cpu") == (torch.bfloat16 if has_bf16 else None)


@pytest.mark.parametrize("shape,det", [((1024, 256), False), ((65792, 256), True)])
def test_wide_layout_is_not_timed_for_small_weights_or_deterministic_algorithms(monkeypatch, shape, det):
    wl = importlib.import_module("srn_fast.ops.wide_linear")  # the module (srn_fast.ops.wide_linear is the function)

    def timed(*_):
        raise AssertionError("a layout was timed")

    monkeypatch.setattr(wl, "_LAYOUTS", {"addmm": timed, "linear": timed})
    monkeypatch.setattr(wl, "_layout_choice", {})
    before = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(det)
    try:
        x, w = torch.zeros(2, shape[1]), torch.empty(shape)
        assert wl.forward_layout(x, w) == "addmm" and wl._layout_choice == {}
    finally:
        torch.use_deterministic_algorithms(before)


_CHILD = r"""
import hashlib, json, sys, torch
torch.use_deterministic_algorithms(True)
torch.set_num_threads(2)
from srn_fast import SRNModel, geometry
torch.manual_seed(0)
model = SRNModel(2, backend="fused", matmul_dtype="auto")
S = 12
pose = torch.stack([torch.tensor(geometry.look_at(e), dtype=torch.float32) for e in ((1.2, -0.9, 0.6), (-0.8, 1.1, 0.9))])
inp = {"instance_idx": torch.arange(2), "pose": pose, "uv": geometry.uv_grid(S)[None].expand(2, -1, -1).contiguous(),
       "intrinsics": geometry.intrinsics_matrix(1.025 * S, S / 2, S / 2).expand(2, 3, 3).contiguous()}
gt = {"rgb": torch.rand(2, S * S, 3, generator=torch.Generator().manual_seed(1)) * 2 - 1}
d0 = model.initial_depth(2, S * S, torch.device("cpu"), generator=torch.Generator().manual_seed(2))
out = model.render(inp, initial_depth=d0)
model.losses((out["rgb"], out["depth"]), gt, out["z"])["total"].backward()
h = hashlib.sha256(out["rgb"].detach().numpy().tobytes())
for n, p in sorted(model.named_parameters()):
    if p.grad is not None:
        h.update(p.grad.numpy().tobytes())
print(json.dumps({"digest": h.hexdigest(), "matmul": str(model.resolved_matmul_dtype(torch.device("cpu")))}))
"""


def test_two_processes_give_the_same_bits_under_deterministic_algorithms():
    """A fused training step's output and every gradient, hashed, from two fresh processes (matmul_dtype="auto": bf16
    where the CPU has bf16 instructions, through the route those give)."""
    require_extension()
    env = dict(os.environ, OMP_NUM_THREADS="2")
    runs = []
    for _ in range(2):
        res = subprocess.run([sys.executable, "-c", _CHILD], capture_output=True, text=True, env=env, cwd=HERE,
                             timeout=600)
        assert res.returncode == 0, res.stderr[-2000:]
        runs.append(json.loads(res.stdout.strip().splitlines()[-1]))
    assert runs[0] == runs[1]
