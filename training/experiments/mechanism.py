"""``python -m training.experiments.mechanism [--quick] [--out DIR] [--seeds N] [--groups ...]``

A controlled study of the mechanism behind LLaVA-MoLE's data-conflict claim (issue 15, point 1).

The task. A tiny LLaMA (``transformers.LlamaConfig``: 2 layers, hidden 64) reads
``[image_1 .. image_P] a b Q`` and answers one token at ``Q``. The "image" tokens are feature
vectors fed as input embeddings: ``cue * u_{d,j} + noise`` with ``u_{d,j}`` a unit vector of
domain d and noise ~ N(0, I), so the domain is visible *only* in the image and ``cue`` sets how
visible. The base mapping, shared by every domain, is ``f(a, b) = (a + b) mod 16``; the base
model is pretrained on it in this script (all weights, every domain's images) and then frozen.
On the conflict set (the pairs whose ``a`` lies in a per-seed subset holding a fraction rho of
the values of ``a``) each domain demands its own answer, drawn at random per pair, different
from f and from every other domain's answer. Elsewhere every domain demands f.

The arms (every one fine-tunes a LoRA on the four attention projections, rank r, plus an FFN
adapter; the FFN adapter is always the real ``mole_ext.MoLEFFN``, K = 1 for plain LoRA):

  single   one LoRA per domain, trained on that domain, scored on it (S steps each)
  mix      one LoRA on the mixture (D*S steps: the union of the single runs' data)
  mix_Kr   the same with the FFN LoRA at K*r rank (as many FFN adapter weights as MoLE)
  mole     MoLE, K experts, learned router
  oracle   MoLE whose routing is forced: every token of a domain-d record goes to expert d
  hash     MoLE whose router stays frozen at its random initialisation (hashing control)

Each seed changes the base model's pretraining, the conflict set and answers, the image
directions, the adapter and router initialisation and the data order; within a seed every arm
sees the same samples in the same order and the same test records (paired comparisons).

Sweeps: rho (incl. 0), rank, cue strength, gate mode (prob, none, straight_through),
balance-loss weight, router learning rate. Every (cell, arm, seed) result is cached as JSON
under ``OUT/runs/``, so an interrupted run resumes; ``results.md``/``results.json`` and the
figures are rewritten from whatever has finished.

Statistics (``training.experiments.stats``): per-seed paired differences with t intervals,
Holm-corrected over the preregistered contrasts; routing mutual information between domain and
expert at the answer token.
"""
from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import math
import os
import platform
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn
import torch.nn.functional as F

from training.experiments import stats

ARMS = ("single", "mix", "mix_Kr", "mole", "oracle", "hash")
MOLE_ARMS = ("mole", "oracle", "hash")
ARM_LABEL = {
    "single": "LoRA, single domain (own domain)",
    "mix": "LoRA r, mixture",
    "mix_Kr": "LoRA FFN rank K*r, mixture",
    "mole": "MoLE K experts, learned router",
    "oracle": "MoLE, oracle routing (domain -> expert)",
    "hash": "MoLE, frozen random router (hash)",
}

# Stated before any run (also printed by the script and copied into results.md). Each is
# checked mechanically by ``check_predictions`` against the finished cells.
PREDICTIONS = [
    ("P1", "No conflict at rho = 0: the mixture LoRA is not below the single-domain LoRAs "
           "(the t interval of single - mix includes 0 or lies below it)."),
    ("P2", "Conflict grows with rho: single - mix is above 0 (Holm-corrected) at the largest rho "
           "and its mean increases from the smallest to the largest rho."),
    ("P3", "Conflict shrinks with rank: single - mix at the largest rank is smaller than at the smallest."),
    ("P4", "The oracle closes the conflict: oracle is above mix (Holm) and oracle - single "
           "has an interval within +-half the conflict (non-inferior), at the main rho."),
    ("P5", "Learned routing closes the conflict only as far as it separates domains: across the "
           "cells and seeds, the share of the conflict that MoLE recovers rises with the routing "
           "mutual information (positive Spearman correlation)."),
    ("P6", "The hash control does not close it: hash - mix has an interval that includes 0 or "
           "lies below the half-conflict, at the main rho."),
]


@dataclass
class MechConfig:
    domains: int = 3
    experts: int = 3  # K of the MoLE arms
    values: int = 8  # a, b in [0, values); answers mod values
    prefix: int = 2  # image tokens
    hidden: int = 64
    intermediate: int = 128
    layers: int = 2
    heads: int = 4
    pretrain_steps: int = 300
    pretrain_lr: float = 1e-2
    pretrain_cue: float = 4.0  # the base sees every domain's images at this cue, all with answer f
    pretrain_batch: int = 128
    steps: int = 100  # per single-domain run; mixture runs train domains * steps
    batch: int = 64
    lr: float = 5e-3
    rank: int = 4
    alpha_over_rank: float = 2.0  # LoRA scaling alpha / r, kept fixed across ranks
    rho: float = 0.25
    cue: float = 4.0
    gate_mode: str = "prob"
    balance: float = 0.01
    router_lr_mult: float = 1.0
    test_per_domain: int = 256

    def validate(self):
        for name in ("domains", "experts", "values", "prefix", "hidden", "layers", "heads", "steps", "batch",
                     "rank", "test_per_domain"):
            v = getattr(self, name)
            if not isinstance(v, int) or v < 1:
                raise ValueError(f"{name} must be an int >= 1, got {v!r}")
        if self.domains < 2:
            raise ValueError(f"domains must be >= 2 to have a conflict, got {self.domains}")
        if self.values < self.domains + 1:
            raise ValueError(f"values must exceed domains (each domain needs its own conflict answer), "
                             f"got values={self.values}, domains={self.domains}")
        if not 0.0 <= self.rho <= 1.0:
            raise ValueError(f"rho must be in [0, 1], got {self.rho!r}")
        if self.cue < 0:
            raise ValueError(f"cue must be >= 0, got {self.cue!r}")
        if self.gate_mode not in ("prob", "none", "straight_through"):
            raise ValueError(f"gate_mode must be one of prob, none, straight_through, got {self.gate_mode!r}")
        if self.balance < 0 or self.router_lr_mult < 0:
            raise ValueError("balance and router_lr_mult must be >= 0")


