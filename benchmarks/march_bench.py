"""srn_fast's headline benchmark: the ray march, a full render and a training step, fused vs the reference
(pure-PyTorch) implementation, in one run on one machine.

    python benchmarks/march_bench.py                 # CPU (or --device cuda), 64x64 and 128x128 views, B = 2
    python benchmarks/march_bench.py --quick --json benchmarks/results/cpu.json

Cases (per view size S, B scenes, N = S*S rays per scene, the reference architecture: width 256, 10 steps):
  mlp         phi alone (from benchmarks/mlp_bench.py): B = 2, N = 8192, width 256, forward and forward+backward,
              fused (kept / recomputed activations, bf16) vs torch and torch+autocast, once per run (not per size)
  march       the ray march alone (no grad)
  render      march + phi at the surface + pixel generator (no grad)
  train_step  render + the reference losses + backward (gradients for every parameter)
Backends: fused (the model's defaults: march_mode "auto"), fused-recompute / fused-store (train step, the march mode
forced), torch (the oracle: the reference's code path), torch+autocast (the torch backend under
torch.autocast(bfloat16): what a user who knows autocast would otherwise pick), torch+compile (torch.compile of the
torch backend, where it compiles), fused+compile (torch.compile of the whole fused model: the fused ops are
dispatcher ops that the compiled graph calls, everything around them is compiled), fused-bf16 (bf16 matmuls with
float32 accumulation, forward and backward). bf16 rows also give their share of the bf16 bmm rate (measured in the
same case) and their error against the float32 torch backend: the PSNR of the rendered image, the relative error of
the training loss.

Reported per case: median wall time, rays/s, speed-up vs torch, achieved GFLOP/s and its share of this
machine's batched-matmul rate measured in the same run, just before the case (torch.bmm, float32 and for bf16 rows
bfloat16, [B, 8192, 256] x [B, 256, 256]^T, nn.Linear's weight layout), and peak memory: on CUDA the growth of
torch.cuda.max_memory_allocated over what is allocated before the run; on the CPU the peak resident-set growth
(VmHWM after resetting it, minus VmRSS before) of a fresh child process running the case once (so every number
includes the allocator's slack, and for torch+compile the compiler's own memory).
For the training step a second figure, "step MB", is the same growth when the parameters' gradient buffers
already exist (a training loop that zeroes gradients rather than freeing them): the step's working memory
without the ~200 MB of hypernetwork weight gradients that every backend must hold.
Within a case the backends' timed runs are interleaved (fused, torch, fused, torch, ...), so that load changes
on a shared machine hit them alike; the JSON keeps every run's time (ms_all) beside the median. A progress bar on
stderr follows each case (warm-ups, timed runs, memory children; --no-progress hides it). The notes also give
the speed-up per repeat (torch's i-th time over the backend's i-th, which ran right after each other): its median
and range ("paired x torch", JSON speedup_vs_torch_paired), steadier than the ratio of medians on a busy VM. With --rounds K every case runs K times, each with fresh models,
and a last line per backend gives the min / median / max of the rounds' speed-ups (JSON round_summary).
The notes end with the median number of page faults a timed run took (JSON page_faults_median): how much fresh
memory it touched. glibc's malloc serves large blocks from fresh mappings until a large free raises its mmap
threshold, so a backend that allocates per run is faster when an earlier backend in the same process freed big
blocks (torch+autocast's 64x64 step on a Zen 4: ~95,000 faults and ~740 ms alone, ~5,500 and ~555 ms after the
torch backend's steps).
"""
from __future__ import annotations

import argparse
import os
import resource
import statistics
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))

import torch  # noqa: E402
from tqdm import tqdm  # noqa: E402

from bench_env import import_srn_fast, machine_facts  # noqa: E402

srn_fast = import_srn_fast()
from srn_fast import files, geometry  # noqa: E402

WIDTH, STEPS, LSTM_H = 256, 10, 16
PHI_MACS = 3 * WIDTH + 3 * WIDTH * WIDTH
LSTM_MACS = 4 * LSTM_H * (WIDTH + LSTM_H)
PIX_MACS = 5 * WIDTH * WIDTH + WIDTH * 3


