"""Checks only a GPU can answer, run early by the GPU check (bench/gpu_check.py, stage hw_tests):
every op reruns bit-identically at shapes that split reductions and fill many blocks, and the
decode step and a MoLEFFN training step give the same bits under CUDA-graph replay (with the
routing changed between replays) as eagerly. Skipped, with the reason, without a CUDA device.
"""

from __future__ import annotations

import os
import sys

import pytest
import torch

from mole_ext import MoLEFFN, _C, ops

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bench"))

pytestmark = [
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (run by bench/gpu_check.sh)"),
    pytest.mark.skipif(not _C.compiled_with_cuda(), reason="mole_ext was built without its CUDA kernels"),
]


def _same(a, b, what):
    for i, (u, v) in enumerate(zip(a, b)):
        assert torch.equal(u, v), f"{what}: output {i} differs between two runs"


def op_runs(dev: str, n: int = 4096, d_in: int = 1024, d_out: int = 2816, r: int = 64, k: int = 8):
    """Each op as a callable returning its outputs, at shapes that split reductions on a GPU."""
    torch.manual_seed(0)
    bf = torch.bfloat16
    x = torch.randn(n, d_in, device=dev, dtype=bf)
    gy = torch.randn(n, d_out, device=dev, dtype=bf)
    a = (torch.randn(k, r, d_in, device=dev) * d_in ** -0.5).to(bf)
    b = (torch.randn(k, d_out, r, device=dev) * r ** -0.5).to(bf)
    expert = torch.where(torch.rand(n, device=dev) < 0.7, 0, torch.randint(0, k, (n,), device=dev))
    off = torch.cat([torch.zeros(1, dtype=torch.long, device=dev),
                     torch.bincount(expert, minlength=k).cumsum(0)]).to(torch.int32)
    rs = torch.rand(n, device=dev)
    logits = torch.randn(n, k, device=dev)
    a128 = (torch.randn(k, 128, d_in, device=dev) * d_in ** -0.5).to(bf)
    b128 = (torch.randn(k, d_out, 128, device=dev) * 128 ** -0.5).to(bf)
    runs = {
        "grouped_lora": lambda: [ops.grouped_lora(x, a, b, off, 2.0, rs)],
        "grouped_lora_backward": lambda: list(torch.ops.mole_ext.grouped_lora_backward(gy, x, a, b, off, 2.0, rs)),
        "grouped_lora_h": lambda: list(torch.ops.mole_ext.grouped_lora_h(x, a, b, off, 2.0, rs)),
        # r = 32: G and dB from the fused pass over dY (dy_pass_kernel; r = 64 above: the same pass in
        # 2 rank chunks, blocks of two halves); r = 128: two passes by default, the fused pass in 4 rank chunks with the
        # any-rank switch; r = 64 with the fused pass off: two passes
        "grouped_lora_backward r=32 (fused dY pass)": lambda: list(torch.ops.mole_ext.grouped_lora_backward(
            gy, x, a[:, :32].contiguous(), b[:, :, :32].contiguous(), off, 2.0, rs)),
        "grouped_lora_backward r=64 (two dY passes)": lambda: _switched(
            _C.set_grouped_lora_fused_dy, False, lambda: torch.ops.mole_ext.grouped_lora_backward(gy, x, a, b, off, 2.0, rs)),
        "grouped_lora_backward r=128 (two dY passes)": lambda: list(torch.ops.mole_ext.grouped_lora_backward(
            gy, x, a128, b128, off, 2.0, rs)),
        "grouped_lora_backward r=128 (fused dY pass, any rank)": lambda: _switched(
            _C.set_grouped_lora_fused_dy_any_rank, True,
            lambda: torch.ops.mole_ext.grouped_lora_backward(gy, x, a128, b128, off, 2.0, rs)),
        # the backward autograd runs: given the forward's shrink (must equal the recomputing one)
        "grouped_lora_backward (saved h)": lambda: list(torch.ops.mole_ext.grouped_lora_backward(
            gy, x, a, b, off, 2.0, rs, torch.ops.mole_ext.grouped_lora_h(x, a, b, off, 2.0, rs)[1])),
        "router_top1": lambda: list(ops.router_top1(logits)),
        "permute": lambda: list(ops.permute(x, expert, k)),
        "unpermute": lambda: [ops.unpermute(x, torch.argsort(expert, stable=True))],
        "load_balance_loss": lambda: [ops.load_balance_loss(torch.softmax(logits, -1), expert, None)],
    }
    return runs


