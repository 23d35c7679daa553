"""The documentation names files that exist: every repository path in backticks or in a relative link in the
README and docs/*.md, and every bare name of a committed benchmark result (``cpu_*.json``, ``mlp_*.json``,
``fewshot_*.json``, ``bf16_*.json`` in backticks; other bare names are files the commands write) under
benchmarks/results/ or docs/results/. Catches docs that drift when files move."""
import glob
import os
import re
from pathlib import Path

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DOCS = [os.path.join(ROOT, "README.md")] + sorted(glob.glob(os.path.join(ROOT, "docs", "*.md")))
TOP = ("srn_fast/", "csrc/", "benchmarks/", "docs/", "tests/", ".ci/")
RESULT_DIRS = ("benchmarks/results", "docs/results")


def referenced_paths(text: str):
    """Repository paths (with a top-level folder) in backticks and in relative markdown links, and bare names of
    committed result files in backticks."""
    paths, results = set(), set()
    for tok in re.findall(r"`([^`\s]+)`", text):
        tok = tok.rstrip(".,:;")
        if tok.startswith(TOP) and "*" not in tok and "<" not in tok and "{" not in tok:
            paths.add(tok)
        elif re.fullmatch(r"(cpu|mlp|fewshot|bf16)_[\w.-]+\.json", tok):
            results.add(tok)
    for target in re.findall(r"\]\(([^)\s#]+)\)", text):
        if not re.match(r"[a-z]+://", target):
            paths.add(target)
    return paths, results


@pytest.mark.parametrize("doc", DOCS, ids=[os.path.relpath(d, ROOT) for d in DOCS])
def test_named_files_exist(doc):
    text = Path(doc).read_text(encoding="utf-8")
    paths, results = referenced_paths(text)
    base = os.path.dirname(doc)
    missing = []
    for p in sorted(paths):
        if not (os.path.exists(os.path.join(ROOT, p)) or os.path.exists(os.path.join(base, p))):
            missing.append(p)
    for name in sorted(results):
        if not any(os.path.exists(os.path.join(ROOT, d, name)) for d in RESULT_DIRS):
            missing.append(name)
    assert not missing, f"{os.path.relpath(doc, ROOT)} names files that do not exist: {missing}"


def test_the_scan_finds_paths():
    """The scanner itself: it must see a backticked path, a link and a bare result name (else the test above
    passes on nothing)."""
    paths, results = referenced_paths("see `srn_fast/model.py`, [x](docs/architecture.md), `cpu_x.json` "
                                         "and `report.json`.")
    assert paths == {"srn_fast/model.py", "docs/architecture.md"} and results == {"cpu_x.json"}
