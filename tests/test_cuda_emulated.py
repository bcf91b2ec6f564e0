"""The CUDA kernels of csrc/cuda/grouped_lora.cu, EXECUTED on the CPU by an emulator (tests/cuda_emu/).

No GPU is needed: at test time the real, current csrc/cuda/grouped_lora.cu (and the csrc/cuda headers
with its kernels and launches: grouped_lora_kernels.cuh, grouped_lora_launch.cuh) is read and a mechanical
source transform (transform_source) rewrites each kernel launch
``kernel<<<grid, block, smem, stream>>>(args);`` into ``::emu::launch(site, grid, block, smem, stream,
&kernel, args);``, each ``__shared__ T name[n];`` into a reference to the emulated block's shared
memory, and puts one include on top (tests/cuda_emu/include/emu_prelude.h). The result is compiled as
C++ against shim headers (tests/cuda_emu/include: cuda_runtime.h, cuda_bf16.h, cuda_fp16.h, mma.h, the
ATen / c10 CUDA headers it uses) together with the real csrc/checks.cpp and csrc/lora_linear.cpp.
The kernels' logic is not touched. Each block runs as one fiber per CUDA thread with real barrier
semantics; see tests/cuda_emu/README.md for what is and is not emulated.

The emulated entry points (torch.ops.mole_cuda_emu.*, CPU tensors standing in for CUDA ones) are
compared with mole_ext's CPU kernels. If the transform no longer matches the source (its shape
changed), the build fixture FAILS with the reason; it never skips.

MOLE_EXT_EMU_SOURCE=/path/to/copy.cu runs the suite against another copy of grouped_lora.cu
(e.g. one with a planted bug, to see the suite fail); MOLE_EXT_EMU_CSRC=/path/to/copy/of/csrc takes
every emulated source and header from a copy of the csrc tree instead (this file and
test_cuda_emulated_routing.py, which shares the transform and the build below). The builds live in
.cache/cuda_emu/<library>-<hash of every input's text>/.
"""

from __future__ import annotations

import hashlib
import os
import re
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

import mole_ext  # noqa: F401  (registers torch.ops.mole_ext: the CPU kernels are the reference)

ROOT = Path(__file__).resolve().parents[1]
EMU = ROOT / "tests" / "cuda_emu"
SOURCE_ENV = "MOLE_EXT_EMU_SOURCE"  # a copy of csrc/cuda/grouped_lora.cu to emulate instead
CSRC_ENV = "MOLE_EXT_EMU_CSRC"  # a copy of the csrc tree to take every emulated source and header from
# -ffp-contract=off: no FMA fusion (nvcc fuses by default, so the last bits of SIMT sums may differ
# from a GPU's; the CPU reference is compared with a tolerance anyway).
CFLAGS = ["-O1", "-g0", "-fvisibility=hidden", "-ffp-contract=off", "-fno-strict-aliasing", "-Wno-unknown-pragmas"]
# Every load, store and reference binding checked for its type's alignment (a GPU faults on a
# misaligned access); tests/cuda_emu/emu_support.cpp handles the reports, no sanitizer runtime.
SANITIZE_ALIGNMENT = ("-fsanitize=alignment", "-DMOLE_EMU_SANITIZE_ALIGNMENT")


# ---- the source transform ---------------------------------------------------------------------

class TransformError(AssertionError):
    """The CUDA source no longer has the shape the transform expects."""


@dataclass
class Launch:
    line: int
    kernel: str  # the kernel expression, e.g. "row_gemm_kernel<S, Acc, true, EPI>"
    config: list[str]  # grid, block[, smem[, stream]]

    @property
    def name(self) -> str:
        return self.kernel.split("<")[0].split("::")[-1].strip()


def code_only(text: str) -> str:
    """text with comments and string / character literals blanked (same length, newlines kept)."""
    out = list(text)
    i, n = 0, len(text)

    def blank(a, b):
        for k in range(a, b):
            if out[k] != "\n":
                out[k] = " "

    while i < n:
        c, nxt = text[i], text[i + 1] if i + 1 < n else ""
        if c == "/" and nxt == "/":
            j = text.find("\n", i)
            j = n if j < 0 else j
            blank(i, j)
            i = j
        elif c == "/" and nxt == "*":
            j = text.find("*/", i + 2)
            if j < 0:
                raise TransformError("unterminated /* comment")
            blank(i, j + 2)
            i = j + 2
        elif c == "R" and nxt == '"' and (i == 0 or not (text[i - 1].isalnum() or text[i - 1] == "_")):
            m = re.match(r'R"([^(\s]*)\(', text[i:])
            if not m:
                raise TransformError(f"cannot parse a raw string literal at offset {i}")
            end = text.find(")" + m.group(1) + '"', i)
            if end < 0:
                raise TransformError("unterminated raw string literal")
            blank(i + 1, end + len(m.group(1)) + 2)
            i = end + len(m.group(1)) + 2
        elif c in "\"'":
            if c == "'" and i > 0 and text[i - 1].isalnum() and text[i - 1 : i + 2].strip("'").isalnum():
                i += 1  # a digit separator (1'000)
                continue
            j = i + 1
            while j < n and text[j] != c:
                j += 2 if text[j] == "\\" else 1
            if j >= n:
                raise TransformError(f"unterminated literal at offset {i}")
            blank(i + 1, j)
            i = j + 1
        else:
            i += 1
    return "".join(out)


def c_string(s: str) -> str:
    return '"' + s.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _match_back(code: str, end: int, open_c: str, close_c: str) -> int:
    """Index of the open_c matching the close_c at code[end]."""
    depth = 0
    for k in range(end, -1, -1):
        if code[k] == close_c:
            depth += 1
        elif code[k] == open_c:
            depth -= 1
            if depth == 0:
                return k
    raise TransformError(f"unbalanced {open_c}{close_c} before offset {end}")


def _match_forward(code: str, start: int) -> int:
    """Index just past the bracket closing the one at code[start]."""
    pairs = {"(": ")", "[": "]", "{": "}"}
    stack = []
    for k in range(start, len(code)):
        c = code[k]
        if c in pairs:
            stack.append(pairs[c])
        elif c in ")]}":
            if not stack or stack.pop() != c:
                raise TransformError(f"unbalanced {c!r} at offset {k}")
            if not stack:
                return k + 1
    raise TransformError(f"no closing bracket for offset {start}")


def _split_top(code: str, text: str, a: int, b: int) -> list[str]:
    """text[a:b] split at the commas outside brackets (found on the blanked code)."""
    parts, depth, last = [], 0, a
    for k in range(a, b):
        c = code[k]
        if c in "([{":
            depth += 1
        elif c in ")]}":
            depth -= 1
        elif c == "," and depth == 0:
            parts.append(text[last:k].strip())
            last = k + 1
    parts.append(text[last:b].strip())
    return parts