# ---------------------------------------------------------------------------------------------
# The task


class Task:
    """One seed's world: image directions, conflict set and answers, test set."""

    def __init__(self, cfg: MechConfig, seed: int):
        self.cfg = cfg
        g = torch.Generator().manual_seed(1_000_003 * seed + 17)
        v, d, dom = cfg.values, cfg.hidden, cfg.domains
        u = torch.randn(dom, cfg.prefix, d, generator=g)
        self.directions = u / u.norm(dim=-1, keepdim=True)  # [D, P, d] unit vectors
        a, b = torch.meshgrid(torch.arange(v), torch.arange(v), indexing="ij")
        self.base = (a + b) % v  # [v, v]
        # conflict answers: per pair, D distinct values != f, a random draw per seed
        order = torch.argsort(torch.rand(v, v, v - 1, generator=g), dim=-1)  # per pair, a permutation of 0..v-2
        shifted = (self.base.unsqueeze(-1) + 1 + order) % v  # the v - 1 values != f, in random order
        self.conflict_answers = shifted[..., :dom].permute(2, 0, 1).contiguous()  # [D, v, v]
        n_conf = int(round(cfg.rho * v))
        self.conflict_a = torch.randperm(v, generator=g)[:n_conf]
        self.in_conflict = torch.zeros(v, dtype=torch.bool)
        self.in_conflict[self.conflict_a] = True
        self.test = [self.sample(dd, cfg.test_per_domain, g, exhaustive=True) for dd in range(dom)]

    def answers(self, domain: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        conf = self.conflict_answers[domain, a, b]
        return torch.where(self.in_conflict[a], conf, self.base[a, b])

    def images(self, domain: torch.Tensor, g: torch.Generator, cue: float | None = None) -> torch.Tensor:
        noise = torch.randn(domain.shape[0], self.cfg.prefix, self.cfg.hidden, generator=g)
        return (self.cfg.cue if cue is None else cue) * self.directions[domain] + noise

    def sample(self, domain, n: int, g: torch.Generator, exhaustive: bool = False, cue: float | None = None) -> dict:
        """n records of ``domain`` (an int, or None for a uniform mixture of domains)."""
        v = self.cfg.values
        if exhaustive:  # test: every pair once (cycled), in a fixed order
            idx = torch.arange(n) % (v * v)
            a, b = idx // v, idx % v
        else:
            a = torch.randint(0, v, (n,), generator=g)
            b = torch.randint(0, v, (n,), generator=g)
        if domain is None:
            dom = torch.randint(0, self.cfg.domains, (n,), generator=g)
        else:
            dom = torch.full((n,), int(domain), dtype=torch.long)
        return {"a": a, "b": b, "domain": dom, "image": self.images(dom, g, cue),
                "answer": self.answers(dom, a, b), "conflict": self.in_conflict[a]}


# ---------------------------------------------------------------------------------------------
# The model


class OracleMoLEFFN(nn.Module):
    """``MoLEFFN`` run with externally forced routing: the experiment sets ``forced`` ([B] expert
    ids, one per record) before each forward; every token of record i goes to expert forced[i]
    with gate 1. The same ops as ``mole_ext.functional.mole_ffn`` (permute, ``lora_linear``
    through ``mole_projection``, unpermute) on the same parameters; only the router is bypassed."""

    def __init__(self, ffn):
        super().__init__()
        self.ffn = ffn
        self.forced: torch.Tensor | None = None
        self.last_routing = None

    def forward(self, x):
        from mole_ext import functional, ops

        if self.forced is None:
            raise RuntimeError("OracleMoLEFFN needs .forced set (one expert id per record) before forward")
        f = self.ffn
        bsz, t, d = x.shape
        x2 = x.reshape(-1, d)
        expert = self.forced.to(torch.int32).repeat_interleave(t)
        xs, sorted_token, offsets = ops.permute(x2, expert, f.num_experts)
        h = f.act_fn(functional.mole_projection(xs, f.gate_proj.projection(), offsets, f.scaling, None)) * \
            functional.mole_projection(xs, f.up_proj.projection(), offsets, f.scaling, None)
        ys = functional.mole_projection(h, f.down_proj.projection(), offsets, f.scaling, None)
        probs = F.one_hot(expert.long(), f.num_experts).float()
        self.last_routing = functional.Routing(probs, expert)
        return ops.unpermute(ys, sorted_token).reshape(x.shape)


def _vocab(cfg: MechConfig) -> dict:
    v = cfg.values
    return {"a": 0, "b": v, "q": 2 * v, "ans": 2 * v + 1, "size": 3 * v + 1}


def build_base(cfg: MechConfig, seed: int):
    from transformers import LlamaConfig, LlamaForCausalLM

    voc = _vocab(cfg)
    lc = LlamaConfig(vocab_size=voc["size"], hidden_size=cfg.hidden, intermediate_size=cfg.intermediate,
                     num_hidden_layers=cfg.layers, num_attention_heads=cfg.heads, num_key_value_heads=cfg.heads,
                     max_position_embeddings=cfg.prefix + 8, tie_word_embeddings=False)
    torch.manual_seed(seed)
    return LlamaForCausalLM(lc)


def forward_logits(model, cfg: MechConfig, batch: dict) -> torch.Tensor:
    """Answer logits [B, values] at the Q token of ``[image] a b Q``."""
    voc = _vocab(cfg)
    emb = model.get_input_embeddings()
    n = batch["a"].shape[0]
    ids = torch.stack([batch["a"] + voc["a"], batch["b"] + voc["b"], torch.full((n,), voc["q"])], dim=1)
    x = torch.cat([batch["image"], emb(ids)], dim=1)
    h = model.model(inputs_embeds=x).last_hidden_state[:, -1]
    w = model.lm_head.weight[voc["ans"]: voc["ans"] + cfg.values]
    return h @ w.t()


def pretrain(cfg: MechConfig, task: Task, seed: int):
    """The base model: every weight trained on f over every domain's images (domain-blind)."""
    model = build_base(cfg, seed)
    g = torch.Generator().manual_seed(seed * 7919 + 1)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.pretrain_lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=cfg.pretrain_lr, total_steps=cfg.pretrain_steps,
                                                pct_start=0.1)
    model.train()
    for _ in range(cfg.pretrain_steps):
        bt = task.sample(None, cfg.pretrain_batch, g, cue=cfg.pretrain_cue)
        loss = F.cross_entropy(forward_logits(model, cfg, bt), task.base[bt["a"], bt["b"]])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def attach_adapters(base, cfg: MechConfig, arm: str, rank: int, seed: int):
    """A deep copy of the frozen base with the arm's adapters. Returns (model, ffns)."""
    import copy

    from mole_ext import MoLEFFN
    from training.lora import LoRALinear

    model = copy.deepcopy(base)
    torch.manual_seed(seed * 104729 + 3)  # identical adapter init across arms where shapes match
    alpha = cfg.alpha_over_rank * rank
    ffns = []
    k = 1 if arm in ("single", "mix", "mix_Kr") else cfg.experts
    ffn_rank = rank * cfg.experts if arm == "mix_Kr" else rank
    for layer in model.model.layers:
        att = layer.self_attn
        for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
            setattr(att, name, LoRALinear(getattr(att, name), rank, alpha))
        ffn = MoLEFFN.from_mlp(layer.mlp, num_experts=k, rank=ffn_rank, alpha=cfg.alpha_over_rank * ffn_rank,
                               gate_mode=cfg.gate_mode if k > 1 else "none")
        if arm == "hash" or k == 1:  # hash: frozen at its random init; K = 1: nothing to route
            ffn.router.requires_grad_(False)
        if arm == "oracle":
            ffn.router.requires_grad_(False)
            ffn = OracleMoLEFFN(ffn)
        layer.mlp = ffn
        ffns.append(ffn)
    return model, ffns