def flops_per_ray(case: str) -> float:
    march = STEPS * (PHI_MACS + LSTM_MACS) * 2
    render = march + (PHI_MACS + PIX_MACS) * 2
    return {"march": march, "render": render, "train_step": 3 * render}[case]


def make_inputs(B: int, S: int, device):
    eyes = [(1.2, -0.9, 0.6), (-0.8, 1.1, 0.9), (0.3, 1.4, -0.5), (1.0, 1.0, 1.0)]
    pose = torch.stack([torch.tensor(geometry.look_at(eyes[b % 4]), dtype=torch.float32) for b in range(B)])
    K = geometry.intrinsics_matrix(1.025 * S, S / 2, S / 2).expand(B, 3, 3).contiguous()
    uv = geometry.uv_grid(S)[None].expand(B, -1, -1).contiguous()
    inp = {"instance_idx": torch.arange(B), "pose": pose, "intrinsics": K, "uv": uv}
    inp = {k: v.to(device) for k, v in inp.items()}
    gt = {"rgb": torch.rand(B, S * S, 3, generator=torch.Generator().manual_seed(1)).to(device) * 2 - 1}
    return inp, gt


def make_model(B: int, backend: str, device, bf16: bool = False, mode: str = "auto"):
    torch.manual_seed(0)
    m = srn_fast.SRNModel(B, backend="torch" if backend.startswith("torch") else "fused", march_mode=mode,
                          matmul_dtype=torch.bfloat16 if bf16 else None).to(device)
    return m


def case_fn(case: str, model, inp, gt, d0, compiled=None, set_to_none=True, autocast=False):
    """The timed function of a case; with autocast, under torch.autocast(bf16) (the torch+autocast backend)."""
    def ctx():
        return torch.autocast(d0.device.type, dtype=torch.bfloat16, enabled=autocast)

    if case == "march":
        def run():
            with torch.no_grad(), ctx():
                z = model.get_z(inp)
                phi = model.phi_layers(z)
                dirs = geometry.get_ray_directions(inp["uv"], inp["pose"], inp["intrinsics"])
                x0 = geometry.world_from_xy_depth(inp["uv"], d0, inp["pose"], inp["intrinsics"])
                march = compiled or model.backend.march
                mm = model.resolved_matmul_dtype(d0.device)
                kw = {} if compiled or model.backend_name == "torch" else {"matmul_dtype": mm}
                return march(x0, dirs, phi, model.ray_marcher.params(), STEPS, **kw)
        return run
    if case == "render":
        def run():
            with torch.no_grad(), ctx():
                return (compiled or model.render)(inp, initial_depth=d0)["rgb"]
        return run

    def run():
        model.zero_grad(set_to_none=set_to_none)
        with ctx():
            out = (compiled or model.render)(inp, initial_depth=d0)
            loss = model.losses((out["rgb"].float(), out["depth"].float()), gt, out["z"])["total"]
        loss.backward()
        return loss
    return run


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def timeit(fn, device, repeats: int, warmup: int = 1):
    for _ in range(warmup):
        fn()
    sync(device)
    ts = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        sync(device)
        ts.append(time.perf_counter() - t)
    return statistics.median(ts)


def bmm_gflops(device, repeats: int, dtype=torch.float32) -> float:
    """The yardstick: this machine's batched matmul [B, 8192, 256] x [B, 256, 256]^T in ``dtype``, the weight in
    nn.Linear's [out, in] layout as in mlp_bench.py (on an AVX2 CPU, torch's bf16 bmm with the other layout runs at
    a tenth of this rate: 1.4 vs 16.8 GFLOP/s)."""
    B, N, C = 2, 8192, WIDTH
    a = torch.randn(B, N, C, device=device, dtype=dtype)
    w = torch.randn(B, C, C, device=device, dtype=dtype)  # [B, out, in]
    t = timeit(lambda: torch.bmm(a, w.transpose(1, 2)), device, max(repeats, 5))
    return 2 * B * N * C * C / t / 1e9


