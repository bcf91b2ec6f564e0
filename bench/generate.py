"""Inference speed: prefill time and decode tokens/s of MoLE against a single unmerged LoRA and the
merged base (the paper's promise: inference at the cost of one LoRA), at batch 1, 8 and 32.

Decoding is where MoLE's fixed costs (router, sort, permute, launches) weigh most: each step
has only batch-size tokens. Variants, on the same base weights:
  mole         every MLP a MoLEFFN (K experts, top-1), attention with LoRA (as training.model builds it)
  single_lora  every MLP with one plain LoRA per projection (PEFT's computation), attention with LoRA
  merged       no LoRA anywhere: what a single LoRA merged into the weights costs

Two models:
  --model demo / tiny (the CPU default: demo): the LLaVA model of training.model (SmolLM2-135M, the
      demo's language model, converted once into .cache/; or the tiny test model), text-only
      prompts through its forward with transformers' KV cache, eager
  --model stack (what --gpu-check runs): a 7B-shaped decoder stack (d = 4096, m = 11008, 32
      heads, a few layers, bf16), plain PyTorch with a static KV cache, so that the decode step can
      also be captured in a CUDA graph and replayed ("+graph" rows): the launch overhead gone,
      what is left is the kernels' own cost. No rotary embedding, no attention LoRA (the
      same in every variant); the MLP variants are those above (LoRA rank 32, K = 4)

Columns: prefill ms (the prompt, batch x prompt tokens), decode ms per step and tokens/s
(batch / step time), decode tokens/s relative to single_lora. Targets (GPU, stack): MoLE decode
>= 0.90x single-LoRA tokens/s at batch 1 and >= 0.95x at batch 32.

  python bench/generate.py --threads 1      # CPU: the demo model, ~1.5 CPU-minutes (6 min wall on a loaded machine)
  python bench/generate.py --gpu-check      # the GPU check's stage: the 7B-shaped stack, with graphs
Rows are appended to bench/results/generate.jsonl; the table goes to bench/results/generate-<cpu|cuda>.md.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from typing import Callable, Dict, List, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import harness  # noqa: E402

from mole_ext import MoLEFFN  # noqa: E402

VARIANTS = ("mole", "single_lora", "merged")
TARGETS = {1: 0.90, 32: 0.95}  # MoLE decode tokens/s over single-LoRA's, GPU


# ---- the MLP variants (shared by both models) -----------------------------------------------

class LoRAMLP(nn.Module):
    """A SwiGLU MLP with one plain LoRA per projection on the MoLE layer's base weights."""

    def __init__(self, mole: MoLEFFN):
        super().__init__()
        r, kw = mole.rank, {"dtype": mole.gate_proj.weight.dtype, "device": mole.gate_proj.weight.device}
        self.act, self.scaling = mole.act_fn, mole.scaling
        self.w = {p: getattr(mole, p).weight for p in ("gate_proj", "up_proj", "down_proj")}
        self.lora_a = nn.ParameterDict({p: nn.Parameter(torch.randn(r, w.shape[1], **kw) * w.shape[1] ** -0.5)
                                        for p, w in self.w.items()})
        self.lora_b = nn.ParameterDict({p: nn.Parameter(torch.zeros(w.shape[0], r, **kw)) for p, w in self.w.items()})

    def proj(self, z, p):
        return F.linear(z, self.w[p]) + F.linear(F.linear(z, self.lora_a[p]), self.lora_b[p]) * self.scaling

    def forward(self, x):
        return self.proj(self.act(self.proj(x, "gate_proj")) * self.proj(x, "up_proj"), "down_proj")


class BaseMLP(nn.Module):
    """The MoLE layer's base weights alone (what a merged LoRA costs)."""

    def __init__(self, mole: MoLEFFN):
        super().__init__()
        self.act = mole.act_fn
        self.w = {p: getattr(mole, p).weight for p in ("gate_proj", "up_proj", "down_proj")}

    def forward(self, x):
        return F.linear(self.act(F.linear(x, self.w["gate_proj"])) * F.linear(x, self.w["up_proj"]),
                        self.w["down_proj"])