def _set_forced(ffns, domain):
    for f in ffns:
        if isinstance(f, OracleMoLEFFN):
            f.forced = domain


def finetune(model, ffns, cfg: MechConfig, task: Task, arm: str, domain, seed: int) -> dict:
    from mole_ext import load_balance_loss

    steps = cfg.steps if domain is not None else cfg.steps * cfg.domains
    router, rest = [], []
    for n, p in model.named_parameters():
        if p.requires_grad:
            (router if ".router." in n else rest).append(p)
    groups = [{"params": rest, "lr": cfg.lr}]
    if router:
        groups.append({"params": router, "lr": cfg.lr * cfg.router_lr_mult})
    opt = torch.optim.AdamW(groups, weight_decay=0.0)
    g = torch.Generator().manual_seed(seed * 15485863 + (0 if domain is None else 1 + int(domain)))
    use_balance = arm == "mole" and cfg.balance > 0
    model.train()
    for _ in range(steps):
        bt = task.sample(domain, cfg.batch, g)
        _set_forced(ffns, bt["domain"])
        loss = F.cross_entropy(forward_logits(model, cfg, bt), bt["answer"])
        if use_balance:
            loss = loss + cfg.balance * sum(load_balance_loss(f.last_routing.probs, f.last_routing.expert)
                                            for f in ffns) / len(ffns)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    model.eval()
    return {"steps": steps, "final_loss": float(loss.detach())}


@torch.no_grad()
def evaluate(model, ffns, cfg: MechConfig, task: Task, domains) -> dict:
    """Per-record correctness on each domain's test set, and the expert at the answer token per layer."""
    out = {}
    for d in domains:
        bt = task.test[d]
        _set_forced(ffns, bt["domain"])
        pred = forward_logits(model, cfg, bt).argmax(-1)
        rec = {"correct": (pred == bt["answer"]).int().tolist(), "conflict": bt["conflict"].int().tolist()}
        if cfg.experts > 1 and ffns and ffns[0].last_routing is not None and ffns[0].last_routing.probs.shape[1] > 1:
            n = bt["a"].shape[0]
            rec["expert"] = [f.last_routing.expert.view(n, -1)[:, -1].tolist() for f in ffns]
        out[str(d)] = rec
    return out


# ---------------------------------------------------------------------------------------------
# Cells, groups, the plan