BF16_BACKENDS = ("fused-bf16", "torch+autocast")


def build(case, backend, B, S, device, set_to_none=True):
    bf16 = backend == "fused-bf16"
    mode = {"fused-store": "store", "fused-recompute": "recompute"}.get(backend, "auto")
    model = make_model(B, backend, device, bf16=bf16, mode=mode)
    inp, gt = make_inputs(B, S, device)
    d0 = model.initial_depth(B, S * S, device, generator=torch.Generator().manual_seed(2))
    compiled = None
    if backend in ("torch+compile", "fused+compile"):  # the whole model compiled; the fused ops stay opaque ops
        if case == "march":
            target = srn_fast.torch_impl.march if backend == "torch+compile" else model.backend.march
        else:
            target = model.render
        compiled = torch.compile(target)
    return model, inp, gt, d0, case_fn(case, model, inp, gt, d0, compiled, set_to_none,
                                       autocast=backend == "torch+autocast")


def cuda_step_mem_mb(model, S, B, device) -> float:
    """CUDA: growth of allocated memory over one training step whose gradient buffers already exist."""
    inp, gt = make_inputs(B, S, device)
    d0 = model.initial_depth(B, S * S, device, generator=torch.Generator().manual_seed(2))
    for prm in model.parameters():
        if prm.requires_grad:
            prm.grad = torch.zeros_like(prm)
    sync(device)
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    out = model.render(inp, initial_depth=d0)
    model.losses((out["rgb"], out["depth"]), gt, out["z"])["total"].backward()
    sync(device)
    peak = torch.cuda.max_memory_allocated() - base
    model.zero_grad(set_to_none=True)
    return peak / 2 ** 20


def child_peak_mb(case, backend, B, S, device, resident_grads=False) -> float:
    """Peak RSS growth (MB) of a fresh process running the case once (CPU memory). With resident_grads the
    parameters' gradient buffers exist (zeros) before the measured step and are reused by it, as in a training
    loop that zeroes gradients instead of freeing them: the growth is then the step's own working memory."""
    cmd = [sys.executable, os.path.abspath(__file__), "--child", case, backend, str(B), str(S), str(device),
           "1" if resident_grads else "0"]
    env = dict(os.environ, OMP_NUM_THREADS=str(torch.get_num_threads()))
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=900, env=env)
        return float(out.stdout.strip().splitlines()[-1])
    except Exception as e:  # report, do not hide
        print(f"  (memory measurement failed for {case}/{backend}: {e})", file=sys.stderr)
        return float("nan")


def _status_kb(field: str) -> int:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def child_main(case, backend, B, S, device, resident_grads="0"):
    device = torch.device(device)
    model, inp, gt, d0, fn = build(case, backend, int(B), int(S), device, set_to_none=resident_grads != "1")
    if resident_grads == "1":
        for prm in model.parameters():
            if prm.requires_grad:
                prm.grad = torch.zeros_like(prm)
    try:  # Linux: reset the peak-RSS mark (VmHWM) so that only the measured run counts
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
        base = _status_kb("VmRSS")
        fn()
        peak = _status_kb("VmHWM")
    except OSError:  # elsewhere: the process-lifetime peak
        base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        fn()
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(max(peak - base, 0) / 1024.0)


def psnr01(a, b):
    a = (a.clamp(-1, 1) + 1) / 2
    b = (b.clamp(-1, 1) + 1) / 2
    return float(10 * torch.log10(1.0 / torch.mean((a - b) ** 2)))


def error_text(e: Exception) -> str:
    """One line for the table's notes column: the exception's type and the start of its message."""
    return f"{type(e).__name__}: {str(e).splitlines()[0][:120] if str(e) else ''}"


