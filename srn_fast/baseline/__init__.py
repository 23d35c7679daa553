"""The 2D encoder-decoder novel-view baseline (Tatarchenko et al. 2016) that SRN is compared against."""
from .data import PairDataset, eval_pairs, heldout_views, image_sample, locate, to_flat, to_image
from ..metrics import depth_abs_error
from .model import POSE_MODES, TatarchenkoNet, baseline_loss, viewpoint_vector
from .train import evaluate, load_checkpoint, predict_views, save_checkpoint, train

__all__ = ["TatarchenkoNet", "baseline_loss", "depth_abs_error", "viewpoint_vector", "POSE_MODES", "PairDataset",
           "eval_pairs", "locate", "heldout_views", "image_sample", "to_flat", "to_image", "train", "evaluate",
           "predict_views", "save_checkpoint", "load_checkpoint"]