def spread_router(mole: MoLEFFN, g: Optional[torch.Generator] = None) -> None:
    """A router that sends tokens to every expert (a fresh one may favour one), and non-zero
    LoRA B, as after training."""
    with torch.no_grad():
        w = mole.router.weight
        w.copy_(torch.randn(w.shape, generator=g).to(w) * w.shape[1] ** -0.5 * 4)
        for p in (mole.gate_proj, mole.up_proj, mole.down_proj):
            p.lora_B.copy_(torch.randn(p.lora_B.shape, generator=g).to(p.lora_B) * 1e-3)


# ---- the 7B-shaped stack (static KV cache, CUDA-graph capturable) ---------------------------

class RMSNorm(nn.Module):
    def __init__(self, d, **kw):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(d, **kw))

    def forward(self, x):
        v = x.float().pow(2).mean(-1, keepdim=True)
        return (x.float() * torch.rsqrt(v + 1e-6)).to(x.dtype) * self.weight


class StackLayer(nn.Module):
    def __init__(self, d, m, heads, k, r, **kw):
        super().__init__()
        self.heads = heads
        self.n1, self.n2 = RMSNorm(d, **kw), RMSNorm(d, **kw)
        self.qkv = nn.Linear(d, 3 * d, bias=False, **kw)
        self.o = nn.Linear(d, d, bias=False, **kw)
        self.mole = MoLEFFN(d, m, k, r, 2.0 * r, **kw).eval()
        self.mlps = {"mole": self.mole, "single_lora": LoRAMLP(self.mole), "merged": BaseMLP(self.mole)}
        self.variant = "mole"

    def forward(self, x, cache_k, cache_v, pos):
        """x [B, T, d]; cache_k / cache_v [B, H, L, hd]; pos: 0-dim long tensor, the first position."""
        b, t, d = x.shape
        h, hd = self.heads, d // self.heads
        q, k, v = self.qkv(self.n1(x)).view(b, t, 3, h, hd).permute(2, 0, 3, 1, 4)
        idx = pos + torch.arange(t, device=x.device)
        cache_k.index_copy_(2, idx, k)
        cache_v.index_copy_(2, idx, v)
        mask = torch.arange(cache_k.shape[2], device=x.device)[None, :] <= idx[:, None]  # [T, L]
        a = F.scaled_dot_product_attention(q, cache_k, cache_v, attn_mask=mask)
        x = x + self.o(a.transpose(1, 2).reshape(b, t, d))
        return x + self.mlps[self.variant](self.n2(x))


