"""Loading the compiled operator library, with errors that say how to rebuild."""

import importlib
import os
import struct

import torch

from cifops import _runtime_check

_REBUILD = (
    "Rebuild it against the torch you run with: from the cifops checkout run "
    "`pip install --no-build-isolation -e .` (or `make test`, which also does it)."
)
_C = None


def load_library():
    global _C
    if _C is not None:
        return _C
    try:
        module = importlib.import_module("cifops._C")
    except ImportError as exc:
        text = str(exc)
        if "GLIBCXX_" in text or "CXXABI_" in text:
            raise ImportError(
                f"cifops: cifops._C was compiled by a newer C++ compiler than the libstdc++ "
                f"torch runs with ({text}). Rebuild it with an older compiler (CXX=g++-N, N "
                f"no newer than the GCC of that libstdc++): `CXX=g++-N pip install "
                f"--no-build-isolation -e .`."
            ) from exc
        if "undefined symbol" in text or "cannot open shared object" in text:
            raise ImportError(
                f"cifops: the compiled library cifops._C does not match torch {torch.__version__} ({text}). {_REBUILD}"
            ) from exc
        raise ImportError(f"cifops: the compiled library cifops._C is missing ({text}). {_REBUILD}") from exc
    if module.torch_version != torch.__version__:
        raise ImportError(
            f"cifops: cifops._C was built against torch {module.torch_version} but torch "
            f"{torch.__version__} is imported. {_REBUILD}"
        )
    check_runtime(getattr(module, "__file__", None))
    _C = module
    return module


def check_runtime(path):
    """Refuse a library that carries its own copy of the C++ runtime (see _runtime_check):
    its first C++ error would kill the process instead of raising RuntimeError."""
    if not path or not os.path.exists(path):
        return
    try:
        private = _runtime_check.private_runtime_symbols(path)
    except (OSError, ValueError, struct.error):  # unreadable or unexpected: not our call
        return
    if private:
        raise ImportError(
            f"cifops: {_runtime_check.describe(path, private)} Rebuild it with "
            f"the current setup.py, which links the shared runtime: "
            f"`pip install --no-build-isolation -e .`."
        )


def build_info():
    """How the loaded library was built.

    Returns a dict: ``cuda`` (bool, CUDA kernels compiled in), ``cuda_archs``
    (the TORCH_CUDA_ARCH_LIST it was compiled for, "" without CUDA),
    ``cuda_version``, ``torch`` (the torch version it was built against),
    ``library`` (the path of the shared object), and how its C++ was compiled:
    ``compiler``, ``cplusplus`` (the value of __cplusplus), ``cxx11_abi``
    (_GLIBCXX_USE_CXX11_ABI) and ``openmp`` (_OPENMP, 0 without OpenMP).
    """
    module = load_library()
    return {
        "cuda": bool(module.with_cuda),
        "cuda_archs": module.cuda_archs,
        "cuda_version": module.cuda_version,
        "torch": module.torch_version,
        "library": module.__file__,
        "compiler": getattr(module, "compiler", None),
        "cplusplus": getattr(module, "cplusplus", None),
        "cxx11_abi": getattr(module, "cxx11_abi", None),
        "openmp": getattr(module, "openmp", None),
    }
