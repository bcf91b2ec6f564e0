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


# One rule for every environment switch (build: setup.py, CMakeLists.txt; run time: tuning.h's
# flag_value, unit-tested in csrc/tests/test_env_flag.cpp): 1, true, yes, on in any letter case.
SWITCH_ON = ["1", "true", "TRUE", "Yes", "yes", "on", "ON", "tRuE"]
SWITCH_OFF = ["", "0", "false", "no", "off", "2", " 1", "y", "enable"]


def test_setup_py_reads_switches_by_the_rule(monkeypatch):
    import ast
    from pathlib import Path

    tree = ast.parse((Path(__file__).resolve().parents[1] / "setup.py").read_text())
    fn = next(n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == "_truthy")
    scope = {"os": __import__("os")}
    exec(compile(ast.Module([fn], []), "setup.py", "exec"), scope)
    for value in SWITCH_ON + SWITCH_OFF:
        monkeypatch.setenv("MOLE_EXT_TEST_SWITCH", value)
        assert scope["_truthy"]("MOLE_EXT_TEST_SWITCH") == (value in SWITCH_ON), repr(value)
    monkeypatch.delenv("MOLE_EXT_TEST_SWITCH")
    assert scope["_truthy"]("MOLE_EXT_TEST_SWITCH") is False


def test_cmake_reads_switches_by_the_rule(tmp_path):
    import re
    import shutil
    from pathlib import Path

    if shutil.which("cmake") is None:
        pytest.skip("no cmake (make host-test needs it too)")
    text = (Path(__file__).resolve().parents[1] / "CMakeLists.txt").read_text()
    fn = re.search(r"function\(mole_env_flag .*?endfunction\(\)", text, re.S)
    assert fn, "CMakeLists.txt has no mole_env_flag function"
    lines = [fn.group(0)]
    for i, value in enumerate(SWITCH_ON + SWITCH_OFF):
        lines += [f'set(ENV{{MOLE_EXT_TEST_SWITCH}} "{value}")', "mole_env_flag(v MOLE_EXT_TEST_SWITCH)",
                  f'message(STATUS "{i} ${{v}}")']
    script = tmp_path / "switches.cmake"
    script.write_text("\n".join(lines) + "\n")
    out = subprocess.run(["cmake", "-P", str(script)], capture_output=True, text=True, check=True).stdout
    got = dict(re.findall(r"-- (\d+) (ON|OFF)", out))
    for i, value in enumerate(SWITCH_ON + SWITCH_OFF):
        assert got[str(i)] == ("ON" if value in SWITCH_ON else "OFF"), repr(value)


def test_runtime_switches_read_by_the_rule():
    """The shipped extension's start-up switches (tuning.h env_flag) in a fresh process."""
    if not _C.compiled_with_cuda():
        pytest.skip("the switches exist in CUDA builds only")
    import os

    code = ("from mole_ext import _C; print(_C.cuda_validate(), _C.grouped_lora_vectorized(), "
            "_C.grouped_lora_pipelined())")
    for validate, scalar, no_pipe, want in (("Yes", "ON", "tRuE", "True False False"),
                                            ("no", "0", "2", "False True True")):
        env = dict(os.environ, MOLE_EXT_CUDA_VALIDATE=validate, MOLE_EXT_GROUPED_LORA_SCALAR=scalar,
                   MOLE_EXT_GROUPED_LORA_NO_PIPELINE=no_pipe)
        out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
        assert out.stdout.split() == want.split(), (validate, scalar, no_pipe, out.stdout)


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
