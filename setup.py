"""Build srn_fast and its extension srn_fast._C.

* Always: the C++ CPU kernels.
* CUDA kernels too when torch is a CUDA build and nvcc is found (CUDAExtension, the usual path).
* SRN_FAST_FORCE_CUDA=1 with a CPU torch and nvcc installed: every .cu file is compiled with nvcc and
  cudart is linked, so a machine without a GPU proves that the CUDA sources compile and link
  (see ../shared/design.md). The extension then imports and runs its CPU path.
* SRN_FAST_NO_CUDA=1: CPU only, even with a CUDA torch.
* TORCH_CUDA_ARCH_LIST picks the GPU architectures (default for the forced build: "8.0;9.0");
  MAX_JOBS bounds the parallel compile jobs (read by torch's BuildExtension / ninja).
* SRN_FAST_NO_NATIVE=1 drops -march=native from the CPU flags (for wheels meant for other machines).

Install with `pip install --no-build-isolation .` after installing torch: an isolated build would
fetch a different torch.
"""
import glob
import os
import shutil
import sys

from setuptools import setup

try:
    import torch
    from torch.utils import cpp_extension
except ImportError:  # pragma: no cover - message for users
    sys.exit("srn_fast needs torch at build time: `pip install torch` first, then "
             "`pip install --no-build-isolation .`")

ROOT = os.path.dirname(os.path.abspath(__file__))


def _flag(name):
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")


def _find_cuda_home():
    """A CUDA toolkit folder holding bin/nvcc and lib64/libcudart.so."""
    candidates = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH")]
    nvcc = shutil.which("nvcc")
    if nvcc:
        candidates += [os.path.dirname(os.path.dirname(os.path.realpath(nvcc))),
                       os.path.dirname(os.path.dirname(nvcc))]
    candidates += ["/usr/local/cuda"] + sorted(glob.glob("/usr/local/cuda-*"), reverse=True)
    for c in candidates:
        if c and os.path.exists(os.path.join(c, "bin", "nvcc")) and \
                glob.glob(os.path.join(c, "lib64", "libcudart.so*")):
            return c
    return None


def _extension():
    os.chdir(ROOT)  # relative source paths, as setuptools wants
    cpp_sources = sorted(glob.glob("csrc/**/*.cpp", recursive=True))
    cu_sources = sorted(glob.glob("csrc/**/*.cu", recursive=True))
    stems = [os.path.splitext(os.path.basename(s))[0] for s in cpp_sources + cu_sources]
    dup = {s for s in stems if stems.count(s) > 1}
    if dup:
        sys.exit(f"csrc: source files share a base name {sorted(dup)}; object files would collide")

    cxx = ["-O3", "-std=c++20", "-fopenmp"]
    if not _flag("SRN_FAST_NO_NATIVE"):
        cxx.append("-march=native")
    nvcc = ["-O3", "-std=c++17", "--use_fast_math", "-lineinfo", "--expt-relaxed-constexpr"]
    include_dirs = [os.path.join(ROOT, "csrc")]
    define_macros = []
    link_args = ["-fopenmp"]

    force = _flag("SRN_FAST_FORCE_CUDA")
    no_cuda = _flag("SRN_FAST_NO_CUDA")
    torch_has_cuda = torch.version.cuda is not None
    if no_cuda:
        with_cuda, mode = False, "cpu (SRN_FAST_NO_CUDA=1)"
    elif torch_has_cuda and cpp_extension.CUDA_HOME is not None:
        with_cuda, mode = True, "cuda"
    elif force:
        cuda_home = _find_cuda_home()
        if cuda_home is None:
            sys.exit("SRN_FAST_FORCE_CUDA=1 but nvcc was not found (set CUDA_HOME or put nvcc on PATH)")
        # A CPU torch leaves CUDA_HOME unset and BuildExtension then refuses .cu files; pointing it at
        # the toolkit makes BuildExtension compile them with nvcc. The .cu files include no torch
        # headers, so the CPU torch's incomplete CUDA headers are never read.
        cpp_extension.CUDA_HOME = cuda_home
        os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0")
        lib = os.path.join(cuda_home, "lib64")
        include_dirs.append(os.path.join(cuda_home, "include"))
        link_args += [f"-L{lib}", "-lcudart", f"-Wl,-rpath,{lib}"]
        with_cuda, mode = True, f"forced cuda (CPU torch, toolkit {cuda_home})"
    else:
        with_cuda, mode = False, "cpu (torch has no CUDA; set SRN_FAST_FORCE_CUDA=1 to compile the CUDA sources)"
    print(f"srn_fast: building the extension, mode: {mode}", flush=True)

    sources = cpp_sources + (cu_sources if with_cuda else [])
    if with_cuda:
        define_macros.append(("SRN_WITH_CUDA", "1"))
    args = dict(
        name="srn_fast._C",
        sources=sources,
        include_dirs=include_dirs,
        define_macros=define_macros,
        extra_compile_args={"cxx": cxx, "nvcc": nvcc},
        extra_link_args=link_args,
    )
    if with_cuda and torch_has_cuda and not force:
        return cpp_extension.CUDAExtension(**args)
    return cpp_extension.CppExtension(**args)


# Package metadata lives in pyproject.toml; this file only adds the extension.
setup(
    ext_modules=[_extension()],
    cmdclass={"build_ext": cpp_extension.BuildExtension.with_options(use_ninja=True)}
)
