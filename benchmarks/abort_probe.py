"""Does an error raised in cifops' C++ code reach Python, or does it kill the process?

    python benchmarks/abort_probe.py          # from the checkout, after the build

Builds nothing: it imports the cifops that is already built (the checkout's, or the
installed one) and runs a few erroring calls, each in its own subprocess, so that one
abort cannot hide the others. For each it prints whether RuntimeError was raised or the
process died (and of which signal), then the facts that decide it: torch's version, C++
ABI and compiler, the compiler, C++ standard, ABI and OpenMP cifops._C was built with
(recorded at build time), the libraries cifops._C needs and whether it carries a
static copy of the C++ runtime (the cause of such crashes: cifops/_runtime_check.py),
and which libstdc++, libgcc_s and libgomp the process loaded (from /proc/self/maps).
Exit status: 0 when every call raised, 1 otherwise.
Takes a few seconds.
"""

import json
import os
import re
import signal
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# name -> (code run in the child, whether it needs the cifops package); each must raise
# RuntimeError. Without the package (it refuses to import a library with a private C++
# runtime) the library is loaded with torch.ops.load_library and only the ops are called.
CASES = {
    # control: an error thrown by torch's own C++ code, through the same dispatcher
    "torch-aten": ("torch.empty(2).view(3)", False),
    # the call: hidden is 2-D; check_cif_args throws through the autograd kernel
    "cif": ("cifops.cif(torch.randn(2, 5), torch.rand(2, 5))", True),
    # the same op called directly, no Python autograd in between
    "cif-op": (
        "torch.ops.cifops.cif_forward(torch.randn(2, 5), torch.rand(2, 5), None, None, 1.0, 1e-4, None, True, -1)",
        False,
    ),
    # the other op library: a wrong shape of teacher
    "contrastive": ("cifops.contrastive_loss(torch.randn(4, 8), torch.randn(3, 8))", True),
    "contrastive-op": (
        "torch.ops.cifops.contrastive_accuracy(torch.randn(4, 8), torch.randn(4, 7), None, True, -100)",
        False,
    ),
}

LIB_PATTERN = re.compile(
    r"lib(stdc\+\+|gcc_s|gomp|iomp5|omp)[^/]*\.so[^/]*$|/_C[^/]*\.so$"
    r"|libc10\.so$|libtorch_python\.so$"
)


def loaded_libraries():
    paths = []
    try:
        with open("/proc/self/maps") as f:
            for line in f:
                parts = line.split(None, 5)
                if len(parts) == 6 and LIB_PATTERN.search(parts[5].strip()):
                    path = parts[5].strip()
                    if path not in paths:
                        paths.append(path)
    except OSError:
        pass
    return paths


def child(library, cases):
    """Print FACTS, then START/RESULT lines per case, flushed: a crash names its case."""
    sys.path.insert(0, ROOT)
    import faulthandler

    faulthandler.enable()
    import torch

    try:
        import cifops

        build, refused = cifops.build_info(), None
    except ImportError as exc:
        cifops, build, refused = None, {}, str(exc)
        torch.ops.load_library(library)
    facts = {
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "torch_cxx11_abi": bool(torch._C._GLIBCXX_USE_CXX11_ABI),
        "torch_compiler": _torch_compiler(torch),
        "cifops_build": build,
        "refused": refused,
        "libraries": loaded_libraries(),
    }
    print("FACTS " + json.dumps(facts), flush=True)
    for case in cases:
        code, needs_package = CASES[case]
        if needs_package and cifops is None:
            print(f"RESULT {case} skipped: the cifops package refused to import", flush=True)
            continue
        print(f"START {case}", flush=True)
        try:
            exec(code, {"torch": torch, "cifops": cifops})
            outcome = "no error raised"
        except RuntimeError as exc:
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
            outcome = f"raised RuntimeError: {first[:150]}"
        except Exception as exc:  # noqa: BLE001 - reported, not swallowed
            outcome = f"raised {type(exc).__name__} (not RuntimeError): {str(exc)[:150]}"
        print(f"RESULT {case} {outcome}", flush=True)
    return 0


def _torch_compiler(torch):
    try:
        config = torch.__config__.show()
    except Exception:  # noqa: BLE001
        return None
    match = re.search(r"^\s*-\s*(GCC [^\n]*|clang [^\n]*)$", config, re.M)
    return match.group(1).strip() if match else None


