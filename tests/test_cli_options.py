"""The command line's shape: the same commands as documented, the shared options defined once with the same
defaults everywhere, and no argument parsing in the domain packages."""
import argparse
import ast
import os

import srn_fast
from srn_fast.cli import COMMANDS, build_parser

PACKAGE_DIR = os.path.dirname(os.path.abspath(srn_fast.__file__))
DOCUMENTED = ["make-data", "train", "eval", "render", "reconstruct", "demo", "semantic-train", "semantic-eval",
              "baseline-train", "baseline-eval", "compare"]
# option -> (default, the commands that have it); every command has --no-progress
SHARED = {"--device": ("auto", set(DOCUMENTED) - {"make-data"}),
          "--backend": ("auto", set(DOCUMENTED) - {"make-data", "baseline-train", "baseline-eval"}),
          "--seed": (0, {"make-data", "train", "eval", "reconstruct", "semantic-train", "baseline-train", "compare"}),
          "--no-progress": (False, set(DOCUMENTED))}


def _subparsers():
    parser = build_parser()
    action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return action.choices


def test_commands_are_the_documented_ones_and_live_in_cli():
    assert list(_subparsers()) == DOCUMENTED
    assert all(mod.startswith("srn_fast.cli.") for mod in COMMANDS.values())


def test_shared_options_are_defined_once_with_the_same_defaults():
    helps = {}
    for command, sub in _subparsers().items():
        shared = next(g for g in sub._action_groups if g.title == "shared options")
        opts = {s: a for a in shared._group_actions for s in a.option_strings}
        for name, (default, where) in SHARED.items():
            assert (name in opts) == (command in where), (command, name)
            if name not in opts:
                continue
            a = opts[name]
            # train keeps None (= not given on the command line, for --resume) and shows the same default
            assert a.default == default or (command == "train" and a.default is None), (command, name, a.default)
            text = a.help.split(":")[0] if name == "--seed" else a.help  # what --seed seeds differs by command
            helps.setdefault(name, set()).add(text)
            if name != "--no-progress":
                assert f"(default: {default})" in a.help, (command, name, a.help)
    assert all(len(h) == 1 for h in helps.values()), helps


def test_domain_packages_parse_no_arguments():
    bad = []
    for pkg in ("data", "semantic", "baseline", "compare"):
        for folder, _, names in os.walk(os.path.join(PACKAGE_DIR, pkg)):
            for n in (n for n in names if n.endswith(".py")):
                path = os.path.join(folder, n)
                with open(path) as fh:
                    tree = ast.parse(fh.read(), path)
                for node in ast.walk(tree):
                    if isinstance(node, (ast.Import, ast.ImportFrom)):
                        mods = [a.name for a in node.names] + [getattr(node, "module", None) or ""]
                        if any(m == "argparse" or m.endswith("cli") or ".cli." in m for m in mods):
                            bad.append(f"{os.path.relpath(path, PACKAGE_DIR)}:{node.lineno}: imports {mods}")
                    if isinstance(node, ast.FunctionDef) and node.name == "add_arguments":
                        bad.append(f"{os.path.relpath(path, PACKAGE_DIR)}:{node.lineno}: defines add_arguments")
    assert not bad, "\n".join(bad)


def test_make_data_quiet_is_no_progress():
    sub = _subparsers()["make-data"]
    assert sub.parse_args(["--out", "x", "--quiet"]).no_progress
    assert sub.parse_args(["--out", "x", "--no-progress"]).no_progress
    assert not sub.parse_args(["--out", "x"]).no_progress
