"""The recipe's layout: what a data-loader worker imports."""
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def imported_by(statement: str) -> set:
    """The modules in sys.modules after `statement`, in a fresh interpreter."""
    code = f"import sys; {statement}; print('\\n'.join(sorted(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return set(out.stdout.split())


def test_data_loader_worker_imports_neither_the_model_nor_cifops():
    """A DataLoader worker unpickles the dataset and the collate function: cifhkd.dataset
    and cifhkd.batch (with the manifests and the sampler) must not bring in the model or
    the cifops extension."""
    modules = imported_by("import cifhkd.dataset, cifhkd.batch, cifhkd.sampler, cifhkd.data")
    assert "torch" in modules                           # the sanity of the check itself
    heavy = sorted(m for m in modules if m == "cifops" or m.startswith("cifops.") or m == "cifhkd.model")
    assert heavy == []
