"""Data: the SRN dataset reader and the generator of multi-view scenes with exact ground truth."""
from .dataset import DatasetError, SceneInstance, SRNDataset, area_resize, square_crop
from .generate import DEPTH_SCALE, generate, instance_parts, load_meta

__all__ = ["SRNDataset", "SceneInstance", "DatasetError", "generate", "load_meta", "instance_parts",
           "DEPTH_SCALE", "area_resize", "square_crop"]
