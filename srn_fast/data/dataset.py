"""Reader for the SRN dataset format (Sitzmann et al.'s ShapeNet renderings, and our generated scenes).

A root holds one folder per object instance (sorted by name); each has ``rgb/`` images, ``pose/`` cam2world text
files (sorted; the i-th pose belongs to the i-th image), ``intrinsics.txt``, and optionally ``depth/`` (16-bit
PNG, camera z times ``depth_scale``, 0 = background) and ``semantic/`` (8-bit part ids, 0 = background).
Conventions are the reference's: square centre crop, area resize to the sidelength, colours in [-1, 1], flattened
row-major; uv = (column, row); intrinsics rescaled to the sidelength. Depth and labels are resized with nearest
neighbour (exact only at the native size).
"""
from __future__ import annotations

import os
from typing import Dict, List, Optional, Sequence

import imageio.v2 as imageio
import numpy as np
import torch
from torch.utils.data import Dataset

from .. import geometry

IMAGE_EXTS = (".png", ".jpg", ".jpeg")


class DatasetError(ValueError):
    """A dataset folder or file that does not follow the SRN format."""


def _list(folder: str, exts) -> List[str]:
    return sorted(os.path.join(folder, f) for f in os.listdir(folder) if f.lower().endswith(exts))


def square_crop(img: np.ndarray) -> np.ndarray:
    """The reference's centre crop to a square (``min_dim // 2`` on each side of the centre)."""
    h, w = img.shape[:2]
    m = min(h, w)
    ch, cw = h // 2, w // 2
    return img[ch - m // 2:ch + m // 2, cw - m // 2:cw + m // 2]


def _area_matrix(n_in: int, n_out: int) -> np.ndarray:
    """[n_out, n_in] weights of area averaging (OpenCV INTER_AREA when shrinking)."""
    scale = n_in / n_out
    A = np.zeros((n_out, n_in), dtype=np.float64)
    for i in range(n_out):
        lo, hi = i * scale, (i + 1) * scale
        j0, j1 = int(np.floor(lo)), int(np.ceil(hi))
        for j in range(j0, min(j1, n_in)):
            A[i, j] = max(0.0, min(hi, j + 1) - max(lo, j))
        A[i] /= A[i].sum()
    return A


def area_resize(img: np.ndarray, size: int) -> np.ndarray:
    """Area-filtered resize of ``[H, W, C]`` float image to ``[size, size, C]``."""
    if img.shape[0] == size and img.shape[1] == size:
        return img
    Ay = _area_matrix(img.shape[0], size)
    Ax = _area_matrix(img.shape[1], size)
    return np.einsum("ij,jkc,lk->ilc", Ay, img, Ax).astype(np.float32)


def nearest_resize(img: np.ndarray, size: int) -> np.ndarray:
    if img.shape[0] == size and img.shape[1] == size:
        return img
    ys = np.minimum(((np.arange(size) + 0.5) * img.shape[0] / size).astype(int), img.shape[0] - 1)
    xs = np.minimum(((np.arange(size) + 0.5) * img.shape[1] / size).astype(int), img.shape[1] - 1)
    return img[ys][:, xs]


def _read_image(path: str) -> np.ndarray:
    try:
        img = imageio.imread(path)
    except Exception as e:  # imageio raises many types
        raise DatasetError(f"{path}: cannot read image ({e})") from None
    if img.ndim not in (2, 3) or img.size == 0:
        raise DatasetError(f"{path}: expected an image of shape [H, W] or [H, W, C], got {img.shape}")
    return np.asarray(img)


def load_rgb(path: str, sidelength: int) -> np.ndarray:
    """``[S*S, 3]`` float32 in [-1, 1]."""
    img = _read_image(path)
    if img.ndim == 2:
        img = np.stack([img] * 3, -1)
    img = img[..., :3]
    if img.shape[-1] == 1:
        img = np.repeat(img, 3, -1)
    scale = 65535.0 if img.dtype == np.uint16 else 255.0
    img = img.astype(np.float32) / scale
    img = area_resize(square_crop(img), sidelength)
    return ((img - 0.5) * 2.0).reshape(-1, 3)


def load_depth(path: str, sidelength: int, depth_scale: float) -> np.ndarray:
    """``[S*S, 1]`` float32 camera z (0 = background)."""
    img = _read_image(path)
    if img.ndim != 2:
        raise DatasetError(f"{path}: depth image must have one channel, got shape {img.shape}")
    d = img.astype(np.float32) / depth_scale
    return nearest_resize(square_crop(d), sidelength).reshape(-1, 1)


def load_semantic(path: str, sidelength: int) -> np.ndarray:
    img = _read_image(path)
    if img.ndim == 3:
        img = img[..., 0]
    return nearest_resize(square_crop(img), sidelength).reshape(-1).astype(np.int64)


class SceneInstance:
    """The files of one object instance, validated."""

    def __init__(self, folder: str, max_observations: int = -1,
                 specific_observation_idcs: Optional[Sequence[int]] = None):
        self.folder = folder
        self.name = os.path.basename(folder.rstrip("/"))
        rgb_dir, pose_dir = os.path.join(folder, "rgb"), os.path.join(folder, "pose")
        for d in (rgb_dir, pose_dir):
            if not os.path.isdir(d):
                raise DatasetError(f"{folder}: missing folder '{os.path.basename(d)}/' (an SRN instance needs rgb/, "
                                   f"pose/ and intrinsics.txt)")
        self.intrinsics_path = os.path.join(folder, "intrinsics.txt")
        if not os.path.isfile(self.intrinsics_path):
            raise DatasetError(f"{folder}: missing intrinsics.txt")
        rgb = _list(rgb_dir, IMAGE_EXTS)
        pose = _list(pose_dir, (".txt",))
        if not rgb:
            raise DatasetError(f"{rgb_dir}: no images (.png/.jpg)")
        if len(rgb) != len(pose):
            raise DatasetError(f"{folder}: {len(rgb)} images in rgb/ but {len(pose)} poses in pose/; they must pair up")
        extra = {}
        for sub, exts in (("depth", IMAGE_EXTS), ("semantic", IMAGE_EXTS)):
            d = os.path.join(folder, sub)
            if os.path.isdir(d):
                files = _list(d, exts)
                if len(files) != len(rgb):
                    raise DatasetError(f"{folder}: {len(files)} files in {sub}/ but {len(rgb)} images in rgb/")
                extra[sub] = files
        n = len(rgb)
        if specific_observation_idcs is not None:
            idcs = list(specific_observation_idcs)
            bad = [i for i in idcs if not -n <= i < n]
            if bad:
                raise DatasetError(f"{folder}: specific_observation_idcs {bad} out of range for {n} views")
            idcs = [i % n for i in idcs]
        elif max_observations is not None and 0 < max_observations < n:
            idcs = np.linspace(0, n, num=max_observations, endpoint=False, dtype=int).tolist()
        else:
            idcs = list(range(n))
        self.observation_idcs = idcs
        self.rgb = [rgb[i] for i in idcs]
        self.pose = [pose[i] for i in idcs]
        self.depth = [extra["depth"][i] for i in idcs] if "depth" in extra else None
        self.semantic = [extra["semantic"][i] for i in idcs] if "semantic" in extra else None
        self.poses = [geometry.load_pose(p).astype(np.float32) for p in self.pose]
        self._intr: Dict[int, np.ndarray] = {}
        self.intrinsics(64)  # validate now, not in a worker

    def intrinsics(self, sidelength: int) -> np.ndarray:
        if sidelength not in self._intr:
            self._intr[sidelength] = geometry.parse_intrinsics(self.intrinsics_path, sidelength).K.astype(np.float32)
        return self._intr[sidelength]

    def __len__(self):
        return len(self.rgb)


class SRNDataset(Dataset):
    """All (instance, view) pairs of an SRN-format root; ``ds[i]`` is a dict the model takes after collation.

    Args:
        root: folder of instance folders.
        sidelength: image size S the views are resized to (``set_sidelength`` changes it between stages).
        max_num_instances: use the first that many instances (sorted), -1 for all.
        max_observations: evenly spaced views per instance (the reference's ``np.linspace`` pick), -1 for all.
        specific_observation_idcs: exactly these view indices of every instance (few-shot).
        num_rays: if given, each sample holds that many random rays of the view (the same rays for every key).
        cache: keep decoded, resized arrays in memory (decode each image once).
        with_depth, with_semantic: load ``depth/`` and ``semantic/`` when present.
        depth_scale: depth PNG units per scene unit (10000 for generated data).

    Sample keys: ``instance_idx``, ``observation_idx`` (int64 scalars), ``rgb [N, 3]``, ``pose [4, 4]``,
    ``intrinsics [4, 4]``, ``uv [N, 2]``, and when available ``depth [N, 1]``, ``semantic [N]``.
    """

    def __init__(self, root: str, sidelength: int = 64, max_num_instances: int = -1, max_observations: int = -1,
                 specific_observation_idcs: Optional[Sequence[int]] = None, num_rays: Optional[int] = None,
                 cache: bool = True, with_depth: bool = True, with_semantic: bool = True,
                 depth_scale: float = 10000.0, seed: int = 0):
        root = os.fspath(root)
        if not os.path.isdir(root):
            raise DatasetError(f"{root}: data folder not found")
        folders = sorted(os.path.join(root, d) for d in os.listdir(root) if os.path.isdir(os.path.join(root, d)))
        if not folders:
            raise DatasetError(f"{root}: no instance folders (expected <root>/<instance>/rgb, pose, intrinsics.txt)")
        if max_num_instances is not None and max_num_instances > 0:
            folders = folders[:max_num_instances]
        self.root = root
        self.instances = [SceneInstance(f, max_observations, specific_observation_idcs) for f in folders]
        self.instance_names = [inst.name for inst in self.instances]
        self.num_instances = len(self.instances)
        self.index = [(i, v) for i, inst in enumerate(self.instances) for v in range(len(inst))]
        self.sidelength = int(sidelength)
        self.num_rays = num_rays
        self.cache = cache
        self.with_depth = with_depth
        self.with_semantic = with_semantic
        self.depth_scale = depth_scale
        self._cache: Dict[tuple, np.ndarray] = {}
        self.has_depth = all(inst.depth is not None for inst in self.instances)
        self.has_semantic = all(inst.semantic is not None for inst in self.instances)
        self._uv = {}

    def num_views(self, i: int) -> int:
        return len(self.instances[i])

    def set_sidelength(self, sidelength: int) -> None:
        self.sidelength = int(sidelength)

    def __len__(self) -> int:
        return len(self.index)

    def _get(self, kind: str, i: int, v: int) -> np.ndarray:
        key = (kind, self.sidelength, i, v)
        if self.cache and key in self._cache:
            return self._cache[key]
        inst = self.instances[i]
        if kind == "rgb":
            arr = load_rgb(inst.rgb[v], self.sidelength)
        elif kind == "depth":
            arr = load_depth(inst.depth[v], self.sidelength, self.depth_scale)
        else:
            arr = load_semantic(inst.semantic[v], self.sidelength)
        if self.cache:
            self._cache[key] = arr
        return arr

    def uv(self) -> torch.Tensor:
        if self.sidelength not in self._uv:
            self._uv[self.sidelength] = geometry.uv_grid(self.sidelength)
        return self._uv[self.sidelength]

    def __getitem__(self, idx: int) -> Dict[str, torch.Tensor]:
        i, v = self.index[idx]
        inst = self.instances[i]
        S = self.sidelength
        sample = {
            "instance_idx": torch.tensor(i, dtype=torch.int64),
            "observation_idx": torch.tensor(inst.observation_idcs[v], dtype=torch.int64),
            "rgb": torch.from_numpy(self._get("rgb", i, v)),
            "pose": torch.from_numpy(inst.poses[v]),
            "intrinsics": torch.from_numpy(inst.intrinsics(S)),
            "uv": self.uv(),
        }
        if self.with_depth and inst.depth is not None:
            sample["depth"] = torch.from_numpy(self._get("depth", i, v))
        if self.with_semantic and inst.semantic is not None:
            sample["semantic"] = torch.from_numpy(self._get("semantic", i, v))
        if self.num_rays is not None and self.num_rays < S * S:
            sel = torch.randperm(S * S)[: self.num_rays]
            for k in ("rgb", "uv", "depth", "semantic"):
                if k in sample:
                    sample[k] = sample[k][sel]
        return sample
