"""The benchmark scripts run (smoke: tiny shapes, nothing written); their numbers are not asserted."""

import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_mole_ffn_bench_quick_runs():
    out = subprocess.run([sys.executable, os.path.join(ROOT, "bench", "mole_ffn.py"), "--quick", "--no-save",
                          "--reps", "1", "--threads", "1"], capture_output=True, text=True, check=True, cwd=ROOT).stdout
    for provider in ("mole_ext", "single_lora", "expert_loop", "expert_loop_native", "dense", "base"):
        assert provider in out
    assert "mole_ext / single_lora worst" in out


def test_mole_ffn_bench_providers_compute_the_same_ffn():
    # a baseline that does less work would flatter mole_ext: every MoLE provider gives MoLEFFN's
    # output and gradients
    import torch
    sys.path.insert(0, os.path.join(ROOT, "bench"))
    import mole_ffn

    cfg = mole_ffn.Config(96, 32, 48, 4, 3, torch.float32)
    forwards, _ = mole_ffn.make_providers(cfg, "cpu")
    mole = forwards["mole_ext"]
    x = torch.randn(96, 32, requires_grad=True)
    want = mole(x)
    want_grads = torch.autograd.grad(want.sum(), [x, mole.gate_proj.lora_A, mole.down_proj.lora_B])
    for name in ("expert_loop", "expert_loop_native"):
        got = forwards[name](x)
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5, msg=name)
        for g, w in zip(torch.autograd.grad(got.sum(), [x, mole.gate_proj.lora_A, mole.down_proj.lora_B]), want_grads):
            torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-5, msg=name)


def test_grouped_gemm_bench_quick_runs_on_cpu():
    out = subprocess.run([sys.executable, os.path.join(ROOT, "bench", "grouped_gemm.py"), "--quick", "--no-save",
                          "--reps", "1", "--threads", "1", "--device", "cpu"], capture_output=True, text=True,
                         check=True, cwd=ROOT).stdout
    assert "CPU run" in out and "grouped_mm is CUDA-only" in out
    for provider in ("mole_ext", "loop", "mask", "roofline"):
        assert provider in out
    for column in ("GB/s", "of_roofline", "mole_ext_speedup"):
        assert column in out
    assert "skipped" not in out  # every CPU provider ran every case


def test_grouped_gemm_profile_runs_on_cpu():
    out = subprocess.run([sys.executable, os.path.join(ROOT, "bench", "grouped_gemm.py"), "--profile", "--device",
                          "cpu"], capture_output=True, text=True, check=True, cwd=ROOT).stdout
    for call in ("== forward", "== forward into an output (add_out)", "== backward"):
        assert call in out
    assert "mole_ext::grouped_lora_backward" in out and "aten::mm" in out
