"""Evaluation: per-domain answer loss, greedy generation scored with the benchmarks' metrics, and
routing analytics on a data set.

    python -m training.evaluate --run RUN_DIR --data FILE.json [--data FILE2.json ...] [--out DIR]

        [--answers-file OUT.jsonl] [--image-root DIR] [--batch-size N] [--limit N]

Works on LLaVA-JSON test files and on LLaVA's question JSONL (``question_id``, ``image``,
``text``). A record may carry ``domain`` and ``metric`` keys (see ``training.metrics``); without
them the file's name is the domain and normalised exact match the metric. A record without an
answer is answered but not scored (test sets whose answers are withheld). Image paths resolve
against ``--image-root``, default the test file's folder. Writes LLaVA's answers JSONL
(``question_id``, ``prompt``, ``text``, ``answer_id``, ``model_id``, ``metadata``, plus ``domain``
and, where scored, ``answer``, ``metric``, ``score``), which LLaVA's scripts and leaderboards read,
``eval.json`` (scores, answer loss, every prediction), ``eval.md`` (the table) and the routing
heatmap of the records with answers.
"""
from __future__ import annotations

import argparse
import json
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


def _file_domain(path: Path, records: list[dict]) -> str:
    """A file's domain: the records' common ``domain`` key, else the file's name."""
    names = {r.get("domain") for r in records}
    return names.pop() if len(names) == 1 and None not in names else path.stem


def read_questions(path, image_root=None, limit: int | None = None) -> tuple[str, list[dict]]:
    """The questions of one test file, as (file domain, items).

    Two formats: LLaVA-JSON (a list of records with ``conversations``; the gpt turn is optional)
    and LLaVA's question JSONL (one ``{"question_id", "image", "text"[, "category"]}`` object a
    line, as its ``model_vqa`` scripts read; an ``answer`` or ``answers`` key is optional). Each
    item: ``question_id``, ``prompt`` (without the ``<image>`` tag), ``image`` (as written),
    ``image_path`` (resolved against ``image_root``, default the file's folder, or None),
    ``answer`` (None when the record has none), ``metric``, ``domain`` and the raw ``record``.
    """
    from .metrics import canonical_metric

    path = Path(path)
    try:
        text = path.read_text()
        if path.suffix == ".jsonl":
            records = [json.loads(line) for line in text.splitlines() if line.strip()]
        else:
            records = json.loads(text)
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"cannot read the test file {path}: {e}") from e
    if not isinstance(records, list) or not all(isinstance(r, dict) for r in records):
        raise ValueError(f"{path}: expected a JSON list of records (or a JSONL file of objects)")
    records = records[:limit] if limit else records
    domain = _file_domain(path, records)
    root = Path(image_root) if image_root else path.parent
    items = []
    for i, rec in enumerate(records):
        qid = rec.get("question_id", rec.get("id", i))
        where = f"{path}: record {qid!r}"
        answer = rec.get("answers", rec.get("answer"))
        if "conversations" in rec:
            turns = rec["conversations"]
            human = next((t.get("value") for t in turns if isinstance(t, dict) and t.get("from") == "human"), None)
            gpt = [t.get("value") for t in turns if isinstance(t, dict) and t.get("from") == "gpt"]
            if answer is None and gpt:
                answer = gpt[0]  # the answer to the first (asked) question
        else:
            human = rec.get("text")
        if not isinstance(human, str) or not human.replace("<image>", "").strip():
            raise ValueError(f"{where}: no question (expected a human turn in 'conversations' or a 'text' key)")
        image = rec.get("image")
        if image is not None and not isinstance(image, str):
            raise ValueError(f"{where}: 'image' must be a path string, got {type(image).__name__}")
        items.append({
            "question_id": qid, "prompt": human.replace("<image>\n", "").replace("<image>", "").strip(),
            "image": image, "image_path": str(root / image) if image else None, "answer": answer,
            "metric": canonical_metric(rec.get("metric")),
            "domain": str(rec.get("domain") or rec.get("category") or domain), "record": rec,
        })
    return domain, items


def _loss_spec(path: Path, domain: str, items: list[dict], image_root, tmp: Path):
    """A DatasetSpec for the answer-loss pass over the records that have a gpt answer, or None."""
    from .config import DatasetSpec

    with_answers = [it["record"] for it in items if "conversations" in it["record"] and it["answer"] is not None
                    and any(t.get("from") == "gpt" for t in it["record"]["conversations"])]
    if not with_answers:
        return None
    root = str(image_root) if image_root else str(path.parent)
    if len(with_answers) == len(items) and path.suffix != ".jsonl":
        return DatasetSpec(path=str(path), domain=domain, image_root=root)
    sub = tmp / f"{len(list(tmp.iterdir()))}-{path.stem}.json"
    sub.write_text(json.dumps(with_answers))
    return DatasetSpec(path=str(sub), domain=domain, image_root=root)


