"""Build cifops._C, the compiled operator library.

CUDA kernels are built when torch is a CUDA build and nvcc is found (CUDA_HOME,
or /usr/local/cuda); CPU-only otherwise. Environment switches, parsed strictly:

  CIFOPS_CUDA=0|1        force the CUDA kernels off / on (1 fails when impossible)
  TORCH_CUDA_ARCH_LIST   GPU architectures; default "8.0;9.0" when no GPU is visible
  MAX_JOBS               parallel compile jobs; default bounded by cores and memory
  CIFOPS_DEBUG=0|1       -O0 -g instead of -O3

Install with `pip install --no-build-isolation -e .` so that the extension is
compiled against the torch it will run with.
"""
import glob
import os
import sys

if "CUDA_HOME" not in os.environ and os.path.exists("/usr/local/cuda/bin/nvcc"):
    os.environ["CUDA_HOME"] = "/usr/local/cuda"

import torch  # noqa: E402
from setuptools import setup  # noqa: E402
from torch.utils import cpp_extension  # noqa: E402

ROOT = os.path.dirname(os.path.abspath(__file__))


def env_flag(name):
    value = os.environ.get(name)
    if value is None or value == "":
        return None
    if value not in ("0", "1"):
        sys.exit(f"setup.py: {name} must be 0 or 1, got {value!r}")
    return value == "1"


def default_jobs():
    cores = os.cpu_count() or 1
    try:
        mem_gib = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    except (ValueError, OSError):
        mem_gib = 8
    # nvcc and the torch headers take 1.5-3 GiB per job
    return max(1, min(cores, int(mem_gib // 3), 8))


def want_cuda():
    forced = env_flag("CIFOPS_CUDA")
    torch_cuda = torch.version.cuda is not None
    nvcc = cpp_extension.CUDA_HOME is not None and os.path.exists(
        os.path.join(cpp_extension.CUDA_HOME, "bin", "nvcc"))
    possible = torch_cuda and nvcc
    why = []
    if not torch_cuda:
        why.append(f"torch {torch.__version__} is a CPU-only build")
    if not nvcc:
        why.append("nvcc was not found (set CUDA_HOME)")
    if forced is True and not possible:
        sys.exit("setup.py: CIFOPS_CUDA=1 but the CUDA kernels cannot be built: " + "; ".join(why))
    if forced is False:
        return False, "CIFOPS_CUDA=0"
    return possible, "; ".join(why)


def openmp_flags():
    # ATen's at::parallel_for is a header template around `#pragma omp parallel`: in an
    # extension compiled without -fopenmp it silently runs on one thread. The libgomp
    # that torch ships has the system's SONAME, so the one already loaded is reused.
    if torch.backends.openmp.is_available() and sys.platform.startswith("linux"):
        return ["-fopenmp"]
    return []


def build_extension():
    with_cuda, why_not = want_cuda()
    debug = env_flag("CIFOPS_DEBUG") is True
    opt = ["-O0", "-g"] if debug else ["-O3"]
    openmp = openmp_flags()
    # -ffp-contract=off: the CIF scan rounds each product and sum on its own on every
    # backend (the CUDA kernels use __dmul_rn/__dadd_rn), so fire decisions agree bit for
    # bit; GCC would otherwise fuse them into FMAs where the target has them (aarch64).
    cxx_flags = opt + ["-Wall", "-Wno-unknown-pragmas", "-ffp-contract=off"] + openmp
    macros = [("CIFOPS_TORCH_VERSION", f'"{torch.__version__}"')]
    sources = ["csrc/ops.cpp"]
    sources += sorted(glob.glob("csrc/*/*_cpu.cpp")) + sorted(glob.glob("csrc/*/*_cpu_op.cpp"))
    os.environ.setdefault("MAX_JOBS", str(default_jobs()))
    if with_cuda:
        if not os.environ.get("TORCH_CUDA_ARCH_LIST") and not torch.cuda.is_available():
            os.environ["TORCH_CUDA_ARCH_LIST"] = "8.0;9.0"
        archs = os.environ.get("TORCH_CUDA_ARCH_LIST", "detected from the visible GPU")
        if torch.cuda.is_available() and not os.environ.get("TORCH_CUDA_ARCH_LIST"):
            archs = ";".join(sorted({"%d.%d" % torch.cuda.get_device_capability(i)
                                     for i in range(torch.cuda.device_count())}))
            os.environ["TORCH_CUDA_ARCH_LIST"] = archs
        sources += sorted(glob.glob("csrc/*/*_cuda.cu")) + sorted(glob.glob("csrc/*/*_cuda_op.cpp"))
        macros += [("CIFOPS_WITH_CUDA", None), ("CIFOPS_CUDA_ARCHS", f'"{archs}"'),
                   ("CIFOPS_CUDA_VERSION", f'"{torch.version.cuda}"')]
        ext_cls = cpp_extension.CUDAExtension
        extra = {"cxx": cxx_flags, "nvcc": opt + ["-lineinfo", "--expt-relaxed-constexpr"]}
        print(f"cifops: building CPU + CUDA kernels for sm {archs} against torch "
              f"{torch.__version__} (CUDA {torch.version.cuda}), MAX_JOBS={os.environ['MAX_JOBS']}")
    else:
        ext_cls = cpp_extension.CppExtension
        extra = {"cxx": cxx_flags}
        print(f"cifops: building CPU kernels only ({why_not}) against torch {torch.__version__}, "
              f"MAX_JOBS={os.environ['MAX_JOBS']}")
    print(f"cifops: CPU kernels {'with OpenMP threads' if openmp else 'single-threaded (no OpenMP)'}")
    return ext_cls(
        name="cifops._C",
        sources=sources,
        include_dirs=[os.path.join(ROOT, "csrc")],
        define_macros=macros,
        extra_compile_args=extra,
        extra_link_args=openmp,
    )


setup(
    ext_modules=[build_extension()],
    cmdclass={"build_ext": cpp_extension.BuildExtension.with_options(use_ninja=True)},
)
