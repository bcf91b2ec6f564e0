"""Evaluation: per-domain answer loss, greedy generation scored with the benchmarks' metrics, and
routing analytics on a data set.

    python -m training.evaluate --run RUN_DIR --data FILE.json [--data FILE2.json ...] [--out DIR]

Works on any LLaVA-JSON test file: a record may carry ``domain`` and ``metric`` keys (see
``training.metrics``); without them the file's name is the domain and normalised exact match the
metric. Image paths resolve relative to the JSON file. Writes ``eval.json`` (every prediction,
per-domain scores, answer loss), ``eval.md`` (the table) and the routing heatmap of that data.
"""
from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

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


def _file_domain(path: Path, records: list[dict]) -> str:
    """A file's domain: the records' common ``domain`` key, else the file's name."""
    names = {r.get("domain") for r in records}
    return names.pop() if len(names) == 1 and None not in names else path.stem


@torch.no_grad()
def evaluate(built, cfg, data_files: list, batch_size: int = 8, max_new_tokens: int = 16,
             limit: int | None = None) -> tuple[dict, RoutingStats]:
    """Greedy answers to the first question of each record, scored per record with its metric."""
    from PIL import Image

    from .config import DatasetSpec
    from .generate import generate_batch
    from .metrics import aggregate, score_record

    specs, raw = [], []
    for f in data_files:
        path = Path(f)
        try:
            records = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise ValueError(f"cannot read the LLaVA-JSON test file {path}: {e}") from e
        records = records[:limit] if limit else records
        raw.append(records)
        specs.append(DatasetSpec(path=str(path), domain=_file_domain(path, records)))
    data = LlavaData(cfg.data, built.tokenizer, built.image_processor, built.num_image_tokens, specs)
    losses, stats = eval_loss(built, data, batch_size=batch_size, max_per_domain=limit)

    items, predictions = [], []
    for spec, records in zip(specs, raw):
        for s in range(0, len(records), batch_size):
            chunk = records[s:s + batch_size]
            prompts, images = [], []
            for rec in chunk:
                human = next((t["value"] for t in rec.get("conversations", []) if t.get("from") == "human"), None)
                if human is None:
                    raise ValueError(f"{spec.path}: record {rec.get('id')!r} has no human turn")
                prompts.append(human.replace("<image>\n", "").replace("<image>", "").strip())
                img = None
                if rec.get("image"):
                    p = Path(spec.path).parent / rec["image"]
                    try:
                        img = Image.open(p)
                    except OSError as e:
                        raise ValueError(f"{spec.path}: record {rec.get('id')!r}: cannot open image {p}: {e}") from e
                images.append(img)
            for rec, pred in zip(chunk, generate_batch(built, cfg, prompts, images, max_new_tokens)):
                item = score_record(rec, pred, default_domain=spec.domain)
                items.append(item)
                predictions.append({**item, "prediction": pred})
    result = {"scores": aggregate(items), "answer_loss": losses, "predictions": predictions,
              "data": [str(f) for f in data_files]}
    return result, stats


def markdown(result: dict) -> str:
    """Domains as rows: score, count, and the score of each metric used."""
    lines = ["| domain | n | score | metrics |", "|---|---|---|---|"]
    for dom, d in result["scores"]["domains"].items():
        per = ", ".join(f"{m} {v['score']:.3f} (n={v['n']})" for m, v in d["metrics"].items())
        lines.append(f"| {dom} | {d['n']} | {d['score']:.3f} | {per} |")
    lines.append(f"| **macro** | {result['scores']['n']} | {result['scores']['macro']:.3f} | |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m training.evaluate", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run", required=True, help="run directory (RUN/adapter, a demo's RUN/stage2/adapter) or adapter")
    ap.add_argument("--data", required=True, action="append", help="LLaVA-JSON test file (repeatable)")
    ap.add_argument("--out", default=None, help="output directory (default RUN/eval)")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--max-new-tokens", type=int, default=16)
    ap.add_argument("--limit", type=int, default=None, help="first N records of each file")
    args = ap.parse_args(argv)
    from .generate import find_adapter
    from .trainer import load_run_model

    built, cfg = load_run_model(find_adapter(args.run))
    result, stats = evaluate(built, cfg, args.data, args.batch_size, args.max_new_tokens, args.limit)
    out = Path(args.out or Path(args.run) / "eval")
    out.mkdir(parents=True, exist_ok=True)
    result["routing"] = stats.write(out, "routing_eval")
    (out / "eval.json").write_text(json.dumps(result, indent=1))
    table = markdown(result)
    (out / "eval.md").write_text(f"# Evaluation of {args.run}\n\n" + table)
    print(table)
    print(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
