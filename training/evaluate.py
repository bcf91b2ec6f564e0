"""Evaluation helpers: per-domain answer loss, greedy exact match, and routing analytics on a data set.
(The full benchmark evaluation with per-domain metrics comes with the data issue.)"""
from __future__ import annotations

import re

import torch
import torch.nn.functional as F

from .analytics import RoutingStats
from .data import Collator, LlavaData
from .model import mole_modules


@torch.no_grad()
def eval_loss(built, data: LlavaData, batch_size: int = 8, max_per_domain: int | None = None) -> tuple[dict, RoutingStats]:
    """Mean answer-token loss per domain (and overall), with the routing of every token."""
    model = built.model.eval()
    moles = mole_modules(model)
    K = moles[0][1].num_experts if moles else 1
    stats = RoutingStats([n for n, _ in moles], K, data.domains)
    idx = [i for dom in data.by_domain for i in (dom[:max_per_domain] if max_per_domain else dom)]
    coll = Collator(built.tokenizer.pad_token_id)
    sums = torch.zeros(len(data.domains), dtype=torch.float64)
    counts = torch.zeros(len(data.domains), dtype=torch.float64)
    for s in range(0, len(idx), batch_size):
        b = coll([data[i] for i in idx[s:s + batch_size]])
        b = {k: v.to(model.device) for k, v in b.items()}
        labels, domain = b.pop("labels"), b.pop("domain")
        if "pixel_values" in b:
            b["pixel_values"] = b["pixel_values"].to(model.dtype)
        logits = model(**b, use_cache=False).logits[:, :-1].float()
        tgt = labels[:, 1:]
        ce = F.cross_entropy(logits.transpose(1, 2), tgt, ignore_index=-100, reduction="none")  # [B, T-1]
        valid = (tgt != -100)
        sums.index_add_(0, domain.cpu(), (ce * valid).sum(1).double().cpu())
        counts.index_add_(0, domain.cpu(), valid.sum(1).double().cpu())
        mask = b["attention_mask"].bool().reshape(-1)
        tok_dom = domain[:, None].expand_as(b["input_ids"]).reshape(-1).cpu()
        is_img = (b["input_ids"] == model.config.image_token_id).reshape(-1).cpu()
        mask = mask.cpu()
        for li, (_, m) in enumerate(moles):
            stats.update(li, m.last_routing.probs, m.last_routing.expert, tok_dom, is_img, mask)
    out = {d: float(sums[k] / counts[k].clamp_min(1)) for k, d in enumerate(data.domains)}
    out["all"] = float(sums.sum() / counts.sum().clamp_min(1))
    return out, stats


def _norm(s: str) -> str:
    return re.sub(r"[^a-z0-9 ]", "", s.lower()).strip()


@torch.no_grad()
def exact_match(built, cfg, data: LlavaData, per_domain: int = 4, max_new_tokens: int = 12) -> dict:
    """Greedy generation on the first question of a few records per domain; normalised exact match."""
    from PIL import Image

    from .generate import generate

    out = {}
    for d, dom in enumerate(data.domains):
        hits = []
        for i in data.by_domain[d][:per_domain]:
            rec = data.records[i]
            q, a = rec.turns[0]
            img = Image.open(rec.image) if rec.image else None
            pred = generate(built, cfg, q.replace("<image>\n", "").replace("<image>", ""), img, max_new_tokens)
            hits.append(_norm(pred) == _norm(a))
        out[dom] = sum(hits) / max(1, len(hits))
    return out