def rewrite_shared(display_name: str, text: str) -> str:
    """``__shared__ [__align__(A)] T name[dims];`` -> ``auto& name = ::emu::shared_var<T[dims], A>(__FILE__,
    __LINE__);`` (the block's shared memory, poisoned before every block; cuda_emu.h), and
    ``extern __shared__ [__align__(A)] T name[];`` -> ``auto& name = ::emu::dynamic_shared<T[], A>(__FILE__,
    __LINE__);`` (the launch's dynamic shared memory)."""
    code = code_only(text)
    pieces, pos = [], 0
    for m in re.finditer(r"\b__shared__\b", code):
        line = text.count("\n", 0, m.start()) + 1
        where = f"{display_name}:{line}"
        ext = re.search(r"\bextern\s+$", code[:m.start()])
        begin = ext.start() if ext else m.start()
        if re.search(r"\b(static|const|volatile)\s+$", code[:begin]):
            raise TransformError(f"{where}: unsupported qualifier before __shared__")
        semi = m.end()
        depth = 0
        while semi < len(code) and not (code[semi] == ";" and depth == 0):
            if code[semi] in "([":
                depth += 1
            elif code[semi] in ")]":
                depth -= 1
            elif code[semi] in "{}":
                raise TransformError(f"{where}: cannot parse the __shared__ declaration")
            semi += 1
        decl = text[m.end():semi]
        dcode = code[m.end():semi]
        if re.search(r"\bextern\b", dcode) or (not ext and re.search(r"\bextern\b[^;{}]*$", code[:m.start()])):
            raise TransformError(f"{where}: expected `extern __shared__ [__align__(A)] T name[];`, got "
                                 f"{text[begin:semi].strip()!r}")
        align = "0"
        am = re.search(r"(?:__align__|alignas)\s*\(", dcode)
        if am:
            close = _match_forward(dcode, am.end() - 1)
            align = decl[am.end():close - 1].strip()
            decl = decl[:am.start()] + " " * (close - am.start()) + decl[close:]
            dcode = dcode[:am.start()] + " " * (close - am.start()) + dcode[close:]
        dm = re.search(r"([A-Za-z_]\w*)\s*((?:\[[^\[\]]*(?:\[[^\[\]]*\][^\[\]]*)*\]\s*)*)$", dcode.rstrip())
        if not dm or "=" in dcode or re.search(r",(?![^<(\[]*[>)\]])", dcode.split("[")[0]):
            raise TransformError(f"{where}: expected `__shared__ [__align__(A)] T name[dims];`, got {decl.strip()!r}")
        name = dm.group(1)
        ctype = " ".join(decl[:dm.start()].split())
        dims = " ".join(decl[dm.start(2):dm.end(2)].split())
        if not ctype or re.search(r"\b(static|extern|const|volatile)\b", ctype):
            raise TransformError(f"{where}: unsupported __shared__ declaration {decl.strip()!r}")
        if ext:
            if re.sub(r"\s", "", dims) != "[]":
                raise TransformError(f"{where}: an extern __shared__ array has exactly one, empty, bound: "
                                     f"{text[begin:semi].strip()!r}")
            repl = f"auto& {name} = ::emu::dynamic_shared<{ctype}[], {align}>(__FILE__, __LINE__)"
        else:
            if re.search(r"\[\s*\]", dims):
                raise TransformError(f"{where}: a __shared__ array without a bound must be extern: {decl.strip()!r}")
            repl = f"auto& {name} = ::emu::shared_var<{ctype}{dims}, {align}>(__FILE__, __LINE__)"
        pieces += [text[pos:begin], repl, "\n" * text.count("\n", begin, semi)]
        pos = semi
    pieces.append(text[pos:])
    return "".join(pieces)


def transform_source(text: str, display_name: str, require_launch: bool = True) -> tuple[str, list[Launch]]:
    """The mechanical rewrite of a .cu file for the emulator:
      * every launch ``KERNEL<<<grid, block[, smem[, stream]]>>>(args);`` becomes
        ``::emu::launch(::emu::LaunchSite{"KERNEL", file, line, &::emu::kernel_name<&KERNEL>}, ::dim3(grid),
        ::dim3(block), smem, stream, &KERNEL, args);``
      * every ``__shared__ [__align__(A)] T name[dims];`` becomes
        ``auto& name = ::emu::shared_var<T[dims], A>(__FILE__, __LINE__);`` and every
        ``extern __shared__ [__align__(A)] T name[];`` becomes
        ``auto& name = ::emu::dynamic_shared<T[], A>(__FILE__, __LINE__);``
      * ``#include "emu_prelude.h"`` on top, then ``#line 1`` so diagnostics and __LINE__ name the real
        file and line (line breaks are kept, so every line keeps its number).
    A header (require_launch=False) may have no launch.
    Raises TransformError when the source does not have that shape."""
    code = code_only(text)
    starts = [m.start() for m in re.finditer(r"<<<", code)]
    if not starts and require_launch:
        raise TransformError(f"{display_name}: no kernel launch (<<<...>>>) found")
    pieces, launches, pos = [], [], 0
    for s in starts:
        if s < pos:
            raise TransformError(f"{display_name}: nested or overlapping launches at offset {s}")
        # the kernel expression: identifier (qualified) with optional template arguments
        k = s - 1
        while k >= 0 and code[k].isspace():
            k -= 1
        targs_begin = k + 1
        if code[k] == ">":
            k = _match_back(code, k, "<", ">") - 1
            targs_begin = k + 1
            while k >= 0 and code[k].isspace():
                k -= 1
        m = re.search(r"(?:::)?[A-Za-z_]\w*(?:\s*::\s*[A-Za-z_]\w*)*$", code[: k + 1])
        if not m:
            raise TransformError(f"{display_name}:{text.count(chr(10), 0, s) + 1}: no kernel name before <<<")
        kbegin = m.start()
        kernel = text[kbegin:s].strip()
        assert targs_begin >= kbegin
        # the launch configuration
        cfg_end = s + 3
        depth = 0
        while True:
            if cfg_end >= len(code):
                raise TransformError(f"{display_name}: unterminated <<< at offset {s}")
            c = code[cfg_end]
            if c in "([{":
                depth += 1
            elif c in ")]}":
                depth -= 1
            elif depth == 0 and code.startswith(">>>", cfg_end):
                break
            cfg_end += 1
        config = _split_top(code, text, s + 3, cfg_end)
        if not 2 <= len(config) <= 4 or not all(config):
            raise TransformError(f"{display_name}: launch of {kernel}: expected <<<grid, block[, smem[, stream]]>>>, "
                                 f"got <<<{text[s + 3:cfg_end]}>>>")
        a = cfg_end + 3
        while a < len(code) and code[a].isspace():
            a += 1
        if a >= len(code) or code[a] != "(":
            raise TransformError(f"{display_name}: launch of {kernel}: no argument list after >>>")
        a_end = _match_forward(code, a)
        semi = a_end
        while semi < len(code) and code[semi].isspace():
            semi += 1
        if semi >= len(code) or code[semi] != ";":
            raise TransformError(f"{display_name}: launch of {kernel}: expected ';' after its arguments")
        line = text.count("\n", 0, s) + 1
        args = text[a + 1 : a_end - 1]
        smem = config[2] if len(config) > 2 else "0"
        stream = config[3] if len(config) > 3 else "nullptr"
        flat_kernel = " ".join(kernel.split())
        call = (f'::emu::launch(::emu::LaunchSite{{{c_string(flat_kernel)}, {c_string(display_name)}, {line}, '
                f'&::emu::kernel_name<&{kernel}>}}, '
                f"::dim3({config[0]}), ::dim3({config[1]}), {smem}, {stream}, &{kernel}"
                + (f", {args}" if args.strip() else args) + ")")
        # keep the line count: the launch's own line breaks (in the kernel expression / config)
        lost = text.count("\n", kbegin, a) - call.count("\n", 0, len(call) - len(args) - 1)
        pieces += [text[pos:kbegin], call, "\n" * max(lost, 0)]
        pos = a_end
        launches.append(Launch(line, flat_kernel, config))
    pieces.append(text[pos:])
    body = rewrite_shared(display_name, "".join(pieces))
    if "<<<" in code_only(body) or ">>>" in code_only(body):
        raise TransformError(f"{display_name}: a <<< or >>> is left after the transform")
    if body.count("\n") != text.count("\n"):
        raise TransformError(f"{display_name}: the transform changed the number of lines")
    header = f'#include "emu_prelude.h"\n#line 1 {c_string(display_name)}\n'
    return header + body, launches