@dataclass
class Cell:
    """One setting of the study: ``over`` replaces fields of the main config; ``arms`` run in it;
    ``phase`` orders the work (lower first); ``borrow`` names arms whose results are taken from the
    main cell because the cell's knob does not touch them (e.g. plain LoRA under a router knob)."""
    group: str
    name: str
    arms: tuple
    over: dict = field(default_factory=dict)
    phase: int = 0
    borrow: tuple = ()


REF_CELL = "rho=0.25"
_PLAIN = ("single", "mix", "mix_Kr")


def plan(cfg: MechConfig, quick: bool = False) -> list[Cell]:
    """The study's cells. Phases order the work by priority (the main cell, then rho = 0.5, then
    rho = 0 and the router knobs, rank, cue, rho = 0.125), so a partial study has whole phases
    with as many seeds as possible."""
    if quick:
        return [Cell("rho", f"rho={r}", ARMS, {"rho": r}) for r in (0.0, 0.25)]
    cells = [Cell("rho", "rho=0.0", ARMS, {"rho": 0.0}, 2)]  # the base already answers every record
    cells += [Cell("rho", "rho=0.25", ARMS, {"rho": 0.25}, 0), Cell("rho", "rho=0.5", ARMS, {"rho": 0.5}, 1)]
    cells += [Cell("gate", f"gate={m}", ("mole",), {"gate_mode": m}, 2, _PLAIN) for m in ("none", "straight_through")]
    cells += [Cell("balance", f"balance={w}", ("mole",), {"balance": w}, 2, _PLAIN) for w in (0.0, 0.1)]
    cells += [Cell("router_lr", f"router_lr_mult={m}", ("mole",), {"router_lr_mult": m}, 2, _PLAIN)
              for m in (10.0, 100.0)]
    cells += [Cell("rank", f"rank={r}", ("single", "mix", "mix_Kr", "mole", "oracle"), {"rank": r}, 3) for r in (1, 16)]
    cells += [Cell("cue", "cue=1.0", ("single", "mix", "mole", "hash"), {"cue": 1.0}, 4)]
    cells += [Cell("rho", "rho=0.125", ARMS, {"rho": 0.125}, 5)]
    return cells


def cell_config(cfg: MechConfig, cell: Cell) -> MechConfig:
    c = dataclasses.replace(cfg, **cell.over)
    c.validate()
    return c


def _fp(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()[:12]


_BASES: dict = {}


def get_base(cfg: MechConfig, task: Task, seed: int, out: Path):
    """The pretrained base of a seed (depends on model shape, pretraining and the task's images/cue),
    cached in memory and on disk."""
    key = {k: getattr(cfg, k) for k in ("domains", "values", "prefix", "hidden", "intermediate", "layers", "heads",
                                        "pretrain_steps", "pretrain_lr", "pretrain_batch", "pretrain_cue")}
    key["seed"] = seed
    fp = _fp(key)
    if fp in _BASES:
        return _BASES[fp]
    path = out / "bases" / f"{fp}.pt"
    if path.exists():
        model = build_base(cfg, seed)
        model.load_state_dict(torch.load(path, weights_only=True))
        model.eval()
        for p in model.parameters():
            p.requires_grad_(False)
    else:
        model = pretrain(cfg, task, seed)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        torch.save(model.state_dict(), tmp)
        os.replace(tmp, path)
    _BASES.clear()  # keep one base in memory
    _BASES[fp] = model
    return model


def run_arm(cfg: MechConfig, arm: str, seed: int, out: Path) -> dict:
    """One (config, arm, seed): trains and scores, cached under out/runs/."""
    key = dataclasses.asdict(cfg) | {"arm": arm, "seed": seed}
    path = out / "runs" / f"{arm}-s{seed}-{_fp(key)}.json"
    if path.exists():
        return json.loads(path.read_text())
    t0 = time.time()
    task = Task(cfg, seed)
    base = get_base(cfg, task, seed, out)
    base_eval = evaluate(base, [], cfg, task, range(cfg.domains))
    res = {"config": key, "arm": arm, "seed": seed, "eval": {}, "train": {}}
    doms = list(range(cfg.domains))
    if arm == "single":
        for d in doms:
            model, ffns = attach_adapters(base, cfg, arm, cfg.rank, seed)
            res["train"][str(d)] = finetune(model, ffns, cfg, task, arm, d, seed)
            res["eval"].update(evaluate(model, ffns, cfg, task, [d]))
    else:
        model, ffns = attach_adapters(base, cfg, arm, cfg.rank, seed)
        res["train"]["mix"] = finetune(model, ffns, cfg, task, arm, None, seed)
        res["eval"] = evaluate(model, ffns, cfg, task, doms)
    res["base"] = {"eval": base_eval}
    res["seconds"] = time.time() - t0
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(res))
    os.replace(tmp, path)
    return res


# ---------------------------------------------------------------------------------------------
# Summaries


def accuracy(res: dict, subset: str = "all") -> float:
    """Mean over domains of test accuracy (``subset``: all, conflict, clean records)."""
    accs = []
    for rec in res["eval"].values():
        pick = [c for c, k in zip(rec["correct"], rec["conflict"])
                if subset == "all" or (subset == "conflict") == bool(k)]
        if pick:
            accs.append(sum(pick) / len(pick))
    return sum(accs) / len(accs) if accs else float("nan")


