"""srn_fast.files, the one module that writes files: atomic replacement, strict JSON, images; and a check that no
other module of the package writes a file by hand."""
import ast
import json
import os
from pathlib import Path

import numpy as np
import pytest

from srn_fast import files

PACKAGE = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "srn_fast")


def no_constants(name):
    raise ValueError(f"non-strict JSON constant {name}")


def test_json_is_strict(tmp_path):
    path = str(tmp_path / "r.json")
    files.write_json(path, {"psnr": float("inf"), "per_image": [{"ssim": float("nan")}, {"ssim": 0.5}],
                            "depth": np.float64("nan")})
    assert json.loads(Path(path).read_text(), parse_constant=no_constants) == \
        {"psnr": None, "per_image": [{"ssim": None}, {"ssim": 0.5}], "depth": None}
    assert files.strict_json([float("-inf"), 1.5]) == "[null, 1.5]"


def test_interrupted_write_keeps_the_old_file(tmp_path):
    path = str(tmp_path / "c.pth")
    files.atomic_write(path, lambda fh: fh.write(b"old"))

    def boom(fh):
        fh.write(b"partial")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        files.atomic_write(path, boom)
    assert Path(path).read_bytes() == b"old" and os.listdir(tmp_path) == ["c.pth"]
    assert os.stat(path).st_mode & 0o777 == files.FILE_MODE


def test_missing_folder(tmp_path):
    with pytest.raises(files.OutputError, match="output folder does not exist"):
        files.write_text(str(tmp_path / "no" / "a.txt"), "x")
    assert files.write_text(str(tmp_path / "no" / "a.txt"), "x", makedirs=True, fsync=False)
    assert Path(tmp_path / "no" / "a.txt").read_text() == "x"


def test_images_round_trip(tmp_path):
    import imageio.v2 as imageio
    from PIL import Image

    img = np.random.default_rng(0).integers(0, 256, (6, 5, 3), dtype=np.uint8)
    assert (imageio.imread(files.write_png(str(tmp_path / "a.png"), img)) == img).all()
    depth = np.arange(30, dtype=np.uint16).reshape(6, 5) * 1000
    assert (np.asarray(Image.open(files.write_png(str(tmp_path / "d.png"), depth, compress_level=1))) == depth).all()
    gif = files.write_gif(str(tmp_path / "o.gif"), [img, 255 - img], fps=5)
    assert len(imageio.mimread(gif)) == 2
    torch = pytest.importorskip("torch")
    t = files.save_torch(str(tmp_path / "t.pt"), {"x": torch.arange(3)})
    assert torch.load(t)["x"].tolist() == [0, 1, 2]


# Writing outside srn_fast.files, allowed where a whole file is not the unit of writing:
ALLOWED = {
    ("train_parts.py", "open"): "metrics.jsonl is an append-only log, one flushed line per record",
    ("runfolder.py", "os.open"): "the run lock file (flock)",
}
WRITE_CALLS = {"json.dump", "torch.save", "np.save", "numpy.save", "imageio.imwrite", "imageio.mimsave",
               "os.open", "os.replace"}


def _call_name(node):
    f = node.func
    parts = []
    while isinstance(f, ast.Attribute):
        parts.append(f.attr)
        f = f.value
    if isinstance(f, ast.Name):
        parts.append(f.id)
    return ".".join(reversed(parts))


def _writes(path):
    """(call, line) of every call in ``path`` that writes a file."""
    out = []
    for node in ast.walk(ast.parse(Path(path).read_text(), path)):
        if not isinstance(node, ast.Call):
            continue
        name = _call_name(node)
        if name == "open":
            mode = node.args[1] if len(node.args) > 1 else next((k.value for k in node.keywords if k.arg == "mode"),
                                                                 None)
            if isinstance(mode, ast.Constant) and any(c in str(mode.value) for c in "wax+"):
                out.append((name, node.lineno))
        elif name in WRITE_CALLS or name.endswith(".save") and name.split(".")[0] in ("im", "img", "image"):
            out.append((name, node.lineno))
    return out


def test_every_file_is_written_by_srn_fast_files():
    bad = []
    for folder, _, names in os.walk(PACKAGE):
        for n in names:
            if not n.endswith(".py") or n == "files.py" and folder == PACKAGE:
                continue
            path = os.path.join(folder, n)
            rel = os.path.relpath(path, PACKAGE)
            bad += [f"{rel}:{line}: {call}" for call, line in _writes(path) if (rel, call) not in ALLOWED]
    assert not bad, "files written by hand instead of through srn_fast.files:\n" + "\n".join(bad)


def test_the_check_sees_a_hand_written_file(tmp_path):
    p = tmp_path / "m.py"
    p.write_text("import json\ndef f(o, x):\n    with open(o, 'w') as fh:\n        json.dump(x, fh)\n")
    assert [c for c, _ in _writes(str(p))] == ["open", "json.dump"]
