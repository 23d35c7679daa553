"""Build srn_fast and its extension srn_fast._C.

* Always: the C++ CPU kernels.
* CUDA kernels too when torch is a CUDA build and a CUDA toolkit is found (CUDAExtension, the usual path).
  A toolkit counts only with bin/nvcc and the cudart it links (lib64/ or lib/libcudart.so; else the
  nvidia-cuda-runtime wheel's): $CUDA_HOME, $CUDA_PATH, torch's guess (nvcc's grandparent folder), nvcc's
  real folder, /usr/local/cuda, /usr/local/cuda-*. The build log names the toolkit and cudart used.
* SRN_FAST_FORCE_CUDA=1 with a CPU torch and nvcc installed: every .cu file is compiled with nvcc and
  cudart is linked, so a machine without a GPU proves that the CUDA sources compile and link
  (see ../shared/design.md). The extension then imports and runs its CPU path.
* SRN_FAST_NO_CUDA=1: CPU only, even with a CUDA torch.
* TORCH_CUDA_ARCH_LIST picks the GPU architectures (default: the visible GPUs'; with none visible, every
  architecture the CUDA torch supports; for the forced build "8.0;9.0");
  MAX_JOBS bounds the parallel compile jobs (read by torch's BuildExtension / ninja).
* SRN_FAST_NO_NATIVE=1 drops -march=native from the CPU flags (for wheels meant for other machines).

Install with `pip install --no-build-isolation .` after installing torch: an isolated build would
fetch a different torch.
"""
import glob
import os
import shlex
import shutil
import subprocess
import sys
import tempfile

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


def _probe_links_shared_libstdcxx(cxx, readelf, folder, extra):
    """Whether `cxx` links a small shared library that streams a long with libstdc++ as a shared library."""
    src, so = os.path.join(folder, "probe.cpp"), os.path.join(folder, "probe.so")
    with open(src, "w") as f:
        f.write("#include <sstream>\n#include <string>\n"
                "std::string probe(long v) { std::ostringstream s; s << v; return s.str(); }\n")
    if subprocess.run([*cxx, "-shared", "-fPIC", src, "-o", so, *extra], capture_output=True).returncode:
        return None
    dyn = subprocess.run([readelf, "-d", so], capture_output=True, text=True).stdout
    return "libstdc++" in dyn


def _shared_libstdcxx_args():
    """Link arguments that keep libstdc++ shared, one copy per process. A compiler that links it statically by
    default (seen: the /opt/gcc g++ of a lent GPU machine) puts a second copy of iostreams and locales into _C
    whose facet ids differ from those of the copy torch loads: the first error message that formats a number
    segfaults. Then the libstdc++.so.6 this process (torch) loaded is linked explicitly, ahead of the driver's
    static one, and checked."""
    cxx = shlex.split(os.environ.get("CXX", "c++"))
    readelf = shutil.which("readelf")
    if not readelf or not cxx or not shutil.which(cxx[0]) or not os.path.exists("/proc/self/maps"):
        return []
    with tempfile.TemporaryDirectory() as d:
        if _probe_links_shared_libstdcxx(cxx, readelf, d, []) is not False:
            return []
        with open("/proc/self/maps") as f:
            loaded = sorted({ln.split()[-1] for ln in f if ln.rstrip().endswith("/libstdc++.so.6")
                             or "/libstdc++.so.6." in ln})
        if loaded and _probe_links_shared_libstdcxx(cxx, readelf, d, [loaded[0]]):
            print(f"srn_fast: {' '.join(cxx)} links libstdc++ statically; linking {loaded[0]} (the one torch "
                  "loaded) instead", flush=True)
            return [loaded[0]]
    print(f"srn_fast: warning: {' '.join(cxx)} links libstdc++ statically and no shared libstdc++.so.6 could be "
          "linked instead; error messages from _C may crash (set CXX to a g++ that links it shared)", flush=True)
    return []


def _cudart_in(home):
    """The folder of the toolkit `home` holding a linkable libcudart.so (lib64 or lib), or None."""
    for sub in ("lib64", "lib"):
        d = os.path.join(home, sub)
        if os.path.exists(os.path.join(d, "libcudart.so")):
            return d
    return None


def _wheel_cudart():
    """libcudart.so.N of the nvidia-cuda-runtime wheel that a CUDA torch depends on (no unversioned libcudart.so
    there, so it is linked through a link of our own), or None."""
    for site in sys.path:
        hits = sorted(glob.glob(os.path.join(site, "nvidia", "cu*", "lib", "libcudart.so.[0-9]*")) +
                      glob.glob(os.path.join(site, "nvidia", "cuda_runtime", "lib", "libcudart.so.[0-9]*")))
        if hits:
            return hits[-1]
    return None


