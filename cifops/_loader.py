"""Loading the compiled operator library, with errors that say how to rebuild."""
import importlib

import torch

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
        if "undefined symbol" in text or "cannot open shared object" in text:
            raise ImportError(
                f"cifops: the compiled library cifops._C does not match torch {torch.__version__} "
                f"({text}). {_REBUILD}") from exc
        raise ImportError(f"cifops: the compiled library cifops._C is missing ({text}). "
                          f"{_REBUILD}") from exc
    if module.torch_version != torch.__version__:
        raise ImportError(
            f"cifops: cifops._C was built against torch {module.torch_version} but torch "
            f"{torch.__version__} is imported. {_REBUILD}")
    _C = module
    return module


def build_info():
    """How the loaded library was built.

    Returns a dict: ``cuda`` (bool, CUDA kernels compiled in), ``cuda_archs``
    (the TORCH_CUDA_ARCH_LIST it was compiled for, "" without CUDA),
    ``cuda_version``, ``torch`` (the torch version it was built against) and
    ``library`` (the path of the shared object).
    """
    module = load_library()
    return {
        "cuda": bool(module.with_cuda),
        "cuda_archs": module.cuda_archs,
        "cuda_version": module.cuda_version,
        "torch": module.torch_version,
        "library": module.__file__,
    }
