"""Training parity of bf16 matmuls against float32 (issue 14): one training run of the demo's configuration.

    python benchmarks/bf16_parity.py OUT SEED fp32|bf16|fp32-torch     # e.g. OUT = parity/fp32_s0
    python benchmarks/bf16_parity.py --summarize DIR RESULT.json [NOTE]  # every DIR/*.json run -> one result

Generates the demo's data once beside OUT (3 procedural chairs x 40 views at 32 px), trains the demo's model
(phi 64, latent 32, 1,500 steps, lr 1e-3) with one thread, scores the held-out views and writes OUT.json: held-out
PSNR / SSIM, training seconds and the machine's facts. ``fp32`` and ``bf16`` train on the fused backend, in float32
or with ``--bf16`` (bf16 matmuls, float32 accumulation); ``fp32-torch`` is the control: float32 on the torch
backend (the reference's arithmetic), the same numbers summed in another order. Two runs with the same seed diverge
after their first differing rounding, so the control measures how far two float32 runs of one seed land apart:
the floor under any same-seed comparison. Run several seeds of each; ``--summarize`` writes the per-precision
means, the same-seed differences of bf16 and of the control against fused float32, and the machine's facts
(``benchmarks/results/bf16_parity_demo_*.json``).
"""
from __future__ import annotations

import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_env import import_srn_fast, machine_facts  # noqa: E402

import torch  # noqa: E402

import_srn_fast()
from srn_fast import files  # noqa: E402
from srn_fast.cli.demo import DEMO_DATA, DEMO_TRAIN  # noqa: E402
from srn_fast.data import SRNDataset  # noqa: E402
from srn_fast.data.generator import generate  # noqa: E402
from srn_fast.evaluation import evaluate  # noqa: E402
from srn_fast.training import TrainConfig, train  # noqa: E402


PRECISIONS = ("fp32", "bf16", "fp32-torch")
USAGE = ("usage: python benchmarks/bf16_parity.py OUT SEED fp32|bf16|fp32-torch\n"
         "       python benchmarks/bf16_parity.py --summarize DIR RESULT.json [NOTE]")


def _mean(xs):
    return sum(xs) / len(xs) if xs else None


def summarize(folder: str, result: str, note: str = "") -> int:
    """Collect every run in ``folder`` (the OUT.json files) into one result with means and same-seed deltas."""
    import json

    runs = []
    for name in sorted(os.listdir(folder)):
        if name.endswith(".json"):
            with open(os.path.join(folder, name)) as fh:
                run = json.load(fh)
            if run.get("precision") in PRECISIONS:
                runs.append(run)
    if not runs:
        print(f"--summarize: no runs (OUT.json files with a precision) in {folder}", file=sys.stderr)
        return 2
    psnr = {(r["precision"], r["seed"]): r["heldout_psnr"] for r in runs}
    seeds = sorted({r["seed"] for r in runs})
    summary = {}
    for prec in PRECISIONS:
        vals = [psnr[(prec, s)] for s in seeds if (prec, s) in psnr]
        summary[prec] = {"runs": len(vals), "mean_psnr": _mean(vals),
                         "mean_train_seconds": _mean([r["train_seconds"] for r in runs if r["precision"] == prec])}
        if prec != "fp32":
            delta = {s: psnr[(prec, s)] - psnr[("fp32", s)] for s in seeds if (prec, s) in psnr and ("fp32", s) in psnr}
            d = list(delta.values())
            summary[prec]["same_seed_delta_db_vs_fp32"] = delta
            summary[prec]["mean_abs_same_seed_delta_db"] = _mean([abs(v) for v in d])
            # the paired mean difference and its standard error: what "within X dB of float32" can be judged by
            summary[prec]["mean_same_seed_delta_db"] = _mean(d)
            summary[prec]["sem_db"] = (statistics.stdev(d) / len(d) ** 0.5) if len(d) > 1 else None
            summary[prec]["median_same_seed_delta_db"] = statistics.median(d) if d else None
    facts = {k: v for k, v in runs[0].items() if k not in ("seed", "precision", "heldout_psnr", "heldout_ssim",
                                                            "train_seconds", "steps", "matmul_dtype", "backend")}
    out = {"benchmark": "bf16 training parity (issue 14, line 3)",
           "command": "python benchmarks/bf16_parity.py OUT SEED {fp32,bf16,fp32-torch}; --summarize DIR RESULT",
           **facts, "runs": [{k: r[k] for k in ("seed", "precision", "backend", "heldout_psnr", "heldout_ssim",
                                                 "train_seconds", "steps", "matmul_dtype") if k in r} for r in runs],
           "summary": summary, "note": note}
    files.write_json(result, out)
    for prec, row in summary.items():
        if not row["runs"]:
            continue
        d = row.get("mean_abs_same_seed_delta_db")
        extra = "" if d is None else (f", same-seed delta vs fp32: mean {row['mean_same_seed_delta_db']:+.2f} dB"
                                      f" (s.e. {row['sem_db'] or 0:.2f}), mean |delta| {d:.2f} dB")
        print(f"{prec:>10}: {row['runs']} runs, mean held-out PSNR {row['mean_psnr']:.2f} dB{extra}")
    print(f"wrote {result}")
    return 0


def main(argv) -> int:
    if argv[:1] == ["--summarize"] and len(argv) in (3, 4):
        return summarize(argv[1], argv[2], *argv[3:])
    if len(argv) != 3 or argv[2] not in PRECISIONS:
        print(USAGE, file=sys.stderr)
        return 2
    out, seed, precision = os.path.abspath(argv[0]), int(argv[1]), argv[2]
    torch.set_num_threads(1)
    data = os.path.join(os.path.dirname(out), "data")
    if not os.path.isdir(os.path.join(data, "test")):
        generate(out=data, progress=False, **DEMO_DATA)
    backend = "torch" if precision == "fp32-torch" else "fused"
    cfg = TrainConfig(data=data, out=out, backend=backend, device="cpu", bf16=precision == "bf16",
                      **dict(DEMO_TRAIN, seed=seed))
    t = time.time()
    res = train(cfg, progress=False)
    seconds = time.time() - t
    test = SRNDataset(os.path.join(data, "test"), sidelength=cfg.sidelengths[-1], with_depth=False,
                      with_semantic=False)
    ev = evaluate(res["model"], test, keep_images=0, progress=False)
    result = {"seed": seed, "precision": precision, "backend": backend, "heldout_psnr": ev["psnr"],
              "heldout_ssim": ev["ssim"], "train_seconds": seconds, "steps": res["step"],
              "matmul_dtype": str(res["model"].resolved_matmul_dtype(torch.device("cpu"))), **machine_facts()}
    print(f"{precision} seed {seed}: held-out PSNR {ev['psnr']:.2f} dB, SSIM {ev['ssim']:.3f}, "
          f"trained in {seconds:.0f} s")
    files.write_json(out + ".json", result)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
