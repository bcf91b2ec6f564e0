"""Training-step throughput and peak memory: LLaVA-MoLE vs plain-LoRA LLaVA at the same rank.

    python bench/train_step.py                      # CPU, demo size (SmolLM2-135M shapes, random weights)
    python bench/train_step.py --config 7b          # GPU: LLaMA-2-7B + CLIP-L/336 shapes, random bf16 weights

Providers, each in its own subprocess (so peak memory is its own): ``mole`` (MoLEFFN with K experts
on every MLP + attention LoRA) and ``lora`` (plain LoRA on the MLP projections + attention LoRA,
what PEFT does), both rank r. One step = forward, LM + balance loss, backward, AdamW step; for
``mole`` also the routing analytics that ``training.trainer`` records every step (counts and
entropy per layer, expert, domain and token kind). ``--gradient-checkpointing`` recomputes each
decoder layer in backward (as ``train.gradient_checkpointing=true`` does).
Reports the median (p20, p80) step time, tokens/s, peak memory (CUDA: max allocated; CPU: max RSS)
and MoLE/LoRA throughput ratio; appends rows to bench/results/train_step.jsonl.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import platform
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


@dataclass
class BenchConfig:
    name: str
    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    vocab: int
    vision_hidden: int
    vision_layers: int
    vision_heads: int
    image_size: int
    patch_size: int
    batch: int
    seq: int  # text tokens per sample, image tokens come on top
    experts: int = 3
    rank: int = 8
    dtype: str = "float32"


CONFIGS = {
    "demo": BenchConfig("demo", 576, 1536, 30, 9, 3, 49153, 128, 2, 4, 64, 16, batch=4, seq=64),
    "tiny": BenchConfig("tiny", 64, 128, 2, 4, 4, 49153, 128, 2, 4, 64, 16, batch=4, seq=64),
    "7b": BenchConfig("7b", 4096, 11008, 32, 32, 32, 32064, 1024, 24, 16, 336, 14, batch=8, seq=512,
                      experts=3, rank=128, dtype="bfloat16"),
}


def build(cfg: BenchConfig, provider: str, device):
    import torch
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

    from training.config import ModelConfig
    from training.lora import LoRALinear
    from training.model import inject_mole, set_trainable

    dtype = getattr(torch, cfg.dtype)
    text = LlamaConfig(vocab_size=cfg.vocab, hidden_size=cfg.hidden, intermediate_size=cfg.intermediate,
                       num_hidden_layers=cfg.layers, num_attention_heads=cfg.heads, num_key_value_heads=cfg.kv_heads,
                       max_position_embeddings=4096)
    vision = CLIPVisionConfig(hidden_size=cfg.vision_hidden, intermediate_size=4 * cfg.vision_hidden,
                              num_hidden_layers=cfg.vision_layers, num_attention_heads=cfg.vision_heads,
                              image_size=cfg.image_size, patch_size=cfg.patch_size)
    lcfg = LlavaConfig(vision_config=vision, text_config=text, image_token_id=cfg.vocab - 1,
                       vision_feature_select_strategy="default", vision_feature_layer=-2)
    torch.manual_seed(0)
    with torch.device(device):
        model = LlavaForConditionalGeneration(lcfg).to(dtype)
    mc = ModelConfig(num_experts=cfg.experts, rank=cfg.rank, alpha=2 * cfg.rank, dropout=0.05,
                     mole_layers=None if provider == "mole" else [])
    inject_mole(model, mc)
    if provider == "lora":
        for layer in model.model.language_model.layers:
            for p in ("gate_proj", "up_proj", "down_proj"):
                setattr(layer.mlp, p, LoRALinear(getattr(layer.mlp, p), cfg.rank, 2 * cfg.rank, 0.05))
    set_trainable(model, 2, train_vision=False)
    return model.to(device)


def worker(cfg: BenchConfig, provider: str, steps: int, warmup: int, checkpointing: bool = False) -> dict:
    import resource

    import torch
    import torch.nn.functional as F

    from training.analytics import RoutingStats
    from training.model import enable_checkpointing, mole_modules
    from training.trainer import balance_losses

    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = build(cfg, provider, device).train()
    if checkpointing:
        enable_checkpointing(model)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    moles = [m for _, m in mole_modules(model)]
    n_img = (cfg.image_size // cfg.patch_size) ** 2
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, cfg.vocab - 2, (cfg.batch, n_img + cfg.seq), generator=g)
    ids[:, :n_img] = cfg.vocab - 1
    ids = ids.to(device)
    pix = torch.randn(cfg.batch, 3, cfg.image_size, cfg.image_size, generator=g).to(device, getattr(torch, cfg.dtype))
    mask = torch.ones_like(ids, dtype=torch.bool).reshape(-1)
    is_img = (ids == cfg.vocab - 1).reshape(-1)
    tok_dom = torch.zeros_like(ids).reshape(-1)
    stats = RoutingStats([n for n, _ in mole_modules(model)], cfg.experts, ["bench"])
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    times = []
    for i in range(warmup + steps):
        if device == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        logits = model(input_ids=ids, pixel_values=pix, use_cache=False).logits
        loss = F.cross_entropy(logits[:, :-1].float().reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))
        if moles:
            routings = [(m.last_routing.probs, m.last_routing.expert) for m in moles]
            for li, (p, e) in enumerate(routings):
                stats.update(li, p, e, tok_dom, is_img, mask)
            loss = loss + 0.01 * balance_losses(routings, mask).mean()
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if device == "cuda":
            torch.cuda.synchronize()
        if i >= warmup:
            times.append(time.perf_counter() - t)
    q = statistics.quantiles(times, n=5) if len(times) > 1 else [times[0]] * 4
    med = statistics.median(times)
    peak = torch.cuda.max_memory_allocated() if device == "cuda" else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return {"provider": provider, "median_s": med, "p20_s": q[0], "p80_s": q[3], "tokens_per_s": ids.numel() / med,
            "peak_mem_gib": peak / 2**30, "device": torch.cuda.get_device_name() if device == "cuda" else platform.processor() or "cpu",
            "torch": torch.__version__, "gradient_checkpointing": checkpointing}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default="demo", choices=sorted(CONFIGS))
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--providers", default="lora,mole")
    ap.add_argument("--gradient-checkpointing", action="store_true", help="recompute each decoder layer in backward")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    ap.add_argument("--no-save", action="store_true")
    args = ap.parse_args()
    cfg = CONFIGS[args.config]
    if args.worker:
        print("RESULT " + json.dumps(worker(cfg, args.worker, args.steps, args.warmup, args.gradient_checkpointing)))
        return 0
    rows = []
    for prov in args.providers.split(","):
        r = subprocess.run([sys.executable, __file__, "--config", args.config, "--steps", str(args.steps),
                            "--warmup", str(args.warmup), "--worker", prov]
                           + (["--gradient-checkpointing"] if args.gradient_checkpointing else []), capture_output=True, text=True)
        line = [x for x in r.stdout.splitlines() if x.startswith("RESULT ")]
        if r.returncode or not line:
            print(r.stderr[-3000:], file=sys.stderr)
            return 1
        rows.append(json.loads(line[0][7:]))
    base = next((r for r in rows if r["provider"] == "lora"), rows[0])
    print(f"config {cfg.name}: batch {cfg.batch}, {cfg.seq} text + {(cfg.image_size // cfg.patch_size) ** 2} image tokens, "
          f"K={cfg.experts}, r={cfg.rank}, {cfg.dtype}, device {rows[0]['device']}"
          + (", gradient checkpointing" if args.gradient_checkpointing else ""))
    print(f"{'provider':<9}{'median s':>10}{'p20':>9}{'p80':>9}{'tokens/s':>11}{'peak GiB':>10}{'vs lora':>9}")
    for r in rows:
        r["throughput_vs_lora"] = r["tokens_per_s"] / base["tokens_per_s"]
        print(f"{r['provider']:<9}{r['median_s']:>10.3f}{r['p20_s']:>9.3f}{r['p80_s']:>9.3f}{r['tokens_per_s']:>11.1f}"
              f"{r['peak_mem_gib']:>10.2f}{r['throughput_vs_lora']:>8.2f}x")
    if not args.no_save:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
        out = ROOT / "bench" / "results"
        out.mkdir(parents=True, exist_ok=True)
        with open(out / "train_step.jsonl", "a") as f:
            for r in rows:
                f.write(json.dumps({**r, "config": dataclasses.asdict(cfg), "commit": commit,
                                    "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
