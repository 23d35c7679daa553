"""Command-line interface: ``python -m srn_fast COMMAND ...``.

Every command lives in its own module of this package (the domain packages ``data``, ``semantic``, ``baseline``,
``compare`` parse no arguments), exposing ``HELP`` (one line), ``add_arguments(parser)`` and ``run(args) -> int``;
:data:`COMMANDS` maps command names to those modules. The options the commands share (``--device``,
``--backend``, ``--seed``, ``--no-progress``) are defined once, in :func:`srn_fast.cli.common.add_shared_options`. Errors a user can fix (:class:`UserError`, bad files, bad arguments) are printed as
one line, without a traceback, unless ``--debug`` is given.
"""
from __future__ import annotations

import argparse
import importlib
import sys
from typing import List, Optional

from .errors import UserError  # the commands raise it (``from . import UserError``)

# name -> module path. Add a command by adding a module and a line here.
COMMANDS = {
    "make-data": "srn_fast.cli.make_data",
    "train": "srn_fast.cli.train",
    "eval": "srn_fast.cli.eval",
    "render": "srn_fast.cli.render",
    "reconstruct": "srn_fast.cli.reconstruct",
    "demo": "srn_fast.cli.demo",
    "semantic-train": "srn_fast.cli.semantic_train",
    "semantic-eval": "srn_fast.cli.semantic_eval",
    "baseline-train": "srn_fast.cli.baseline_train",
    "baseline-eval": "srn_fast.cli.baseline_eval",
    "compare": "srn_fast.cli.compare",
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m srn_fast",
                                     description="Scene Representation Networks with fused C++/CUDA kernels.")
    parser.add_argument("--debug", action="store_true", help="show full tracebacks on errors")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, modpath in COMMANDS.items():
        mod = importlib.import_module(modpath)
        p = sub.add_parser(name, help=mod.HELP, description=mod.HELP)
        mod.add_arguments(p)
        p.set_defaults(_run=mod.run)
    return parser


def _keep_freed_memory(device_name: Optional[str]) -> None:
    """:func:`srn_fast.cpu_memory.keep_freed_memory_for` the command's device, resolved as the command resolves it
    (an unavailable CUDA device raises the command's own error here; a name torch does not know is left for the
    command to report)."""
    from ..cpu_memory import keep_freed_memory_for
    from .common import pick_device

    try:
        device = pick_device(device_name)
    except RuntimeError:
        return
    keep_freed_memory_for(device)


def main(argv: Optional[List[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "command", None):
        parser.print_help()
        return 2
    try:
        if getattr(args, "release_memory", True) is False:  # a command with --device: a CPU run keeps freed memory
            _keep_freed_memory(getattr(args, "device", None))
        elif getattr(args, "release_memory", False):  # ... and --release-memory gives back the ops' saved buffers too
            from ..ops import buffer_cache

            buffer_cache.set_enabled(False)
        return int(args._run(args) or 0)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except (UserError, OSError, ValueError) as e:
        if args.debug:
            raise
        msg = str(e) if not isinstance(e, OSError) or not e.filename else f"{e.strerror}: {e.filename}"
        print(f"error: {msg}", file=sys.stderr)
        return 2
