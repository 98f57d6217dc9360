"""Build cifops._C, the compiled operator library.

CUDA kernels are built when torch is a CUDA build and nvcc is found (CUDA_HOME,
or /usr/local/cuda); CPU-only otherwise. Environment switches, parsed strictly:

  CIFOPS_CUDA=0|1        force the CUDA kernels off / on (1 fails when impossible)
  TORCH_CUDA_ARCH_LIST   GPU architectures; default "8.0;9.0" when no GPU is visible
  MAX_JOBS               parallel compile jobs; default bounded by cores and memory
  CIFOPS_DEBUG=0|1       -O0 -g instead of -O3

Install with `pip install --no-build-isolation -e .` so that the extension is
compiled against the torch it will run with.

The extension must use the C++ runtime torch runs with: it is linked against the
libstdc++ this process loaded with torch, by path, and a built library that still
carries a static copy of libstdc++, libgcc's unwinder or libgomp is refused (such a
library turns every C++ error into a crash; cifops/_runtime_check.py).
"""

import glob
import importlib.util
import os
import re
import subprocess
import sys

if "CUDA_HOME" not in os.environ and os.path.exists("/usr/local/cuda/bin/nvcc"):
    os.environ["CUDA_HOME"] = "/usr/local/cuda"

import torch  # noqa: E402
from setuptools import setup  # noqa: E402
from torch.utils import cpp_extension  # noqa: E402

ROOT = os.path.dirname(os.path.abspath(__file__))


