"""Static report of the CUDA kernels, checkable without a GPU.

Compiles each CUDA source of cifops (csrc/*/*_cuda.cu; they include no torch header)
with nvcc for one architecture, with setup.py's nvcc flags, and prints

  * per kernel: registers, spill stores/loads, stack, static shared memory, and the
    occupancy the registers allow for blocks of 256 threads (the block of every CIF
    kernel) on that architecture;
  * the SASS of the loops of the CIF scan (scan_kernel<float>) that run on one thread:
    every loop that adds float64 values into a running sum (DADD of two different
    registers), with its instructions, the stall cycles encoded in their control bits
    (a lower bound on its cycles: waits on loads, barriers and called subroutines come
    on top) and those cycles per frame (per chained DADD).

  python benchmarks/sass_report.py [--arch sm_90] [--rev GIT_REV] [--listing] [SOURCE.cu ...]

--rev compiles the sources as they are at a git revision (git archive of csrc/), so
that a before/after comparison needs no checkout. Needs nvcc (CUDA_HOME, /usr/local/cuda
or PATH) and cuobjdump (the same places, or the copy that triton's wheel ships).
"""

import argparse
import glob
import os
import re
import shutil
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# setup.py's nvcc flags, plus those torch's CUDAExtension adds
NVCC_FLAGS = [
    "-std=c++17",
    "-O3",
    "-lineinfo",
    "--expt-relaxed-constexpr",
    "-D__CUDA_NO_HALF_OPERATORS__",
    "-D__CUDA_NO_HALF_CONVERSIONS__",
    "-D__CUDA_NO_BFLOAT16_CONVERSIONS__",
    "-D__CUDA_NO_HALF2_OPERATORS__",
]
BLOCK_THREADS = 256
# registers, warps and shared memory per SM (CUDA occupancy calculator tables)
SM_LIMITS = {
    "sm_80": (65536, 64, 164 * 1024),
    "sm_86": (65536, 48, 100 * 1024),
    "sm_89": (65536, 48, 100 * 1024),
    "sm_90": (65536, 64, 228 * 1024),
}


def find_tool(name):
    candidates = []
    for home in (os.environ.get("CUDA_HOME"), "/usr/local/cuda"):
        if home:
            candidates.append(os.path.join(home, "bin", name))
    on_path = shutil.which(name)
    if on_path:
        candidates.append(on_path)
    try:  # triton's wheel carries cuobjdump and nvdisasm
        import importlib.util

        spec = importlib.util.find_spec("triton")
        if spec and spec.submodule_search_locations:
            for loc in spec.submodule_search_locations:
                candidates.append(os.path.join(loc, "backends", "nvidia", "bin", name))
    except (ImportError, ValueError):
        pass
    for c in candidates:
        if os.path.isfile(c) and os.access(c, os.X_OK):
            return c
    sys.exit(f"sass_report.py: {name} not found (set CUDA_HOME, or put it on PATH)")


def demangle(names):
    if not names:
        return {}
    try:
        out = subprocess.run(
            ["c++filt"], input="\n".join(names), capture_output=True, text=True, check=True
        ).stdout.splitlines()
    except (OSError, subprocess.CalledProcessError):
        return {n: n for n in names}
    short = {}
    for n, d in zip(names, out):
        d = re.sub(r"cifops::\(anonymous namespace\)::", "", d)
        d = d.replace("cifops::", "")
        d = re.sub(r"^void ", "", d)
        # drop the parameter list: the last top-level parenthesis group
        depth = 0
        for i in range(len(d) - 1, -1, -1):
            if d[i] == ")":
                depth += 1
            elif d[i] == "(":
                depth -= 1
                if depth == 0:
                    d = d[:i]
                    break
        short[n] = d
    return short


def compile_cubin(nvcc, source, include, arch, out):
    cmd = [nvcc, *NVCC_FLAGS, f"-arch={arch}", "-cubin", "--resource-usage", "-I" + include, "-o", out, source]
    res = subprocess.run(cmd, capture_output=True, text=True)
    if res.returncode != 0:
        sys.exit(f"sass_report.py: nvcc failed on {source}:\n{res.stdout}{res.stderr}")
    return res.stdout + res.stderr