def run_case(case, S, args, device):
    """One case at one size for every backend. The backends' runs are interleaved (fused, torch, fused, torch,
    ...) so that a change in machine load during the case hits them alike; medians over the repeats."""
    backends = [b for b in args.backends.split(",")
                if not (b in ("fused-store", "fused-recompute") and case != "train_step")]
    name = f"{case}_{S}x{S}"
    yard = bmm_gflops(device, args.repeats)
    yard16 = bmm_gflops(device, args.repeats, torch.bfloat16) if any(b in BF16_BACKENDS for b in backends) else None
    rows, fns, times, faults = {}, {}, {}, {}
    n_mem = 0 if args.no_memory or device.type != "cpu" else (2 if case == "train_step" else 1)
    bar = tqdm(total=len(backends) * (1 + args.repeats + n_mem), desc=name, unit="run", leave=False,
               disable=args.no_progress, file=sys.stderr)
    for backend in backends:
        bar.set_postfix_str(f"{backend} warm-up")
        row = rows[backend] = {"name": name, "case": case, "size": S, "batch": args.batch, "backend": backend,
                               "bmm_gflops": yard}
        if backend in BF16_BACKENDS:
            row["bmm_bf16_gflops"] = yard16
        try:
            model, inp, gt, d0, fn = build(case, backend, args.batch, S, device)
            for _ in range(2 if backend.endswith("+compile") else 1):  # warm-up (and compilation)
                fn()
            sync(device)
            fns[backend] = (model, fn)
            times[backend], faults[backend] = [], []
        except Exception as e:  # torch.compile may not compile here: say so in the table
            row["error"] = error_text(e)
        bar.update(1)
    for k in range(args.repeats):
        bar.set_postfix_str(f"repeat {k + 1}/{args.repeats}")
        for backend, (model, fn) in fns.items():
            try:
                if device.type == "cuda":
                    torch.cuda.reset_peak_memory_stats()
                sync(device)
                f0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
                t = time.perf_counter()
                fn()
                sync(device)
                times[backend].append(time.perf_counter() - t)
                # page faults (first touches of fresh memory): where the allocator hands out memory it unmapped
                # before, a run pays ~1 us each; how many depends on what ran earlier in the process (glibc's
                # mmap threshold rises after large frees), so they explain a backend's run-to-run spread
                faults[backend].append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0)
            except Exception as e:
                rows[backend]["error"] = error_text(e)
            bar.update(1)
    # float32 references for the error columns: the torch backend's image (render) or loss (train step)
    ref_out = fns["torch"][1]().detach().float() if case in ("render", "train_step") and "torch" in fns else None
    n_rays = args.batch * S * S
    for backend, row in rows.items():
        ts = times.get(backend)
        if not ts or "error" in row:
            row.update(ms_median=float("nan"), rays_per_s=float("nan"), gflops=float("nan"),
                       pct_of_bmm=float("nan"), peak_mem_mb=float("nan"))
            continue
        t = statistics.median(ts)
        gflops = flops_per_ray(case) * n_rays / t / 1e9
        row.update(ms_median=t * 1e3, ms_all=[x * 1e3 for x in ts], rays_per_s=n_rays / t, gflops=gflops,
                   pct_of_bmm=100 * gflops / yard, page_faults_median=statistics.median(faults[backend]))
        if backend in BF16_BACKENDS:  # bf16 rows: also the share of the bf16 bmm rate
            row["pct_of_bmm_bf16"] = 100 * gflops / yard16
        if device.type == "cuda":  # growth over what is allocated before the run, as on the CPU
            model, fn = fns[backend]
            model.zero_grad(set_to_none=True)
            sync(device)
            base = torch.cuda.memory_allocated()
            torch.cuda.reset_peak_memory_stats()
            fn()
            sync(device)
            row["peak_mem_mb"] = (torch.cuda.max_memory_allocated() - base) / 2 ** 20
            if case == "train_step" and not backend.endswith("+compile"):
                row["step_mem_mb"] = cuda_step_mem_mb(model, S, args.batch, device)
        if ref_out is not None and backend != "torch":
            out = fns[backend][1]().detach().float()
            if case == "render":
                row["psnr_vs_torch_db"] = psnr01(out, ref_out)
            else:
                row["loss_rel_err_vs_torch"] = float((out - ref_out).abs() / ref_out.abs())
    fns.clear()
    bar.update(bar.total - bar.n - len(rows) * n_mem)  # backends that failed to build had no timed runs
    if device.type == "cpu":
        for backend, row in rows.items():
            if "error" in row or args.no_memory:
                row.setdefault("peak_mem_mb", float("nan"))
                bar.update(n_mem)
                continue
            bar.set_postfix_str(f"{backend} peak memory (a child process)")
            row["peak_mem_mb"] = child_peak_mb(case, backend, args.batch, S, device)
            bar.update(1)
            if case == "train_step":
                row["step_mem_mb"] = child_peak_mb(case, backend, args.batch, S, device, resident_grads=True)
                bar.update(1)
    bar.close()
    ref = rows.get("torch", {}).get("ms_median")
    ref_all = rows.get("torch", {}).get("ms_all")
    for backend, row in rows.items():
        row["speedup_vs_torch"] = ref / row["ms_median"] if ref and row["ms_median"] == row["ms_median"] \
            else float("nan")
        if backend != "torch" and ref_all and len(row.get("ms_all", ())) == len(ref_all):
            # repeat i of every backend ran back to back: the ratio per repeat cancels most load changes
            ratios = sorted(t / f for t, f in zip(ref_all, row["ms_all"]))
            row["speedup_vs_torch_paired"] = {"median": statistics.median(ratios), "min": ratios[0],
                                              "max": ratios[-1]}
        print_row(row)
    return list(rows.values())


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--batch", type=int, default=2, help="scenes B")
    p.add_argument("--sizes", default="64,128", help="view sizes S (N = S*S rays per scene)")
    p.add_argument("--cases", default="mlp,march,render,train_step")
    p.add_argument("--backends",
                   default="fused,fused-recompute,fused-store,torch,torch+autocast,torch+compile,fused+compile,"
                           "fused-bf16")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--rounds", type=int, default=1, help="run every case this many times, each with fresh models, "
                   "and summarise the speed-ups over the rounds (min / median / max): on a shared machine one "
                   "round's ratio moves with the load")
    p.add_argument("--quick", action="store_true", help="64x64 only, 2 repeats, no torch.compile backends")
    p.add_argument("--no-memory", action="store_true", help="skip the CPU peak-memory child processes")
    p.add_argument("--keep-freed-memory", action="store_true", help="CPU: glibc keeps freed memory for reuse, as the "
                   "command-line tools do on the CPU (srn_fast.cpu_memory), for every backend's timed runs (the "
                   "memory children keep glibc's defaults); default: glibc's defaults, as in a plain script")
    p.add_argument("--no-progress", action="store_true", help="no progress bar (stderr) while a case runs")
    p.add_argument("--json", help="write the results here")
    p.add_argument("--note", default="", help="free text stored in the JSON (e.g. 'machine shared')")
    p.add_argument("--child", nargs=6, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        return child_main(*args.child)
    if args.rounds < 1:
        p.error(f"--rounds: expected a positive count, got {args.rounds}")
    if args.quick:
        args.sizes, args.repeats = "64", 2
        args.backends = ",".join(b for b in args.backends.split(",") if not b.endswith("+compile"))
    device = torch.device(args.device)
    if device.type == "cpu" and not srn_fast.fused_available():
        sys.exit("the fused backend is not built: pip install --no-build-isolation . first")
    kept = False
    if args.keep_freed_memory:
        from srn_fast.cpu_memory import keep_freed_memory

        kept = keep_freed_memory()
    yard = bmm_gflops(device, args.repeats)
    print(f"device {device} | torch {torch.__version__} | threads {torch.get_num_threads()} | "
          f"batched-matmul rate {yard:.1f} GFLOP/s (re-measured before every case)"
          + (" | freed memory kept for reuse" if kept else ""))
    rows, mlp_rows = [], []
    cases = args.cases.split(",")
    if "mlp" in cases:
        import mlp_bench

        mlp_rows = mlp_bench.run_mlp_cases(device.type if device.type == "cpu" else str(device), quick=args.quick)
        mlp_bench.print_table(mlp_rows)
        print()
    summary = []
    for S in [int(s) for s in args.sizes.split(",")]:
        for case in (c for c in cases if c != "mlp"):
            case_rows = []
            for k in range(args.rounds):
                for row in run_case(case, S, args, device):
                    case_rows.append(dict(row, round=k) if args.rounds > 1 else row)
            rows += case_rows
            if args.rounds > 1:
                summary += summarise_rounds(case_rows)
    yards = [r["bmm_gflops"] for r in rows if r.get("bmm_gflops")]
    yard = statistics.median(yards) if yards else yard
    result = {
        "device": str(device) if device.type == "cpu" else torch.cuda.get_device_name(device),
        **machine_facts(str(device)), "srn_fast_version": srn_fast.__version__,
        "batched_matmul_gflops": yard, "freed_memory_kept": kept, "note": args.note,
        "rounds": args.rounds, "cases": rows, "mlp_cases": mlp_rows,
    }
    if summary:
        result["round_summary"] = summary
    if args.json:
        files.write_json(args.json, result, default=float, makedirs=True)
        print(f"wrote {args.json}")
    return 0


def summarise_rounds(rows):
    """Per backend of one case, the speed-up over the torch backend in every round: min, median and max of the
    rounds' median ratios and of their paired ratios. Printed, and returned for the JSON."""
    out = []
    for backend in dict.fromkeys(r["backend"] for r in rows):
        mine = [r for r in rows if r["backend"] == backend]
        ratios = [r["speedup_vs_torch"] for r in mine if r["speedup_vs_torch"] == r["speedup_vs_torch"]]
        paired = [r["speedup_vs_torch_paired"]["median"] for r in mine if "speedup_vs_torch_paired" in r]
        if backend == "torch" or not ratios:
            continue
        item = {"name": mine[0]["name"], "backend": backend, "rounds": len(ratios),
                "speedup_vs_torch": [min(ratios), statistics.median(ratios), max(ratios)],
                "speedup_vs_torch_paired": [min(paired), statistics.median(paired), max(paired)] if paired else None}
        out.append(item)
        line = (f"{item['name']:<20}{backend:<15}x torch over {len(ratios)} rounds: min {min(ratios):.2f}, "
                f"median {statistics.median(ratios):.2f}, max {max(ratios):.2f}")
        if paired:
            line += f" (paired medians {min(paired):.2f} / {statistics.median(paired):.2f} / {max(paired):.2f})"
        print(line, flush=True)
    return out


_HEADER = False


def print_row(r):
    global _HEADER
    if not _HEADER:
        print(f"{'case':<20}{'backend':<15}{'ms':>10}{'rays/s':>12}{'x torch':>9}{'GFLOP/s':>9}{'% bmm':>7}"
              f"{'peak MB':>9}{'step MB':>9}  notes")
        _HEADER = True
    notes = [r["error"]] if "error" in r else []
    if "speedup_vs_torch_paired" in r:
        p = r["speedup_vs_torch_paired"]
        notes.append(f"paired x torch {p['median']:.2f} ({p['min']:.2f}-{p['max']:.2f})")
    if "psnr_vs_torch_db" in r:
        notes.append(f"PSNR vs torch fp32 {r['psnr_vs_torch_db']:.1f} dB")
    if "loss_rel_err_vs_torch" in r:
        notes.append(f"loss rel. err. vs torch fp32 {r['loss_rel_err_vs_torch']:.1e}")
    if "pct_of_bmm_bf16" in r:
        notes.append(f"{r['pct_of_bmm_bf16']:.0f}% of bf16 bmm ({r['bmm_bf16_gflops']:.0f} GFLOP/s)")
    if "page_faults_median" in r:
        notes.append(f"{r['page_faults_median']:.0f} page faults")
    notes = "; ".join(notes)
    print(f"{r['name']:<20}{r['backend']:<15}{r['ms_median']:>10.1f}{r['rays_per_s']:>12.0f}"
          f"{r.get('speedup_vs_torch', float('nan')):>9.2f}{r['gflops']:>9.1f}{r['pct_of_bmm']:>7.0f}"
          f"{r['peak_mem_mb']:>9.0f}{r.get('step_mem_mb', float('nan')):>9.0f}  {notes}", flush=True)


if __name__ == "__main__":
    sys.exit(main())