def load_runtime_check():
    # by path: importing the cifops package would load the library being built
    spec = importlib.util.spec_from_file_location(
        "cifops_runtime_check", os.path.join(ROOT, "cifops", "_runtime_check.py")
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


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
    nvcc = cpp_extension.CUDA_HOME is not None and os.path.exists(os.path.join(cpp_extension.CUDA_HOME, "bin", "nvcc"))
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


def torch_cxx_runtime():
    """The libstdc++ that torch runs with in this process (it is loaded by now), or None."""
    try:
        with open("/proc/self/maps") as f:
            for line in f:
                path = line.split(None, 5)[-1].strip()
                if os.path.basename(path).startswith("libstdc++.so") and os.path.exists(path):
                    return path
    except OSError:
        pass
    return None


# libstdc++.so.6.0.N: the GCC release whose libstdc++ that is (N -> GCC major)
_LIBSTDCXX_GCC = {28: 9, 29: 11, 30: 12, 31: 13, 32: 13, 33: 14, 34: 15}


def check_toolchain(compiler, runtime):
    """Warn on a compiler that this torch's C++ runtime cannot serve; say what is done."""

    def ask(*args):
        try:
            return subprocess.run([compiler, *args], capture_output=True, text=True, timeout=60).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            return ""

    version = ask("-dumpfullversion") or ask("-dumpversion")
    print(
        f"cifops: C++ compiler {compiler} ({version or 'version unknown'}); C++ runtime "
        f"{runtime or 'not found (not Linux, or torch without libstdc++)'}"
    )
    if runtime is None:
        return
    archive = ask("-print-file-name=libstdc++.a")
    if os.path.isabs(archive) and not os.path.exists(os.path.join(os.path.dirname(archive), "libstdc++.so")):
        print(
            f"cifops: note: {compiler} finds {archive} with no libstdc++.so beside it: "
            f"without the explicit {runtime} it would link the C++ runtime statically "
            "(a library whose C++ errors crash Python)"
        )
    match = re.search(r"libstdc\+\+\.so\.6\.0\.(\d+)$", os.path.realpath(runtime))
    runtime_gcc = _LIBSTDCXX_GCC.get(int(match.group(1))) if match else None
    compiler_gcc = int(version.split(".")[0]) if re.match(r"\d+", version) else None
    if "clang" not in ask("--version").lower() and runtime_gcc and compiler_gcc and compiler_gcc > runtime_gcc:
        print(
            f"cifops: WARNING: {compiler} is GCC {compiler_gcc}, newer than the libstdc++ "
            f"torch runs with ({os.path.realpath(runtime)}, GCC {runtime_gcc}): the library "
            "may need symbols that runtime lacks (ImportError: version `GLIBCXX_...' not "
            f"found). Use GCC {runtime_gcc} or older (CXX=g++-{runtime_gcc})."
        )


# Torch-free CPU kernel sources compiled a second time, as their own translation unit,
# for a CPU capability the extension is not compiled for (as ATen's CPU_CAPABILITY): the
# source picks its namespace from the macro, and its includer chooses at run time.
CPU_CAPABILITY_BUILDS = [
    ("csrc/contrastive/contrastive_cpu_kernels.cpp", "avx2", ["-mavx2", "-mfma", "-DCIFOPS_CPU_AVX2"]),
]


def is_x86():
    import platform

    return platform.machine().lower() in ("x86_64", "amd64", "i386", "i686")


class BuildExtension(cpp_extension.BuildExtension):
    """torch's build_ext, plus the C++ runtime checks before and after the link, and the
    per-capability objects of CPU_CAPABILITY_BUILDS."""

    def build_capability_objects(self, ext, cxx):
        flags = ["-std=c++17", "-fPIC", "-DNDEBUG", "-fwrapv", "-I" + os.path.join(ROOT, "csrc")] + ext.cifops_cxx_flags
        headers = glob.glob(os.path.join(ROOT, "csrc", "**", "*.h"), recursive=True)
        for source, capability, capability_flags in CPU_CAPABILITY_BUILDS:
            source = os.path.join(ROOT, source)
            out_dir = os.path.join(os.path.abspath(self.build_temp), "cpu_capability", capability)
            os.makedirs(out_dir, exist_ok=True)
            obj = os.path.join(out_dir, os.path.basename(source)[: -len(".cpp")] + ".o")
            cmd = [*cxx, *flags, *capability_flags, "-c", source, "-o", obj]
            # rebuilt when a source or header is newer, or the command changed
            stamp = obj + ".cmd"
            old = open(stamp).read() if os.path.exists(stamp) else None
            newest = max(map(os.path.getmtime, [source] + headers))
            if old != " ".join(cmd) or not os.path.exists(obj) or os.path.getmtime(obj) < newest:
                print("cifops: " + " ".join(cmd))
                subprocess.run(cmd, check=True)
                with open(stamp, "w") as f:
                    f.write(" ".join(cmd))
            # after the extension's own objects: the linker keeps the first copy of an
            # inline function, the portable one (csrc/contrastive/contrastive_cpu_kernels.cpp)
            ext.extra_objects.append(obj)
            ext.depends.append(obj)  # relink when only this object changed

    def build_extensions(self):
        compiler = getattr(self.compiler, "compiler_cxx", None) or [cpp_extension.get_cxx_compiler()]
        check_toolchain(compiler[0], torch_cxx_runtime())
        if is_x86():
            for ext in self.extensions:
                self.build_capability_objects(ext, compiler)
        super().build_extensions()
        check = load_runtime_check()
        for ext in self.extensions:
            path = self.get_ext_fullpath(ext.name)
            private = check.private_runtime_symbols(path) if os.path.exists(path) else {}
            if private:
                os.remove(path)
                sys.exit(
                    f"setup.py: refused: {check.describe(path, private)} The compiler "
                    f"{compiler[0]} links them statically: use one whose shared "
                    "libstdc++.so, libgcc_s.so and libgomp.so it finds (CXX=g++ of the "
                    "system), and no -static-libstdc++ / -static-libgcc in LDFLAGS."
                )


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
    sources += sorted(glob.glob("csrc/*/*_cpu.cpp")) + sorted(glob.glob("csrc/*/*_cpu_kernels.cpp"))
    sources += sorted(glob.glob("csrc/*/*_cpu_op.cpp")) + sorted(glob.glob("csrc/*/*_autocast.cpp"))
    os.environ.setdefault("MAX_JOBS", str(default_jobs()))
    if with_cuda:
        if not os.environ.get("TORCH_CUDA_ARCH_LIST") and not torch.cuda.is_available():
            os.environ["TORCH_CUDA_ARCH_LIST"] = "8.0;9.0"
        archs = os.environ.get("TORCH_CUDA_ARCH_LIST", "detected from the visible GPU")
        if torch.cuda.is_available() and not os.environ.get("TORCH_CUDA_ARCH_LIST"):
            archs = ";".join(
                sorted({"%d.%d" % torch.cuda.get_device_capability(i) for i in range(torch.cuda.device_count())})
            )
            os.environ["TORCH_CUDA_ARCH_LIST"] = archs
        sources += sorted(glob.glob("csrc/*/*_cuda.cu")) + sorted(glob.glob("csrc/*/*_cuda_op.cpp"))
        macros += [
            ("CIFOPS_WITH_CUDA", None),
            ("CIFOPS_CUDA_ARCHS", f'"{archs}"'),
            ("CIFOPS_CUDA_VERSION", f'"{torch.version.cuda}"'),
        ]
        ext_cls = cpp_extension.CUDAExtension
        extra = {"cxx": cxx_flags, "nvcc": opt + ["-lineinfo", "--expt-relaxed-constexpr"]}
        print(
            f"cifops: building CPU + CUDA kernels for sm {archs} against torch "
            f"{torch.__version__} (CUDA {torch.version.cuda}), MAX_JOBS={os.environ['MAX_JOBS']}"
        )
    else:
        ext_cls = cpp_extension.CppExtension
        extra = {"cxx": cxx_flags}
        print(
            f"cifops: building CPU kernels only ({why_not}) against torch {torch.__version__}, "
            f"MAX_JOBS={os.environ['MAX_JOBS']}"
        )
    print(f"cifops: CPU kernels {'with OpenMP threads' if openmp else 'single-threaded (no OpenMP)'}")
    # The C++ runtime torch runs with, by path and ahead of the driver's own -lstdc++: a
    # compiler that finds only libstdc++.a (a relocated toolchain) would otherwise link a
    # private, possibly different, copy of the runtime into the library.
    runtime = torch_cxx_runtime()
    ext = ext_cls(
        name="cifops._C",
        sources=sources,
        include_dirs=[os.path.join(ROOT, "csrc")],
        define_macros=macros,
        extra_compile_args=extra,
        extra_link_args=([runtime] if runtime else []) + openmp,
    )
    # the flags of CPU_CAPABILITY_BUILDS: the extension's own that matter to torch-free code
    ext.cifops_cxx_flags = opt + [
        "-Wall",
        "-ffp-contract=off",
        f"-D_GLIBCXX_USE_CXX11_ABI={int(torch._C._GLIBCXX_USE_CXX11_ABI)}",
    ]
    return ext


setup(
    ext_modules=[build_extension()],
    cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)},
)
