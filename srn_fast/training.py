"""The reference SRN training (auto-decoder: one latent code per training object): the public entry point.

As the reference ``train.py``: Adam (lr 5e-5), loss ``200 * MSE + 1e-3 * depth regulariser + 1 * mean(z^2)``
(:meth:`SRNModel.losses`), a schedule of (sidelength, batch size, steps) stages, one random view of one object per
batch row. Additions: random ray subsets per view, bf16 matmuls, validation PSNR/SSIM on held-out views, a JSON-lines
metrics log, atomic checkpoints with exact resume, and multi-process data parallelism (DDP, launched by torchrun).

:func:`train` runs it. The loop itself (setup, restore, the step/log/validate/save loop, run-folder locking, health
checks) lives in :mod:`srn_fast.train_loop`, the parts it is built from (configuration, batches, metrics log) in
:mod:`srn_fast.train_parts`; this module re-exports their public names, so that ``srn_fast.training.TrainConfig``
and friends stay where users import them from. Few-shot fitting of new objects moved to :mod:`srn_fast.fewshot`
(``fit_latents`` is re-exported here too).
"""
from .fewshot import fit_latents
from .train_loop import train
from .train_parts import (BatchStream, ExtraLoss, MetricsLog, TrainConfig, camera_facts_of, prepare_batch,
                          read_metrics, rng_state, sample_generator, set_rng_state, split_roots)

__all__ = ["train", "TrainConfig", "ExtraLoss", "BatchStream", "prepare_batch", "sample_generator", "split_roots",
           "MetricsLog", "read_metrics", "rng_state", "set_rng_state", "camera_facts_of", "fit_latents"]
