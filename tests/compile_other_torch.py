"""Compiles every C++ and CUDA source of mole_ext against the headers of another PyTorch release
(default 2.11.0, the GPU machine's), for every architecture of the build, without installing it.

The GPU machine brings its own PyTorch (bench/gpu_check.sh builds the extension there); this
check finds header incompatibilities here, on the CPU machine, before a scarce GPU session
spends its time on a failed build. It compiles only (no link, no import of that torch): the
wheel is downloaded once (`pip download --no-deps`, pinned version) into .cache/ and only its
include/ tree is unpacked.

  python tests/compile_other_torch.py                 # torch 2.11.0, archs "8.0;9.0a"
  python tests/compile_other_torch.py --torch 2.12.0 --jobs 2

The CUDA sources compile with `-Xptxas -v`: the script prints a summary of the kernels' registers
and spills per architecture (issue 4 asks for that check). A spill is reported, not fatal here:
it costs speed, not correctness (bench/sass_check.py, run by `make test` on the built library,
fails on local memory and writes the per-kernel table, bench/results/ptxas.md).

Exit status 0 when every source compiles; else 1, with each failing compiler's output.
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import glob
import os
import re
import shutil
import subprocess
import sys
import sysconfig
import tempfile
import time
import zipfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def torch_headers(version: str, cache: str) -> str:
    """include/ of torch==version, downloaded and unpacked once under cache."""
    dest = os.path.join(cache, f"torch-{version}")
    inc = os.path.join(dest, "torch", "include")
    if os.path.isdir(os.path.join(inc, "ATen")) and os.path.isfile(os.path.join(dest, CPP_EXTENSION)):
        return inc
    os.makedirs(cache, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=cache) as tmp:
        subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:",
                        f"torch=={version}", "-d", tmp], check=True)
        (wheel,) = glob.glob(os.path.join(tmp, "torch-*.whl"))
        with zipfile.ZipFile(wheel) as z:
            members = [m for m in z.namelist()
                       if m.startswith("torch/include/") or m in ("torch/version.py", CPP_EXTENSION)]
            z.extractall(os.path.join(tmp, "x"), members)
        shutil.rmtree(dest, ignore_errors=True)
        os.rename(os.path.join(tmp, "x"), dest)
    return inc


CPP_EXTENSION = "torch/utils/cpp_extension.py"


def default_std(inc: str) -> str:
    """The -std that release's BuildExtension adds when setup.py passes none (as ours does):
    c++17 up to at least 2.11, whatever its headers could take."""
    with open(os.path.join(os.path.dirname(os.path.dirname(inc)), CPP_EXTENSION)) as f:
        found = re.findall(r"cpp_flag_prefix \+ '(c\+\+\d+)'", f.read())
    return f"-std={found[0]}" if found else "-std=c++17"


def gencode(archs: str):
    """TORCH_CUDA_ARCH_LIST ("8.0;9.0a") -> nvcc -gencode flags."""
    flags = []
    for a in archs.replace(" ", ";").split(";"):
        if not a:
            continue
        num = a.replace(".", "").replace("+PTX", "")
        flags.append(f"-gencode=arch=compute_{num},code=sm_{num}")
    return flags


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--torch", default="2.11.0", help="PyTorch release whose headers to compile against")
    ap.add_argument("--archs", default=os.environ.get("TORCH_CUDA_ARCH_LIST", "8.0;9.0a"))
    ap.add_argument("--jobs", type=int, default=max(1, min(2, os.cpu_count() or 1)))
    ap.add_argument("--cache", default=os.path.join(ROOT, ".cache"))
    args = ap.parse_args(argv)

    cuda_home = os.environ.get("CUDA_HOME") or os.path.realpath("/usr/local/cuda")
    nvcc = os.path.join(cuda_home, "bin", "nvcc")
    inc = torch_headers(args.torch, args.cache)
    with open(os.path.join(os.path.dirname(inc), "version.py")) as f:
        version_line = next((ln.strip() for ln in f if ln.startswith("__version__")), "?")
    site = sysconfig.get_paths()["purelib"]
    # as setup.py: the wheels' cuBLAS/cuSPARSE headers after every -I dir (the toolkit's win)
    nvidia = [d for d in sorted(glob.glob(os.path.join(site, "nvidia", "*", "include")))
              if any(os.path.exists(os.path.join(d, h)) for h in ("cublas_v2.h", "cusparse.h"))]
    includes = [os.path.join(ROOT, "csrc"), inc, os.path.join(inc, "torch", "csrc", "api", "include"),
                os.path.join(cuda_home, "include"), sysconfig.get_paths()["include"]]
    common = ["-O3", "-DTORCH_API_INCLUDE_EXTENSION_H", "-DTORCH_EXTENSION_NAME=_C", "-DMOLE_EXT_WITH_CUDA=1"] + \
        [f"-I{d}" for d in includes] + [f for d in nvidia for f in ("-isystem", d)]
    # the flags setup.py passes, and the -std that release's build adds (setup.py passes none)
    std = default_std(inc)
    cxx = ["c++", "-fPIC", std, "-ffp-contract=off", *common]
    cu = [nvcc, *common, "--expt-relaxed-constexpr", "--expt-extended-lambda", "-U__CUDA_NO_HALF_OPERATORS__",
          "-U__CUDA_NO_HALF_CONVERSIONS__", "-U__CUDA_NO_BFLOAT16_CONVERSIONS__", "--compiler-options", "-fPIC",
          std, "-Xptxas=-v", *gencode(args.archs)]
    sources = sorted(glob.glob(os.path.join(ROOT, "csrc", "*.cpp")) + glob.glob(os.path.join(ROOT, "csrc", "cpu", "*.cpp"))
                     + glob.glob(os.path.join(ROOT, "csrc", "cuda", "*.cu")))
    print(f"compiling {len(sources)} sources against torch {args.torch} headers ({version_line}), {std}, "
          f"archs {args.archs}, {args.jobs} jobs", flush=True)

    def compile_one(src):
        t0 = time.time()
        with tempfile.TemporaryDirectory() as tmp:
            cmd = (cu if src.endswith(".cu") else cxx) + ["-c", src, "-o", os.path.join(tmp, "out.o")]
            p = subprocess.run(cmd, capture_output=True, text=True)
        return src, p.returncode, p.stdout + p.stderr, time.time() - t0

    failed, kernels = 0, []
    with cf.ThreadPoolExecutor(args.jobs) as pool:
        for src, rc, log, secs in pool.map(compile_one, sources):
            rel = os.path.relpath(src, ROOT)
            print(f"  {'ok  ' if rc == 0 else 'FAIL'} {rel} ({secs:.0f} s)", flush=True)
            if rc != 0:
                failed += 1
                print(log[-6000:], flush=True)
            elif src.endswith(".cu"):
                kernels += [dict(k, source=rel) for k in parse_ptxas(log)]
    print(f"torch {args.torch}: {len(sources) - failed}/{len(sources)} sources compile", flush=True)
    if kernels:
        report_ptxas(kernels, args, version_line)
    return 1 if failed else 0


_ENTRY = re.compile(r"Compiling entry function '([^']+)' for '([^']+)'")
_SPILL = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")
_USED = re.compile(r"Used (\d+) registers(?:.*?(\d+) bytes smem)?")


def parse_ptxas(log: str):
    """Kernels from `nvcc -Xptxas -v` output: name (mangled), arch, registers, spills, smem."""
    out, cur = [], None
    for line in log.splitlines():
        if m := _ENTRY.search(line):
            cur = {"mangled": m.group(1), "arch": m.group(2), "stack": 0, "spill_st": 0, "spill_ld": 0}
            out.append(cur)
        elif cur is not None and (m := _SPILL.search(line)):
            cur.update(stack=int(m.group(1)), spill_st=int(m.group(2)), spill_ld=int(m.group(3)))
        elif cur is not None and (m := _USED.search(line)):
            cur.update(regs=int(m.group(1)), smem=int(m.group(2) or 0))
    return out


def _short(mangled: str) -> str:
    """Demangled, without namespaces and parameters (bench/sass_check.py's short_name)."""
    sys.path.insert(0, os.path.join(ROOT, "bench"))
    from sass_check import short_name

    try:
        name = subprocess.run(["c++filt", mangled], capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return mangled
    return short_name(name)


def report_ptxas(kernels, args, version_line) -> None:
    spills = [k for k in kernels if k["spill_st"] or k["spill_ld"]]
    print(f"ptxas: {len(kernels)} kernel instantiations, at most {max(k.get('regs', 0) for k in kernels)} registers; "
          f"{len(spills)} spill" + ("" if not spills else ": " + ", ".join(
              f"{_short(k['mangled'])} [{k['arch']}] {k['spill_st']}/{k['spill_ld']} B" for k in spills)), flush=True)


if __name__ == "__main__":
    sys.exit(main())