class Stack(nn.Module):
    """A decoder stack with a static KV cache: step(tokens, pos) -> logits of the last position."""

    def __init__(self, d=4096, m=11008, heads=32, layers=4, vocab=32000, k=4, r=32, dtype=torch.bfloat16,
                 device="cuda", seed=0):
        super().__init__()
        torch.manual_seed(seed)
        kw = {"dtype": dtype, "device": device}
        self.embed = nn.Embedding(vocab, d, **kw)
        self.layers = nn.ModuleList(StackLayer(d, m, heads, k, r, **kw) for _ in range(layers))
        self.norm = RMSNorm(d, **kw)
        self.head = nn.Linear(d, vocab, bias=False, **kw)
        with torch.no_grad():
            for mod in self.modules():
                if isinstance(mod, nn.Linear):
                    mod.weight.normal_(0, mod.weight.shape[1] ** -0.5)
        g = torch.Generator().manual_seed(seed)
        for layer in self.layers:
            spread_router(layer.mole, g)
        self.d, self.heads, self.dtype, self.device = d, heads, dtype, device
        self.cache = None

    def set_variant(self, v: str):
        for layer in self.layers:
            layer.variant = v

    def new_cache(self, batch: int, length: int):
        shape = (batch, self.heads, length, self.d // self.heads)
        self.cache = [(torch.zeros(shape, dtype=self.dtype, device=self.device),
                       torch.zeros(shape, dtype=self.dtype, device=self.device)) for _ in self.layers]

    def forward(self, tokens, pos):
        x = self.embed(tokens)
        for layer, (ck, cv) in zip(self.layers, self.cache):
            x = layer(x, ck, cv, pos)
        return self.head(self.norm(x[:, -1]))


# ---- timing ----------------------------------------------------------------------------------

def _now(device: str) -> float:
    if device == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter()


def stack_runner(stack: Stack, variant: str, batch: int, prompt: int, new: int, graph: bool,
                 keep: bool = False) -> Callable[[], tuple]:
    """A callable that runs one prefill and `new` decode steps of the stack from a fresh cache
    and returns (prefill seconds, seconds per decode step). With `graph`, the decode step is a
    CUDA graph captured once here (new tokens and the position are copied into its inputs).
    With `keep`, each call leaves the logits of every step in `run.outputs` [new, batch, vocab]."""
    dev = stack.device
    stack.set_variant(variant)
    stack.new_cache(batch, prompt + new + 1)
    cache = stack.cache
    g = torch.Generator(device=dev).manual_seed(batch)
    ids = torch.randint(0, stack.head.out_features, (batch, prompt), device=dev, generator=g)
    tok = torch.zeros(batch, 1, dtype=torch.long, device=dev)
    pos = torch.zeros((), dtype=torch.long, device=dev)
    step = lambda: stack(tok, pos)  # noqa: E731
    if graph:
        pos.fill_(prompt)
        s = torch.cuda.Stream()
        s.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(s):
            for _ in range(2):
                step()
        torch.cuda.current_stream().wait_stream(s)
        cuda_graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(cuda_graph):
            out_static = step()
        step = lambda: (cuda_graph.replay(), out_static)[1]  # noqa: E731

    @torch.no_grad()
    def run():
        stack.set_variant(variant)
        stack.cache = cache
        pos.zero_()
        t0 = _now(dev)
        logits = stack(ids, pos)
        t1 = _now(dev)
        outs = []
        for i in range(new):
            tok.copy_(logits.argmax(-1, keepdim=True))
            pos.fill_(prompt + i)
            logits = step()
            if keep:
                outs.append(logits.clone())
        t2 = _now(dev)
        if keep:
            run.outputs = torch.stack(outs)
        return t1 - t0, (t2 - t1) / new

    with torch.no_grad():
        return run


def measure(runners: Dict[str, Callable[[], tuple]], reps: int, warmup: int = 1) -> Dict[str, dict]:
    """Median (p20, p80) prefill and step times; variants round-robin, so that a machine that
    speeds up or slows down during the run affects every variant alike; `warmup` reps first."""
    got = {v: ([], []) for v in runners}
    for rep in range(reps + warmup):
        for v, run in runners.items():
            pre, step = run()
            if rep >= warmup:
                got[v][0].append(pre)
                got[v][1].append(step)
    return {v: {"prefill_s": harness.quantiles(p), "step_s": harness.quantiles(s)} for v, (p, s) in got.items()}


def demo_model(kind: str, cache_dir: str):
    """The LLaVA-MoLE model of training.model ('demo': SmolLM2-135M; 'tiny': the test model) and
    its decoder layers, with the MLP variants prepared on each layer."""
    from training.config import load_config
    from training.model import build_model

    over = [f"model.source={'smollm2' if kind == 'demo' else 'tiny'}", f"model.cache_dir={cache_dir}",
            "model.num_experts=3"]
    cfg = load_config(None, over)
    built = build_model(cfg.model, stage=2)
    model = built.model.eval()
    layers = model.model.language_model.layers
    g = torch.Generator().manual_seed(0)
    parts = []
    for layer in layers:
        mole = layer.mlp
        spread_router(mole, g)
        attn = layer.self_attn
        lora = {p: getattr(attn, p) for p in ("q_proj", "k_proj", "v_proj", "o_proj")}
        plain = {}
        for p, mod in lora.items():
            lin = nn.Linear(mod.in_features, mod.out_features, bias=mod.bias is not None)
            lin.weight, lin.bias = mod.weight, mod.bias
            plain[p] = lin
        parts.append({"layer": layer, "mole": mole, "single_lora": LoRAMLP(mole), "merged": BaseMLP(mole),
                      "attn_lora": lora, "attn_plain": plain})
    return model, parts, model.config.text_config.vocab_size


def set_demo_variant(parts, variant: str) -> None:
    for p in parts:
        p["layer"].mlp = p[variant]
        attn = p["layer"].self_attn
        for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
            setattr(attn, name, (p["attn_plain"] if variant == "merged" else p["attn_lora"])[name])


def demo_runner(model, parts, vocab: int, variant: str, batch: int, prompt: int, new: int) -> Callable[[], tuple]:
    """One prefill and `new` decode steps of the demo model with transformers' KV cache."""
    g = torch.Generator().manual_seed(batch)
    ids = torch.randint(0, vocab, (batch, prompt), generator=g)

    @torch.no_grad()
    def run():
        set_demo_variant(parts, variant)
        t0 = time.perf_counter()
        out = model(input_ids=ids, use_cache=True)
        t1 = time.perf_counter()
        for _ in range(new):
            out = model(input_ids=out.logits[:, -1:].argmax(-1), past_key_values=out.past_key_values, use_cache=True)
        t2 = time.perf_counter()
        return t1 - t0, (t2 - t1) / new

    return run


def rows_for(label: str, batch: int, prompt: int, res: Dict[str, dict], graph: bool) -> List[dict]:
    rows = []
    single = res["single_lora"]["step_s"]["median"]
    for v, r in res.items():
        st = r["step_s"]
        rows.append({"bench": "generate", "model": label, "variant": v + ("+graph" if graph else ""), "batch": batch,
                     "prompt": prompt, "prefill_ms": r["prefill_s"]["median"] * 1e3,
                     "step_ms": st["median"] * 1e3, "step_p20_ms": st["p20"] * 1e3, "step_p80_ms": st["p80"] * 1e3,
                     "decode_tok_s": batch / st["median"], "vs_single_lora": single / st["median"]})
    return rows


def verdicts(rows: List[dict], gpu: bool) -> List[str]:
    out = []
    for graph in ("", "+graph"):
        for b, target in TARGETS.items():
            r = [x for x in rows if x["variant"] == "mole" + graph and x["batch"] == b]
            if not r:
                continue
            v = r[0]["vs_single_lora"]
            judged = f"(target >= {target:.2f}x on a GPU): {'MET' if v >= target else 'MISSED'}" if gpu else \
                "(the target applies to the GPU run)"
            out.append(f"MoLE decode tokens/s over single-LoRA{graph or ' (eager)'} at batch {b}: {v:.2f}x {judged}")
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", choices=["demo", "tiny", "stack"], default=None,
                    help="default: stack on CUDA, demo on the CPU")
    ap.add_argument("--gpu-check", action="store_true", help="the GPU check's run: the 7B-shaped stack, with graphs")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--batches", default="1,8,32")
    ap.add_argument("--prompt", type=int, default=None, help="prompt tokens (default 128 on CUDA, 16 on the CPU)")
    ap.add_argument("--new", type=int, default=None, help="decoded tokens per rep (default 32 on CUDA, 8 on the CPU)")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--warmup", type=int, default=None, help="warm-up reps (default 1 on CUDA, 0 on the CPU)")
    ap.add_argument("--layers", type=int, default=4, help="layers of the stack")
    ap.add_argument("--stack-size", default="7b", choices=["7b", "small"], help="small: a CPU-sized stack (tests)")
    ap.add_argument("--cache-dir", default=".cache/mole_ext", help="where training.model keeps the converted demo model")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--no-save", action="store_true")
    args = ap.parse_args(argv)
    dev = args.device
    gpu = dev == "cuda"
    if args.threads:
        torch.set_num_threads(args.threads)
    model_kind = "stack" if args.gpu_check else (args.model or ("stack" if gpu else "demo"))
    prompt = args.prompt or (128 if gpu else 16)
    warmup = args.warmup if args.warmup is not None else (1 if gpu else 0)
    new = args.new or (32 if gpu else 8)
    batches = [int(b) for b in args.batches.split(",")]
    env = harness.environment(dev)
    rows = []
    if model_kind == "stack":
        shape = dict(d=4096, m=11008, heads=32, vocab=32000, k=4, r=32) if args.stack_size == "7b" else \
            dict(d=128, m=344, heads=4, vocab=500, k=4, r=8)
        dtype = torch.bfloat16 if gpu else torch.float32
        stack = Stack(layers=args.layers, dtype=dtype, device=dev, **shape).eval()
        label = (f"{args.stack_size} stack: {args.layers} layers d={shape['d']} m={shape['m']} K={shape['k']} "
                 f"r={shape['r']} {str(dtype).replace('torch.', '')}")
        print(f"{label}; prompt {prompt}, {new} decode steps, median of {args.reps}", flush=True)
        for graph in ([False, True] if gpu else [False]):
            for b in batches:
                res = measure({v: stack_runner(stack, v, b, prompt, new, graph) for v in VARIANTS}, args.reps,
                              warmup)
                rows += rows_for(label, b, prompt, res, graph)
                print(f"batch {b}{' graph' if graph else ''}: " + ", ".join(
                    f"{v} {r['step_s']['median'] * 1e3:.2f} ms/step" for v, r in res.items()), flush=True)
    else:
        model, parts, vocab = demo_model(model_kind, args.cache_dir)
        label = f"{model_kind} model ({len(parts)} layers, K=3 experts, training.model)"
        print(f"{label}; prompt {prompt}, {new} decode steps, median of {args.reps}, {torch.get_num_threads()} threads",
              flush=True)
        for b in batches:
            res = measure({v: demo_runner(model, parts, vocab, v, b, prompt, new) for v in VARIANTS}, args.reps,
                          warmup)
            rows += rows_for(label, b, prompt, res, False)
            print(f"batch {b}: " + ", ".join(f"{v} {r['step_s']['median'] * 1e3:.2f} ms/step"
                                             for v, r in res.items()), flush=True)
        set_demo_variant(parts, "mole")
    cols = ["variant", "batch", "prompt", "prefill_ms", "step_ms", "step_p20_ms", "step_p80_ms", "decode_tok_s",
            "vs_single_lora"]
    harness.print_table(rows, cols)
    vs = verdicts(rows, gpu)
    for v in vs:
        print(v)
    if not args.no_save:
        cmd = "python bench/generate.py" + (" --gpu-check" if args.gpu_check else "") + \
            (f" --model {args.model}" if args.model else "") + (f" --threads {args.threads}" if args.threads else "")
        md = (f"# bench/generate.py\n\n{env['device']}, torch {env['torch']}, commit {env['git_commit']}, "
              f"{env['date']}\n\nCommand: `{cmd}`; {rows[0]['model']}; prompt {prompt} tokens, {new} decode steps "
              f"per rep, median of {args.reps} reps, variants round-robin (p20-p80 of the step time shown).\n\n" +
              harness.markdown_table(rows, cols) + "".join(f"\n{v}\n" for v in vs))
        print("wrote", harness.write_results("generate", env, rows, md))
    return rows


if __name__ == "__main__":
    main()