def _switched(put, value, fn):
    """fn() with a CUDA kernels' A/B switch (mole_ext._C.set_grouped_lora_*) at `value`, then back."""
    put(value)
    try:
        return list(fn())
    finally:
        put(not value)


def _close(a, b, what, tol=3e-2):
    for i, (u, v) in enumerate(zip(a, b)):
        u, v = u.double(), v.double()
        err = (u - v).abs().max().item() if u.numel() else 0.0
        assert err <= tol * (v.abs().max().item() + 1e-12), f"{what}: output {i} differs by {err:.3e}"


def test_every_op_reruns_bit_identically():
    runs = op_runs("cuda")
    for name, run in runs.items():
        first = [t.clone() for t in run()]
        torch.cuda.synchronize()
        _same(first, run(), name)
    _same(runs["grouped_lora_backward (saved h)"](), runs["grouped_lora_backward"](), "saved h vs recompute")
    # the fused dY pass and two passes sum in another order: they agree within bf16 rounding
    _close(runs["grouped_lora_backward"](), runs["grouped_lora_backward r=64 (two dY passes)"](),
           "r = 64: fused (2 rank chunks) vs two dY passes")
    _close(runs["grouped_lora_backward r=128 (fused dY pass, any rank)"](),
           runs["grouped_lora_backward r=128 (two dY passes)"](), "r = 128: fused (4 rank chunks) vs two dY passes")


def test_mole_ffn_forward_backward_reruns_bit_identically():
    torch.manual_seed(0)
    ffn = MoLEFFN(512, 1376, 4, 32, 64.0, dtype=torch.bfloat16, device="cuda")
    with torch.no_grad():
        ffn.router.weight.normal_(0, 512 ** -0.5)
        for p in (ffn.gate_proj, ffn.up_proj, ffn.down_proj):
            p.lora_B.normal_(0, 0.01)
    x = torch.randn(8, 512, 512, device="cuda", dtype=torch.bfloat16)
    gy = torch.randn_like(x)
    trainable = [p for p in ffn.parameters() if p.requires_grad]

    def run():
        xi = x.clone().requires_grad_()
        y = ffn(xi)
        grads = torch.autograd.grad(y, [xi, *trainable], gy)
        return [y.detach(), *grads]

    _same(run(), run(), "MoLEFFN forward + backward")


def test_decode_step_under_cuda_graph_matches_eager():
    """bench/generate.py's decode loop, eager and as a replayed CUDA graph: the same logits at
    every step (each step's new tokens route differently through the MoLE layers)."""
    import generate

    stack = generate.Stack(d=256, m=688, heads=4, layers=2, vocab=1000, k=4, r=16, dtype=torch.bfloat16,
                           device="cuda").eval()
    for variant in generate.VARIANTS:
        logits = {}
        for graph in (False, True):
            run = generate.stack_runner(stack, variant, 8, 16, 6, graph, keep=True)
            run()
            logits[graph] = run.outputs
        assert torch.equal(logits[False], logits[True]), f"{variant}: graph replay differs from eager decoding"


def test_graphed_mole_ffn_training_step_matches_eager():
    torch.manual_seed(0)
    ffn = MoLEFFN(256, 688, 4, 16, 32.0, dtype=torch.bfloat16, device="cuda")
    with torch.no_grad():
        ffn.router.weight.normal_(0, 256 ** -0.5)
        for p in (ffn.gate_proj, ffn.up_proj, ffn.down_proj):
            p.lora_B.normal_(0, 0.01)
    trainable = [p for p in ffn.parameters() if p.requires_grad]
    sample = torch.randn(1024, 256, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    graphed = torch.cuda.make_graphed_callables(ffn, (sample,))
    for seed in (1, 2):  # new inputs: new routing in each replay
        g = torch.Generator(device="cuda").manual_seed(seed)
        x = torch.randn(1024, 256, device="cuda", dtype=torch.bfloat16, generator=g)
        gy = torch.randn(1024, 256, device="cuda", dtype=torch.bfloat16, generator=g)
        got, want = [], []
        for fn, sink in ((graphed, got), (ffn, want)):
            xi = x.clone().requires_grad_()
            y = fn(xi)
            sink += [y.detach().clone(), *[t.clone() for t in torch.autograd.grad(y, [xi, *trainable], gy)]]
        _same(got, want, f"graphed MoLEFFN step, seed {seed}")