def routing_mi(res: dict, num_experts: int) -> float | None:
    """Mean over layers of I(domain; expert at the answer token) in bits, or None without routing."""
    if not all("expert" in r for r in res["eval"].values()):
        return None
    doms = sorted(res["eval"])
    n_layers = len(res["eval"][doms[0]]["expert"])
    mis = []
    for layer in range(n_layers):
        dom_labels, exp_labels = [], []
        for d in doms:
            e = res["eval"][d]["expert"][layer]
            dom_labels += [int(d)] * len(e)
            exp_labels += e
        mis.append(stats.mutual_information_labels(dom_labels, exp_labels, len(doms), num_experts))
    return sum(mis) / len(mis)


def _arm_values(results: dict, cell: str, arm: str, fn) -> dict:
    """{seed: fn(result)} for one cell and arm."""
    return {s: fn(r) for s, r in results.get(cell, {}).get(arm, {}).items()}


def _paired(a: dict, b: dict):
    seeds = sorted(set(a) & set(b))
    if len(seeds) < 2:
        return None, seeds
    return stats.paired_difference([a[s] for s in seeds], [b[s] for s in seeds]), seeds


CONTRASTS = [("single", "mix"), ("mix_Kr", "mix"), ("mole", "mix"), ("oracle", "mix"), ("hash", "mix"),
             ("mole", "single"), ("oracle", "single")]


def analyse(cfg: MechConfig, cells: list[Cell], results: dict, ref_cell: str) -> dict:
    """Per cell: accuracy of every arm (t interval over seeds), paired contrasts (Holm over all
    contrasts of the study), routing MI. A cell's ``borrow`` arms come from ``ref_cell`` (the main
    cell: the same settings except a knob that only MoLE has)."""
    out = {"cells": {}, "contrasts": []}
    for cell in cells:
        c = {"group": cell.group, "over": cell.over, "ran": list(cell.arms), "arms": {}, "contrasts": {}}
        acc = {}
        for arm in ARMS:
            src = cell.name if arm in cell.arms else ref_cell if arm in cell.borrow else None
            if src is None:
                continue
            vals = _arm_values(results, src, arm, accuracy)
            if not vals:
                continue
            acc[arm] = vals
            conf_vals = _arm_values(results, src, arm, lambda r: accuracy(r, "conflict"))
            entry = {"from": src, "seeds": len(vals), "per_seed": vals,
                     "conflict_per_seed": conf_vals}
            if len(vals) >= 2:
                entry["acc"] = stats.t_interval(list(vals.values())).as_dict()
            if arm in MOLE_ARMS:
                mi = {s: m for s, m in _arm_values(results, src, arm, lambda r: routing_mi(r, cfg.experts)).items()
                      if m is not None}
                entry["mi_per_seed"] = mi
                if len(mi) >= 2:
                    entry["mi"] = stats.t_interval(list(mi.values())).as_dict()
            c["arms"][arm] = entry
        for a, b in CONTRASTS:
            if a in acc and b in acc and (a in cell.arms or b in cell.arms):
                iv, seeds = _paired(acc[a], acc[b])
                if iv is not None:
                    c["contrasts"][f"{a}-{b}"] = iv.as_dict()
                    out["contrasts"].append((cell.name, f"{a}-{b}"))
        out["cells"][cell.name] = c
    ps = [out["cells"][cn]["contrasts"][k]["p"] for cn, k in out["contrasts"]]
    if ps:
        adj, rej = stats.holm(ps)
        for (cn, k), pa, r in zip(out["contrasts"], adj, rej):
            out["cells"][cn]["contrasts"][k]["p_holm"] = pa
            out["cells"][cn]["contrasts"][k]["holm_reject"] = r
    out["contrasts"] = [f"{cn}:{k}" for cn, k in out["contrasts"]]
    base = {}
    for arms in results.values():
        for per_seed in arms.values():
            for s, r in per_seed.items():
                base.setdefault(s, accuracy({"eval": r["base"]["eval"]}, "clean"))
    if base:
        out["base_clean"] = {"per_seed": base, "seeds": len(base)}
        if len(base) >= 2:
            out["base_clean"]["acc"] = stats.t_interval(list(base.values())).as_dict()
    return out


