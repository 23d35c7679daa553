"""Test-session set-up: which srn_fast is tested, the tests' helper modules, shared fixtures.

Which srn_fast: the tests run against what ``import srn_fast`` gives *outside* the source tree when that copy has
its compiled extension (a non-editable ``pip install .``), even when pytest is started from the source root
(``python -m pytest`` puts the current folder first on sys.path, and the source copy there has no ``_C`` after a
non-editable install). We chose this explicit check over a ``src/`` layout because the package folder stays where
the design and the users' reference-style imports expect it (``srn_fast/`` at the top), and over relying on
``--import-mode=importlib`` alone because ``python -m pytest`` would still shadow the install. With an editable
install, or none, the source tree is what is tested. The header of every run names the copy and whether ``_C``
loaded; the op tests fail (not skip) when it did not, unless ``SRN_FAST_ALLOW_NO_EXT=1`` (see op_utils).
"""
import glob
import importlib
import importlib.util
import os
import sys

import pytest
import torch

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)


def _prefer_installed_copy():
    """Drop the source root from sys.path when an installed srn_fast with its extension exists elsewhere."""
    if "srn_fast" in sys.modules:
        return
    is_root = [os.path.realpath(p or os.getcwd()) == ROOT for p in sys.path]
    if not any(is_root):
        return
    saved = list(sys.path)
    sys.path[:] = [p for p, r in zip(saved, is_root) if not r]
    importlib.invalidate_caches()
    spec = importlib.util.find_spec("srn_fast")
    locs = list(spec.submodule_search_locations or []) if spec else []
    if locs and os.path.realpath(locs[0]) != os.path.join(ROOT, "srn_fast") and \
            glob.glob(os.path.join(locs[0], "_C*.so")):
        return  # the installed copy, with its extension
    sys.path[:] = saved


_prefer_installed_copy()
sys.path.insert(0, HERE)  # the tests' helper modules (op_utils, _spheres): this folder, not the source root

# Deterministic, quiet, and bounded on the 2-core CI machine.
torch.set_num_threads(min(2, os.cpu_count() or 1))


def pytest_sessionstart(session):
    """First line of every run (also with -q): which srn_fast is tested and whether its extension loaded."""
    from srn_fast import _ext

    reporter = session.config.pluginmanager.get_plugin("terminalreporter")
    if reporter is not None:
        reporter.write_line(_ext.describe())


@pytest.fixture
def one_thread():
    """One intra-op thread for the test (tiny models and convolutions: as fast, and far faster when other programs
    share the cores); a module opts in with ``pytestmark = pytest.mark.usefixtures("one_thread")``."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


#: the bf16 routes that need CPU instructions (srn_fast's own kernels), and what they need
CPU_ROUTES = {"avx512bf16": "AVX512-BF16", "amx": "AMX-BF16 (and Linux's permission for the tile data)"}


@pytest.fixture
def bf16_route(request):
    """The CPU bf16 GEMM route named by the test's indirect parameter ("auto", "mkl", "onednn", "widened",
    "avx512bf16", "amx", or "amx-mkl": amx with its weight gradients on MKL's bf16 GEMM), set for the test and
    the measured choice restored after it. A route this torch build or CPU lacks ("mkl" without MKL's bf16 GEMM,
    "avx512bf16" without AVX512-BF16, "amx" without AMX-BF16: "needs a CPU with ...") skips the test; test_cpu_gemm.py checks that the routes
    measured are the ones the build and CPU have."""
    import srn_fast
    from srn_fast.ops import precision

    name = request.param
    route = name.replace("-mkl", "")  # "amx-mkl": amx with its weight gradients on MKL's bf16 GEMM
    if route != "auto" and route not in precision.tile_gemm_rates():
        if route in CPU_ROUTES:  # hardware this machine lacks, like a GPU (.ci/install_and_test.sh accepts the words)
            pytest.skip(f"needs a CPU with {CPU_ROUTES[route]}: this one has no {route} bf16 GEMM")
        pytest.skip(f"this torch build has no {route} bf16 GEMM")
    if name == "amx-mkl" and "mkl" not in precision.tile_gemm_rates():
        pytest.skip("this torch build has no MKL bf16 GEMM for amx's weight gradients")
    ext = srn_fast._ext.load()
    ext.set_cpu_bf16_route(route)
    ext.set_cpu_amx_weight_grad_mkl(name != route)
    yield name
    ext.set_cpu_bf16_route("auto")
    ext.set_cpu_amx_weight_grad_mkl(False)


@pytest.fixture
def rng():
    return torch.Generator().manual_seed(0)


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory):
    """A generated SRN-format dataset: 2 chairs x 6 views (+2 held-out views each), 1 unseen chair x 4 views, 16 px."""
    from srn_fast.data import generate

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    out = tmp_path_factory.mktemp("tiny") / "chairs"
    out = generate("chairs", instances=2, views=6, size=16, seed=0, out=str(out), test_views=2,
                   unseen_instances=1, unseen_views=4, progress=False)
    torch.set_num_threads(n)
    return out
