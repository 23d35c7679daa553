"""Run folders that lose no work: a lock while a process trains in them, staged replacement for ``--overwrite``,
and clean-up of the temporaries a killed process leaves behind.

* :class:`RunLock`: an exclusive ``fcntl.flock`` on ``RUN/.lock`` (the holder's pid written inside). The kernel
  releases it when the process dies, however it dies, so a lock is never stale; a second trainer of the same
  folder (two ``--resume``, a ``--resume`` while a run is going, ...) gets :class:`RunLockedError` naming the pid.
* :class:`RunFolder`: what ``train`` writes into. A new run writes into ``RUN`` itself. ``--overwrite`` of an
  existing run writes into a hidden staging folder ``RUN/.staging-<pid>-<id>`` until the new run has its first
  checkpoint; only then (:meth:`RunFolder.commit`) the old run's entries are moved aside and the new ones moved
  in, so a new run that fails early (bad data found late, a crash, non-finite loss, Ctrl-C) leaves the old run
  as it was. Files outside :data:`RUN_ENTRIES` (e.g. an ``eval/`` folder) are never touched.
* Stale temporaries: an interrupted atomic write leaves ``.NAME.XXXX.tmp`` (see
  :func:`srn_fast.files.atomic_write`), an interrupted overwrite a staging folder. Whoever holds the lock
  owns every temporary in the folder, so opening the folder removes them (:func:`clean_run_temporaries`).
  ``make-data`` names its temporary folders with its pid and removes those of dead processes
  (:func:`clean_stale_siblings`).
"""
from __future__ import annotations

import glob
import os
import re
import shutil
import uuid
import warnings
from typing import Callable, List, Optional

try:
    import fcntl
except ImportError:  # not POSIX: no locking (warned once)
    fcntl = None

LOCK_NAME = ".lock"
RUN_ENTRIES = ("checkpoints", "config.json", "metrics.jsonl", "val_latest.png")


class RunFolderError(ValueError):
    """A run folder that cannot be used as asked (taken by another run, locked, ...); the message says why."""


class RunLockedError(RunFolderError):
    """Another live process holds the folder's lock."""


def pid_alive(pid: int) -> bool:
    """Whether a process with this pid exists on this machine."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


class RunLock:
    """Exclusive lock of ``folder`` (``folder/.lock``) for as long as this object holds it.

    ``what`` names the folder's role in the error message. The lock file is removed on :meth:`release`; after a
    kill -9 it stays behind unlocked and is simply reused.
    """

    def __init__(self, folder: str, what: str = "run folder"):
        self.folder = os.path.abspath(folder)
        self.path = os.path.join(self.folder, LOCK_NAME)
        self.what = what
        self.fd: Optional[int] = None

    def acquire(self) -> "RunLock":
        if fcntl is None:
            warnings.warn(f"{self.folder}: file locking is not available on this platform; nothing stops two "
                          f"processes from training into this {self.what} at once", stacklevel=2)
            return self
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                holder = os.read(fd, 64).decode(errors="replace").strip()
                os.close(fd)
                who = f"process {holder}" if holder.isdigit() else "another process"
                raise RunLockedError(f"{self.folder}: {who} is training in this {self.what} right now; wait for "
                                     f"it to finish or stop it (two processes would mix their checkpoints and "
                                     f"metrics)") from None
            # the holder before us may have unlinked the file between our open and our flock: retry on a fresh one
            try:
                same = os.path.samestat(os.fstat(fd), os.stat(self.path))
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        self.fd = fd
        return self

    def release(self) -> None:
        if self.fd is None:
            return
        try:
            os.unlink(self.path)
        except OSError:
            pass
        os.close(self.fd)  # closing drops the flock
        self.fd = None

    def __enter__(self):
        return self.acquire()

    def __exit__(self, *exc):
        self.release()


_TMP_FILE = re.compile(r"^\..+\.[A-Za-z0-9_]+\.tmp$")  # files.atomic_write: .NAME.<random>.tmp


def clean_run_temporaries(folder: str, log: Optional[Callable[[str], None]] = None) -> List[str]:
    """Remove the temporaries an interrupted writer left in ``folder`` and ``folder/checkpoints`` (atomic-write
    ``.NAME.*.tmp`` files, staging folders of an interrupted ``--overwrite``). Call only while holding the
    folder's :class:`RunLock`. Returns the removed paths."""
    removed = []
    for d in (folder, os.path.join(folder, "checkpoints")):
        if not os.path.isdir(d):
            continue
        for name in os.listdir(d):
            p = os.path.join(d, name)
            if _TMP_FILE.match(name) and os.path.isfile(p):
                os.unlink(p)
                removed.append(p)
    for p in glob.glob(os.path.join(folder, ".staging-*")):
        shutil.rmtree(p, ignore_errors=True)
        removed.append(p)
    for p in glob.glob(os.path.join(folder, ".replaced-*")):
        # an overwrite interrupted while swapping: the old run's entries are here. Put them back if the folder
        # holds no run now; otherwise the new run is complete and they are the old run's leftovers.
        if not _has_checkpoint(folder):
            for name in os.listdir(p):
                if not os.path.exists(os.path.join(folder, name)):
                    os.rename(os.path.join(p, name), os.path.join(folder, name))
        shutil.rmtree(p, ignore_errors=True)
        removed.append(p)
    if removed and log is not None:
        log(f"removed {len(removed)} stale temporar{'y' if len(removed) == 1 else 'ies'} of an interrupted run in "
            f"{folder} (e.g. {os.path.basename(removed[0])})")
    return removed


