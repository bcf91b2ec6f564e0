"""bench/sass_check.py's parser and checks on small canned `cuobjdump` outputs (CPU only, no library).

The real check runs in `make test` (Makefile target sass-check) on the built extension; these tests
make sure that a parsing or rule bug shows up as a failure rather than a vacuous pass: a kernel
with the defects the issue found (32-bit epilogue stores, generic bf16 operand loads, spills, too
many registers) must fail, and the same kernel without them must pass.
"""

from __future__ import annotations

import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "bench"))

import sass_check as sc  # noqa: E402

# mangled names as nvcc emits them (namespace mole_ext::cuda::glora)
ROW_BF16 = "_ZN8mole_ext4cuda5glora15row_gemm_kernelI13__nv_bfloat16fLb1ELNS1_3EpiE1ELi1EEEvNS1_11RowGemmArgsIT_EE"
ROW_F16 = "_ZN8mole_ext4cuda5glora15row_gemm_kernelI6__halffLb1ELNS1_3EpiE0ELi0EEEvNS1_11RowGemmArgsIT_EE"
WG_BF16 = "_ZN8mole_ext4cuda5glora12wgrad_kernelI13__nv_bfloat16fLb1EEEvNS1_9WgradArgsIT_EE"
WG_F16 = "_ZN8mole_ext4cuda5glora12wgrad_kernelI6__halffLb1EEEvNS1_9WgradArgsIT_EE"
SIMT = "_ZN8mole_ext4cuda5glora15row_gemm_kernelIffLb0ELNS1_3EpiE0ELi0EEEvNS1_11RowGemmArgsIT_EE"
DY_BF16 = "_ZN8mole_ext4cuda5glora14dy_pass_kernelI13__nv_bfloat16Lb1EEEvNS1_10DyPassArgsIT_EE"
DY_F16 = "_ZN8mole_ext4cuda5glora14dy_pass_kernelI6__halfLb0EEEvNS1_10DyPassArgsIT_EE"

HEADER = """
Fatbin elf code:
================
arch = {arch}
code version = [1,8]
host = linux
compile_size = 64bit
identifier = csrc/cuda/grouped_lora.cu
"""


def insn(i: int, text: str) -> str:
    return (f"        /*{i * 16:04x}*/                   {text} ;{' ' * 20}/* 0x000fe20000000800 */\n"
            f"{' ' * 101}/* 0x000fe20000000a00 */\n")


def function(name: str, body: list[str]) -> str:
    out = f"\n\t\tFunction : {name}\n\t.headerflags\t@\"EF_CUDA_SM90 EF_CUDA_VIRTUAL_SM(EF_CUDA_SM90)\"\n"
    return out + "".join(insn(i, t) for i, t in enumerate(body))


GOOD = ["LDC R1, c[0x0][0x28]", "LDSM.16.M88.4 R8, [R20]", "@!P0 LDSM.16.MT88.4 R16, [R16]",
        "HMMA.16816.F32.BF16 R4, R8.reuse, R16, RZ", "@P1 STG.E.U16 desc[UR4][R2.64], R5",
        "STG.E.128 desc[UR4][R2.64], R4", "EXIT"]
# what the issue found: four 32-bit STG.E per 16 bytes, generic LD.E operand loads, plus a spill
BAD = ["LD.E R18, desc[UR4][R8.64]", "LD.E R19, desc[UR4][R8.64+0x280]", "HMMA.16816.F32.BF16 R4, R12, R10, RZ",
       "STG.E desc[UR4][R2.64], R4", "STG.E desc[UR4][R2.64+0x4], R5", "STL [R1], R4", "@!UPT LDL R4, [R1]",
       "EXIT"]


def sass(arch: str = "sm_90a", bad: bool = False) -> str:
    text = HEADER.format(arch=arch) + f"\n\tcode for {arch}\n"
    for name in (ROW_F16, WG_BF16, WG_F16, SIMT, DY_BF16, DY_F16):
        text += function(name, GOOD)
    return text + function(ROW_BF16, BAD if bad else GOOD)


def res_usage(arch: str = "sm_90a", regs: int = 76, shared: int = 31744) -> str:
    text = HEADER.format(arch=arch) + "\nResource usage:\n Common:\n  GLOBAL:28 CONSTANT[4]:224\n"
    for name in (ROW_F16, WG_BF16, WG_F16, SIMT, DY_BF16, DY_F16, ROW_BF16):
        r = regs if name == ROW_BF16 else 40
        text += (f" Function {name}:\n  REG:{r} STACK:0 SHARED:{shared} LOCAL:0 CONSTANT[0]:648 TEXTURE:0 "
                 f"SURFACE:0 SAMPLER:0\n")
    return text


def parsed(bad=False, regs=76, shared=31744, arch="sm_90a"):
    kernels = sc.parse_sass(sass(arch, bad))
    sc.parse_res_usage(res_usage(arch, regs, shared), kernels)
    sc.demangle_all(kernels.values())
    return kernels


