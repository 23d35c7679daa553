"""``SRNDataset``: every (instance, view) pair of an SRN-format folder, with the reference's conventions.

Layout of ``root`` (as SRN's ShapeNet sets)::

    root/<instance>/rgb/*.png|jpg       views (sorted by file name)
    root/<instance>/pose/*.txt          cam2world 4x4, one per view, same count as rgb/
    root/<instance>/intrinsics.txt      f cx cy _ / barycenter / scale / height width [/ world2cam flag]
    root/<instance>/depth/*.png|npy     optional: camera z (16-bit PNG counts of 1e-4, or float .npy)
    root/<instance>/semantic/*.png      optional: part ids (0 = background)

Instances are the sorted sub-folders of ``root``. Images are centre-cropped to a square, area-resized to the
sidelength and mapped to [-1, 1]; intrinsics are rescaled to the sidelength (:func:`srn_fast.geometry.
parse_intrinsics`); depth and part ids are nearest-resized (see :mod:`srn_fast.data.io`).
"""
from __future__ import annotations

import bisect
import os
import warnings
from typing import Dict, List, Optional, Sequence

import numpy as np
import torch
from torch.utils.data import Dataset, get_worker_info

from ..geometry import load_pose, parse_intrinsics
from . import io
from .io import DataError

DEPTH_EXTS = (".png", ".npy")


def _listdir(folder: str) -> List[str]:
    return sorted(n for n in os.listdir(folder) if not n.startswith("."))


def _files(folder: str, exts: Sequence[str], what: str) -> List[str]:
    """Sorted files of ``folder`` with one of ``exts``; any other (non-hidden) file is an error."""
    names = _listdir(folder)
    bad = [n for n in names if not n.lower().endswith(tuple(exts)) or os.path.isdir(os.path.join(folder, n))]
    if bad:
        raise DataError(f"{os.path.join(folder, bad[0])}: unexpected entry in {what}/ (expected only "
                        f"{'/'.join(exts)} files; {len(bad)} such entr{'y' if len(bad) == 1 else 'ies'})")
    return [os.path.join(folder, n) for n in names]


class DataWarning(UserWarning):
    """Data that is probably not what the user meant (given once per dataset, naming the file)."""


class _Instance:
    """File lists and poses of one instance folder (validated on construction)."""

    def __init__(self, folder: str, want_depth: bool, want_semantic: bool):
        self.folder = folder
        self.name = os.path.basename(folder.rstrip(os.sep))
        rgb_dir, pose_dir = os.path.join(folder, "rgb"), os.path.join(folder, "pose")
        for d, what in ((rgb_dir, "rgb"), (pose_dir, "pose")):
            if not os.path.isdir(d):
                raise DataError(f"{d}: missing {what}/ folder (an SRN instance needs rgb/, pose/ and "
                                f"intrinsics.txt)")
        self.intrinsics_path = os.path.join(folder, "intrinsics.txt")
        if not os.path.isfile(self.intrinsics_path):
            raise DataError(f"{self.intrinsics_path}: missing intrinsics file")
        self.rgb = _files(rgb_dir, io.IMAGE_EXTS, "rgb")
        self.pose_paths = _files(pose_dir, (".txt",), "pose")
        if not self.rgb:
            raise DataError(f"{rgb_dir}: no images (.png/.jpg) in rgb/")
        if len(self.rgb) != len(self.pose_paths):
            raise DataError(f"{folder}: {len(self.rgb)} images in rgb/ but {len(self.pose_paths)} pose files in "
                            f"pose/ (need one pose per image)")
        self.depth = self._optional("depth", DEPTH_EXTS) if want_depth else None
        self.semantic = self._optional("semantic", (".png",)) if want_semantic else None
        # parse everything small now, so a bad file fails at construction and names itself
        self.info = parse_intrinsics(self.intrinsics_path)
        poses = np.stack([load_pose(p) for p in self.pose_paths])
        if self.info.world2cam_poses:  # the flag says the files hold world2cam: invert to cam2world
            poses = np.linalg.inv(poses)
        self.poses = poses.astype(np.float32)
        self.K = {}

    def _optional(self, sub: str, exts) -> Optional[List[str]]:
        d = os.path.join(self.folder, sub)
        if not os.path.isdir(d):
            return None
        files = _files(d, exts, sub)
        if len(files) != len(self.rgb):
            raise DataError(f"{d}: {len(files)} files in {sub}/ but {len(self.rgb)} images in rgb/ "
                            f"(need one per image)")
        return files

    def intrinsics(self, sidelength: int) -> np.ndarray:
        if sidelength not in self.K:
            self.K[sidelength] = parse_intrinsics(self.intrinsics_path, sidelength).K.astype(np.float32)
        return self.K[sidelength]