def _find_cuda_home(torch_guess=None):
    """(toolkit, cudart_dir, wheel_cudart): a CUDA toolkit holding bin/nvcc and the cudart it will link.

    Candidates, in order: $CUDA_HOME / $CUDA_PATH, torch's own guess (cpp_extension.CUDA_HOME, which is only
    nvcc's grandparent folder: /usr/local for a /usr/local/bin/nvcc wrapper), the folder of nvcc with links
    resolved, /usr/local/cuda, /usr/local/cuda-*. A toolkit is accepted only with a libcudart.so in lib64/ or
    lib/; failing that, the first toolkit with nvcc is paired with the nvidia-cuda-runtime wheel's cudart.
    Returns (None, None, None) and the list of rejected candidates' reasons when nothing fits."""
    candidates = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), torch_guess]
    nvcc = shutil.which("nvcc")
    if nvcc:
        candidates += [os.path.dirname(os.path.dirname(nvcc)),
                       os.path.dirname(os.path.dirname(os.path.realpath(nvcc)))]
    candidates += ["/usr/local/cuda"] + sorted(glob.glob("/usr/local/cuda-*"), reverse=True)
    seen, rejected, nvcc_only = set(), [], None
    for c in candidates:
        if not c or c in seen:
            continue
        seen.add(c)
        if not os.path.exists(os.path.join(c, "bin", "nvcc")):
            rejected.append(f"{c} (no bin/nvcc)")
            continue
        lib = _cudart_in(c)
        if lib:
            return c, lib, None, rejected
        rejected.append(f"{c} (no libcudart.so in lib64/ or lib/)")
        nvcc_only = nvcc_only or c
    wheel = _wheel_cudart()
    if nvcc_only and wheel:
        return nvcc_only, os.path.dirname(wheel), wheel, rejected
    return None, None, None, rejected


def _cuda_toolkit(torch_guess=None):
    """Picks the toolkit for a CUDA build (see _find_cuda_home), tells cpp_extension to use it, and returns
    (toolkit, extra link args); exits with one line saying what was looked for when nothing fits."""
    home, lib, wheel, rejected = _find_cuda_home(torch_guess)
    if home is None:
        sys.exit("srn_fast: no usable CUDA toolkit: looked for bin/nvcc plus lib64/ or lib/libcudart.so in "
                 f"{'; '.join(rejected) or '$CUDA_HOME, $CUDA_PATH, nvcc on PATH, /usr/local/cuda*'} and for the "
                 "nvidia-cuda-runtime wheel's cudart; set CUDA_HOME=/path/to/cuda (the folder with bin/nvcc and "
                 "lib64/libcudart.so), or SRN_FAST_NO_CUDA=1 for a CPU-only build")
    for r in rejected:
        print(f"srn_fast: skipped CUDA toolkit candidate {r}", flush=True)
    # cpp_extension reads its module-level CUDA_HOME for nvcc, include and library paths (-L.../lib64 -lcudart)
    cpp_extension.CUDA_HOME = home
    os.environ["CUDA_HOME"] = home
    link = [f"-L{lib}", f"-Wl,-rpath,{lib}"]
    cudart = os.path.join(lib, "libcudart.so")
    if wheel:
        # the wheel ships libcudart.so.N only: give -lcudart a libcudart.so to find
        shim = os.path.join(ROOT, "build", "cudart_link")
        os.makedirs(shim, exist_ok=True)
        target = os.path.join(shim, "libcudart.so")
        if os.path.lexists(target):
            os.remove(target)
        os.symlink(wheel, target)
        link = [f"-L{shim}"] + link
        cudart = wheel
    print(f"srn_fast: CUDA toolkit {home} (nvcc {os.path.join(home, 'bin', 'nvcc')}), cudart {cudart}", flush=True)
    return home, link


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
    link_args = ["-fopenmp"] + _shared_libstdcxx_args()

    force = _flag("SRN_FAST_FORCE_CUDA")
    no_cuda = _flag("SRN_FAST_NO_CUDA")
    torch_has_cuda = torch.version.cuda is not None
    if no_cuda:
        with_cuda, mode = False, "cpu (SRN_FAST_NO_CUDA=1)"
    elif torch_has_cuda and (force or cpp_extension.CUDA_HOME is not None):
        # The usual path: a CUDA torch and a toolkit. torch's CUDA_HOME guess is checked, not trusted.
        cuda_home, link = _cuda_toolkit(cpp_extension.CUDA_HOME)
        link_args += link
        if not os.environ.get("TORCH_CUDA_ARCH_LIST") and not torch.cuda.is_available():
            # torch picks the visible GPUs' architectures and fails with none visible: build for every
            # architecture this torch supports instead
            archs = sorted({a.split("_")[1] for a in torch.cuda.get_arch_list() if a.startswith("sm_")}, key=int)
            os.environ["TORCH_CUDA_ARCH_LIST"] = ";".join(f"{a[:-1]}.{a[-1]}" for a in archs) + "+PTX"
            print(f"srn_fast: no GPU visible, TORCH_CUDA_ARCH_LIST={os.environ['TORCH_CUDA_ARCH_LIST']} "
                  "(this torch's architectures)", flush=True)
        with_cuda, mode = True, f"cuda (CUDA torch {torch.version.cuda}, toolkit {cuda_home})"
    elif force:
        # A CPU torch leaves CUDA_HOME unset and BuildExtension then refuses .cu files; pointing it at
        # the toolkit makes BuildExtension compile them with nvcc. The .cu files include no torch
        # headers, so the CPU torch's incomplete CUDA headers are never read.
        cuda_home, link = _cuda_toolkit()
        os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0")
        include_dirs.append(os.path.join(cuda_home, "include"))
        link_args += link + ["-lcudart"]
        with_cuda, mode = True, f"forced cuda (CPU torch, toolkit {cuda_home})"
    elif torch_has_cuda:
        with_cuda, mode = False, "cpu (a CUDA torch but no nvcc: put nvcc on PATH or set CUDA_HOME for the CUDA kernels)"
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
    if with_cuda and torch_has_cuda:
        return cpp_extension.CUDAExtension(**args)
    return cpp_extension.CppExtension(**args)


# Package metadata lives in pyproject.toml; this file only adds the extension.
setup(
    ext_modules=[_extension()],
    cmdclass={"build_ext": cpp_extension.BuildExtension.with_options(use_ninja=True)}
)