def test_parser_counts_opcodes_predicates_and_resources():
    k = parsed()[(ROW_BF16, "sm_90a")]
    assert k.name == "void row_gemm_kernel<__nv_bfloat16, float, true, (Epi)1, 1>"
    assert k.source == "csrc/cuda/grouped_lora.cu" and k.arch == "sm_90a"
    assert k.ops["LDSM.16.M88.4"] == 1 and k.ops["LDSM.16.MT88.4"] == 1  # the predicated one counts
    assert k.ops["STG.E.128"] == 1 and k.ops["STG.E.U16"] == 1 and k.ops["LDC"] == 1
    assert sum(k.ops.values()) == len(GOOD)  # the encoding-only continuation lines are not instructions
    assert (k.regs, k.stack, k.shared, k.local) == (76, 0, 31744, 0)
    assert sc.is_tensor_core_kernel(k) and not sc.is_tensor_core_kernel(parsed()[(SIMT, "sm_90a")])


def test_good_kernels_pass():
    result = sc.check(parsed(), "sm_90a", 256, 3)
    assert result.failures == []
    assert sum(sc.is_tensor_core_kernel(k) for k, _ in result.rows) == 6
    assert parsed()[(DY_BF16, "sm_90a")].name == "void dy_pass_kernel<__nv_bfloat16, true>"
    table = sc.format_table(result, "sm_90a", 256, 3)
    assert "register limit 80" in table and table.count(" ok") == 6


def test_the_defects_the_issue_found_fail():
    failures = "\n".join(sc.check(parsed(bad=True), "sm_90a", 256, 3).failures)
    assert "no 128-bit global store (STG.E.128)" in failures
    assert "not loaded by LDSM" in failures and "2 generic loads (LD.E)" in failures
    assert "local memory: 2 STL/LDL" in failures
    assert "(Epi)1, 1>" in failures and "__half" not in failures  # only the bad kernel is named


def test_registers_and_shared_memory_against_the_intended_occupancy():
    assert sc.reg_limit(256, 3) == 80 and sc.reg_limit(256, 1) == 255 and sc.reg_limit(128, 4) == 128
    failures = sc.check(parsed(regs=88), "sm_90a", 256, 3).failures
    assert any("88 registers > 80" in f for f in failures)
    assert sc.check(parsed(regs=80), "sm_90a", 256, 3).failures == []
    failures = sc.check(parsed(shared=80 * 1024), "sm_90a", 256, 3).failures
    assert any("shared memory x 3 blocks" in f for f in failures)


def test_nothing_to_check_fails_rather_than_passes():
    kernels = parsed()
    del kernels[(ROW_BF16, "sm_90a")]
    assert any("no tensor-core row_gemm_kernel for __nv_bfloat16" in f
               for f in sc.check(kernels, "sm_90a", 256, 3).failures)
    kernels = parsed()
    del kernels[(DY_F16, "sm_90a")]  # the fused backward pass is checked too
    assert any("no tensor-core dy_pass_kernel for __half" in f for f in sc.check(kernels, "sm_90a", 256, 3).failures)
    with pytest.raises(sc.CheckError, match="no sm_90a code"):
        sc.check(parsed(arch="sm_80"), "sm_90a", 256, 3)
    with pytest.raises(sc.CheckError, match="no CUDA code at all"):
        sc.check({}, "sm_90a", 256, 3)


def test_local_memory_anywhere_fails():
    text = sass() + HEADER.format(arch="sm_80") + "\n\tcode for sm_80\n" + function(
        "_ZN8mole_ext4cuda12_GLOBAL__N_111some_kernelEv", ["STL [R1], R4", "EXIT"])
    kernels = sc.parse_sass(text)
    sc.parse_res_usage(res_usage(), kernels)
    sc.demangle_all(kernels.values())
    assert any("some_kernel" in f and "[sm_80]" in f and "local-memory" in f
               for f in sc.check(kernels, "sm_90a", 256, 3).failures)


def test_skip_only_for_a_build_without_cuda_on_purpose():
    assert sc.skipped_cuda({"cuda_built": False, "cuda_reason": "MOLE_EXT_SKIP_CUDA=1"}) == "MOLE_EXT_SKIP_CUDA=1"
    assert sc.skipped_cuda({"cuda_built": False, "cuda_reason": "no CUDA toolkit found"}) is None
    assert sc.skipped_cuda({"cuda_built": True, "cuda_reason": "torch CUDA 13.0"}) is None
    assert sc.skipped_cuda({}) is None


def test_intended_occupancy_is_read_from_the_source():
    threads, blocks = sc.intended_occupancy()
    assert threads == 256 and 1 <= blocks <= 8


def test_a_library_without_cuda_code_cannot_pass(tmp_path):
    """An object without device code: exit status 2 (CANNOT CHECK), never 0."""
    if not os.path.exists("/usr/bin/c++") and not os.path.exists("/usr/bin/cc"):
        pytest.skip("no host C compiler to make a plain object")
    try:
        tool = sc.find_cuobjdump()
    except sc.CheckError as e:
        pytest.skip(str(e))
    src = tmp_path / "plain.c"
    src.write_text("int f(void) { return 1; }\n")
    lib = tmp_path / "plain.so"
    import subprocess

    subprocess.run(["cc", "-shared", "-fPIC", str(src), "-o", str(lib)], check=True)
    with pytest.raises(sc.CheckError):
        sc.disassemble(str(lib), tool)
    assert sc.main(["--lib", str(lib)]) == 2