def defined_kernels(text: str) -> set[str]:
    """Names of the __global__ functions of a CUDA source."""
    pattern = r"__global__\s+void\s+(?:__launch_bounds__\s*\((?:[^()]|\([^()]*\))*\)\s*)?([A-Za-z_]\w*)\s*\("
    return set(re.findall(pattern, code_only(text)))


# ---- building the emulated extension ----------------------------------------------------------

@dataclass
class EmuSource:
    """One emulated .cu file as transformed for a build."""
    path: Path
    display: str  # the name in diagnostics, __FILE__ and the launch statistics
    launches: list[Launch]
    kernels: set[str]  # the __global__ functions it defines


class Emulated:
    """An emulated op library (torch.ops.<name>) plus what the build saw."""

    def __init__(self, ops, sources: list[EmuSource], library: Path):
        self.ops = ops
        self.sources = sources  # as transformed for THIS build (the files may change meanwhile)
        self.library = library

    # the first (for grouped_lora: the only) source
    @property
    def source(self) -> Path:
        return self.sources[0].path

    @property
    def launches(self) -> list[tuple[str, Launch]]:
        """(display name, launch) of every launch in every transformed file (the .cu files and the
        csrc/cuda headers they include)."""
        return [(src.display, launch) for src in self.sources for launch in src.launches]

    @property
    def kernels(self) -> set[str]:
        return set().union(*(src.kernels for src in self.sources))

    def stats(self) -> dict:
        """Counters since the last reset_stats(): launches per kernel name and per launch site
        (source line; "site_at" / "ever_at": per (file, line)), blocks, barriers, warp collectives,
        mma_sync calls, 16- and 8-byte vector accesses, atomics, launches with dynamic shared memory;
        and since the library was loaded: launches per site ("ever", "ever_at") and per kernel
        specialisation ("instances": full names with template arguments)."""
        out = {"launch": {}, "site": {}, "ever": {}, "site_at": {}, "ever_at": {}, "instances": {}}
        for line in self.ops.stats().splitlines():
            f = line.split("\t")
            if f[0] == "instance":  # launches per kernel specialisation since the library was loaded
                out["instances"][f[1]] = int(f[2])
            elif f[0] in ("launch", "ever"):
                kernel, site = f[1].rsplit(" @ ", 1)
                file, line_no = site.rsplit(":", 1)
                line_no = int(line_no)
                if f[0] == "ever":  # per launch site since the library was loaded
                    out["ever"][line_no] = int(f[2])
                    out["ever_at"][(file, line_no)] = int(f[2])
                    continue
                name = kernel.split("<")[0].strip()
                out["launch"][name] = out["launch"].get(name, 0) + int(f[2])
                out["site"][line_no] = int(f[2])
                out["site_at"][(file, line_no)] = int(f[2])
            else:
                out[f[0]] = int(f[1])
        return out


def csrc_root() -> Path:
    """The csrc tree the emulated builds read (MOLE_EXT_EMU_CSRC: a copy of it)."""
    return Path(os.environ.get(CSRC_ENV) or ROOT / "csrc").resolve()


def display_name(path: Path) -> str:
    try:
        return str(path.relative_to(ROOT))
    except ValueError:
        return str(path)


def _headers(root: Path) -> list[Path]:
    """Every header an emulated build can include: csrc's and the emulator's."""
    found = [f for d in (root, root / "core", root / "cuda") for f in sorted(d.glob("*"))
             if f.suffix in (".h", ".cuh")]
    return found + sorted(f for f in EMU.rglob("*") if f.is_file() and f.suffix == ".h")


_INCLUDE = re.compile(r'^\s*#\s*include\s+"([^"]+)"', re.M)


def local_headers(src: Path, root: Path) -> list[Path]:
    """The headers of the csrc/cuda tree (root / "cuda") that `src` includes, directly or through
    one another, with `#include "..."`, in first-seen order. These are transformed like the .cu
    files (a kernel's __shared__ declarations and the launches may live in them)."""
    cuda_dir = (root / "cuda").resolve()
    seen: list[Path] = []
    todo = [src]
    while todo:
        cur = todo.pop(0)
        for name in _INCLUDE.findall(cur.read_text()):
            for base in (cur.parent, cuda_dir):
                cand = (base / name).resolve()
                if cand.is_file():
                    break
            else:
                continue
            if cand.parent == cuda_dir and cand.suffix in (".cuh", ".h") and cand not in seen:
                seen.append(cand)
                todo.append(cand)
    return seen


def _prune(cache: Path, name: str, keep: Path, newest: int = 3) -> None:
    """Removes old builds of library `name` (content-keyed, so every edit makes a new one): all but
    the `newest` most recently used, and only those unused for an hour."""
    import shutil
    import time

    dirs = sorted((d for d in cache.glob(f"{name}-*") if d.is_dir() and d != keep),
                  key=lambda d: d.stat().st_mtime, reverse=True)
    for d in dirs[newest - 1:]:
        if time.time() - d.stat().st_mtime > 3600:
            shutil.rmtree(d, ignore_errors=True)


