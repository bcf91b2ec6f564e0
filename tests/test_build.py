"""What the build records and exposes: python -m mole_ext.info, the CUDA fallback table."""

import subprocess
import sys

import pytest
import torch

import mole_ext
from mole_ext import _C, ops
from mole_ext.info import build_info


def test_info_command_prints_build_and_backends():
    out = subprocess.run([sys.executable, "-m", "mole_ext.info"], capture_output=True, text=True, check=True).stdout
    assert "torch" in out and "compiled_with_cuda" in out and "cuda_backend" in out
    assert "grouped_lora=" in out


def test_build_info_is_consistent_with_the_binary():
    info = build_info()
    assert info["torch"].split("+")[0] == torch.__version__.split("+")[0], "built against another torch"
    assert info["cuda_built"] == _C.compiled_with_cuda()
    backends = ops.cuda_backend()
    assert set(backends) >= {"router_top1", "permute", "unpermute", "grouped_lora", "load_balance_loss"}
    for name, how in backends.items():
        has_kernel = torch._C._dispatch_has_kernel_for_dispatch_key(f"mole_ext::{name}", "CUDA")
        assert has_kernel, f"{name} has no CUDA implementation at all (neither kernel nor reference fallback)"
        if not _C.compiled_with_cuda():
            assert how == "reference"


def test_every_op_has_cpu_kernel_and_public_wrapper():
    for name in ("router_top1", "permute", "permute_rows", "unpermute", "grouped_lora", "grouped_lora_add_out",
                 "grouped_lora_backward_add_out", "lora_linear", "load_balance_loss"):
        assert torch._C._dispatch_has_kernel_for_dispatch_key(f"mole_ext::{name}", "CPU"), name
        assert callable(getattr(ops, name)) and getattr(ops, name).__doc__
    assert mole_ext.load_balance_loss is ops.load_balance_loss


def test_index_math_binding_smoke():
    im = _C.index_math
    assert im.exclusive_scan([3, 0, 2]) == [0, 3, 3, 5]
    assert im.seg_tile([0, 5, 5, 12], 12, 4, 3) == (2, 5, 9)
    assert im.valid_offsets([0, 2, 2], 2) and not im.valid_offsets([0, 3, 2], 2)


@pytest.mark.parametrize("switch", ["vectorized", "pipelined"])
def test_grouped_lora_switches_round_trip(switch):
    # the CUDA kernels' A/B switches (results identical either way; tests/test_cuda_grouped_lora.py)
    get, put = getattr(_C, f"grouped_lora_{switch}"), getattr(_C, f"set_grouped_lora_{switch}")
    if not _C.compiled_with_cuda():
        assert get() is False
        return
    assert get() is True
    put(False)
    try:
        assert get() is False
    finally:
        put(True)
    assert get() is True
