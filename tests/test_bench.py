"""The benchmark scripts run (smoke: tiny shapes, nothing written); their numbers are not asserted."""

import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_mole_ffn_bench_quick_runs():
    out = subprocess.run([sys.executable, os.path.join(ROOT, "bench", "mole_ffn.py"), "--quick", "--no-save",
                          "--reps", "1", "--threads", "1"], capture_output=True, text=True, check=True, cwd=ROOT).stdout
    for provider in ("mole_ext", "single_lora", "expert_loop", "dense", "base"):
        assert provider in out
    assert "mole_ext / single_lora worst" in out


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