def check_predictions(summary: dict, ref_cell: str, cfg: MechConfig | None = None) -> list[dict]:
    """Each preregistered prediction: held / did not hold / not testable, with the evidence."""
    cfg = cfg or MechConfig()
    cells = summary["cells"]

    def con(cell, key):
        return cells.get(cell, {}).get("contrasts", {}).get(key)

    rho_cells = sorted((c for c in cells.values() if c["group"] == "rho" and "single-mix" in c["contrasts"]),
                       key=lambda c: c["over"]["rho"])
    rank_cells = [c for c in cells.values() if c["group"] in ("rank",) and "single-mix" in c["contrasts"]]
    if ref_cell in cells and "single-mix" in cells[ref_cell]["contrasts"]:
        rank_cells.append(cells[ref_cell] | {"over": {"rank": cfg.rank}})
    rank_cells.sort(key=lambda c: c["over"]["rank"])
    res = []

    def add(pid, status, evidence):
        text = dict(PREDICTIONS)[pid]
        res.append({"id": pid, "prediction": text, "status": status, "evidence": evidence})

    zero = [c for c in rho_cells if c["over"]["rho"] == 0.0]
    if zero:
        iv = zero[0]["contrasts"]["single-mix"]
        add("P1", "held" if iv["lo"] <= 0 else "did not hold", f"single-mix at rho=0: {_fmt(iv)}")
    else:
        add("P1", "not testable", "no finished rho=0 cell")
    if len(rho_cells) >= 2:
        lo, hi = rho_cells[0]["contrasts"]["single-mix"], rho_cells[-1]["contrasts"]["single-mix"]
        ok = hi.get("holm_reject", False) and hi["mean"] > 0 and hi["mean"] > lo["mean"]
        add("P2", "held" if ok else "did not hold",
            f"single-mix at rho={rho_cells[0]['over']['rho']}: {_fmt(lo)}; at rho={rho_cells[-1]['over']['rho']}: "
            f"{_fmt(hi)} (Holm p {hi.get('p_holm', float('nan')):.3g})")
    else:
        add("P2", "not testable", "fewer than two finished rho cells")
    if len(rank_cells) >= 2:
        lo, hi = rank_cells[0]["contrasts"]["single-mix"], rank_cells[-1]["contrasts"]["single-mix"]
        add("P3", "held" if hi["mean"] < lo["mean"] else "did not hold",
            f"single-mix at rank {rank_cells[0]['over']['rank']}: {_fmt(lo)}; at rank "
            f"{rank_cells[-1]['over']['rank']}: {_fmt(hi)}")
    else:
        add("P3", "not testable", "fewer than two finished rank cells")
    conflict, orm, ors = con(ref_cell, "single-mix"), con(ref_cell, "oracle-mix"), con(ref_cell, "oracle-single")
    if conflict and orm and ors:
        half = conflict["mean"] / 2
        ok = orm.get("holm_reject", False) and orm["mean"] > 0 and -half < ors["lo"] and ors["hi"] < half
        add("P4", "held" if ok else "did not hold",
            f"{ref_cell}: conflict {_fmt(conflict)}, oracle-mix {_fmt(orm)}, oracle-single {_fmt(ors)}, "
            f"half conflict {half:.3f}")
    else:
        add("P4", "not testable", f"{ref_cell} lacks single, mix or oracle")
    gains, mis = [], []
    for c in cells.values():
        if c["over"].get("rho", cfg.rho) == 0.0:
            continue
        mole, mix = c["arms"].get("mole"), c["arms"].get("mix")
        if not mole or not mix or "mole" not in c["ran"]:
            continue
        for s, mi in mole.get("mi_per_seed", {}).items():
            if s in mix["per_seed"]:
                gains.append(mole["per_seed"][s] - mix["per_seed"][s])
                mis.append(mi)
    if len(gains) >= 3 and max(mis) - min(mis) > 1e-9:
        r, p = stats.spearman(mis, gains)
        add("P5", "held" if r > 0 and p < 0.05 else "did not hold",
            f"Spearman(MI, mole-mix) = {r:+.2f} (p {p:.3g}) over {len(gains)} cell-seeds; "
            f"MI from {min(mis):.3f} to {max(mis):.3f} bits")
    else:
        add("P5", "not testable", f"{len(gains)} cell-seeds with MoLE and mix; MI did not vary")
    hm = con(ref_cell, "hash-mix")
    if conflict and hm:
        ok = hm["lo"] <= 0 or hm["hi"] < conflict["mean"] / 2
        add("P6", "held" if ok else "did not hold", f"{ref_cell}: hash-mix {_fmt(hm)}, conflict {_fmt(conflict)}")
    else:
        add("P6", "not testable", f"{ref_cell} lacks hash or mix")
    return res


def _fmt(iv: dict | None, digits: int = 3) -> str:
    if not iv:
        return "-"
    if "lo" not in iv:
        return f"{iv['mean']:.{digits}f}"
    return f"{iv['mean']:+.{digits}f} [{iv['lo']:+.{digits}f}, {iv['hi']:+.{digits}f}]"


def _acc_cell(entry: dict | None) -> str:
    if not entry:
        return "-"
    if "acc" not in entry:
        vals = list(entry["per_seed"].values())
        return f"{sum(vals) / len(vals):.3f} (n={len(vals)})"
    a = entry["acc"]
    return f"{a['mean']:.3f} [{a['lo']:.3f}, {a['hi']:.3f}]"


def tables(summary: dict) -> str:
    """The main tables in markdown: accuracy per arm, contrasts, routing MI."""
    base = summary.get("base_clean")
    lines = ([f"Frozen base model, accuracy on the records where every domain wants f (the pretraining "
              f"check): {_acc_cell(base)}", ""] if base else []) + ["### Accuracy (mean over domains, all test records; mean [95% t interval] over seeds)", "",
             "| cell | seeds | " + " | ".join(ARMS) + " |", "|---|---|" + "---|" * len(ARMS)]
    # "(main cell)": the cell's knob does not touch that arm; its contrasts use the main cell's runs
    for name, c in summary["cells"].items():
        n = max((e["seeds"] for a, e in c["arms"].items() if a in c["ran"]), default=0)
        row = [_acc_cell(c["arms"].get(a)) if a in c["ran"] else "(main cell)" if a in c["arms"] else "-"
               for a in ARMS]
        lines.append(f"| {name} | {n} | " + " | ".join(row) + " |")
    keys = [f"{a}-{b}" for a, b in CONTRASTS]
    lines += ["", "### Paired differences over seeds (mean [95% t interval]; * = Holm-adjusted p < 0.05 "
              "over all contrasts of the study)", "",
              "| cell | " + " | ".join(keys) + " |", "|---|" + "---|" * len(keys)]
    for name, c in summary["cells"].items():
        row = []
        for k in keys:
            iv = c["contrasts"].get(k)
            row.append("-" if not iv else _fmt(iv) + (" *" if iv.get("holm_reject") else ""))
        lines.append(f"| {name} | " + " | ".join(row) + " |")
    lines += ["", "### Routing: mutual information between domain and expert at the answer token "
              f"(bits, mean over layers; log2 K = {math.log2(MechConfig().experts):.3f} at most)", "",
              "| cell | mole | oracle | hash |", "|---|---|---|---|"]
    for name, c in summary["cells"].items():
        row = [_fmt(c["arms"].get(a, {}).get("mi")) if c["arms"].get(a, {}).get("mi") else "-" for a in MOLE_ARMS]
        lines.append(f"| {name} | " + " | ".join(row) + " |")
    return "\n".join(lines)