def parse_resources(ptxas):
    kernels, current = {}, None
    for line in ptxas.splitlines():
        m = re.search(r"Compiling entry function '([^']+)'", line)
        if m:
            current = m.group(1)
            kernels[current] = {}
            continue
        if current is None:
            continue
        m = re.search(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads", line)
        if m:
            kernels[current].update(stack=int(m.group(1)), spill_st=int(m.group(2)), spill_ld=int(m.group(3)))
        m = re.search(r"Used (\d+) registers", line)
        if m:
            kernels[current]["regs"] = int(m.group(1))
            s = re.search(r"(\d+) bytes smem", line)
            kernels[current]["smem"] = int(s.group(1)) if s else 0
    return kernels


def occupancy(regs, smem, arch):
    """Fraction of the SM's warps resident, limited by registers and shared memory, for
    blocks of BLOCK_THREADS threads."""
    reg_file, max_warps, smem_sm = SM_LIMITS.get(arch, SM_LIMITS["sm_90"])
    warps_per_block = BLOCK_THREADS // 32
    regs_per_warp = ((regs * 32 + 255) // 256) * 256  # allocated per warp in units of 256
    blocks = min(reg_file // (regs_per_warp * warps_per_block), max_warps // warps_per_block)
    if smem:
        blocks = min(blocks, smem_sm // (smem + 1024))  # 1 KiB reserved per block
    return blocks * warps_per_block / max_warps


# One SASS instruction: address, predicate + opcode + operands, and its control word.
INSN = re.compile(r"/\*([0-9a-f]{4,})\*/\s+(.*?)\s*;\s*/\* (0x[0-9a-f]{16}) \*/")
CTRL = re.compile(r"^\s*/\* (0x[0-9a-f]{16}) \*/\s*$")


def parse_sass(text):
    """{mangled name: [(addr, text, stall), ...]} from cuobjdump -sass."""
    funcs, current, pending = {}, None, None
    for line in text.splitlines():
        m = re.search(r"Function : (\S+)", line)
        if m:
            current = funcs.setdefault(m.group(1), [])
            pending = None
            continue
        if current is None:
            continue
        m = INSN.search(line)
        if m:
            pending = (int(m.group(1), 16), m.group(2))
            continue
        m = CTRL.match(line)
        if m and pending:
            hi = int(m.group(1), 16)
            current.append((pending[0], pending[1], (hi >> 41) & 0xF))
            pending = None
    return funcs


def opcode(text):
    t = re.sub(r"^@!?U?P\w+\s+", "", text)
    return t.split()[0] if t else ""


CHAIN_ADD = re.compile(r"\bDADD\s+(R\d+),\s*(-?R\d+|R\d+\.reuse),\s*(-?R\d+)")


def is_chain_add(text):
    """A DADD of two different registers (not the finite check x - x)."""
    m = CHAIN_ADD.search(text)
    if not m:
        return False
    a, b = (re.sub(r"[-]|\.reuse", "", g) for g in m.group(2, 3))
    return a != b


def loops(insns):
    """(start index, end index) of every loop: a branch back to an earlier address."""
    index = {addr: i for i, (addr, _, _) in enumerate(insns)}
    found = []
    for i, (addr, text, _) in enumerate(insns):
        m = re.search(r"\bBRA\s+(?:U?!?P\d+,\s*)?(0x[0-9a-f]+)", text)
        if m:
            target = int(m.group(1), 16)
            if target <= addr and target in index:
                found.append((index[target], i))
    return found


def serial_loops(insns):
    """The loops that run a float64 running sum on one thread: the innermost loops with a
    chained DADD and no barrier (a loop nested in one, as the settle loops of a fire,
    stays part of it; a loop with a barrier is one the whole block runs)."""
    cands = [
        (s, e)
        for s, e in loops(insns)
        if any(is_chain_add(insns[k][1]) for k in range(s, e + 1))
        and not any(opcode(insns[k][1]).startswith("BAR") for k in range(s, e + 1))
    ]
    keep = [(s, e) for s, e in cands if not any(s <= s2 and e2 <= e and (s2, e2) != (s, e) for s2, e2 in cands)]
    return sorted(set(keep))


def describe_loop(insns, s, e, listing):
    body = insns[s : e + 1]
    adds = sum(is_chain_add(t) for _, t, _ in body)
    stalls = sum(st for _, _, st in body)
    hist = {}
    for _, t, _ in body:
        op = opcode(t).split(".")[0]
        hist[op] = hist.get(op, 0) + 1
    ops = " ".join(f"{k}x{v}" for k, v in sorted(hist.items(), key=lambda kv: -kv[1]))
    calls = sum(opcode(t).startswith("CALL") for _, t, _ in body)
    lines = [
        f"  loop 0x{body[0][0]:04x}-0x{body[-1][0]:04x}: {len(body)} instructions, "
        f"{adds} chained DADD, {stalls} encoded stall cycles"
        + (f" = {stalls / adds:.1f} per chained DADD (frame)" if adds else "")
        + (f", {calls} CALL (a subroutine's cycles come on top)" if calls else "")
    ]
    lines.append(f"    opcodes: {ops}")
    if listing:
        for addr, t, st in body:
            lines.append(f"    /*{addr:04x}*/ S{st:<2d} {t}")
    return "\n".join(lines)


def prepare_tree(rev):
    """The csrc/ tree to compile: the working tree's, or one from git archive."""
    if rev is None:
        return None, os.path.join(ROOT, "csrc")
    tmp = tempfile.mkdtemp(prefix="sass_report_")
    archive = subprocess.run(["git", "-C", ROOT, "archive", rev, "csrc"], capture_output=True)
    if archive.returncode != 0:
        sys.exit(f"sass_report.py: git archive {rev} failed: {archive.stderr.decode()}")
    subprocess.run(["tar", "-x", "-C", tmp], input=archive.stdout, check=True)
    return tmp, os.path.join(tmp, "csrc")


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument(
        "sources", nargs="*", help="CUDA sources relative to the repository root (default csrc/*/*_cuda.cu)"
    )
    ap.add_argument("--arch", default="sm_90")
    ap.add_argument("--rev", help="compile the sources as of this git revision")
    ap.add_argument(
        "--listing", action="store_true", help="print every instruction of the serial loops with its stall count"
    )
    ap.add_argument(
        "--loops-of",
        default=r"scan_kernel<float>",
        help="kernels (regex on the demangled name) whose serial loops to show",
    )
    args = ap.parse_args()
    nvcc, cuobjdump = find_tool("nvcc"), find_tool("cuobjdump")
    tmp, csrc = prepare_tree(args.rev)
    sources = args.sources or sorted(
        os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, "csrc", "*", "*_cuda.cu"))
    )
    print(
        f"# sass_report: {args.arch}, nvcc {os.path.realpath(nvcc)}, "
        f"source {'git ' + args.rev if args.rev else 'working tree'}"
    )
    print(
        f"# occupancy: resident warps / max warps per SM for {BLOCK_THREADS}-thread blocks, "
        "limited by registers and static shared memory"
    )
    try:
        with tempfile.TemporaryDirectory() as work:
            for rel in sources:
                src = os.path.join(csrc, os.path.relpath(rel, "csrc"))
                if not os.path.exists(src):
                    sys.exit(f"sass_report.py: no such CUDA source: {rel}")
                cubin = os.path.join(work, os.path.basename(src) + ".cubin")
                res = parse_resources(compile_cubin(nvcc, src, csrc, args.arch, cubin))
                names = demangle(sorted(res))
                print(f"\n## {rel}")
                print(f"{'kernel':<58} {'regs':>4} {'spill st/ld':>11} {'stack':>5} {'smem':>6} {'occ':>5}")
                for mangled in sorted(res, key=lambda n: names[n]):
                    r = res[mangled]
                    print(
                        f"{names[mangled]:<58} {r.get('regs', 0):>4} "
                        f"{r.get('spill_st', 0):>5}/{r.get('spill_ld', 0):<5} "
                        f"{r.get('stack', 0):>5} {r.get('smem', 0):>6} "
                        f"{occupancy(r.get('regs', 0), r.get('smem', 0), args.arch):>5.1%}"
                    )
                wanted = [m for m in res if re.search(args.loops_of, names[m])]
                if not wanted:
                    continue
                sass = subprocess.run([cuobjdump, "-sass", cubin], capture_output=True, text=True, check=True).stdout
                funcs = parse_sass(sass)
                for mangled in wanted:
                    insns = funcs.get(mangled, [])
                    print(f"\n### serial float64 loops of {names[mangled]} ({len(insns)} instructions in the kernel)")
                    found = serial_loops(insns)
                    if not found:
                        print("  none found")
                    for s, e in found:
                        print(describe_loop(insns, s, e, args.listing))
    finally:
        if tmp:
            shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
