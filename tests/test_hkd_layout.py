"""The recipe's layout: what a data-loader worker imports; the ops and the recipe as two
distributions (the ops' wheel holds no recipe; the recipe's wheel runs outside the checkout)."""

import os
import shutil
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
    assert "torch" in modules  # the sanity of the check itself
    heavy = sorted(m for m in modules if m == "cifops" or m.startswith("cifops.") or m == "cifhkd.model")
    assert heavy == []


def test_the_ops_distribution_holds_no_recipe(tmp_path):
    """`pip install .` installs the ops alone: the Python files the ops' wheel gets
    (setup.py build_py, the step that copies them into the wheel) are cifops' only."""
    subprocess.run(
        [sys.executable, "setup.py", "-q", "build_py", "--build-lib", str(tmp_path / "lib")],
        cwd=ROOT,
        check=True,
        capture_output=True,
    )
    top = sorted(p.name for p in (tmp_path / "lib").iterdir())
    assert top == ["cifops"], top
    assert not list((tmp_path / "lib").rglob("*.yaml"))


def test_the_recipe_wheel_runs_outside_the_checkout(tmp_path):
    """The recipe's own distribution (recipe/pyproject.toml) built into a wheel and
    installed into a folder: its command lines answer --help from another folder, with
    that install first on the path, and the demo finds its config as package data."""
    wheels, site, elsewhere = tmp_path / "wheels", tmp_path / "site", tmp_path / "elsewhere"
    elsewhere.mkdir()
    source = tmp_path / "recipe"  # a copy: the build writes build/ and *.egg-info beside it
    shutil.copytree(ROOT / "recipe", source, ignore=shutil.ignore_patterns("build", "*.egg-info", "__pycache__"))
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "-q"]
    subprocess.run(
        pip + ["wheel", "--no-deps", "--no-build-isolation", "-w", str(wheels), str(source)],
        check=True,
        capture_output=True,
        timeout=300,
    )
    (wheel,) = wheels.glob("cifhkd-*.whl")
    subprocess.run(
        pip + ["install", "--no-deps", "--target", str(site), str(wheel)], check=True, capture_output=True, timeout=300
    )
    env = dict(os.environ, PYTHONPATH=str(site))
    where = subprocess.run(
        [
            sys.executable,
            "-c",
            "import cifhkd, cifhkd.demo as d; print(cifhkd.__file__); "
            "print(d.DEFAULT_CONFIG, d.DEFAULT_CONFIG.is_file())",
        ],
        cwd=elsewhere,
        env=env,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()
    assert Path(where[0]).is_relative_to(site), where
    assert Path(where[1]).is_relative_to(site) and where[2] == "True", where
    for module, option in [
        ("train", "--exp-dir"),
        ("decode", "--checkpoint"),
        ("demo", "--ablations"),
        ("export", "--int8"),
        ("teacher_cache", "--splits"),
        ("corpus", "--num-train"),
        ("plot_alignment", "--utt"),
    ]:
        done = subprocess.run(
            [sys.executable, "-m", f"cifhkd.{module}", "--help"],
            cwd=elsewhere,
            env=env,
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert done.returncode == 0 and option in done.stdout, (module, done.stderr[-2000:])