def library_facts():
    """The built cifops._C, found without importing it: its NEEDED entries and any
    C++ runtime symbols it defines itself (a static copy of the runtime)."""
    import glob
    import importlib.util

    sys.path.insert(0, ROOT)
    spec = importlib.util.find_spec("cifops")
    if spec is None or spec.origin is None:
        return None, None, None
    folder = os.path.dirname(spec.origin)
    libraries = sorted(glob.glob(os.path.join(folder, "_C*.so")))
    if not libraries:
        return None, None, None
    check_spec = importlib.util.spec_from_file_location(
        "cifops_runtime_check", os.path.join(folder, "_runtime_check.py")
    )
    if check_spec is None or not os.path.exists(check_spec.origin):
        return libraries[0], None, None
    check = importlib.util.module_from_spec(check_spec)
    check_spec.loader.exec_module(check)
    summary = check.elf_summary(libraries[0])
    return (libraries[0],) + (summary if summary else (None, None))


def signal_name(returncode):
    try:
        return signal.Signals(-returncode).name
    except ValueError:
        return str(-returncode)


def run_cases(library):
    """Run every case; a child that dies is replaced by one for the cases left.
    Returns (facts or None, {case: status}, {case: stderr tail}, import error text)."""
    pending, facts, statuses, tails = list(CASES), None, {}, {}
    while pending:
        cmd = [sys.executable, os.path.abspath(__file__), "--child", library, *pending]
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=180)
            stdout, stderr, code = proc.stdout, proc.stderr, proc.returncode
        except subprocess.TimeoutExpired as exc:
            stdout = exc.stdout.decode() if isinstance(exc.stdout, bytes) else (exc.stdout or "")
            stderr, code = "", None
        started = None
        for line in stdout.splitlines():
            if line.startswith("FACTS ") and facts is None:
                facts = json.loads(line[len("FACTS ") :])
            elif line.startswith("START "):
                started = line.split()[1]
            elif line.startswith("RESULT "):
                case, outcome = line[len("RESULT ") :].split(" ", 1)
                statuses[case] = outcome
                pending.remove(case)
                started = None
        if not any(line.startswith("FACTS ") for line in stdout.splitlines()):
            why = "timed out" if code is None else (f"died of {signal_name(code)}" if code < 0 else f"exited {code}")
            return facts, statuses, tails, f"{why}: " + " | ".join(stderr.strip().splitlines()[-6:])
        if pending and started is None:
            started = pending[0]  # died or hung between cases
        if started is not None:
            statuses[started] = (
                "timed out after 180 s"
                if code is None
                else f"DIED of {signal_name(code)}"
                if code < 0
                else f"exited {code} without a result"
            )
            tails[started] = [
                line for line in stderr.splitlines() if line.strip() and not line.startswith("Extension modules")
            ][:8]
            pending.remove(started)
    return facts, statuses, tails, None


def main():
    if len(sys.argv) >= 3 and sys.argv[1] == "--child":
        return child(sys.argv[2], sys.argv[3:])
    library, needed, private = library_facts()
    if library is None:
        print("cifops abort probe: no built cifops._C found (build it first)")
        return 1
    print(f"library {library}")
    if needed is not None:
        print(f"  needs {', '.join(needed)}")
        print(
            "  C++ runtime: "
            + (
                "shared (no private copy)"
                if not private
                else "PRIVATE STATIC COPY, defines " + ", ".join(sorted(private))
            )
        )
    facts, statuses, tails, failure = run_cases(library)
    if facts is None:
        print(f"cifops abort probe: the child could not start: {failure}")
        return 1
    build = facts["cifops_build"]
    print(
        f"python {facts['python']}, torch {facts['torch']} (CUDA {facts['torch_cuda']}, "
        f"built with {facts['torch_compiler']}, _GLIBCXX_USE_CXX11_ABI="
        f"{int(facts['torch_cxx11_abi'])})"
    )
    if facts["refused"]:
        print(f"cifops refused to import: {facts['refused'][:300]}")
    else:
        print(
            "cifops._C built with: "
            + ", ".join(
                f"{k}={build[k]!r}"
                for k in ("compiler", "cplusplus", "cxx11_abi", "openmp", "cuda", "torch")
                if k in build
            )
        )
    print("loaded:")
    for path in facts["libraries"]:
        print(f"  {path}")
    failed = 0
    for case in CASES:
        status = statuses.get(case, "not run")
        ok = status.startswith("raised RuntimeError") or status.startswith("skipped")
        failed += not ok
        print(f"{'ok  ' if ok else 'FAIL'} {case:14s} {status}")
        for line in tails.get(case, []):
            print(f"       | {line}")
    ran = sum(1 for case in CASES if not statuses.get(case, "").startswith("skipped"))
    print(
        f"abort probe: {ran - failed} of {ran} erroring calls raised RuntimeError"
        + ("" if not failed else "; the others killed or misled the process")
        + ("; the cifops package refused to import" if facts["refused"] else "")
    )
    return 1 if failed or facts["refused"] else 0


if __name__ == "__main__":
    sys.exit(main())
