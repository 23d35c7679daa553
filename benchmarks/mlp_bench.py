"""Benchmark of the fused MLP op (issue 4): phi forward and forward+backward, fused vs the torch backend.

Measures, in one run on one device:
  * the yardstick: the machine's own batched-matmul rate (torch.bmm, [B, N, W] x [B, W, W]) in float32 (and
    bfloat16 on the CPU);
  * phi (3 -> W -> W -> W -> W, per-scene weights, LayerNorm without affine + ReLU) at B scenes x N rays:
    forward (no grad) and forward+backward (gradients for x and every weight/bias), for backend torch
    (srn_fast.torch_impl.mlp), torch+autocast (the same under torch.autocast(bfloat16)), fused (srn_fast.ops.mlp;
    activations kept, or recomputed in backward; CPU matmuls through torch's MKL symbols or through at::mm) and
    fused with bf16 matmuls (forward and backward).
Median times (implementations interleaved), GFLOP/s (forward 2 * B * N * sum(C_in * C_out); forward+backward 3x
that), speed-up vs torch, the share of the float32 bmm rate (and for bf16 rows of the bf16 bmm rate), and the
relative error against the float32 torch backend (forward: the output; forward+backward: all gradients). Prints a table; --json writes the rows with device, versions and commit.

    python benchmarks/mlp_bench.py [--quick] [--device cpu|cuda] [--json out.json]

`run_mlp_cases(device, quick)` returns the rows (benchmarks/march_bench.py reuses it).
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from typing import Callable, Dict, List

import torch

from bench_env import import_srn_fast, machine_facts  # noqa: E402

import_srn_fast(verbose=__name__ == "__main__")
from srn_fast import _ext, files, ops, torch_impl  # noqa: E402
from srn_fast.torch_impl import Layer  # noqa: E402


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def median_times(fns: Dict[str, Callable[[], object]], device: str, reps: int, warmup: int = 1) -> Dict[str, float]:
    """Median wall time (s) of each fn, the runs interleaved (a, b, c, a, b, c, ...) so that load changes on a
    shared machine hit every implementation alike (after warm-up; synchronised on CUDA)."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    _sync(device)
    ts: Dict[str, List[float]] = {k: [] for k in fns}
    for _ in range(reps):
        for k, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            _sync(device)
            ts[k].append(time.perf_counter() - t0)
    return {k: statistics.median(v) for k, v in ts.items()}


def median_time(fn: Callable[[], object], device: str, reps: int, warmup: int = 1) -> float:
    return median_times({"fn": fn}, device, reps, warmup)["fn"]


def phi_layers(B: int, width: int, device: str, requires_grad: bool, seed: int = 0) -> List[Layer]:
    gen = torch.Generator().manual_seed(seed)
    dims = [3, width, width, width, width]
    layers = []
    for ci, co in zip(dims[:-1], dims[1:]):
        W = torch.randn(B, co, ci, generator=gen) * (2.0 / ci) ** 0.5
        b = torch.randn(B, co, generator=gen) * 0.1
        layers.append(Layer(W.to(device).requires_grad_(requires_grad), b.to(device).requires_grad_(requires_grad),
                            True))
    return layers


def _flops_forward(B: int, N: int, width: int) -> float:
    dims = [3, width, width, width, width]
    return 2.0 * B * N * sum(ci * co for ci, co in zip(dims[:-1], dims[1:]))


BF16_IMPLS = ("fused bf16", "torch+autocast")