def figures(summary: dict, out: Path, ref_cell: str, cfg: MechConfig) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figdir = out / "figures"
    figdir.mkdir(parents=True, exist_ok=True)
    cells = summary["cells"]
    made = []

    def sweep_plot(group, key, fname, xlabel, extra=None):
        pts = [(c["over"][key], c) for c in cells.values() if c["group"] == group]
        if extra is not None:
            pts.append(extra)
        pts.sort(key=lambda t: t[0])
        if len(pts) < 2:
            return
        fig, axes = plt.subplots(1, 2, figsize=(11, 4))
        span = (max(p[0] for p in pts) - min(p[0] for p in pts)) or 1
        for ax, field_, title in ((axes[0], "per_seed", "all test records"),
                                  (axes[1], "conflict_per_seed", "conflict records")):
            for i, arm in enumerate(ARMS):
                xs, ys, lo, hi = [], [], [], []
                for x, c in pts:
                    e = c["arms"].get(arm)
                    vals = [v for v in (e or {}).get(field_, {}).values() if v == v]  # drop nan (no records)
                    if len(vals) >= 2:
                        iv = stats.t_interval(vals)
                        xs.append(x)
                        ys.append(iv.mean)
                        lo.append(iv.mean - iv.lo)
                        hi.append(iv.hi - iv.mean)
                if xs:
                    off = (i - len(ARMS) / 2) * (0.01 if key == "rank" else 0.006 * span)
                    xo = [x * (1 + off) if key == "rank" else x + off for x in xs]
                    ax.errorbar(xo, ys, yerr=[lo, hi], marker="o", capsize=3, label=arm)
            ax.set_xlabel(xlabel)
            ax.set_ylabel("test accuracy, mean over domains")
            ax.set_title(f"{title} (95% t intervals over seeds)", fontsize=10)
            if key == "rank":
                ax.set_xscale("log", base=2)
            ax.grid(alpha=0.3)
        axes[0].legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(figdir / fname, dpi=120)
        plt.close(fig)
        made.append(fname)

    sweep_plot("rho", "rho", "accuracy_vs_rho.png", "conflict fraction rho")
    ref = cells.get(ref_cell)
    sweep_plot("rank", "rank", "accuracy_vs_rank.png", "LoRA rank r",
               (cfg.rank, ref) if ref else None)
    sweep_plot("cue", "cue", "accuracy_vs_cue.png", "domain cue strength",
               (cfg.cue, ref) if ref else None)
    fig, ax = plt.subplots(figsize=(6, 4))
    any_pt = False
    for arm, mark in (("mole", "o"), ("hash", "x"), ("oracle", "s")):
        xs, ys = [], []
        for c in cells.values():
            e, mix = c["arms"].get(arm), c["arms"].get("mix")
            if not e or not mix or arm not in c["ran"]:
                continue
            for s, mi in e.get("mi_per_seed", {}).items():
                if s in mix["per_seed"]:
                    xs.append(mi)
                    ys.append(e["per_seed"][s] - mix["per_seed"][s])
        if xs:
            any_pt = True
            ax.scatter(xs, ys, marker=mark, label=arm, alpha=0.6)
    if any_pt:
        ax.axhline(0, color="grey", lw=0.8)
        ax.set_xlabel("routing MI(domain; expert) at the answer token, bits")
        ax.set_ylabel("accuracy minus the mixture LoRA (same seed)")
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
        fig.tight_layout()
        fig.savefig(figdir / "mi_vs_gain.png", dpi=120)
        made.append("mi_vs_gain.png")
    plt.close(fig)
    return made


# ---------------------------------------------------------------------------------------------
# Driver


def _git_commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              cwd=Path(__file__).parent, timeout=10).stdout.strip()
    except Exception:  # noqa: BLE001 (a missing git is not an error of the experiment)
        return ""


def collect(cfg: MechConfig, cells: list[Cell], seeds: list[int], out: Path) -> dict:
    """{cell name: {arm: {seed: result}}} for every cached result of the plan."""
    found = {}
    for cell in cells:
        c = cell_config(cfg, cell)
        for arm in cell.arms:
            for s in seeds:
                key = dataclasses.asdict(c) | {"arm": arm, "seed": s}
                p = out / "runs" / f"{arm}-s{s}-{_fp(key)}.json"
                if p.exists():
                    found.setdefault(cell.name, {}).setdefault(arm, {})[s] = json.loads(p.read_text())
    return found


FIRST_PASS_SEEDS = 5  # phases >= 2 (secondary sweeps) run this many seeds before any runs all of them