class SRNDataset(Dataset):
    """All (instance, view) pairs of an SRN-format ``root``; ``ds[i]`` is a dict SRNModel takes after collate.

    Args:
        root: folder whose sorted sub-folders are the instances.
        sidelength: images are square-cropped and resized to ``sidelength`` (change it with
            :meth:`set_sidelength` between training stages).
        max_num_instances: keep only the first this many instances (-1: all).
        max_observations: keep this many evenly spaced views per instance, indices
            ``np.linspace(0, n, k, endpoint=False).astype(int)`` as the reference (-1 or >= n: all).
        specific_observation_idcs: keep exactly these view indices of every instance (overrides
            ``max_observations``; e.g. ``[64]`` or ``[64, 104]`` for few-shot).
        num_rays: if given, each sample holds this many random pixels (the same subset for every key) instead
            of the whole image; drawn afresh at every access.
        cache: keep every decoded and resized view in memory (keyed by sidelength), so each file is decoded
            once. DataLoader workers each fill their own copy: call :meth:`preload` before creating the
            loader (workers inherit the filled cache) or use ``persistent_workers=True``.
        with_depth, with_semantic: include ``depth`` / ``semantic`` when every instance has the folder
            (an error if only some have it).
        seed: seed of the random ray subsets (mixed with the DataLoader worker seed inside workers).

    Sample keys: ``instance_idx`` int64 scalar, ``observation_idx`` int64 scalar (index of the view among the
    instance's sorted files), ``rgb`` [N, 3] float32 in [-1, 1], ``pose`` [4, 4] float32 cam2world,
    ``intrinsics`` [4, 4] float32, ``uv`` [N, 2] float32 (column, row), and when present ``depth`` [N, 1]
    float32 (camera z, 0 = background) and ``semantic`` [N] int64 (0 = background). N = sidelength^2 in
    row-major pixel order, or ``num_rays``.
    """

    def __init__(self, root: str, sidelength: int = 64, max_num_instances: int = -1, max_observations: int = -1,
                 specific_observation_idcs: Optional[Sequence[int]] = None, num_rays: Optional[int] = None,
                 cache: bool = True, with_depth: bool = True, with_semantic: bool = True, seed: int = 0):
        root = os.fspath(root)
        if not os.path.isdir(root):
            raise DataError(f"{root}: dataset root folder not found")
        dirs = [os.path.join(root, n) for n in _listdir(root) if os.path.isdir(os.path.join(root, n))]
        if not dirs:
            raise DataError(f"{root}: no instance folders in the dataset root (expected <instance>/rgb, "
                            f"<instance>/pose, <instance>/intrinsics.txt)")
        names = {os.path.basename(d) for d in dirs}
        if {"train"} <= names and not os.path.isdir(os.path.join(root, "train", "rgb")) and \
                not os.path.isdir(os.path.join(root, "train", "pose")):
            raise DataError(f"{root}: this looks like a generated dataset's top folder (it has train/); pass "
                            f"{os.path.join(root, 'train')} (or test/, unseen/) as the root")
        if max_num_instances is not None and max_num_instances != -1:
            if max_num_instances < 1:
                raise ValueError(f"max_num_instances must be -1 (all) or >= 1, got {max_num_instances}")
            dirs = dirs[:max_num_instances]
        self.root = root
        self.instances = [_Instance(d, with_depth, with_semantic) for d in dirs]
        self.instance_names = [inst.name for inst in self.instances]
        self.num_instances = len(self.instances)
        self.has_depth = self._all_or_none("depth", with_depth)
        self.has_semantic = self._all_or_none("semantic", with_semantic)

        self.view_indices: List[np.ndarray] = []
        for inst in self.instances:
            n = len(inst.rgb)
            if specific_observation_idcs is not None:
                idcs = np.atleast_1d(np.asarray(specific_observation_idcs, dtype=np.int64))
                if idcs.size == 0 or idcs.min() < 0 or idcs.max() >= n:
                    raise DataError(f"{inst.folder}: specific_observation_idcs {idcs.tolist()} out of range for "
                                    f"its {n} views")
            elif max_observations is not None and max_observations != -1 and max_observations < n:
                if max_observations < 1:
                    raise ValueError(f"max_observations must be -1 (all) or >= 1, got {max_observations}")
                idcs = np.linspace(0, n, num=max_observations, endpoint=False).astype(np.int64)
            else:
                idcs = np.arange(n, dtype=np.int64)
            self.view_indices.append(idcs)
        self._offsets = np.cumsum([0] + [len(v) for v in self.view_indices]).tolist()
        for inst, idcs in zip(self.instances, self.view_indices):
            inst.observation_idcs = [int(v) for v in idcs]  # file index of each selected view
        # (instance, position among the instance's selected views) of every sample, in order
        self.index = [(i, v) for i in range(len(self.instances)) for v in range(len(self.view_indices[i]))]

        if num_rays is not None and (int(num_rays) != num_rays or num_rays < 1):
            raise ValueError(f"num_rays must be a positive integer or None, got {num_rays!r}")
        self.num_rays = num_rays
        self.cache = cache
        self.seed = seed
        self._cache: Dict = {}
        self._uv: Dict[int, torch.Tensor] = {}
        self._rng = None
        self._rng_owner = None
        self._size_checked = set()  # (instance, sidelength) pairs whose image size was compared
        self._warned = set()  # kinds of DataWarning already given by this dataset
        self.sidelength = None
        self.set_sidelength(sidelength)

    def _all_or_none(self, sub: str, wanted: bool) -> bool:
        if not wanted:
            return False
        have = [getattr(inst, sub) is not None for inst in self.instances]
        if any(have) and not all(have):
            missing = self.instances[have.index(False)].folder
            raise DataError(f"{os.path.join(missing, sub)}: missing {sub}/ folder while other instances have one "
                            f"(pass with_{sub}=False to ignore {sub} everywhere)")
        return all(have)

    # ------------------------------------------------------------------------------------------ API
    def set_sidelength(self, sidelength: int) -> None:
        """Resize to ``sidelength`` from now on (multi-resolution training); cached sizes are kept."""
        if int(sidelength) != sidelength or sidelength < 1:
            raise ValueError(f"sidelength must be a positive integer, got {sidelength!r}")
        sidelength = int(sidelength)
        if self.num_rays is not None and self.num_rays > sidelength * sidelength:
            raise ValueError(f"num_rays={self.num_rays} exceeds the {sidelength}x{sidelength} = "
                             f"{sidelength * sidelength} pixels of a view")
        self.sidelength = sidelength

    def num_views(self, i: int) -> int:
        """Number of (selected) views of instance ``i``."""
        return len(self.view_indices[i])

    def clear_cache(self) -> None:
        self._cache.clear()

    def __len__(self) -> int:
        return self._offsets[-1]

    def locate(self, index: int):
        """``(instance index, view index among the instance's sorted files)`` of sample ``index``."""
        if index < 0:
            index += len(self)
        if not 0 <= index < len(self):
            raise IndexError(f"index {index} out of range for a dataset of {len(self)} views")
        i = bisect.bisect_right(self._offsets, index) - 1
        return i, int(self.view_indices[i][index - self._offsets[i]])

    def preload(self, progress: bool = True) -> None:
        """Decode and resize every view at the current sidelength into the cache (needs ``cache=True``)."""
        if not self.cache:
            raise ValueError("preload() needs cache=True")
        from tqdm import tqdm
        for i in tqdm(range(len(self)), desc=f"loading {self.sidelength}px", disable=not progress):
            self._arrays(*self.locate(i))

    # ------------------------------------------------------------------------------------------ loading
    def _arrays(self, i: int, v: int) -> Dict[str, np.ndarray]:
        S = self.sidelength
        key = (S, i, v)
        hit = self._cache.get(key)
        if hit is not None:
            return hit
        inst = self.instances[i]
        if (i, S) not in self._size_checked:
            self._check_size(inst, inst.rgb[v], S)
            self._size_checked.add((i, S))
        arr = {"rgb": io.load_rgb(inst.rgb[v], S).reshape(-1, 3)}
        if self.has_depth:
            arr["depth"] = self._checked(inst.depth[v], io.load_depth(inst.depth[v], S), S).reshape(-1, 1)
        if self.has_semantic:
            sem = self._checked(inst.semantic[v], io.load_semantic(inst.semantic[v], S), S).reshape(-1)
            if sem.min() < 0:
                raise DataError(f"{inst.semantic[v]}: negative part id")
            arr["semantic"] = sem
        if self.cache:
            self._cache[key] = arr
        return arr

    def _warn_once(self, kind: str, msg: str) -> None:
        if kind not in self._warned:
            self._warned.add(kind)
            warnings.warn(msg, DataWarning, stacklevel=4)

    def _check_size(self, inst: "_Instance", path: str, S: int) -> None:
        """Warn (once per dataset) when intrinsics.txt's image size is not the images' own (the reference's
        rescaling of f, cx, cy to the sidelength would then be wrong) or when S upsamples the images."""
        h, w = io.image_size(path)
        if (h, w) != (round(inst.info.height), round(inst.info.width)):
            self._warn_once("intrinsics_size",
                            f"{inst.intrinsics_path}: says the images are {inst.info.width:g} x {inst.info.height:g} "
                            f"(line 4, height width) but {path} is {w} x {h}: the focal length and principal point "
                            f"are rescaled from the file's size, so the cameras are probably wrong (further "
                            f"instances are not reported)")
        if S > min(h, w):
            self._warn_once(f"upsample{S}",
                            f"{path}: the images ({w} x {h}, centre-cropped to {min(h, w)} x {min(h, w)}) are smaller "
                            f"than the sidelength {S}: they are upsampled, which adds no detail (use a sidelength "
                            f"<= {min(h, w)}; further files are not reported)")

    @staticmethod
    def _checked(path: str, a: np.ndarray, S: int) -> np.ndarray:
        if a.shape[:2] != (S, S):
            raise DataError(f"{path}: image is too small or empty after cropping ({list(a.shape)})")
        return a

    def _generator(self) -> np.random.Generator:
        info = get_worker_info()
        owner = (os.getpid(), None if info is None else info.id)
        if self._rng is None or self._rng_owner != owner:
            extra = [] if info is None else [info.seed % (2 ** 63), info.id]
            self._rng = np.random.default_rng(np.random.SeedSequence([self.seed] + extra))
            self._rng_owner = owner
        return self._rng

    def _uv_grid(self, S: int) -> torch.Tensor:
        if S not in self._uv:
            rows, cols = np.meshgrid(np.arange(S), np.arange(S), indexing="ij")
            self._uv[S] = torch.from_numpy(np.stack([cols.ravel(), rows.ravel()], -1).astype(np.float32))
        return self._uv[S]

    def __getitem__(self, index: int) -> Dict[str, torch.Tensor]:
        i, v = self.locate(int(index))
        inst = self.instances[i]
        S = self.sidelength
        arr = self._arrays(i, v)
        uv = self._uv_grid(S)
        sample = {
            "instance_idx": torch.tensor(i, dtype=torch.int64),
            "observation_idx": torch.tensor(v, dtype=torch.int64),
            "pose": torch.from_numpy(inst.poses[v].copy()),
            "intrinsics": torch.from_numpy(inst.intrinsics(S).copy()),
        }
        if self.num_rays is not None:
            sel = self._generator().choice(S * S, size=self.num_rays, replace=False)
            sample["uv"] = uv[torch.from_numpy(sel)]
            for k, a in arr.items():
                sample[k] = torch.from_numpy(a[sel])
        else:
            sample["uv"] = uv.clone()
            for k, a in arr.items():
                sample[k] = torch.from_numpy(a.copy())
        return sample

    def __repr__(self) -> str:
        if not hasattr(self, "_offsets"):
            return "SRNDataset(<not constructed>)"
        return (f"SRNDataset({self.root!r}, {self.num_instances} instances, {len(self)} views, "
                f"sidelength={self.sidelength}, num_rays={self.num_rays}, depth={self.has_depth}, "
                f"semantic={self.has_semantic})")