def write_answers(path, predictions: list[dict]) -> Path:
    """LLaVA's answers JSONL: one prediction a line (``question_id``, ``prompt``, ``text``,
    ``answer_id``, ``model_id``, ``metadata``, plus our ``domain`` and, where scored, ``score``)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w") as f:
        for p in predictions:
            f.write(json.dumps(p, ensure_ascii=False) + "\n")
    return path


@torch.no_grad()
def evaluate(built, cfg, data_files: list, batch_size: int = 8, max_new_tokens: int = 16,
             limit: int | None = None, image_root=None, loss: bool = True, model_id: str = "mole",
             progress: bool | None = None) -> tuple[dict, RoutingStats | None]:
    """Greedy answers to the first question of each record, batched, with a progress bar.

    Records with an answer are scored with their metric (``scores``) and, when ``loss``, their
    answer-token loss and routing go through one teacher-forced pass (``answer_loss``, the
    returned ``RoutingStats``); records without one are only answered. ``predictions`` are the
    rows of LLaVA's answers JSONL (see ``write_answers``)."""
    import tempfile
    import uuid

    from PIL import Image
    from tqdm.auto import tqdm

    from .generate import generate_batch
    from .metrics import METRICS, aggregate

    if batch_size < 1 or max_new_tokens < 1:
        raise ValueError(f"batch_size and max_new_tokens must be >= 1, got {batch_size} and {max_new_tokens}")
    files = []
    for f in data_files:
        domain, items = read_questions(f, image_root, limit)
        files.append((Path(f), domain, items))

    losses, stats = {}, None
    if loss:
        with tempfile.TemporaryDirectory(prefix="mole-eval-") as tmp:
            specs = [s for p, d, items in files if (s := _loss_spec(p, d, items, image_root, Path(tmp))) is not None]
            if specs:
                data = LlavaData(cfg.data, built.tokenizer, built.image_processor, built.num_image_tokens, specs)
                losses, stats = eval_loss(built, data, batch_size=batch_size)

    scored, predictions = [], []
    total = sum(len(items) for _, _, items in files)
    bar = tqdm(total=total, desc="answering", unit="q", disable=(not progress) if progress is not None else None)
    for path, _, items in files:
        for s in range(0, len(items), batch_size):
            chunk = items[s:s + batch_size]
            images = []
            for it in chunk:
                img = None
                if it["image_path"]:
                    try:
                        with Image.open(it["image_path"]) as im:
                            img = im.convert("RGB")
                    except OSError as e:
                        raise ValueError(f"{path}: record {it['question_id']!r}: cannot open image "
                                         f"{it['image_path']} (see --image-root): {e}") from e
                images.append(img)
            preds = generate_batch(built, cfg, [it["prompt"] for it in chunk], images, max_new_tokens)
            for it, pred in zip(chunk, preds):
                row = {"question_id": it["question_id"], "prompt": it["prompt"], "text": pred.strip(),
                       "answer_id": uuid.uuid4().hex, "model_id": model_id, "metadata": {},
                       "domain": it["domain"], "image": it["image"]}
                if it["answer"] is not None:
                    row.update(answer=it["answer"], metric=it["metric"], score=METRICS[it["metric"]](pred, it["answer"]))
                    scored.append(row)
                predictions.append(row)
            bar.update(len(chunk))
    bar.close()
    result = {"scores": aggregate(scored), "answer_loss": losses, "predictions": predictions,
              "answered": len(predictions), "scored": len(scored), "data": [str(f) for f in data_files]}
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
    ap.add_argument("--data", required=True, action="append",
                    help="test file: LLaVA-JSON (.json) or LLaVA question JSONL (.jsonl); repeatable")
    ap.add_argument("--out", default=None, help="output directory (default RUN/eval)")
    ap.add_argument("--answers-file", default=None, help="LLaVA answers JSONL (default OUT/answers.jsonl)")
    ap.add_argument("--image-root", default=None, help="folder the records' image paths are relative to "
                                                       "(default: each test file's folder)")
    ap.add_argument("--model-id", default=None, help="model_id written in the answers (default: the run's name)")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--max-new-tokens", type=int, default=16)
    ap.add_argument("--limit", type=int, default=None, help="first N records of each file")
    ap.add_argument("--no-loss", action="store_true", help="skip the answer-loss and routing pass")
    args = ap.parse_args(argv)
    for name in ("batch_size", "max_new_tokens", "limit"):
        v = getattr(args, name)
        if v is not None and v < 1:
            ap.error(f"--{name.replace('_', '-')} must be >= 1, got {v}")
    if args.image_root and not Path(args.image_root).is_dir():
        ap.error(f"--image-root {args.image_root} is not a directory")
    from .generate import load_run

    built, cfg = load_run(args.run)
    model_id = args.model_id or Path(args.run).resolve().name
    result, stats = evaluate(built, cfg, args.data, args.batch_size, args.max_new_tokens, args.limit,
                             image_root=args.image_root, loss=not args.no_loss, model_id=model_id)
    out = Path(args.out or Path(args.run) / "eval")
    out.mkdir(parents=True, exist_ok=True)
    if stats is not None:
        result["routing"] = stats.write(out, "routing_eval")
    answers = write_answers(args.answers_file or out / "answers.jsonl", result["predictions"])
    (out / "eval.json").write_text(json.dumps(result, indent=1))
    table = markdown(result)
    (out / "eval.md").write_text(f"# Evaluation of {args.run}\n\n" + table)
    print(table)
    print(f"{result['answered']} answers ({result['scored']} scored) in {answers}")
    print(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
