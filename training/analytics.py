"""Routing analytics (the paper's Figure 6, live): per layer, expert and domain, the fraction of
tokens routed to each expert, image and text tokens separately, and the routing entropy."""
from __future__ import annotations

import json
import logging
import math
from pathlib import Path

import torch

log = logging.getLogger(__name__)
KINDS = ("text", "image")


class RoutingStats:
    """Accumulates routing counts. ``counts[l, d, kind, k]``: tokens of domain ``d`` and kind
    (0 text, 1 image) routed to expert ``k`` in MoLE layer ``l``; ``entropy[l, d, kind]``: summed
    per-token entropy of the router's probabilities (nats)."""

    def __init__(self, layer_names: list[str], num_experts: int, domains: list[str]):
        self.layer_names = layer_names
        self.domains = domains
        self.K = num_experts
        shape = (len(layer_names), len(domains), 2)
        self.counts = torch.zeros(*shape, num_experts, dtype=torch.float64)
        self.entropy = torch.zeros(*shape, dtype=torch.float64)

    @torch.no_grad()
    def update(self, layer: int, probs: torch.Tensor, expert: torch.Tensor, token_domain: torch.Tensor,
               is_image: torch.Tensor, mask: torch.Tensor) -> None:
        """probs [N, K] float, expert [N] int, token_domain [N] long, is_image / mask [N] bool.
        Accumulates on the tensors' device (no host sync per step on a GPU)."""
        dev = probs.device
        if self.counts.device != dev:
            self.counts, self.entropy = self.counts.to(dev), self.entropy.to(dev)
        # No boolean indexing and no bincount: on CUDA both wait for the device (the output size
        # depends on the data). Padding tokens go to cell 0 with weight 0 instead.
        m = mask.to(dev).reshape(-1).bool()
        cell = token_domain.to(dev).reshape(-1).long() * 2 + is_image.to(dev).reshape(-1).long()  # (domain, kind)
        cell = torch.where(m, cell, 0)
        idx = torch.where(m, cell * self.K + expert.to(dev).reshape(-1).long(), 0)
        self.counts[layer].view(-1).index_add_(0, idx, m.to(self.counts.dtype))
        p = probs.detach().float()
        h = -(p * torch.log(p.clamp_min(1e-12))).sum(-1)
        self.entropy[layer].view(-1).index_add_(0, cell, torch.where(m, h, 0.0).to(self.entropy.dtype))

    def all_reduce(self) -> None:
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            dev = "cuda" if dist.get_backend() == "nccl" else "cpu"
            for name in ("counts", "entropy"):
                buf = getattr(self, name).to(dev)
                dist.all_reduce(buf)
                setattr(self, name, buf)

    def snapshot(self) -> tuple[torch.Tensor, torch.Tensor]:
        """A copy of the counters (stays on their device: no host sync)."""
        return self.counts.clone(), self.entropy.clone()

    def since(self, snap: tuple[torch.Tensor, torch.Tensor], all_reduce: bool = False) -> "RoutingStats":
        """The routing counted after ``snap`` (a window), as a new ``RoutingStats``; with
        ``all_reduce``, summed over every rank (a collective)."""
        out = RoutingStats(self.layer_names, self.K, self.domains)
        c0, e0 = snap
        out.counts = self.counts - c0.to(self.counts.device)
        out.entropy = self.entropy - e0.to(self.entropy.device)
        if all_reduce:
            out.all_reduce()
        return out

    def summary(self, min_fraction: float = 0.01) -> dict:
        """JSON-ready fractions and entropies; ``warnings`` lists experts under ``min_fraction``
        of a layer's tokens (all domains and kinds together)."""
        self.counts, self.entropy = self.counts.cpu(), self.entropy.cpu()
        out = {"layers": self.layer_names, "domains": self.domains, "num_experts": self.K, "cells": [], "warnings": [],
               "layer_loads": []}
        tot = self.counts.sum(-1)  # [L, D, 2]
        for l in range(len(self.layer_names)):
            for d, dom in enumerate(self.domains):
                for kind in range(2):
                    n = float(tot[l, d, kind])
                    if n == 0:
                        continue
                    frac = (self.counts[l, d, kind] / n).tolist()
                    out["cells"].append({
                        "layer": l, "domain": dom, "kind": KINDS[kind], "tokens": int(n),
                        "fractions": frac,
                        "mean_token_entropy": float(self.entropy[l, d, kind] / n),
                        "load_entropy": -sum(f * math.log(f) for f in frac if f > 0),
                    })
            layer_tot = self.counts[l].sum((0, 1))
            n = float(layer_tot.sum())
            if n == 0:
                continue
            fr = [float(layer_tot[k]) / n for k in range(self.K)]
            out["layer_loads"].append({
                "layer": l, "tokens": int(n), "fractions": fr,
                "load_entropy": -sum(f * math.log(f) for f in fr if f > 0),
                "mean_token_entropy": float(self.entropy[l].sum()) / n,
                "dead": [k for k in range(self.K) if fr[k] < min_fraction],
            })
            for k in range(self.K):
                f = fr[k]
                if f < min_fraction:
                    msg = f"layer {self.layer_names[l]}: expert {k} received {100 * f:.2f}% of tokens (< {100 * min_fraction:g}%)"
                    out["warnings"].append(msg)
        return out

    def write(self, run_dir: str | Path, name: str = "routing") -> dict:
        run_dir = Path(run_dir)
        s = self.summary()
        for w in s["warnings"]:
            log.warning("routing: %s", w)
        (run_dir / f"{name}.json").write_text(json.dumps(s, indent=1))
        if self.counts.sum() > 0:
            heatmap(self, run_dir / f"{name}_heatmap.png")
        return s


