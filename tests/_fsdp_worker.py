"""Training worker for tests/test_fsdp.py: one process (``python tests/_fsdp_worker.py``) or one
rank under torchrun. Not a test module itself.

It builds the tiny model and makes its routing depend on the token kind, so that a rank whose
micro-batch is text-only routes no token at all to expert 2 while a rank holding an image does:
image tokens carry +1 and every text (and padding) token -1 in one hidden dimension that no
frozen base weight writes to, and each router scores only expert 2, by that dimension (experts 0
and 1 tie at 0 and the tie goes to expert 0). It records each rank's per-layer expert token
counts for every forward and whether the parameters were sharded, then trains with
``run_training`` exactly as ``python -m training.train`` does.

Usage: ``_fsdp_worker.py --config FILE [--resume] [section.key=value ...]``
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

DIM = 5  # the hidden dimension that carries the token kind


def route_by_token_kind(model) -> None:
    import torch

    lm = model.model.language_model
    with torch.no_grad():
        lm.embed_tokens.weight[:, DIM] = -1.0  # every text token (frozen; tied with lm_head)
        proj = model.model.multi_modal_projector.linear_2
        proj.weight[DIM] = 0.0
        proj.bias[DIM] = 1.0  # every image token
        for layer in lm.layers:  # the frozen base never writes to DIM, so the sign survives all layers
            layer.self_attn.o_proj.weight[DIM] = 0.0
            layer.mlp.down_proj.weight[DIM] = 0.0
            layer.mlp.router.weight.zero_()
            layer.mlp.router.bias.zero_()
            layer.mlp.router.weight[2, DIM] = 10.0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--config", required=True)
    ap.add_argument("--resume", action="store_true")
    ap.add_argument("overrides", nargs="*")
    a = ap.parse_args(argv)

    import torch
    from torch.distributed.tensor import DTensor
    from transformers import set_seed

    from training.config import load_config
    from training.model import build_model, mole_modules
    from training.trainer import run_training

    cfg = load_config(a.config, a.overrides)
    set_seed(cfg.train.seed)
    built = build_model(cfg.model, stage=cfg.train.stage)
    route_by_token_kind(built.model)
    moles = [m for _, m in mole_modules(built.model)]
    K = moles[0].num_experts
    calls: list[list[int]] = []
    for m in moles:
        m.register_forward_hook(lambda mod, i, o: calls.append(
            torch.bincount(mod.last_routing.expert.reshape(-1).long(), minlength=K).tolist()))

    s = run_training(cfg, resume=True if a.resume else None, built=built)
    params = list(s["trainer"].model.named_parameters())
    rank = int(os.environ.get("RANK", "0"))
    L = len(moles)
    Path(cfg.train.output_dir, f"worker_{rank}.json").write_text(json.dumps({
        "expert_counts": [calls[i:i + L] for i in range(0, len(calls), L)],  # [forward][layer][expert]
        "params": len(params),
        "sharded": sum(isinstance(p, DTensor) for _, p in params),
    }))
    return 0


if __name__ == "__main__":
    sys.exit(main())
