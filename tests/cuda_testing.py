"""Helpers shared by the CUDA kernel tests (tests/test_cuda_*.py), on top of tests/helpers.py:
the skip logic, validate mode, a bit-exact comparison and running the CPU kernel on copies.

No CUDA call happens at import: the ``device`` fixture decides per test whether to skip.
"""

from __future__ import annotations

import pytest
import torch

import mole_ext
from helpers import assert_close as helpers_assert_close
from helpers import assert_equal as helpers_assert_equal
from helpers import mismatch_report
from mole_ext import _C

SKIP_NO_CUDA = "CUDA is not available here; these cases run on a GPU machine (bench/gpu_check.sh)"
SKIP_NO_KERNELS = "mole_ext was built without its CUDA kernels (MOLE_EXT_FORCE_CUDA=1 to build them)"

# float dtypes and the relative tolerance of probabilities / losses computed on the GPU versus
# the CPU kernel (exp differs by a few ulp between CUDA's libdevice and glibc).
PROB_RTOL = {torch.float32: 4e-6, torch.float64: 1e-14}


def cuda_params():
    """The device parametrisation of every CUDA case: ["cuda"], skipped at run time without one."""
    return [pytest.param("cuda", id="cuda")]


def require_cuda(device: str) -> None:
    if device.startswith("cuda"):
        if not torch.cuda.is_available():
            pytest.skip(SKIP_NO_CUDA)
        if not _C.compiled_with_cuda():
            pytest.skip(SKIP_NO_KERNELS)


def validated_device(request):
    """The ``device`` fixture of the kernel tests (``device = pytest.fixture(params=cuda_params(),
    name="device")(validated_device)``): skips without CUDA; runs the test in validate mode (bad
    ids or offsets raise in the failing call, as on the CPU); afterwards no error may be pending."""
    require_cuda(request.param)
    with validate_mode(True):
        yield request.param
    _C.cuda_check_errors(True)


class validate_mode:
    """Context manager: CUDA routing ops raise bad ids in the failing call (on/off)."""

    def __init__(self, on: bool):
        self.on = on

    def __enter__(self):
        self.old = _C.cuda_validate()
        _C.set_cuda_validate(self.on)

    def __exit__(self, *exc):
        _C.set_cuda_validate(self.old)


def assert_equal(actual: torch.Tensor, expected: torch.Tensor, what: str = "tensor") -> None:
    """Bit-identical: for floats the bits are compared, so -0.0 differs from +0.0 (any NaN equals
    any NaN: payloads differ between CPU and GPU). Reports through helpers.mismatch_report."""
    a, e = actual.detach().cpu(), expected.detach().cpu()
    assert a.shape == e.shape, f"{what}: shape {tuple(a.shape)} != expected {tuple(e.shape)}"
    assert a.dtype == e.dtype, f"{what}: dtype {a.dtype} != expected {e.dtype}"
    if a.numel() == 0:
        return
    if a.dtype.is_floating_point:
        ib = {2: torch.int16, 4: torch.int32, 8: torch.int64}[a.element_size()]
        same = (a.contiguous().view(ib) == e.contiguous().view(ib)) | (a.isnan() & e.isnan())
        assert bool(same.all()), f"{what}: {int((~same).sum())} elements differ in their bits; " + \
            mismatch_report(a, e, 0.0, 0.0)
    else:
        helpers_assert_equal(a, e, what)


def assert_close(actual: torch.Tensor, expected: torch.Tensor, rtol: float, atol: float = 0.0,
                 what: str = "tensor") -> None:
    assert actual.dtype == expected.dtype, f"{what}: dtype {actual.dtype} != expected {expected.dtype}"
    helpers_assert_close(actual, expected, rtol=rtol, atol=atol, msg=what + ":")


def cpu_op(name: str, *args):
    """Runs torch.ops.mole_ext.<name> on CPU copies of the tensor arguments (the CPU kernel)."""
    cpu_args = [a.detach().cpu() if isinstance(a, torch.Tensor) else a for a in args]
    return getattr(torch.ops.mole_ext, name)(*cpu_args)


def kernels_registered() -> dict:
    return mole_ext.ops.cuda_backend()
