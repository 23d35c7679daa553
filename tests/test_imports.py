"""No import cycle anywhere in srn_fast: a static check of the import graph (every import statement, lazy ones inside
functions included, relative ones resolved) and every module imported in a fresh interpreter in several random
orders. Both checks are shown to fail on a package with a cycle."""
import ast
import json
import os
import random
import subprocess
import sys
import textwrap
from typing import Dict, List, Optional, Set

import srn_fast

PACKAGE_DIR = os.path.dirname(os.path.abspath(srn_fast.__file__))




def modules_of(root: str, package: str) -> Dict[str, str]:
    """``{dotted module name: file}`` of every ``.py`` file under ``root`` (the package folder named ``package``)."""
    out = {}
    for folder, dirs, files in os.walk(root):
        dirs[:] = sorted(d for d in dirs if d != "__pycache__" and os.path.isfile(os.path.join(folder, d, "__init__.py")))
        rel = os.path.relpath(folder, root)
        parts = [package] + ([] if rel == "." else rel.split(os.sep))
        for f in sorted(files):
            if f.endswith(".py"):
                name = ".".join(parts if f == "__init__.py" else parts + [f[:-3]])
                out[name] = os.path.join(folder, f)
    return out


def _ancestors(name: str) -> List[str]:
    parts = name.split(".")
    return [".".join(parts[:k]) for k in range(1, len(parts))]


def graph(root: str, package: str) -> Dict[str, Set[str]]:
    """``{module: modules it imports}``, within the package. Importing ``a.b.c`` counts as importing ``a.b.c`` and
    the packages ``a.b``, ``a`` that Python initialises first (except the importer's own parents, which are
    already being initialised); ``from a.b import name`` counts as importing ``a.b`` when ``name`` is not a
    submodule."""
    mods = modules_of(root, package)
    edges: Dict[str, Set[str]] = {}
    for name, path in mods.items():
        is_pkg = os.path.basename(path) == "__init__.py"
        here = name if is_pkg else name.rpartition(".")[0]
        with open(path) as fh:
            tree = ast.parse(fh.read(), path)
        targets: Set[str] = set()
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                targets.update(a.name for a in node.names)
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    base = here.split(".")
                    base = base[:len(base) - (node.level - 1)]
                    src = ".".join(base + ([node.module] if node.module else []))
                else:
                    src = node.module or ""
                for a in node.names:
                    sub = f"{src}.{a.name}"
                    targets.add(sub if sub in mods else src)
        own = set(_ancestors(name))
        out = set()
        for t in targets:
            if t not in mods:
                continue
            out.add(t)
            out.update(a for a in _ancestors(t) if a not in own)
        out.discard(name)
        edges[name] = out
    return edges


def find_cycle(edges: Dict[str, Set[str]]) -> Optional[List[str]]:
    """One import cycle ``[m0, m1, ..., m0]``, or None."""
    state: Dict[str, int] = {}
    stack: List[str] = []

    def visit(m):
        state[m] = 1
        stack.append(m)
        for t in sorted(edges.get(m, ())):
            if state.get(t) == 1:
                return stack[stack.index(t):] + [t]
            if t not in state:
                c = visit(t)
                if c:
                    return c
        stack.pop()
        state[m] = 2
        return None

    for m in sorted(edges):
        if m not in state:
            c = visit(m)
            if c:
                return c
    return None


def _cycle_message(cycle: List[str]) -> str:
    return "import cycle: " + " -> ".join(cycle)


def test_no_import_cycle_in_the_graph():
    edges = graph(PACKAGE_DIR, "srn_fast")
    assert len(edges) > 50 and "srn_fast.cli.compare" in edges  # the walk found the modules
    cycle = find_cycle(edges)
    assert cycle is None, _cycle_message(cycle)


# The layers of docs/architecture.md, lowest first: a module may import from its own layer and the ones below.
LAYERS = [
    ("foundations", {"types", "geometry", "metrics", "files", "viz", "cpu_memory"}),
    ("extension", {"_ext"}),
    ("ops", {"ops"}),
    ("backends", {"backends", "torch_impl"}),
    ("model & data", {"model", "layers", "checkpoint", "runfolder", "health", "data"}),
    ("workflows", {"training", "train_loop", "train_parts", "fewshot", "evaluation", "semantic", "baseline",
                   "compare"}),
    ("cli", {"cli", "__main__"}),
]


