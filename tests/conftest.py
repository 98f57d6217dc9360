import os

import pytest
import torch
from hypothesis import HealthCheck, settings

# "ci" (the default) draws the same examples every run, so that a CI run is repeatable;
# "thorough" draws new ones: run it to explore (HYPOTHESIS_PROFILE=thorough)
settings.register_profile(
    "ci", max_examples=60, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow]
)
settings.register_profile("thorough", max_examples=2000, deadline=None, suppress_health_check=[HealthCheck.too_slow])
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))

requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def assert_cuda_emulation_passes(folder, build_dir, timeout=900):
    """Run tests/native/<folder>/run.sh (CUDA kernels compiled as C++ and run on the CPU
    against the CPU kernels) into build_dir; skip without g++ >= 12; assert that its last
    line says PASS, else show the failing cases."""
    import shutil
    import subprocess
    import sys

    gxx = shutil.which("g++")
    if gxx is None:
        pytest.skip("needs g++ >= 12")
    version = subprocess.run([gxx, "-dumpversion"], capture_output=True, text=True).stdout
    if int(version.split(".")[0] or 0) < 12:
        pytest.skip(f"needs g++ >= 12 (C++20 <source_location>), found {version}")
    script = os.path.join(os.path.dirname(__file__), "native", folder, "run.sh")
    out = subprocess.run(
        ["bash", script, str(build_dir)],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=dict(os.environ, PYTHON=sys.executable),
    )
    lines = out.stdout.splitlines()
    report = [line for line in lines if "FAIL" in line] + [
        line for line in out.stderr.splitlines() if "ERROR" in line or "error" in line
    ]
    assert out.returncode == 0 and lines and lines[-1].endswith("-> PASS"), (
        "\n".join(report[:80]) or out.stdout[-3000:] + out.stderr[-3000:]
    )