def _has_checkpoint(folder: str) -> bool:
    return bool(glob.glob(os.path.join(folder, "checkpoints", "step_*.pth")))


def sibling_temp_name(out: str, kind: str) -> str:
    """Name of a hidden temporary next to ``out`` owned by this process: ``.NAME.KIND-<pid>-<id>``."""
    return os.path.join(os.path.dirname(out), f".{os.path.basename(out)}.{kind}-{os.getpid()}-{uuid.uuid4().hex[:8]}")


def clean_stale_siblings(out: str, kinds=("tmp", "old"), log: Optional[Callable[[str], None]] = None) -> List[str]:
    """Remove hidden ``.NAME.KIND-<pid>-<id>`` folders next to ``out`` whose process is gone (and the pid-less
    ``.NAME.KIND-<id>`` of older srn_fast versions). Returns the removed paths."""
    parent, base = os.path.dirname(os.path.abspath(out)), os.path.basename(os.path.abspath(out))
    if not os.path.isdir(parent):
        return []
    pat = re.compile(r"^\." + re.escape(base) + r"\.(" + "|".join(kinds) + r")-(?:(\d+)-)?[0-9a-f]{8}$")
    removed = []
    for name in os.listdir(parent):
        m = pat.match(name)
        if m and (m.group(2) is None or not pid_alive(int(m.group(2)))):
            shutil.rmtree(os.path.join(parent, name), ignore_errors=True)
            removed.append(os.path.join(parent, name))
    if removed and log is not None:
        log(f"removed {len(removed)} stale temporary folder(s) of an interrupted run next to {out}")
    return removed


class RunFolder:
    """The folder a training run writes into, locked while open.

    ``mode``: ``"new"`` (``out`` must not hold a run), ``"overwrite"`` (a run there is replaced once the new one
    has its first checkpoint) or ``"resume"`` (``out`` must hold a run). :attr:`path` is where files go now (the
    staging folder until :meth:`commit`, then ``out``).
    """

    def __init__(self, out: str, mode: str = "new", log: Optional[Callable[[str], None]] = None):
        if mode not in ("new", "overwrite", "resume"):
            raise ValueError(f"mode must be new, overwrite or resume, got {mode!r}")
        self.out = os.path.abspath(out)
        self.mode = mode
        self.log = log
        self.staging: Optional[str] = None
        self.lock = RunLock(self.out)

    def open(self) -> "RunFolder":
        os.makedirs(self.out, exist_ok=True)
        self.lock.acquire()
        try:
            clean_run_temporaries(self.out, self.log)
            taken = self.existing()
            if self.mode == "new" and taken:
                raise RunFolderError(f"{self.out}: already holds a run ({', '.join(taken)}); continue it with "
                                     f"--resume {self.out} or pass --overwrite")
            if self.mode == "resume" and not _has_checkpoint(self.out):
                raise RunFolderError(f"{self.out}: no checkpoint to resume from yet")
            if self.mode == "overwrite" and taken:
                self.staging = os.path.join(self.out, f".staging-{os.getpid()}-{uuid.uuid4().hex[:8]}")
                os.makedirs(self.staging)
        except BaseException:
            self.lock.release()
            raise
        return self

    def existing(self) -> List[str]:
        return [f for f in RUN_ENTRIES if os.path.exists(os.path.join(self.out, f))]

    @property
    def path(self) -> str:
        return self.staging or self.out

    def join(self, *parts: str) -> str:
        return os.path.join(self.path, *parts)

    def commit(self) -> bool:
        """Swap a staged run in for the old one (call after the new run's first checkpoint). Returns True if it
        swapped; the old run's entries are deleted afterwards."""
        if self.staging is None:
            return False
        aside = os.path.join(self.out, f".replaced-{os.getpid()}-{uuid.uuid4().hex[:8]}")
        os.makedirs(aside)
        for name in self.existing():
            os.rename(os.path.join(self.out, name), os.path.join(aside, name))
        for name in os.listdir(self.staging):
            os.rename(os.path.join(self.staging, name), os.path.join(self.out, name))
        os.rmdir(self.staging)
        self.staging = None
        shutil.rmtree(aside, ignore_errors=True)
        if self.log is not None:
            self.log(f"replaced the previous run in {self.out} (the new run has its first checkpoint)")
        return True

    def close(self) -> None:
        """Release the lock; a staged run that never reached its first checkpoint is dropped (the old run stays)."""
        if self.staging is not None:
            shutil.rmtree(self.staging, ignore_errors=True)
            if self.log is not None:
                self.log(f"the new run stopped before its first checkpoint: the previous run in {self.out} is kept")
            self.staging = None
        self.lock.release()

    def __enter__(self):
        return self.open()

    def __exit__(self, *exc):
        self.close()