def _layer(module: str) -> int:
    parts = module.split(".")
    if len(parts) == 1:
        return len(LAYERS)  # the package's __init__: the public API, above everything
    for k, (_, names) in enumerate(LAYERS):
        if parts[1] in names:
            return k
    raise AssertionError(f"{module}: in no layer of docs/architecture.md (add it there and to LAYERS)")


def test_no_module_imports_from_a_higher_layer():
    edges = graph(PACKAGE_DIR, "srn_fast")
    up = [f"{m} ({LAYERS[_layer(m)][0]}) imports {t} ({LAYERS[_layer(t)][0]})"
          for m, ts in sorted(edges.items()) for t in sorted(ts) if _layer(t) > _layer(m)]
    assert not up, "\n".join(up)


IMPORT_ALL = textwrap.dedent("""
    import importlib, json, sys, traceback
    failed = []
    for name in json.loads(sys.argv[1]):
        try:
            importlib.import_module(name)
        except Exception:
            failed.append(name + ": " + traceback.format_exc().strip().splitlines()[-1])
    print(json.dumps(failed))
""")


def import_in_orders(root: str, names: List[str], orders: int, seed: int = 0) -> List[str]:
    """Import ``names`` in a fresh interpreter per order (sorted reversed, then ``orders`` random ones), the
    package found under ``root``; returns the failures, each naming the order and the module."""
    rng = random.Random(seed)
    perms = [sorted(names, reverse=True)] + [rng.sample(names, len(names)) for _ in range(orders)]
    env = dict(os.environ, PYTHONPATH=root + os.pathsep + os.environ.get("PYTHONPATH", ""), OMP_NUM_THREADS="1",
               PYTHONDONTWRITEBYTECODE="1")
    procs = [subprocess.Popen([sys.executable, "-c", IMPORT_ALL, json.dumps(p)], cwd=root, env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for p in perms]
    failures = []
    for k, (p, proc) in enumerate(zip(perms, procs)):
        out, err = proc.communicate(timeout=300)
        if proc.returncode != 0:
            failures.append(f"order {k}: interpreter failed: {err.strip().splitlines()[-1:]}")
            continue
        failures += [f"order {k} (first {p[0]}): {f}" for f in json.loads(out.strip().splitlines()[-1])]
    return failures


def test_every_module_imports_in_any_order():
    names = sorted(n for n in modules_of(PACKAGE_DIR, "srn_fast") if not n.endswith("__main__"))
    failures = import_in_orders(os.path.dirname(PACKAGE_DIR), names, orders=3)
    assert not failures, "\n".join(failures)


def _write_package(root, files: Dict[str, str]) -> str:
    for rel, text in files.items():
        path = os.path.join(root, rel)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "w") as fh:
            fh.write(textwrap.dedent(text))
    return os.path.join(root, "pkg")


def test_the_checks_catch_a_cycle(tmp_path):
    # a lazy relative import inside a function closes the cycle pkg.a -> pkg.sub (package) -> pkg.sub.b -> pkg.a
    pkg = _write_package(str(tmp_path), {
        "pkg/__init__.py": "",
        "pkg/a.py": "from .sub.b import B\nA = 1\n",
        "pkg/sub/__init__.py": "from .b import B\n",
        "pkg/sub/b.py": "B = 2\ndef f():\n    from ..a import A\n    return A\n",
        "pkg/c.py": "import pkg.a\n",
    })
    cycle = find_cycle(graph(pkg, "pkg"))
    assert cycle is not None and cycle[0] == cycle[-1] and {"pkg.a", "pkg.sub.b"} <= set(cycle), cycle
    # the same files with the import at the top: importing pkg.sub.b first fails, in some order
    _write_package(str(tmp_path), {"pkg/sub/b.py": "from ..a import A\nB = 2\n"})
    failures = import_in_orders(str(tmp_path), ["pkg.a", "pkg.sub.b", "pkg.c"], orders=0)
    assert failures and "cannot import name" in failures[0], failures
    # and without the cycle both checks pass
    _write_package(str(tmp_path), {"pkg/sub/b.py": "B = 2\n"})
    assert find_cycle(graph(pkg, "pkg")) is None
    assert import_in_orders(str(tmp_path), ["pkg.a", "pkg.sub.b", "pkg.c"], orders=1) == []
