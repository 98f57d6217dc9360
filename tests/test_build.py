"""The built library and the C++ runtime it runs with.

An error raised in cifops' C++ code (TORCH_CHECK) must reach Python as a RuntimeError.
A library that carries its own static copy of the C++ runtime (libstdc++ linked
statically, as a relocated compiler without libstdc++.so does) kills the process
instead (SIGSEGV on torch 2.11 with g++ 13.3, whose libstdc++ differs from the one
torch runs with); setup.py and the loader refuse such a library (cifops/_runtime_check.py).
"""

import os
import shutil
import signal
import subprocess
import sys
import textwrap

import pytest
import torch

import cifops
from cifops import _loader, _runtime_check

# Each erroring call, the argument its message must name; run in a child process,
# one line per call, flushed: a call that kills the process leaves the lines before it.
ERRORING_CALLS = textwrap.dedent("""
    import torch, cifops
    calls = [
        ("cif", lambda: cifops.cif(torch.randn(2, 5), torch.rand(2, 5))),
        ("cif_forward", lambda: torch.ops.cifops.cif_forward(
            torch.randn(2, 5, 3), torch.rand(2, 4), None, None, 1.0, 1e-4, None, True, -1)),
        ("cif_backward", lambda: torch.ops.cifops.cif_backward(
            torch.randn(3, 1, 3), None, torch.randn(2, 5, 3), torch.rand(2, 5), None, None,
            1.0, 1e-4, None, True)),
        ("contrastive_loss", lambda: cifops.contrastive_loss(torch.randn(4, 8), torch.randn(3, 8))),
        ("contrastive_accuracy", lambda: cifops.contrastive_accuracy(
            torch.randn(4, 8), torch.randn(4, 7))),
    ]
    if torch.cuda.is_available() and cifops.build_info()["cuda"]:
        calls.append(("cif_cuda", lambda: cifops.cif(
            torch.randn(2, 5, 3, device="cuda"), torch.rand(2, 5))))
    for name, call in calls:
        try:
            call()
        except RuntimeError as exc:
            print(name, "RuntimeError:", str(exc).strip().splitlines()[0], flush=True)
        else:
            print(name, "no error", flush=True)
    print("done", flush=True)
""")

EXPECTED = {
    "cif": "hidden must be a 3-D tensor",
    "cif_forward": r"alphas must have shape [B, T]",
    "cif_backward": "grad_embeds must have shape",
    "contrastive_loss": "teacher has M = 3 rows",
    "contrastive_accuracy": "teacher must have D = 8 columns",
    "cif_cuda": "alphas is on cpu but hidden is on cuda",
}


def test_cpp_errors_raise_runtime_error_and_the_process_lives():
    env = dict(
        os.environ,
        PYTHONPATH=os.pathsep.join(
            [os.path.dirname(os.path.dirname(cifops.__file__))]
            + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
        ),
    )
    proc = subprocess.run([sys.executable, "-c", ERRORING_CALLS], capture_output=True, text=True, timeout=600, env=env)
    lines = proc.stdout.splitlines()
    if proc.returncode != 0:
        how = f"died of {signal.Signals(-proc.returncode).name}" if proc.returncode < 0 else f"exited {proc.returncode}"
        pytest.fail(
            f"the process {how} after {len(lines)} of the erroring calls (output: "
            f"{lines}); stderr: {proc.stderr[-1500:]} (benchmarks/abort_probe.py "
            "tells why)"
        )
    assert lines[-1] == "done"
    results = dict(line.split(" ", 1) for line in lines[:-1])
    assert set(results) <= set(EXPECTED) and len(results) >= 5, results
    for name, result in results.items():
        assert result.startswith("RuntimeError: "), (name, result)
        assert EXPECTED[name] in result, (name, result)


def test_library_shares_the_cxx_runtime_torch_runs_with():
    path = cifops.build_info()["library"]
    summary = _runtime_check.elf_summary(path)
    if summary is None:
        pytest.skip("not a 64-bit ELF library")
    needed, defined = summary
    private = _runtime_check.private_runtime_symbols(path)
    assert not defined, _runtime_check.describe(path, private)
    with open("/proc/self/maps") as f:
        torch_uses_libstdcxx = "libstdc++.so" in f.read()
    if torch_uses_libstdcxx:
        assert "libstdc++.so.6" in needed, needed