def heatmap(stats: RoutingStats, path: str | Path) -> None:
    """Layers x experts token fractions, one panel per domain (columns) and kind (rows)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    D, L, K = len(stats.domains), len(stats.layer_names), stats.K
    kinds = [k for k in range(2) if stats.counts[:, :, k].sum() > 0]
    fig, axes = plt.subplots(len(kinds), D, figsize=(1.5 + (0.4 * K + 1.0) * D, 1.0 + (0.25 * L + 1.0) * len(kinds)),
                             squeeze=False, constrained_layout=True)
    im = None
    for r, kind in enumerate(kinds):
        for d in range(D):
            ax = axes[r][d]
            c = stats.counts[:, d, kind]
            if c.sum() == 0:
                ax.set_title(f"{stats.domains[d]} / {KINDS[kind]}", fontsize=8)
                ax.text(0.5, 0.5, "no tokens", ha="center", va="center", transform=ax.transAxes, fontsize=8)
                ax.set_axis_off()
                continue
            frac = (c / c.sum(-1, keepdim=True).clamp_min(1)).numpy()
            im = ax.imshow(frac, vmin=0, vmax=1, cmap="viridis", aspect="auto")
            ax.set_title(f"{stats.domains[d]} / {KINDS[kind]}", fontsize=8)
            ax.set_xticks(range(K))
            ax.set_xlabel("expert", fontsize=7)
            ax.set_yticks(range(L))
            ax.set_yticklabels([str(i) for i in range(L)] if d == 0 else [], fontsize=6)
            if d == 0:
                ax.set_ylabel("MoLE layer", fontsize=7)
    fig.colorbar(im, ax=axes, fraction=0.05, label="token fraction")
    fig.suptitle("routing: token fraction per MoLE layer and expert", fontsize=9)
    fig.savefig(path, dpi=100)
    plt.close(fig)


def loss_curve(metrics_jsonl: str | Path, path: str | Path) -> None:
    """Plot loss, LM loss and balance loss against the step from a metrics JSONL file."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [json.loads(x) for x in Path(metrics_jsonl).read_text().splitlines() if x.strip()]
    fig, ax = plt.subplots(figsize=(6, 3.5))
    for stage in sorted({r.get("stage", 0) for r in rows}):
        pts = [r for r in rows if r.get("stage", 0) == stage and "loss" in r]
        if pts:
            ax.plot([r["global_step"] for r in pts], [r["loss"] for r in pts], label=f"stage {stage} loss")
        ev = [r for r in rows if r.get("stage", 0) == stage and "eval_loss" in r]
        if ev:
            ax.plot([r["global_step"] for r in ev], [r["eval_loss"] for r in ev], "o--", label=f"stage {stage} eval")
    ax.set_xlabel("optimizer step (per stage)")
    ax.set_ylabel("loss")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