def work(cfg: MechConfig, cells: list[Cell], seeds: list[int], out: Path, log=print, first_pass=FIRST_PASS_SEEDS):
    """Runs every (cell, arm, seed) not cached yet: phase by phase, seeds outer within a phase, so a
    partial study has whole phases with as many seeds as possible. Phases 0 and 1 (rho = 0.25 and
    0.5) run every seed; later phases first run the first ``first_pass`` seeds each, then the rest."""
    phases = sorted({c.phase for c in cells})
    passes = [(ph, [s for s in seeds if ph < 2 or s < first_pass]) for ph in phases]
    passes += [(ph, [s for s in seeds if s >= first_pass]) for ph in phases if ph >= 2]
    for phase, pass_seeds in passes:
        for s in pass_seeds:
            for cell in (c for c in cells if c.phase == phase):
                c = cell_config(cfg, cell)
                for arm in cell.arms:
                    t0 = time.time()
                    r = run_arm(c, arm, s, out)
                    if time.time() - t0 > 0.5:
                        log(f"[{time.strftime('%H:%M:%S')}] {cell.name} {arm} seed {s}: acc {accuracy(r):.3f} "
                            f"(conflict {accuracy(r, 'conflict'):.3f}) in {r['seconds']:.0f} s", flush=True)


def report(cfg: MechConfig, cells: list[Cell], seeds: list[int], out: Path, quick: bool, argv: list[str],
           wall: float | None = None) -> str:
    ref_cell = REF_CELL
    results = collect(cfg, cells, seeds, out)
    summary = analyse(cfg, cells, results, ref_cell)
    preds = check_predictions(summary, ref_cell, cfg)
    done = sum(len(v) for arms in results.values() for v in arms.values())
    planned = sum(len(c.arms) for c in cells) * len(seeds)
    figs = figures(summary, out, ref_cell, cfg)
    md = ["# Mechanism study: data conflict and sparse MoLE on a controlled task", "",
          f"Command: `python -m training.experiments.mechanism {' '.join(argv)}`  ",
          f"Commit: `{_git_commit()}`; machine: {platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}"
          + (f"; wall time {wall / 60:.1f} min" if wall else "") + "  ",
          f"Finished (cell, arm, seed) results: {done} of {planned} planned ({len(seeds)} seeds x "
          f"{len(cells)} cells){' - quick mode' if quick else ''}.", "",
          "Settings of the main cell: " + ", ".join(f"{k}={v}" for k, v in dataclasses.asdict(cfg).items()), "",
          "## Predictions (stated before running) and whether they held", ""]
    for p in preds:
        md.append(f"- **{p['id']} - {p['status']}.** {p['prediction']} Evidence: {p['evidence']}.")
    md += ["", "## Tables", "", tables(summary), ""]
    if figs:
        md += ["## Figures", ""] + [f"![{f}](figures/{f})" for f in figs] + [""]
    text = "\n".join(md)
    (out / "results.md").write_text(text)
    slim = {"config": dataclasses.asdict(cfg), "seeds": seeds, "quick": quick, "argv": argv, "commit": _git_commit(),
            "finished": done, "planned": planned, "predictions": preds, "summary": summary,
            "plan": [dataclasses.asdict(c) for c in cells]}
    (out / "results.json").write_text(json.dumps(slim, indent=1, default=float))
    return text


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    ap = argparse.ArgumentParser(prog="python -m training.experiments.mechanism", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="2 cells (rho 0 and 0.25), 3 seeds, short training")
    ap.add_argument("--out", default=None, help="output directory (default runs/mechanism[-quick])")
    ap.add_argument("--seeds", type=int, default=None, help="number of seeds (default 10; quick 3)")
    ap.add_argument("--groups", nargs="*", default=None, help="only these sweep groups (rho rank cue gate balance "
                    "router_lr)")
    ap.add_argument("--workers", type=int, default=1, help="processes, each taking every workers-th seed")
    ap.add_argument("--worker", type=int, default=None, help=argparse.SUPPRESS)
    ap.add_argument("--report-only", action="store_true", help="rewrite results from the cache, train nothing")
    ap.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="override MechConfig fields")
    args = ap.parse_args(argv)
    cfg = MechConfig()
    if args.quick:
        cfg = dataclasses.replace(cfg, pretrain_steps=300, steps=60)
    for kv in args.set:
        k, _, v = kv.partition("=")
        if k not in {f.name for f in dataclasses.fields(MechConfig)}:
            raise ValueError(f"--set: unknown MechConfig field {k!r}")
        setattr(cfg, k, type(getattr(cfg, k))(v))
    cfg.validate()
    n_seeds = args.seeds or (3 if args.quick else 10)
    seeds = list(range(n_seeds))
    cells = plan(cfg, args.quick)
    if args.groups:
        unknown = set(args.groups) - {c.group for c in plan(cfg)}
        if unknown:
            raise ValueError(f"--groups: unknown groups {sorted(unknown)}")
        cells = [c for c in cells if c.group in args.groups or c.name == REF_CELL]
    out = Path(args.out or ("runs/mechanism-quick" if args.quick else "runs/mechanism"))
    out.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(1)
    t0 = time.time()
    if args.worker is not None:
        work(cfg, cells, [s for s in seeds if s % args.workers == args.worker], out)
        return 0
    if not args.report_only:
        print("Predictions, stated before running:")
        for pid, text in PREDICTIONS:
            print(f"  {pid}: {text}")
        if args.workers > 1:
            base = [sys.executable, "-m", "training.experiments.mechanism"] + argv
            procs = [subprocess.Popen(base + ["--worker", str(w)]) for w in range(args.workers)]
            codes = [p.wait() for p in procs]
            if any(codes):
                print(f"workers exited with {codes}; reporting what finished", file=sys.stderr)
        else:
            work(cfg, cells, seeds, out)
    text = report(cfg, cells, seeds, out, args.quick, argv, None if args.report_only else time.time() - t0)
    print(text)
    print(f"\nwritten: {out / 'results.md'}, {out / 'results.json'}, {out / 'figures'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