def _compile(tmp_path, name, *flags):
    compiler = shutil.which(os.environ.get("CXX", "c++")) or shutil.which("g++")
    if compiler is None:
        pytest.skip("no C++ compiler")
    source = tmp_path / "thrower.cpp"
    source.write_text('#include <stdexcept>\nvoid cifops_test_fail() { throw std::runtime_error("x"); }\n')
    out = tmp_path / name
    proc = subprocess.run(
        [compiler, "-shared", "-fPIC", "-O1", *flags, str(source), "-o", str(out)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    if proc.returncode != 0:
        pytest.skip(f"{compiler} {' '.join(flags)} cannot link: {proc.stderr[-300:]}")
    return str(out)


@pytest.fixture(scope="module")
def static_runtime_library(tmp_path_factory):
    return _compile(tmp_path_factory.mktemp("static"), "libstatic.so", "-static-libstdc++")


def test_runtime_check_tells_a_static_runtime_from_a_shared_one(tmp_path, static_runtime_library):
    shared = _compile(tmp_path, "libshared.so")
    if _runtime_check.elf_summary(shared) is None:
        pytest.skip("not a 64-bit ELF platform")
    assert _runtime_check.private_runtime_symbols(shared) == {}
    private = _runtime_check.private_runtime_symbols(static_runtime_library)
    assert {"__cxa_throw", "__gxx_personality_v0"} <= set(private), private
    assert "libstdc++" in _runtime_check.describe(static_runtime_library, private)


def test_loader_refuses_a_library_with_its_own_cxx_runtime(monkeypatch, static_runtime_library):
    class PrivateRuntimeLibrary:
        torch_version = torch.__version__
        __file__ = static_runtime_library

    monkeypatch.setattr(_loader, "_C", None)
    monkeypatch.setattr(_loader.importlib, "import_module", lambda name: PrivateRuntimeLibrary)
    with pytest.raises(ImportError, match=r"carries its own copy of libstdc\+\+ .*Rebuild it"):
        _loader.load_library()


def test_loader_names_a_compiler_newer_than_the_runtime(monkeypatch):
    def newer(name):
        raise ImportError("/usr/lib/libstdc++.so.6: version `GLIBCXX_3.4.32' not found (required by _C.so)")

    monkeypatch.setattr(_loader, "_C", None)
    monkeypatch.setattr(_loader.importlib, "import_module", newer)
    with pytest.raises(ImportError, match=r"newer C\+\+ compiler than the libstdc\+\+"):
        _loader.load_library()


def test_build_info_records_the_compiler():
    info = cifops.build_info()
    assert info["compiler"] and info["compiler"] != "unknown"
    assert info["cplusplus"] >= 201703
    assert info["cxx11_abi"] == int(torch._C._GLIBCXX_USE_CXX11_ABI)


@pytest.mark.skipif(shutil.which("objdump") is None, reason="needs binutils' objdump")
def test_avx2_instructions_stay_in_the_avx2_build():
    """The contrastive tile kernels are compiled twice, the second time with -mavx2 -mfma
    (csrc/contrastive/contrastive_cpu_kernels.cpp). Inline functions of shared headers
    (std::vector, contrastive.h) are compiled in both units, and the linker keeps one copy:
    it must be the portable one, or a CPU without AVX runs AVX instructions outside the
    kernels it chose not to use. So no function outside the avx2 namespace has a VEX
    (v-prefixed) instruction."""
    import platform

    if platform.machine() not in ("x86_64", "AMD64"):
        pytest.skip("the avx2 build exists on x86-64 only")
    out = subprocess.run(
        ["objdump", "-d", "--no-show-raw-insn", "-C", cifops._C.__file__], capture_output=True, text=True, check=True
    ).stdout
    function, with_avx, outside = None, set(), set()
    for line in out.splitlines():
        if line.endswith(">:"):
            function = line
            continue
        fields = line.split()
        if function and len(fields) >= 2 and fields[1].startswith("v") and fields[1].isalnum():
            with_avx.add(function)
            if "avx2::" not in function:
                outside.add(function)
    assert with_avx, "the avx2 build of the contrastive kernels is missing from the library"
    assert not outside, f"AVX instructions outside the avx2 build: {sorted(outside)[:5]}"
