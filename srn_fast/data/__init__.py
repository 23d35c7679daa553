"""Data: the SRN dataset format (:class:`SRNDataset`) and a generator of procedural multi-view datasets with
exact depth and part labels (:func:`generate`, CLI ``python -m srn_fast make-data``).

>>> from srn_fast.data import SRNDataset, generate
>>> generate("chairs", instances=8, views=50, size=64, seed=0, out="/tmp/chairs")
>>> ds = SRNDataset("/tmp/chairs/train", sidelength=64)
>>> batch = next(iter(torch.utils.data.DataLoader(ds, batch_size=4, shuffle=True)))   # SRNModel's input
"""
from .dataset import DataWarning, SRNDataset
from .generator import generate, load_meta, load_shape
from .io import DEPTH_SCALE, DataError

DatasetError = DataError  # alias used by earlier code
from .sdf import Shape
from .shapes import KINDS, PART_NAMES

__all__ = ["SRNDataset", "DataWarning", "generate", "load_meta", "load_shape", "DataError", "DatasetError", "DEPTH_SCALE", "Shape", "KINDS",
           "PART_NAMES"]
