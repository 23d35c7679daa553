"""Image pairs (input view, target view) of the same object, from an SRN-format root, for the baseline."""
from __future__ import annotations

import bisect
import random
import weakref
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
from torch.utils.data import Dataset

from ..data import SRNDataset


def to_image(flat: torch.Tensor, sidelength: int) -> torch.Tensor:
    """Row-major flattened pixels ``[..., S*S, C]`` -> image ``[..., C, S, S]``."""
    S = sidelength
    if flat.shape[-2] != S * S:
        raise ValueError(f"expected {S * S} pixels (sidelength {S}), got {flat.shape[-2]}")
    return flat.reshape(*flat.shape[:-2], S, S, flat.shape[-1]).movedim(-1, -3)


def to_flat(image: torch.Tensor) -> torch.Tensor:
    """Image ``[..., C, S, S]`` -> row-major flattened pixels ``[..., S*S, C]``."""
    return image.movedim(-3, -1).reshape(*image.shape[:-3], -1, image.shape[-3])


_OFFSETS: "weakref.WeakKeyDictionary[SRNDataset, List[int]]" = weakref.WeakKeyDictionary()


def _offsets(ds: SRNDataset) -> List[int]:
    """``[num_instances + 1]`` position in ``ds`` of each instance's first (selected) view."""
    off = _OFFSETS.get(ds)
    if off is None:
        off = np.concatenate([[0], np.cumsum([ds.num_views(i) for i in range(ds.num_instances)])]).tolist()
        _OFFSETS[ds] = off
    return off


def _flat_index(ds: SRNDataset, instance: int, view: int) -> int:
    """Position in ``ds`` of view ``view`` (among the instance's selected views) of ``instance``."""
    if not 0 <= instance < ds.num_instances:
        raise IndexError(f"instance {instance} out of range for {ds.num_instances} instances")
    if not 0 <= view < ds.num_views(instance):
        raise IndexError(f"view {view} out of range for {ds.num_views(instance)} views of instance {instance}")
    return _offsets(ds)[instance] + view


def locate(ds: SRNDataset, index: int) -> Tuple[int, int]:
    """``(instance, view position among the instance's selected views)`` of sample ``index`` of ``ds``."""
    off = _offsets(ds)
    if not 0 <= index < off[-1]:
        raise IndexError(f"index {index} out of range for a dataset of {off[-1]} views")
    i = bisect.bisect_right(off, index) - 1
    return i, index - off[i]


def image_sample(ds: SRNDataset, instance: int, view: int) -> Dict[str, torch.Tensor]:
    """One view as images: ``rgb [3, S, S]``, ``pose [4, 4]``, ``intrinsics [4, 4]`` and, when the dataset has
    depth, ``depth [1, S, S]``; plus ``observation_idx``."""
    s = ds[_flat_index(ds, instance, view)]
    S = ds.sidelength
    out = {"rgb": to_image(s["rgb"], S), "pose": s["pose"], "intrinsics": s["intrinsics"],
           "observation_idx": s["observation_idx"]}
    if "depth" in s:
        out["depth"] = to_image(s["depth"], S)
    return out


class PairDataset(Dataset):
    """Every view of every object as an input, each paired with a random OTHER view of the same object.

    ``pairs[k]`` is a dict: ``input_rgb [3, S, S]``, ``input_pose [4, 4]``, ``target_rgb [3, S, S]``,
    ``target_pose [4, 4]``, ``target_depth [1, S, S]`` (when the root has depth), ``instance_idx`` (int64).
    The target is redrawn at every access (from ``seed``), so each epoch sees new pairs.
    """

    def __init__(self, ds: SRNDataset, seed: int = 0):
        if ds.num_rays is not None:
            raise ValueError("PairDataset needs whole images: build the SRNDataset with num_rays=None")
        few = [ds.instance_names[i] for i in range(ds.num_instances) if ds.num_views(i) < 2]
        if few:
            raise ValueError(f"{ds.root}: every object needs at least 2 views to form (input, target) pairs; "
                             f"{few[:3]} {'...' if len(few) > 3 else ''}have 1")
        self.ds = ds
        self.rng = random.Random(seed)

    def __len__(self) -> int:
        return len(self.ds)

    def __getitem__(self, idx: int) -> Dict[str, torch.Tensor]:
        i, v = locate(self.ds, idx)
        t = self.rng.randrange(self.ds.num_views(i) - 1)
        t = t + 1 if t >= v else t
        a, b = image_sample(self.ds, i, v), image_sample(self.ds, i, t)
        out = {"input_rgb": a["rgb"], "input_pose": a["pose"], "target_rgb": b["rgb"], "target_pose": b["pose"],
               "instance_idx": torch.tensor(i, dtype=torch.int64)}
        if "depth" in b:
            out["target_depth"] = b["depth"]
        return out


def heldout_views(num_views: int, input_view: int, max_targets: Optional[int] = None) -> List[int]:
    """The target views of an object for evaluation: every view but ``input_view`` (evenly spaced subset of
    ``max_targets`` when given)."""
    if not -num_views <= input_view < num_views:
        raise ValueError(f"input view {input_view} out of range for an object with {num_views} views")
    input_view %= num_views
    rest = [v for v in range(num_views) if v != input_view]
    if max_targets is not None and 0 < max_targets < len(rest):
        rest = [rest[k] for k in np.linspace(0, len(rest), num=max_targets, endpoint=False, dtype=int)]
    return rest


def eval_pairs(ds: SRNDataset, input_view: int = 0, max_targets: Optional[int] = None,
               instances: Optional[Sequence[int]] = None) -> List[Tuple[int, int, List[int]]]:
    """``[(instance, input_view, [target views])]`` for every object of ``ds`` (or ``instances``)."""
    idx = range(ds.num_instances) if instances is None else instances
    return [(i, input_view % ds.num_views(i), heldout_views(ds.num_views(i), input_view, max_targets)) for i in idx]