def build_library(name: str, cu_sources: list[Path], cpp_sources: list[Path],
                  extra_cflags: tuple[str, ...] = ()) -> Emulated:
    """Transforms cu_sources, compiles them with the emulator runtime (emu_support.cpp, built as the op
    library `name`) and cpp_sources, loads the result and returns torch.ops.<name>. The build
    directory is keyed by the text of every input (sources, csrc and emulator headers), the flags,
    torch and Python: an edit anywhere the build reads makes a fresh build."""
    from torch.utils import cpp_extension

    root = csrc_root()
    cflags = CFLAGS + [f"-DMOLE_EMU_LIBRARY={name}", *extra_cflags]
    emitted, sources = [], []
    headers: list[Path] = []
    for src in cu_sources:
        src = Path(src).resolve()
        text = src.read_text()
        display = display_name(src)
        generated, launches = transform_source(text, display, require_launch=False)
        emitted.append((src.stem + "_emulated.cpp", generated))
        sources.append(EmuSource(src, display, launches, defined_kernels(text)))
        headers += [h for h in local_headers(src, root) if h not in headers]
    # csrc/cuda headers with kernels or launches are transformed too and written next to the
    # generated .cpp files under their own names: `#include "x.cuh"` searches the including
    # file's directory first, so the transformed copy is the one compiled.
    for hdr in headers:
        text = hdr.read_text()
        code = code_only(text)
        if not re.search(r"\b__shared__\b|<<<|__global__", code):
            continue
        display = display_name(hdr)
        generated, launches = transform_source(text, display, require_launch=False)
        emitted.append((hdr.name, generated))
        sources.append(EmuSource(hdr, display, launches, defined_kernels(text)))
    if not any(src.launches for src in sources):
        raise TransformError(f"{', '.join(src.display for src in sources)}: no kernel launch (<<<...>>>) found")
    support = [EMU / "emu_support.cpp", *[Path(c).resolve() for c in cpp_sources]]
    h = hashlib.sha1(f"{name}|{torch.__version__}|{sys.version}|{cflags}|{root}".encode())
    for fname, generated in emitted:
        h.update(f"\0{fname}\0{generated}".encode())
    for f in support + _headers(root):
        h.update(f"\0{f}\0".encode() + f.read_bytes())
    cache = ROOT / ".cache" / "cuda_emu"
    build_dir = cache / f"{name}-{h.hexdigest()[:12]}"
    build_dir.mkdir(parents=True, exist_ok=True)
    os.utime(build_dir)  # most recently used (for _prune)
    _prune(cache, name, build_dir)
    # The runtime, the op file(s) and csrc's .cpp files compile as ONE translation unit (each would
    # parse the ATen headers again: ~10 s apiece on the 2-core CI); every .cu stays its own, as nvcc
    # compiles it.
    emitted.append(("emu_support_unity.cpp", "// Generated by tests/test_cuda_emulated.py (build_library).\n"
                    + "".join(f"#include {c_string(str(f))}\n" for f in support)))
    gens = []
    for fname, generated in emitted:
        gen = build_dir / fname
        if not gen.exists() or gen.read_text() != generated:  # unchanged: keep the mtime, no rebuild
            gen.write_text(generated)
        gens.append(gen)
    cpp_extension.load(
        name=name,
        sources=[str(g) for g in gens if g.suffix == ".cpp"],
        extra_include_paths=[str(EMU / "include"), str(root / "cuda"), str(root)],
        extra_cflags=cflags,
        build_directory=str(build_dir),
        is_python_module=False,
        verbose=False,
    )
    library = max(build_dir.glob(f"{name}*.so"), key=lambda p: p.stat().st_mtime)
    return Emulated(getattr(torch.ops, name), sources, library)


def build_emulated() -> Emulated:
    """torch.ops.mole_cuda_emu: csrc/cuda/grouped_lora.cu (or MOLE_EXT_EMU_SOURCE) emulated."""
    root = csrc_root()
    source = Path(os.environ.get(SOURCE_ENV) or root / "cuda" / "grouped_lora.cu")
    return build_library("mole_cuda_emu", [source],
                         [EMU / "emu_ops_grouped_lora.cpp", root / "checks.cpp", root / "lora_linear.cpp"],
                         SANITIZE_ALIGNMENT)


@pytest.fixture(scope="session")
def emu_build() -> Emulated:
    # A TransformError (the source changed shape) or a compiler error is an error of every test
    # that uses the emulator (pytest reports the cached exception for each): never a skip.
    return build_emulated()


@pytest.fixture
def emu(emu_build) -> Emulated:
    emu_build.ops.configure(132, 0, 0, 1)  # H100 / H200 SM count; grid order; forward thread order
    emu_build.ops.set_vectorized(True)
    emu_build.ops.set_pipelined(True)
    return emu_build


# ---- helpers ------------------------------------------------------------------------------------

ops_cpu = torch.ops.mole_ext
DTYPES = [torch.float32, torch.float64, torch.bfloat16, torch.float16]
# (rtol, atol as a fraction of the largest expected magnitude) against the CPU kernel, as in
# test_cuda_grouped_lora.py: the 16-bit paths round the rank-r intermediate to the input dtype once
# and multiply on (emulated) tensor cores with fp32 accumulation.
TOL = {torch.float64: (1e-12, 1e-12), torch.float32: (1e-4, 2e-5), torch.bfloat16: (2e-2, 1.5e-2),
       torch.float16: (4e-3, 3e-3)}
PAD = 64  # elements of NaN around every test-owned tensor


def offsets_of(counts) -> torch.Tensor:
    return torch.tensor([0] + torch.tensor(counts, dtype=torch.long).cumsum(0).tolist(), dtype=torch.int32)


def padded(t: torch.Tensor, misalign: int = 0) -> torch.Tensor:
    """A copy of t inside a NaN-filled buffer (PAD elements before, PAD after; `misalign` more in front,
    so the rows lose their 16-byte alignment): out-of-bounds reads bring NaN into the results, and
    check_padding() finds out-of-bounds writes."""
    buf = torch.full((t.numel() + 2 * PAD + misalign,), float("nan"), dtype=t.dtype)
    v = buf[PAD + misalign: PAD + misalign + t.numel()].view(t.shape)
    v.copy_(t)
    return v