def run_mlp_cases(device: str = "cpu", quick: bool = False, B: int = 2, N: int = 8192, width: int = 256
                  ) -> List[Dict]:
    """Rows of the MLP benchmark (see the module docstring). quick: N / 4 and fewer repetitions."""
    if quick:
        N = max(256, N // 4)
    reps = 3 if quick else 7
    ext = _ext.load()
    rows: List[Dict] = []
    fwd_flops = _flops_forward(B, N, width)

    # yardsticks: the machine's batched matmul on the same shape, float32 and bfloat16 (interleaved)
    a = torch.randn(B, N, width, device=device)
    w = torch.randn(B, width, width, device=device)
    ab, wb = a.bfloat16(), w.bfloat16()
    bmm_flops = 2.0 * B * N * width * width
    t = median_times({"f32": lambda: torch.bmm(a, w.transpose(1, 2)), "bf16": lambda: torch.bmm(ab, wb.transpose(1, 2))},
                     device, reps)
    bmm_rate, bmm16_rate = bmm_flops / t["f32"] / 1e9, bmm_flops / t["bf16"] / 1e9
    rows.append(dict(case="yardstick", impl="torch.bmm float32", phase="matmul", ms=t["f32"] * 1e3, gflops=bmm_rate))
    rows.append(dict(case="yardstick", impl="torch.bmm bfloat16", phase="matmul", ms=t["bf16"] * 1e3,
                     gflops=bmm16_rate))

    x = torch.randn(B, N, 3, device=device) * 0.5
    case = f"phi B={B} N={N} W={width}"
    have_fused = ext is not None and hasattr(ext, "mlp_forward")

    def autocast_mlp(x, L):
        with torch.autocast(x.device.type, dtype=torch.bfloat16):
            return torch_impl.mlp(x, L).float()

    impls = [("torch", lambda x, L: torch_impl.mlp(x, L), None), ("torch+autocast", autocast_mlp, None)]
    if have_fused:
        impls += [
            ("fused", lambda x, L: ops.mlp(x, L, save_activations=True), "auto"),
            ("fused recompute-bwd", lambda x, L: ops.mlp(x, L, save_activations=False), "auto"),
            ("fused bf16", lambda x, L: ops.mlp(x, L, matmul_dtype=torch.bfloat16), "auto"),
        ]
        if device == "cpu":
            impls.append(("fused (at::mm gemm)", lambda x, L: ops.mlp(x, L), "aten"))

    def with_gemm(fn, gemm):
        def run(*a):
            if gemm and device == "cpu":
                ext.set_cpu_gemm_backend(gemm)
            return fn(*a)
        return run

    def add_row(name, phase, t, flops, err=None):
        r = dict(case=case, impl=name, phase=phase, ms=t * 1e3, gflops=flops / t / 1e9,
                 pct_of_bmm=100 * flops / t / 1e9 / bmm_rate)
        if name in BF16_IMPLS:
            r["pct_of_bmm_bf16"] = 100 * flops / t / 1e9 / bmm16_rate
        if err is not None:
            r["rel_err_vs_torch"] = err
        rows.append(r)

    # forward, no grad
    layers = phi_layers(B, width, device, requires_grad=False)
    fwd = {name: with_gemm(fn, gemm) for name, fn, gemm in impls if name != "fused recompute-bwd"}
    with torch.no_grad():
        ref = torch_impl.mlp(x, layers)
        ts = median_times({k: (lambda f=f: f(x, layers)) for k, f in fwd.items()}, device, reps)
        for name, f in fwd.items():
            out = f(x, layers).float()
            add_row(name, "forward", ts[name], fwd_flops, ((out - ref).norm() / ref.norm()).item())
    # forward + backward (errors: of every gradient together, vs the float32 torch backend)
    layers = phi_layers(B, width, device, requires_grad=True)
    xg = x.clone().requires_grad_()
    v = torch.randn(B, N, width, device=device)
    params = [xg] + [t for L in layers for t in (L.weight, L.bias)]

    def step(f):
        out = f(xg, layers)
        return torch.autograd.grad(out, params, v)

    steps = {name: (lambda f=with_gemm(fn, gemm): step(f)) for name, fn, gemm in impls}
    ts = median_times(steps, device, reps)
    g_ref = torch.cat([g.reshape(-1) for g in steps["torch"]()])
    for name, f in steps.items():
        g = torch.cat([g.float().reshape(-1) for g in f()])
        add_row(name, "forward+backward", ts[name], 3 * fwd_flops, ((g - g_ref).norm() / g_ref.norm()).item())
    if have_fused and device == "cpu":
        ext.set_cpu_gemm_backend("auto")
    base = {r["phase"]: r["ms"] for r in rows if r["impl"] == "torch"}
    for r in rows:
        if r["phase"] in base:
            r["speedup_vs_torch"] = base[r["phase"]] / r["ms"]
    return rows


def print_table(rows: List[Dict]) -> None:
    head = (f"{'case':<24} {'impl':<22} {'phase':<17} {'ms':>9} {'GFLOP/s':>8} {'x torch':>8} {'% bmm':>6} "
            f"{'rel err':>8} {'% bf16 bmm':>10}")
    print(head)
    print("-" * len(head))
    for r in rows:
        def f(key, fmt):
            return format(r[key], fmt) if key in r else ""
        print(f"{r['case']:<24} {r['impl']:<22} {r['phase']:<17} {f('ms', '9.2f'):>9} {f('gflops', '8.1f'):>8} "
              f"{f('speedup_vs_torch', '8.2f'):>8} {f('pct_of_bmm', '6.0f'):>6} {f('rel_err_vs_torch', '8.1e'):>8} "
              f"{f('pct_of_bmm_bf16', '10.0f'):>10}")


def environment(device: str) -> Dict:
    return dict(device=device, **machine_facts(device))


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cpu")
    p.add_argument("--quick", action="store_true", help="N / 4 and 3 repetitions")
    p.add_argument("--N", type=int, default=8192)
    p.add_argument("--B", type=int, default=2)
    p.add_argument("--width", type=int, default=256)
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    p.add_argument("--json", default=None, help="write rows and environment to this file")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        sys.exit("--device cuda: no CUDA GPU is available")
    rows = run_mlp_cases(args.device, args.quick, B=args.B, N=args.N, width=args.width)
    env = environment(args.device)
    print(f"# {env['device']}  {env['cpu']['model']}  torch {env['versions']['torch']}  threads {env['threads']}  "
          f"cpu gemm {env['cpu_gemm']}  load {env['load_average']}")
    print_table(rows)
    if args.json:
        files.write_json(args.json, dict(environment=env, rows=rows), makedirs=True)


if __name__ == "__main__":
    main()
