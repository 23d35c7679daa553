"""Training parity of bf16 matmuls against float32 (issue 14): one training run of the demo's configuration.

    python benchmarks/bf16_parity.py OUT SEED fp32|bf16      # e.g. OUT = parity/fp32_s0

Generates the demo's data once beside OUT (3 procedural chairs x 40 views at 32 px), trains the demo's model
(phi 64, latent 32, 1,500 steps, lr 1e-3) on the fused backend with one thread, in float32 or with
``--bf16`` (bf16 matmuls, float32 accumulation), scores the held-out views and writes OUT.json: held-out PSNR /
SSIM, training seconds and the machine's facts. Run several seeds of both: two runs with the same seed diverge after
the first bf16 rounding, so only means over seeds compare precisions (see
``benchmarks/results/bf16_parity_demo_xeon_avx512bf16.json``).
"""
from __future__ import annotations

import os
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


def main(argv) -> int:
    if len(argv) != 3 or argv[2] not in ("fp32", "bf16"):
        print("usage: python benchmarks/bf16_parity.py OUT SEED fp32|bf16", file=sys.stderr)
        return 2
    out, seed, precision = os.path.abspath(argv[0]), int(argv[1]), argv[2]
    torch.set_num_threads(1)
    data = os.path.join(os.path.dirname(out), "data")
    if not os.path.isdir(os.path.join(data, "test")):
        generate(out=data, progress=False, **DEMO_DATA)
    cfg = TrainConfig(data=data, out=out, backend="fused", device="cpu", bf16=precision == "bf16",
                      **dict(DEMO_TRAIN, seed=seed))
    t = time.time()
    res = train(cfg, progress=False)
    seconds = time.time() - t
    test = SRNDataset(os.path.join(data, "test"), sidelength=cfg.sidelengths[-1], with_depth=False,
                      with_semantic=False)
    ev = evaluate(res["model"], test, keep_images=0, progress=False)
    result = {"seed": seed, "precision": precision, "heldout_psnr": ev["psnr"], "heldout_ssim": ev["ssim"],
              "train_seconds": seconds, "steps": res["step"],
              "matmul_dtype": str(res["model"].resolved_matmul_dtype(torch.device("cpu"))), **machine_facts()}
    print(f"{precision} seed {seed}: held-out PSNR {ev['psnr']:.2f} dB, SSIM {ev['ssim']:.3f}, "
          f"trained in {seconds:.0f} s")
    files.write_json(out + ".json", result)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
