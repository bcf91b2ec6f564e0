"""Machine-code checks of the grouped LoRA kernels, without a GPU (issue 13, point 2).

Disassembles the built extension (python/mole_ext/_C*.so) with `cuobjdump` (the toolkit's, or the
one in the `triton` wheel torch installs) and asserts, for the tensor-core kernels of the grouped
LoRA (row_gemm / wgrad with tensor cores, bf16 and fp16) at --arch (sm_90a):

  * every epilogue stores 16-byte vectors: at least one 128-bit global store (STG.E.128);
  * the tensor-core operands come from shared memory through LDSM (ldmatrix), with no generic
    loads (LD.E: what wmma's bf16 fragment loads used to compile to);
  * no local memory: no STL / LDL instruction, no stack frame, no local bytes;
  * registers and shared memory allow the intended occupancy, kGemmMinBlocksPerSm resident blocks
    of kThreads threads per SM (read from csrc/cuda/grouped_lora_tile.cuh).

It also checks that no kernel of the library, at any architecture, touches local memory (STL /
LDL), prints one table row per grouped LoRA kernel, and with --ptxas-report writes the per-kernel
resource table (bench/results/ptxas.md) from the same disassembly.

  python bench/sass_check.py                       # the in-place build, sm_90a
  python bench/sass_check.py --ptxas-report bench/results/ptxas.md

Exit status 0 when every check passes; 1 with the failures listed; 2 when the library cannot be
checked (no CUDA code in it, no cuobjdump). A build made with MOLE_EXT_SKIP_CUDA=1 has no CUDA code
by request: that is reported as a skip (status 0) with the reason.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import re
import shutil
import subprocess
import sys
from collections import Counter
from dataclasses import dataclass, field

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TILE_HEADER = os.path.join(ROOT, "csrc", "cuda", "grouped_lora_tile.cuh")
REGS_PER_SM = 65536
MAX_REGS_PER_THREAD = 255
REG_GRANULARITY = 8  # registers per thread are allocated in steps of 8 (256 per warp)
# shared memory per SM available to blocks (cudaDevAttrMaxSharedMemoryPerMultiprocessor)
SMEM_PER_SM = {"sm_80": 167936, "sm_86": 102400, "sm_89": 102400, "sm_90": 233472, "sm_90a": 233472}


class CheckError(Exception):
    """The library cannot be checked at all (exit status 2)."""


@dataclass
class Kernel:
    mangled: str
    arch: str
    source: str = "?"  # the translation unit (cuobjdump's ELF identifier)
    ops: Counter = field(default_factory=Counter)  # SASS opcodes with modifiers, e.g. "STG.E.128"
    regs: int | None = None
    stack: int = 0
    shared: int = 0
    local: int = 0
    name: str = ""  # demangled, without namespaces and parameter list

    def count(self, pred) -> int:
        return sum(n for op, n in self.ops.items() if pred(op))


# ---- parsing cuobjdump output -------------------------------------------------------------------

_ARCH = re.compile(r"^\s*arch\s*=\s*(sm_\w+)")
_IDENT = re.compile(r"^\s*identifier\s*=\s*(\S+)")
_FUNC = re.compile(r"^\s*Function\s*:?\s*(\S+?):?\s*$")
# an instruction line: /*0123*/  [@P0 | @!UP1]  OPCODE.MODS  operands ;
_INSN = re.compile(r"^\s*/\*[0-9a-f]+\*/\s+(?:@!?U?P[T0-9]+\s+)?([A-Z][A-Z0-9_]*(?:\.[A-Z0-9_]+)*)")
_RES = re.compile(r"REG:(\d+)\s+STACK:(\d+)\s+SHARED:(\d+)\s+LOCAL:(\d+)")


def parse_sass(text: str) -> dict[tuple[str, str], Kernel]:
    """`cuobjdump -sass` output -> {(mangled name, arch): Kernel with opcode counts}."""
    kernels: dict[tuple[str, str], Kernel] = {}
    arch, ident, cur = "?", "?", None
    for line in text.splitlines():
        if m := _ARCH.match(line):
            arch, cur = m.group(1), None
        elif m := _IDENT.match(line):
            ident = m.group(1)
        elif m := _FUNC.match(line):
            cur = kernels.setdefault((m.group(1), arch), Kernel(m.group(1), arch, ident))
        elif cur is not None and (m := _INSN.match(line)):
            cur.ops[m.group(1)] += 1
    return kernels


def parse_res_usage(text: str, kernels: dict[tuple[str, str], Kernel]) -> None:
    """`cuobjdump -res-usage` output: registers, stack, shared and local bytes into `kernels`
    (kernels missing from the disassembly are added)."""
    arch, ident, name = "?", "?", None
    for line in text.splitlines():
        if m := _ARCH.match(line):
            arch = m.group(1)
        elif m := _IDENT.match(line):
            ident = m.group(1)
        elif m := _FUNC.match(line):
            name = m.group(1)
        elif name is not None and (m := _RES.search(line)):
            k = kernels.setdefault((name, arch), Kernel(name, arch, ident))
            k.regs, k.stack, k.shared, k.local = (int(g) for g in m.groups())
            name = None


def short_name(demangled: str) -> str:
    """Demangled name without the namespaces and the parameter list, for readable tables."""
    for ns in ("mole_ext::cuda::(anonymous namespace)::", "mole_ext::cuda::glora::", "mole_ext::"):
        demangled = demangled.replace(ns, "")
    if demangled.endswith(")"):  # drop the parameter list: the parenthesis that closes at the end
        depth = 0
        for i in range(len(demangled) - 1, -1, -1):
            depth += {")": 1, "(": -1}.get(demangled[i], 0)
            if depth == 0:
                return demangled[:i]
    return demangled


def demangle_all(kernels) -> None:
    names = sorted({k.mangled for k in kernels})
    try:
        out = subprocess.run(["c++filt"], input="\n".join(names), capture_output=True, text=True,
                             check=True).stdout.splitlines()
    except (OSError, subprocess.CalledProcessError):
        out = names
    table = dict(zip(names, out if len(out) == len(names) else names))
    for k in kernels:
        k.name = short_name(table[k.mangled])


# ---- the checks ---------------------------------------------------------------------------------

def intended_occupancy(header: str = TILE_HEADER) -> tuple[int, int]:
    """(threads per block, resident blocks per SM) of the tensor-core GEMM kernels, from the source."""
    with open(header) as f:
        text = f.read()
    threads = re.search(r"constexpr\s+int\s+kThreads\s*=\s*(\d+)\s*;", text)
    blocks = re.search(r"constexpr\s+int\s+kGemmMinBlocksPerSm\s*=\s*(\d+)\s*;", text)
    if not threads or not blocks:
        raise CheckError(f"{header}: kThreads / kGemmMinBlocksPerSm not found")
    return int(threads.group(1)), int(blocks.group(1))


def reg_limit(threads: int, blocks: int) -> int:
    per_thread = REGS_PER_SM // (threads * blocks)
    return min(MAX_REGS_PER_THREAD, per_thread // REG_GRANULARITY * REG_GRANULARITY)


_TC_KERNEL = re.compile(r"^void (?:(row_gemm_kernel|wgrad_kernel)<(__half|__nv_bfloat16), float, true\b"
                        r"|dy_pass_kernel<(__half|__nv_bfloat16)\b)")


def is_tensor_core_kernel(k: Kernel) -> bool:
    return bool(_TC_KERNEL.match(k.name))


def is_grouped_lora(k: Kernel) -> bool:
    return "glora" in k.mangled or "grouped_lora" in k.source


def local_memory(k: Kernel) -> int:
    return k.count(lambda op: op.startswith(("STL", "LDL")))


def generic_loads(k: Kernel) -> int:
    return k.count(lambda op: op == "LD" or op.startswith("LD."))


def check_kernel(k: Kernel, threads: int, blocks: int) -> list[str]:
    """What is wrong with one tensor-core kernel (empty: nothing)."""
    bad = []
    if k.ops["STG.E.128"] == 0:
        bad.append(f"no 128-bit global store (STG.E.128) in the epilogue "
                   f"({k.count(lambda op: op.startswith('STG'))} narrower STG)")
    ldsm = k.count(lambda op: op.startswith("LDSM"))
    if ldsm == 0:
        bad.append("tensor-core operands not loaded by LDSM (ldmatrix)")
    if generic_loads(k):
        bad.append(f"{generic_loads(k)} generic loads (LD.E) where shared-memory loads belong")
    if local_memory(k) or k.stack or k.local:
        bad.append(f"local memory: {local_memory(k)} STL/LDL, stack {k.stack} B, local {k.local} B")
    limit = reg_limit(threads, blocks)
    if k.regs is None:
        bad.append("no resource usage found")
    elif k.regs > limit:
        bad.append(f"{k.regs} registers > {limit} ({blocks} blocks of {threads} threads per SM)")
    smem_sm = SMEM_PER_SM.get(k.arch)
    if smem_sm and k.shared * blocks > smem_sm:
        bad.append(f"{k.shared} B shared memory x {blocks} blocks > {smem_sm} B per SM")
    return bad


@dataclass
class Result:
    rows: list[tuple[Kernel, list[str]]]  # the grouped LoRA kernels at the checked arch, tensor-core ones checked
    failures: list[str]


def check(kernels: dict[tuple[str, str], Kernel], arch: str, threads: int, blocks: int) -> Result:
    """Applies the checks; a library without the expected kernels fails (never a vacuous pass)."""
    failures: list[str] = []
    at_arch = [k for k in kernels.values() if k.arch == arch]
    if not at_arch:
        archs = sorted({k.arch for k in kernels.values()})
        raise CheckError(f"no {arch} code in the library (it has: {', '.join(archs) or 'no CUDA code at all'})")
    rows = []
    for k in sorted((k for k in at_arch if is_grouped_lora(k)), key=lambda k: k.name):
        bad = check_kernel(k, threads, blocks) if is_tensor_core_kernel(k) else []
        rows.append((k, bad))
        failures += [f"{k.name} [{arch}]: {b}" for b in bad]
    tc = [k for k, _ in rows if is_tensor_core_kernel(k)]
    for kind in ("row_gemm_kernel", "wgrad_kernel", "dy_pass_kernel"):
        for dtype in ("__half", "__nv_bfloat16"):
            if not any(f"{kind}<{dtype}," in k.name for k in tc):
                failures.append(f"no tensor-core {kind} for {dtype} at {arch}: the check has nothing to check")
    checked = {id(k) for k, bad in rows if bad}
    for k in kernels.values():  # every kernel of the library, every architecture
        if local_memory(k) and id(k) not in checked:
            failures.append(f"{k.name or k.mangled} [{k.arch}]: {local_memory(k)} local-memory instructions (STL/LDL)")
    return Result(rows, failures)


def format_table(result: Result, arch: str, threads: int, blocks: int) -> str:
    head = (f"grouped LoRA kernels at {arch} (checked: tensor-core ones; register limit {reg_limit(threads, blocks)} "
            f"for {blocks} blocks x {threads} threads per SM)")
    cols = ["kernel", "regs", "smem B", "STG.E.128", "STG other", "LDSM", "LD.E", "STL/LDL", "check"]
    lines = []
    for k, bad in result.rows:
        other_stg = k.count(lambda op: op.startswith("STG") and op != "STG.E.128")
        verdict = ("FAIL" if bad else "ok") if is_tensor_core_kernel(k) else "-"
        lines.append([k.name, str(k.regs), str(k.shared), str(k.ops["STG.E.128"]), str(other_stg),
                      str(k.count(lambda op: op.startswith("LDSM"))), str(generic_loads(k)), str(local_memory(k)),
                      verdict])
    widths = [max(len(c), *(len(r[i]) for r in lines)) if lines else len(c) for i, c in enumerate(cols)]
    fmt = lambda r: "  ".join(v.ljust(w) if i == 0 else v.rjust(w) for i, (v, w) in enumerate(zip(r, widths)))  # noqa: E731
    return "\n".join([head, fmt(cols), *(fmt(r) for r in lines)])


# ---- the library and the tools ------------------------------------------------------------------

def find_library() -> str:
    found = sorted(glob.glob(os.path.join(ROOT, "python", "mole_ext", "_C*.so")))
    if not found:
        raise CheckError("no python/mole_ext/_C*.so: build the extension first (make install)")
    return found[0]


def build_info(lib: str) -> dict:
    path = os.path.join(os.path.dirname(lib), "_build_info.json")
    if not os.path.exists(path):
        return {}
    with open(path) as f:
        return json.load(f)


def skipped_cuda(info: dict) -> str | None:
    """The reason when the build left out CUDA by request (MOLE_EXT_SKIP_CUDA), else None."""
    if info.get("cuda_built") is False and "MOLE_EXT_SKIP_CUDA" in str(info.get("cuda_reason", "")):
        return str(info["cuda_reason"])
    return None


def find_cuobjdump() -> str:
    cands = [os.path.join(d, "bin", "cuobjdump") for d in (os.environ.get("CUDA_HOME"), "/usr/local/cuda") if d]
    try:
        import triton  # the wheel torch installs ships cuobjdump / nvdisasm

        cands.append(os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump"))
    except ImportError:
        pass
    cands.append(shutil.which("cuobjdump") or "")
    for c in cands:
        if c and os.path.isfile(c) and os.access(c, os.X_OK):
            return c
    raise CheckError("no cuobjdump (looked in $CUDA_HOME/bin, /usr/local/cuda/bin, the triton wheel, PATH)")


def disassemble(lib: str, tool: str) -> dict[tuple[str, str], Kernel]:
    def run(*args):
        p = subprocess.run([tool, *args, lib], capture_output=True, text=True)
        if p.returncode != 0:
            msg = (p.stderr or p.stdout).strip()
            raise CheckError(f"{os.path.basename(tool)} {' '.join(args)} failed on {lib}: {msg[-500:]}")
        return p.stdout

    kernels = parse_sass(run("-sass"))
    parse_res_usage(run("-res-usage"), kernels)
    if not kernels:
        raise CheckError(f"{lib} holds no CUDA kernels")
    demangle_all(kernels.values())
    return kernels


# ---- bench/results/ptxas.md ---------------------------------------------------------------------

def write_report(path: str, kernels, info: dict) -> None:
    """bench/results/ptxas.md: registers, local memory and shared memory of every kernel of the
    library at every architecture, from the same disassembly the checks read (the one generator of
    that table; tests/compile_other_torch.py only prints a summary of its compile)."""
    ks = sorted(kernels, key=lambda k: (k.source, k.name, k.arch))
    for k in ks:  # the build records absolute source paths: keep them from csrc/ on
        k.source = k.source[k.source.find("csrc/"):] if "csrc/" in k.source else k.source
    with_local = [k for k in ks if local_memory(k) or k.stack or k.local]
    rows = ["| source | kernel | arch | registers | STL / LDL instructions | stack (B) | local (B) | shared (B) |",
            "|---|---|---|---|---|---|---|---|"]
    rows += [f"| {k.source} | `{k.name}` | {k.arch} | {k.regs if k.regs is not None else '?'} | {local_memory(k)} | "
             f"{k.stack} | {k.local} | {k.shared} |" for k in ks]
    with open(path, "w") as f:
        f.write(f"# Kernel resource usage\n\n`python bench/sass_check.py --ptxas-report {os.path.relpath(path, ROOT)}`: "
                f"`cuobjdump -res-usage` and `-sass` of the built library (torch {info.get('torch', '?')}, "
                f"CUDA {info.get('torch_cuda', '?')}, archs {info.get('cuda_archs', '?')}, nvcc -O3). "
                f"{len(ks)} kernel instantiations, at most {max((k.regs or 0) for k in ks)} registers, "
                f"{len(with_local)} with local memory. Shared memory as cuobjdump reports it (sm_90 adds the "
                f"1 KB the system reserves per block).\n\n" + "\n".join(rows) + "\n")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--lib", help="the extension library (default: python/mole_ext/_C*.so)")
    ap.add_argument("--arch", default="sm_90a", help="architecture whose kernels are checked")
    ap.add_argument("--ptxas-report", help="write the per-kernel resource table (Markdown) here")
    args = ap.parse_args(argv)
    try:
        lib = args.lib or find_library()
        info = build_info(lib)
        if reason := skipped_cuda(info):
            print(f"sass_check: SKIPPED, the library was built without CUDA on purpose ({reason})")
            return 0
        kernels = disassemble(lib, find_cuobjdump())
        threads, blocks = intended_occupancy()
        result = check(kernels, args.arch, threads, blocks)
    except CheckError as e:
        print(f"sass_check: CANNOT CHECK: {e}", file=sys.stderr)
        return 2
    print(format_table(result, args.arch, threads, blocks))
    if args.ptxas_report:
        write_report(args.ptxas_report, kernels.values(), info)
        print("wrote", args.ptxas_report)
    n_tc = sum(is_tensor_core_kernel(k) for k, _ in result.rows)
    if result.failures:
        print(f"\nsass_check: FAILED ({len(result.failures)}):", *result.failures, sep="\n  ", file=sys.stderr)
        return 1
    print(f"\nsass_check: ok: {n_tc} tensor-core kernels at {args.arch} with 128-bit epilogue stores, LDSM operand "
          f"loads, no local memory, registers for {blocks} blocks/SM; no local memory in any of {len(kernels)} kernels")
    return 0


if __name__ == "__main__":
    sys.exit(main())
