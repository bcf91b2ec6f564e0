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
    # forward alone and the traffic model of mole_ext's ops, forward and backward apart
    assert "forward only" in out and "traffic model of mole_ext's ops" in out
    for column in ("min_MB", "impl_MB", "pred_frac", "pred_ms", "of_pred"):
        assert column in out


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
    for provider in ("mole_ext", "loop", "mask"):
        assert provider in out
    for column in ("GB/s", "of_copy", "mole_ext_speedup", "min_MB", "impl_MB", "pred_frac", "pred_us"):
        assert column in out
    # the traffic model of the CUDA kernels at the GPU configurations, predictions only here:
    # r = 128 and the 11008 -> 4096 shape among them, forward and backward
    assert "traffic model of the CUDA kernels" in out and "predictions only, no GPU here" in out
    assert " 11008   4096  128" in out and " 4096  11008  128" in out
    assert "skipped" not in out  # every CPU provider ran every case


def test_grouped_gemm_profile_runs_on_cpu():
    out = subprocess.run([sys.executable, os.path.join(ROOT, "bench", "grouped_gemm.py"), "--profile", "--device",
                          "cpu"], capture_output=True, text=True, check=True, cwd=ROOT).stdout
    for call in ("== forward", "== forward into an output (add_out)", "== backward"):
        assert call in out
    assert "mole_ext::grouped_lora_backward" in out and "aten::mm" in out


def test_generate_bench_runs_on_cpu():
    # the stack the GPU check decodes (here CPU-sized, float32) and the training.model tiny model
    for model in (["--model", "stack", "--stack-size", "small", "--layers", "2"], ["--model", "tiny"]):
        out = subprocess.run([sys.executable, os.path.join(ROOT, "bench", "generate.py"), *model, "--batches", "1,2",
                              "--prompt", "4", "--new", "2", "--reps", "1", "--threads", "1", "--no-save"],
                             capture_output=True, text=True, check=True, cwd=ROOT).stdout
        for word in ("mole", "single_lora", "merged", "prefill_ms", "decode_tok_s", "vs_single_lora"):
            assert word in out
        assert "MoLE decode tokens/s over single-LoRA (eager) at batch 1" in out


def test_generate_stack_decode_matches_a_full_forward():
    """The static KV cache is right: decoding token t after a prefill of t tokens gives the logits
    of a prefill of t + 1 tokens, in every variant (so the timed decode computes the real thing)."""
    import torch
    sys.path.insert(0, os.path.join(ROOT, "bench"))
    import generate

    stack = generate.Stack(d=64, m=96, heads=4, layers=2, vocab=50, k=3, r=4, dtype=torch.float64, device="cpu")
    ids = torch.randint(0, 50, (2, 6), generator=torch.Generator().manual_seed(0))
    outs = {}
    for v in generate.VARIANTS:
        stack.set_variant(v)
        stack.new_cache(2, 8)
        full = stack(ids, torch.tensor(0))
        stack.new_cache(2, 8)
        stack(ids[:, :5], torch.tensor(0))
        step = stack(ids[:, 5:], torch.tensor(5))
        torch.testing.assert_close(step, full, rtol=1e-10, atol=1e-10, msg=v)
        outs[v] = full
    # the variants differ only by the LoRA: close, not equal (LoRA B is non-zero)
    assert not torch.equal(outs["mole"], outs["merged"])
    torch.testing.assert_close(outs["mole"], outs["merged"], rtol=0.05, atol=0.05)