def check_padding(v: torch.Tensor, what: str) -> None:
    buf = torch.as_strided(v, (v.untyped_storage().nbytes() // v.element_size(),), (1,), 0)
    lo, hi = v.storage_offset(), v.storage_offset() + v.numel()
    assert buf[:lo].isnan().all() and buf[hi:].isnan().all(), f"{what}: written out of bounds"


def make(counts, r, d_in, d_out, dtype, seed=0, row_scale=True):
    g = torch.Generator().manual_seed(seed)
    n, k = sum(counts), len(counts)
    x = torch.randn(n, d_in, generator=g).to(dtype)
    a = (torch.randn(k, r, d_in, generator=g) / max(d_in, 1) ** 0.5).to(dtype)
    b = (torch.randn(k, d_out, r, generator=g) / r ** 0.5).to(dtype)
    gy = torch.randn(n, d_out, generator=g).to(dtype)
    rs = torch.rand(n, generator=g) + 0.5 if row_scale else None
    return x, a, b, offsets_of(counts), rs, gy


def close(actual: torch.Tensor, expected: torch.Tensor, dtype, what: str) -> None:
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    assert actual.dtype == expected.dtype, f"{what}: dtype {actual.dtype} != {expected.dtype}"
    if expected.numel() == 0:
        return
    a, e = actual.double(), expected.double()
    assert not a.isnan().any(), f"{what}: NaN in the emulated result (an unwritten output or a poisoned read)"
    rtol, afrac = TOL[dtype]
    atol = afrac * e.abs().max().item() + 1e-30
    err = (a - e).abs()
    bad = err > atol + rtol * e.abs()
    assert not bad.any(), (f"{what}: {int(bad.sum())}/{e.numel()} elements out of tolerance; max abs err "
                           f"{err.max().item():.3e} (atol {atol:.3e}, rtol {rtol})")


def run_all(ops, x, a, b, off, rs, gy, scaling=0.75, misalign=0):
    """The four grouped LoRA entry points on NaN-padded inputs -> dict of results (also checks that
    nothing was written around the test-owned outputs)."""
    xp, ap, bp, gyp = (padded(t, misalign) for t in (x, a, b, gy))
    rsp = None if rs is None else padded(rs, misalign)
    res = {"y": ops.grouped_lora(xp, ap, bp, off, scaling, rsp)}
    base = torch.randn(x.shape[0], b.shape[1], generator=torch.Generator().manual_seed(7)).to(x.dtype)
    out = padded(base, misalign)
    ops.grouped_lora_add_out(out, xp, ap, bp, off, scaling, rsp)
    check_padding(out, "grouped_lora_add_out: out")
    res["add_out"] = out.clone()
    res["gx"], res["ga"], res["gb"], res["grs"] = ops.grouped_lora_backward(gyp, xp, ap, bp, off, scaling, rsp)
    gbase = torch.randn(x.shape, generator=torch.Generator().manual_seed(8)).to(x.dtype)
    gx = padded(gbase, misalign)
    res["ga2"], res["gb2"], res["grs2"] = ops.grouped_lora_backward_add_out(gx, gyp, xp, ap, bp, off, scaling, rsp)
    check_padding(gx, "grouped_lora_backward_add_out: grad_x")
    res["gx2"] = gx.clone()
    # the forward's saved shrink h (grouped_lora_h): the same y, and both backward ops given h return
    # what they return recomputing it, bit for bit
    y_h, h = ops.grouped_lora_h(xp, ap, bp, off, scaling, rsp)
    assert torch.equal(y_h, res["y"]), "grouped_lora_h's y differs from grouped_lora's"
    res["h"] = h
    hp = padded(h, misalign)
    for key, t in zip(("gx", "ga", "gb", "grs"), ops.grouped_lora_backward(gyp, xp, ap, bp, off, scaling, rsp, hp)):
        assert torch.equal(t, res[key]), f"grouped_lora_backward with the saved h: {key} differs"
    gx = padded(gbase, misalign)
    for key, t in zip(("ga2", "gb2", "grs2"),
                      ops.grouped_lora_backward_add_out(gx, gyp, xp, ap, bp, off, scaling, rsp, hp)):
        assert torch.equal(t, res[key]), f"grouped_lora_backward_add_out with the saved h: {key} differs"
    assert torch.equal(gx, res["gx2"]), "grouped_lora_backward_add_out with the saved h: grad_x differs"
    check_padding(gx, "grouped_lora_backward_add_out (saved h): grad_x")
    check_padding(hp, "the saved h")
    for t in (xp, ap, bp, gyp) + (() if rsp is None else (rsp,)):
        check_padding(t, "an input")
    return res


def reference(x, a, b, off, rs, gy, scaling=0.75):
    return run_all(ops_cpu, x, a, b, off, rs, gy, scaling)


def compare(got: dict, want: dict, dtype, label: str) -> None:
    for key in want:
        close(got[key], want[key], dtype, f"{label} {key}")


# (counts per expert, r, in, out): N = 1, 33, 97, K = 1 / 3 / 8 with empty experts, in / out not
# multiples of 16, r from 1 to 128, and long reductions that split (in = 1000: the shrink GEMM over
# `in`; out = 600: the backward's dY B over `out`).
SHAPES = [
    pytest.param([1], 1, 40, 72, id="N1-K1-r1"),
    pytest.param([33], 8, 24, 40, id="N33-K1-r8"),
    pytest.param([0, 33, 0], 16, 40, 72, id="N33-K3-empty-r16"),
    pytest.param([5, 0, 92], 128, 40, 72, id="N97-K3-empty-r128"),
    pytest.param([2, 0, 1], 8, 1000, 600, id="N3-K3-splitK"),
    pytest.param([0, 0, 70, 1, 0, 17, 0, 9], 16, 33, 17, id="N97-K8-odd"),
]


# ---- the emulator itself ------------------------------------------------------------------------

def test_transform_matches_the_current_source(emu):
    """Every launch of the source and of the csrc/cuda headers it includes was rewritten, and the kernels
    launched are the ones defined: grouped_lora.cu's kernels and launches live in its headers."""
    names = {src.path.name for src in emu.sources}
    assert {"grouped_lora_kernels.cuh", "grouped_lora_launch.cuh"} <= names, names
    for src in emu.sources:
        assert len(src.launches) == len(re.findall(r"<<<", code_only(src.path.read_text()))), src.display
    assert {launch.name for _, launch in emu.launches} == emu.kernels, "a __global__ kernel is never launched"


def test_transform_rejects_what_it_cannot_parse():
    good = "__global__ void k(int* p) {}\nvoid f(int* p) {\n  k<<<dim3(2, 1), 256, 0, s>>>(\n    p);\n}\n"
    out, launches = transform_source(good, "x.cu")
    assert [(l.line, l.kernel, l.config) for l in launches] == [(3, "k", ["dim3(2, 1)", "256", "0", "s"])]
    assert out.count("\n") == good.count("\n") + 2 and "&k, \n    p)" in out
    # comments and strings are not code
    assert transform_source(good + '// k<<<1, 1>>>();\nconst char* s = "<<<";\n', "x.cu")[1] == launches
    # dynamic shared memory: every extern declaration names the launch's smem bytes
    dyn = ("__global__ void k() {\n  extern __shared__ __align__(16) int32_t s[];  // [w][b]\n  extern\n"
           "  __shared__ float t[ ];\n}\nvoid f() { k<<<1, 2, 64>>>(); }\n")
    out, launches = transform_source(dyn, "x.cu")
    assert "auto& s = ::emu::dynamic_shared<int32_t[], 16>(__FILE__, __LINE__);  // [w][b]" in out
    assert "auto& t = ::emu::dynamic_shared<float[], 0>(__FILE__, __LINE__)\n;" in out
    assert out.count("\n") == dyn.count("\n") + 2 and launches[0].config[2] == "64"
    for bad in ("void f() {}\n",                                    # no launch at all
                "void f() { k<<<1>>>(); }\n",                        # no block size
                "void f() { k<<<1, 2>>>; }\n",                       # no argument list
                "void f() { k<<<1, 2>>>(a) + 1; }\n",                # not a statement
                "__global__ void k() { extern __shared__ float s[4]; }\nvoid f() { k<<<1, 2>>>(); }\n",
                "__global__ void k() { extern __shared__ float s[][4]; }\nvoid f() { k<<<1, 2>>>(); }\n",
                "__global__ void k() { __shared__ float s[]; }\nvoid f() { k<<<1, 2>>>(); }\n",
                "__global__ void k() { static __shared__ float s[2]; }\nvoid f() { k<<<1, 2>>>(); }\n"):
        with pytest.raises(TransformError):
            transform_source(bad, "x.cu")


@pytest.mark.parametrize("name,expect", [
    ("divergent_barrier", "wait at different __syncthreads"),
    ("exit_before_barrier", "reached by 255 of the 256 threads"),
    ("wmma_misaligned", "not 256-bit (32-byte) aligned"),
    ("wmma_bad_ldm", "not a multiple of 16 bytes"),
    ("wmma_half_warp", "issued different wmma calls"),
    ("shfl_partial_mask", "only full-warp masks"),
    ("shfl_divergent", "reached by 16 of the 32 lanes"),
    # the uint4 copy's own check, or (first, in this build) the alignment sanitizer's
    ("misaligned_vec16", ("16-byte vector load from a misaligned address",
                          "for type 'const struct uint4', which requires 16-byte alignment")),
    ("oob_write", "out-of-bounds write"),
])
def test_emulator_enforces_cuda_rules(emu, name, expect):
    pattern = "|".join(map(re.escape, expect)) if isinstance(expect, tuple) else re.escape(expect)
    with pytest.raises(RuntimeError, match=pattern):
        emu.ops.selftest(name)


def test_emulator_shared_memory_and_collectives(emu):
    ops = emu.ops
    # a missing barrier reads the neighbour's slot before it is written: poison (NaN) shows
    assert ops.selftest("missing_barrier")[:255].isnan().all()
    assert torch.equal(ops.selftest("with_barrier")[:256], (torch.arange(256) + 1).remainder(256).float())
    # shared memory is fresh (poisoned) in every block, not left over from the previous one
    stale = ops.selftest("stale_shared")
    assert (stale[:256] == 1).all() and stale[256:512].isnan().all()
    # common.cuh's scans and reductions (warp shuffles) give the right numbers
    r = ops.selftest("collectives")
    t = torch.arange(256)
    assert torch.equal(r[:256], t * (t - 1) // 2)
    assert torch.equal(r[256:512], (t // 32) * 32 * 32 + 496)
    assert r[512].item() == r[513].item() == 255 * 256 // 2
    # a whole 16x16x16 wmma product
    i, j = torch.arange(16)[:, None], torch.arange(16)[None, :]
    a, b = (i + j).float(), (i - j).float()
    assert torch.equal(ops.selftest("wmma_product")[:256].view(16, 16), a @ b)


# ---- the grouped LoRA kernels against the CPU kernel --------------------------------------------

@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("counts,r,d_in,d_out", SHAPES)
def test_matches_cpu_kernel(emu, counts, r, d_in, d_out, dtype):
    x, a, b, off, rs, gy = make(counts, r, d_in, d_out, dtype, row_scale=len(counts) != 8)
    emu.ops.reset_stats()
    got = run_all(emu.ops, x, a, b, off, rs, gy)
    compare(got, reference(x, a, b, off, rs, gy), dtype, f"{dtype} {counts} r={r} {d_in}x{d_out}")
    st = emu.stats()
    if dtype in (torch.bfloat16, torch.float16):
        assert st.get("mma", 0) > 0, "the 16-bit path did not run on the (emulated) tensor cores"
    else:
        assert st.get("mma", 0) == 0
    if d_in >= 512:
        assert st["split_launches"] > 0, "the long reduction was not split"
    # the weight gradients of an expert without rows are exactly zero (+0.0), not unwritten
    for e, c in enumerate(counts):
        if c == 0:
            for key in ("ga", "gb", "ga2", "gb2"):
                g = got[key][e]
                assert (g == 0).all() and not torch.signbit(g).any(), f"{key}[{e}] of an empty expert is not +0"


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_vectorized_and_element_paths_are_bit_identical(emu, dtype):
    """The 16-byte path (csrc/cuda/tuning.h switch on) and the element path give the same bits, both
    with 16-byte aligned rows and with rows that are not (where the vector path must fall back);
    so does the 16-byte path with the plain main loop instead of the pipelined one (bf16 / fp16)."""
    ops = emu.ops
    for counts, r, d_in, d_out, misalign in (([0, 97, 0, 3], 16, 40, 72, 0), ([2, 1], 8, 1000, 600, 0),
                                             ([33, 64], 64, 40, 72, 1), ([5, 4], 16, 33, 17, 0),
                                             # 16-bit: the dY pass's two halves, 2 column chunks
                                             ([30, 0, 70], 64, 40, 600, 0)):
        x, a, b, off, rs, gy = make(counts, r, d_in, d_out, dtype)
        results = {}
        for vec in (True, False):
            ops.set_vectorized(vec)
            ops.reset_stats()
            results[vec] = run_all(ops, x, a, b, off, rs, gy, misalign=misalign)
            results[vec, "vec16"] = emu.stats()["vec16"]
        ops.set_vectorized(True)
        ops.set_pipelined(False)
        try:
            plain = run_all(ops, x, a, b, off, rs, gy, misalign=misalign)
        finally:
            ops.set_pipelined(True)
        label = f"{dtype} {counts} {d_in}x{d_out} misalign={misalign}"
        for key in results[True]:
            assert torch.equal(results[True][key], results[False][key]), f"{label} {key}: vector != element path"
            assert torch.equal(results[True][key], plain[key]), f"{label} {key}: pipelined != plain main loop"
        assert results[False, "vec16"] == 0, f"{label}: 16-byte accesses with vectorisation off"
        if misalign == 0 and d_in % 8 == 0:
            assert results[True, "vec16"] > 0, f"{label}: the 16-byte path never ran"
        compare(results[True], reference(x, a, b, off, rs, gy), dtype, label)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("counts,r,d_in,d_out", [([40, 0, 90, 7], 32, 72, 40), ([2, 0, 1], 8, 1000, 600),
                                                 ([40, 0, 90, 7], 64, 24, 600)])  # bf16: dY pass, two halves
def test_results_do_not_depend_on_block_or_thread_order(emu, dtype, counts, r, d_in, d_out):
    """Blocks in grid / reverse / random order and the threads of a block in forward / reverse /
    random order between barriers: a race between threads or blocks would change the bits."""
    x, a, b, off, rs, gy = make(counts, r, d_in, d_out, dtype, seed=3)
    runs = []
    for block_order, thread_order, seed in ((0, 0, 1), (1, 1, 1), (2, 2, 5), (2, 2, 6)):
        emu.ops.configure(132, block_order, thread_order, seed)
        runs.append(run_all(emu.ops, x, a, b, off, rs, gy))
    emu.ops.configure(132, 0, 0, 1)
    for other in runs[1:]:
        for key in runs[0]:
            assert torch.equal(runs[0][key], other[key]), f"{key} depends on the execution order"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_fewer_sms_change_the_split_not_the_result(emu, dtype):
    x, a, b, off, rs, gy = make([3, 0, 2], 16, 1100, 700, dtype, seed=4)
    want = reference(x, a, b, off, rs, gy)
    for sms, split in ((1, False), (132, True)):
        emu.ops.configure(sms, 0, 0, 1)
        emu.ops.reset_stats()
        compare(run_all(emu.ops, x, a, b, off, rs, gy), want, dtype, f"{sms} SMs")
        assert (emu.stats()["split_launches"] > 0) == split
    emu.ops.configure(132, 0, 0, 1)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("counts,r,d_in,d_out,misalign", [
    pytest.param([1], 1, 40, 72, 0, id="N1-r1"),
    pytest.param([0, 97, 0], 16, 40, 600, 0, id="one-expert-2-column-chunks"),
    pytest.param([5, 0, 92], 17, 24, 72, 0, id="r17-empty"),
    pytest.param([40, 33, 1, 0], 32, 40, 1100, 0, id="r32-3-column-chunks"),
    pytest.param([30, 0, 40], 24, 40, 72, 1, id="misaligned"),
    pytest.param([0, 0, 0], 8, 40, 72, 0, id="N0"),
    # r > 32: rank chunks of 32 (the last one ragged for 40 and 48), adjacent blocks of two halves
    # (512 columns of dY a block)
    pytest.param([5, 0, 92], 48, 24, 72, 0, id="r48-empty"),
    pytest.param([0, 61, 0], 40, 24, 1100, 0, id="r40-one-expert-3-column-chunks"),
    pytest.param([1], 64, 24, 40, 0, id="r64-N1"),
    pytest.param([30, 0, 40], 64, 24, 72, 1, id="r64-misaligned"),
    pytest.param([20, 0, 13, 30], 128, 24, 72, 0, id="r128-any-rank"),
])
def test_fused_dy_pass(emu, dtype, counts, r, d_in, d_out, misalign):
    """bf16 / fp16: G = dY B and dB = dY^T Hs come from one pass over dY (dy_pass_kernel; r > 32 in
    rank chunks of 32; r >= 128 only with the any-rank switch). Its sums run in another order than
    the two-pass path (row_gemm + wgrad), so both are compared with the CPU kernel within tolerance
    and with each other; it is bit-identical with and without the saved h, and from rerun to rerun."""
    x, a, b, off, rs, gy = make(counts, r, d_in, d_out, dtype, seed=11)
    want = reference(x, a, b, off, rs, gy)
    runs = {}
    for fused in (True, False, True):
        emu.ops.set_fused_dy(fused)
        emu.ops.set_fused_dy_any_rank(r >= 128)
        emu.ops.reset_stats()
        try:
            got = run_all(emu.ops, x, a, b, off, rs, gy, misalign=misalign)
        finally:
            emu.ops.set_fused_dy(True)
            emu.ops.set_fused_dy_any_rank(False)
        launched = emu.stats()["launch"].get("dy_pass_kernel", 0)
        assert launched == (4 if fused and sum(counts) > 0 else 0), (fused, launched)  # 4 backward runs
        compare(got, want, dtype, f"fused={fused}")
        if fused in runs:
            for key in got:
                assert torch.equal(got[key], runs[fused][key]), f"{key}: the fused pass is not reproducible"
        runs[fused] = got
    for key in want:
        close(runs[True][key], runs[False][key], dtype, f"fused vs two passes: {key}")
    for e, c in enumerate(counts):
        if c == 0:
            for key in ("gb", "gb2"):
                g = runs[True][key][e]
                assert (g == 0).all() and not torch.signbit(g).any(), f"{key}[{e}] of an empty expert is not +0"


def test_fused_dy_pass_by_default_below_rank_128(emu):
    """By default the fused pass runs where its fp32 partials of G cost fewer DRAM bytes than a
    second read of dY (r < 128 for 16-bit types: 8 r / 512 < 2; bench/traffic.py); the any-rank
    switch extends it."""
    for r, any_rank, fused in ((127, False, True), (128, False, False), (128, True, True)):
        x, a, b, off, rs, gy = make([20, 13], r, 24, 72, torch.bfloat16)
        emu.ops.set_fused_dy_any_rank(any_rank)
        emu.ops.reset_stats()
        try:
            got = run_all(emu.ops, x, a, b, off, rs, gy)
        finally:
            emu.ops.set_fused_dy_any_rank(False)
        compare(got, reference(x, a, b, off, rs, gy), torch.bfloat16, f"r = {r}, any rank {any_rank}")
        assert ("dy_pass_kernel" in emu.stats()["launch"]) == fused, (r, any_rank)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_weight_gradient_chunks_follow_the_wave(emu, dtype):
    """The weight gradients' row chunks fill whole waves of the occupancy (2 blocks per SM here).
    dA has 1 output tile, dB 2. With 132 SMs both want 64 chunks and get the 64-row minimum:
    2000 / 64 + 3 segments = 34. With one SM (waves of 2 blocks): dA 11 chunks fill 6 waves (9 wanted,
    224 rows: 8 + 3), dB 8 wanted (256 rows: 7 + 3 = 10 chunks, 20 blocks in 10 waves). The sums'
    order changes with the chunks, so the results match the CPU kernel within tolerance either way,
    and each SM count repeats its own bits."""
    x, a, b, off, rs, gy = make([1200, 0, 800], 8, 40, 72, dtype, seed=6)
    want = reference(x, a, b, off, rs, gy)
    blocks, runs = {}, {}
    for sms in (1, 132, 1):
        emu.ops.configure(sms, 0, 0, 1)
        emu.ops.reset_stats()
        got = run_all(emu.ops, x, a, b, off, rs, gy)
        compare(got, want, dtype, f"{sms} SMs")
        blocks.setdefault(sms, emu.stats()["blocks"])
        if sms in runs:
            for key in got:
                assert torch.equal(got[key], runs[sms][key]), f"{key}: a rerun on {sms} SMs changed the bits"
        runs[sms] = got
    emu.ops.configure(132, 0, 0, 1)
    # run_all runs the backward 4 times (plain and add_out, each without and with the saved h). For
    # bf16, dB comes from the fused dY pass, whose row chunks follow the same rule over its 1 column
    # chunk (as dA's 1 tile: 34 or 11 chunks).
    db_extra = (34 - 11) * 1 if dtype == torch.bfloat16 else (34 - 10) * 2
    assert blocks[132] - blocks[1] == 4 * ((34 - 11) * 1 + db_extra), blocks


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_no_rows(emu, dtype):
    x, a, b, off, rs, gy = make([0, 0, 0], 8, 40, 72, dtype)
    got = run_all(emu.ops, x, a, b, off, rs, gy)
    compare(got, reference(x, a, b, off, rs, gy), dtype, "N = 0")
    for key in ("ga", "gb", "ga2", "gb2"):
        assert (got[key] == 0).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_backward_add_out_into_its_own_input(emu, dtype):
    """grad_x may share memory with x or (in == out) with grad_y, as the CPU kernel allows: every
    kernel that reads them must run before the one that writes grad_x."""
    x, a, b, off, rs, gy = make([30, 0, 40], 8, 40, 40, dtype, seed=2)
    for alias in ("x", "grad_y"):
        results = []
        for ops, saved_h in ((emu.ops, False), (emu.ops, True), (ops_cpu, False)):
            xc, gyc = x.clone(), gy.clone()
            h = ops.grouped_lora_h(xc, a, b, off, 0.75, rs)[1] if saved_h else None
            gx = xc if alias == "x" else gyc
            grads = ops.grouped_lora_backward_add_out(gx, gyc, xc, a, b, off, 0.75, rs, h)
            results.append((gx.clone(),) + tuple(grads))
        for got, with_h, want, key in zip(*results, ("grad_x", "grad_a", "grad_b", "grad_row_scale")):
            close(got, want, dtype, f"grad_x aliasing {alias}: {key}")
            assert torch.equal(with_h, got), f"grad_x aliasing {alias}, saved h: {key} differs from recompute"


def test_noncontiguous_outputs(emu):
    x, a, b, off, rs, gy = make([10, 0, 23], 8, 40, 24, torch.bfloat16)
    out = torch.randn(24, 33).to(torch.bfloat16).t()  # [33, 24], not contiguous
    want = out.clone()
    emu.ops.grouped_lora_add_out(out, x, a, b, off, 0.5, rs)
    ops_cpu.grouped_lora_add_out(want, x, a, b, off, 0.5, rs)
    close(out, want, torch.bfloat16, "add_out into a transposed view")
    gx = torch.randn(40, 33).to(torch.bfloat16).t()
    gwant = gx.clone()
    emu.ops.grouped_lora_backward_add_out(gx, gy, x, a, b, off, 0.5, rs)
    ops_cpu.grouped_lora_backward_add_out(gwant, gy, x, a, b, off, 0.5, rs)
    close(gx, gwant, torch.bfloat16, "backward_add_out into a transposed view")


def test_bad_offsets_are_reported(emu):
    x, a, b, _, rs, gy = make([3, 4, 3], 8, 40, 24, torch.float32)
    for bad in ([0, 5, 3, 10], [0, 3, 7, 9], [1, 3, 7, 10]):
        off = torch.tensor(bad, dtype=torch.int32)
        with pytest.raises(RuntimeError, match="offsets"):
            emu.ops.grouped_lora(x, a, b, off, 0.5, rs)
        with pytest.raises(RuntimeError, match="offsets"):
            emu.ops.grouped_lora_backward(gy, x, a, b, off, 0.5, rs)
    # nothing stays pending: the next good call works
    emu.ops.grouped_lora(x, a, b, offsets_of([3, 4, 3]), 0.5, rs)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_lora_linear(emu, dtype):
    x, a, b, off, rs, _ = make([20, 0, 13], 8, 40, 24, dtype)
    g = torch.Generator().manual_seed(9)
    w = (torch.randn(24, 40, generator=g) / 40 ** 0.5).to(dtype)
    bias = torch.randn(24, generator=g).to(dtype)
    x32 = x.float()  # any float dtype, cast to the weight's inside
    lx = torch.randn(x.shape, generator=g)
    for args in ((x32, w, bias, a, b, off, 0.5, rs, None), (x32, w, None, a, b, off, 0.5, None, lx)):
        y = emu.ops.lora_linear(*args)
        close(y, ops_cpu.lora_linear(*args), dtype, "lora_linear")
        y_h, h = emu.ops.lora_linear_h(*args)
        assert torch.equal(y_h, y), "lora_linear_h's y differs from lora_linear's"
        lora_in = (x32 if args[-1] is None else lx).to(dtype)
        assert torch.equal(h, emu.ops.grouped_lora_h(lora_in, a, b, off, 0.5, args[7])[1]), "lora_linear_h's h"
        close(h, ops_cpu.lora_linear_h(*args)[1], torch.float32 if dtype == torch.float32 else dtype, "h")


def simt_subprocess(emu) -> set[tuple[str, int]]:
    """MOLE_EXT_GROUPED_LORA_SIMT=1 (read once per process) sends bf16 / fp16 through the SIMT variant
    of the 16-bit kernels: a fresh process loads this session's emulated library, compares both dtypes
    with the CPU kernel and returns the launch sites (file, line) it ran. Cached per session."""
    if emu.library not in _SIMT_SITES:
        import subprocess

        code = (
            "import sys, torch; sys.path.insert(0, %r); import test_cuda_emulated as t\n"
            "torch.ops.load_library(%r); ops = torch.ops.mole_cuda_emu\n"
            "for dt in (torch.bfloat16, torch.float16):\n"
            "    for counts, r, d_in, d_out in (([5, 0, 40], 16, 40, 72), ([3, 2], 8, 24, 600)):\n"
            "        x, a, b, off, rs, gy = t.make(counts, r, d_in, d_out, dt)\n"
            "        ops.reset_stats()\n"
            "        want = t.reference(x, a, b, off, rs, gy)\n"
            "        t.compare(t.run_all(ops, x, a, b, off, rs, gy), want, dt, f'SIMT {dt} {counts}')\n"
            "        assert '\\nmma\\t0\\n' in ops.stats(), 'tensor cores used despite MOLE_EXT_GROUPED_LORA_SIMT=1'\n"
            "print('SITES', sorted({tuple(l.split(chr(9))[1].rsplit(' @ ', 1)[1].rsplit(':', 1))\n"
            "                       for l in ops.stats().splitlines() if l.startswith('ever')}))\n" % (str(ROOT / "tests"), str(emu.library)))
        env = dict(os.environ, MOLE_EXT_GROUPED_LORA_SIMT="1")
        p = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
        assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
        _SIMT_SITES[emu.library] = {(f, int(line)) for f, line in eval(p.stdout.split("SITES", 1)[1].strip())}
    return _SIMT_SITES[emu.library]


_SIMT_SITES: dict = {}


def test_simt_cross_check_path(emu):
    assert simt_subprocess(emu)


def test_every_launch_site_ran(emu):
    """Every kernel launch of the source executed in this session (or in the SIMT subprocess): the
    16-byte path, rows that are not 16-byte aligned, the element path, each dtype."""
    ops = emu.ops
    for dtype in DTYPES:
        x, a, b, off, rs, gy = make([5, 0, 70], 8, 40, 600, dtype)
        for vec, misalign in ((True, 0), (True, 1), (False, 0)):
            ops.set_vectorized(vec)
            run_all(ops, x, a, b, off, rs, gy, misalign=misalign)
    ops.set_vectorized(True)
    ran = set(emu.stats()["ever_at"]) | simt_subprocess(emu)
    missing = [f"{launch.kernel} ({file}:{launch.line})" for file, launch in emu.launches
               if (file, launch.line) not in ran]
    assert not missing, f"launches never executed (add a case that reaches them): {missing}"
