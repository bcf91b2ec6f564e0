"""``python -m training.experiments.conflict [--config FILE] [--out DIR] [key=value ...]``

The data-conflict experiment of LLaVA-MoLE (issue 6). With the same model, steps and samples it
trains, on the three offline domains of ``training.data`` (general, charts, medical):

  (a) one plain LoRA per domain,          (b) one plain LoRA on the mixture,
  (c) the same at 4x rank (same alpha/r), (d) MoLE with 3 experts on the mixture,
  (e) MoLE with 2, 4 and 8 experts,

then the knob sweep: (b) and (d) again on data built at other values of the conflict knob
(``training/data/conflict.py``). Every run is evaluated on every domain's test set with the
benchmarks' metrics (``training.evaluate``). Output in ``--out`` (default runs/conflict):
``results.md`` (the table laid out like the paper's: domains as columns, runs as rows, each cell
the score and its change against the single-domain runs; the conflict slice; the sweep; the
verdict), ``results.json`` (every number, per-record scores, seeds, command, commit, timings),
``heatmaps/`` (routing per MoLE run) and one directory per run. A run whose ``done.json`` matches
its settings is reused, so a crashed experiment continues where it stopped.

Change "significant" below means: more than twice the standard error of the paired per-record
score differences (both runs answer the same test records).

The built-in default is CPU-sized (39 minutes measured on a quiet 2-core machine):
SmolLM2-135M-Instruct with a 64 px random CLIP tower trained in a shared stage 1.
Its successor, ``conflict_v2.py`` (issue 15), has the GPU-sized configuration
(``training/experiments/conflict_gpu.json``: CLIP + Vicuna-7B with a stage-1 projector).
"""
from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import logging
import math
import os
import platform
import re
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

log = logging.getLogger("training.experiments.conflict")


@dataclass
class ConflictConfig:
    out: str = "runs/conflict"
    seed: int = 0
    domains: list[str] = field(default_factory=lambda: ["general", "charts", "medical"])
    # data (training.data.build)
    per_domain: int = 240  # training records per domain
    test_per_domain: int = 30
    image_px: int = 336  # drawn size; the vision tower's processor resizes to its input
    conflict: float = 0.5  # the knob of the main runs
    sweep: list[float] = field(default_factory=lambda: [1.0])  # further knob values
    sweep_runs: list[str] = field(default_factory=lambda: ["lora_mix", "mole_3"])
    # model: ModelConfig keys shared by every run; experts / rank / alpha are set per run
    model: dict = field(default_factory=lambda: {"source": "smollm2", "image_size": 64})
    rank: int = 8
    alpha: float = 16.0
    experts: int = 3  # (d)
    expert_sweep: list[int] = field(default_factory=lambda: [2, 4, 8])  # (e)
    rank_mult: int = 4  # (c)
    # stage 1 (projector + random vision tower on the captions); 0 skips it (a LLaVA checkpoint)
    stage1_steps: int = 60
    stage1_lr: float = 1e-3
    # stage 2, the same for every run
    steps: int = 60
    batch: int = 4
    lr: float = 1e-3
    projector_lr: float = 2e-4
    max_length: int = 128
    train: dict = field(default_factory=dict)  # further TrainConfig keys for every run (e.g. bf16)
    # evaluation
    eval_batch: int = 12
    max_new_tokens: int = 10

    @classmethod
    def load(cls, path: str | None, overrides: list[str] = ()) -> "ConflictConfig":
        from training.config import apply_overrides

        d = apply_overrides(json.loads(Path(path).read_text()) if path else {}, overrides, example="steps=20")
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ValueError(f"unknown conflict-experiment keys {unknown}; known: {sorted(names)}")
        cfg = cls(**d)
        if not cfg.domains or len(set(cfg.domains)) != len(cfg.domains):
            raise ValueError(f"domains must be distinct and non-empty, got {cfg.domains}")
        for c in [cfg.conflict, *cfg.sweep]:
            if not 0.0 <= c <= 1.0:
                raise ValueError(f"conflict knob values must be in [0, 1], got {c}")
        return cfg


@dataclass
class RunSpec:
    name: str
    group: str  # a..e, or "sweep"
    label: str
    domains: list[str]
    experts: int
    rank: int
    alpha: float
    conflict: float


def plan(cfg: ConflictConfig) -> list[RunSpec]:
    r, a, c = cfg.rank, cfg.alpha, cfg.conflict
    runs = [RunSpec(f"lora_{d}", "a", f"LoRA r={r}, {d} only", [d], 1, r, a, c) for d in cfg.domains]
    runs.append(RunSpec("lora_mix", "b", f"LoRA r={r}, mixture", list(cfg.domains), 1, r, a, c))
    rm = cfg.rank_mult
    runs.append(RunSpec(f"lora_mix_r{rm * r}", "c", f"LoRA r={rm * r}, mixture", list(cfg.domains), 1, rm * r, rm * a, c))
    runs.append(RunSpec(f"mole_{cfg.experts}", "d", f"MoLE K={cfg.experts} r={r}, mixture", list(cfg.domains),
                        cfg.experts, r, a, c))
    for k in cfg.expert_sweep:
        if k != cfg.experts:
            runs.append(RunSpec(f"mole_{k}", "e", f"MoLE K={k} r={r}, mixture", list(cfg.domains), k, r, a, c))
    by_name = {s.name: s for s in runs}
    for knob in cfg.sweep:
        if abs(knob - c) < 1e-9:
            continue
        for name in cfg.sweep_runs:
            if name not in by_name:
                raise ValueError(f"sweep_runs names {name!r}, not one of the runs {sorted(by_name)}")
            base = by_name[name]
            runs.append(dataclasses.replace(base, name=f"{name}@{knob:.1f}", group="sweep",
                                            label=f"{base.label}, knob {knob:.1f}", conflict=knob))
    return runs


def _fingerprint(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


def data_dir(cfg: ConflictConfig, knob: float) -> Path:
    return Path(cfg.out) / "data" / f"knob{knob:.1f}"


def build_data(cfg: ConflictConfig, knob: float) -> Path:
    from training.data import build_datasets

    out = data_dir(cfg, knob)
    build_datasets(out, seed=cfg.seed, per_domain=cfg.per_domain, test_per_domain=cfg.test_per_domain,
                   conflict=knob, size=cfg.image_px, domains=tuple(cfg.domains))
    return out


def _run_config(cfg: ConflictConfig, stage: int, out: Path, datasets: list[dict], steps: int, lr: float,
                projector_lr: float, init_adapter: str | None, model_extra: dict):
    from training.config import RunConfig

    train = {"stage": stage, "output_dir": str(out), "max_steps": steps, "per_device_batch_size": cfg.batch,
             "lr": lr, "projector_lr": projector_lr, "seed": cfg.seed, "logging_steps": 5, "warmup_ratio": 0.1,
             "save_total_limit": 1, "init_adapter": init_adapter, **cfg.train}
    return RunConfig.from_dict({"model": {**cfg.model, **model_extra},
                                "data": {"builtin": None, "datasets": datasets, "max_length": cfg.max_length},
                                "train": train})


def _done(run_dir: Path, fp: str) -> dict | None:
    p = run_dir / "done.json"
    if p.exists():
        d = json.loads(p.read_text())
        if d.get("fingerprint") == fp:
            return d
    return None


def stage1(cfg: ConflictConfig, data: Path, commit: str = "") -> str | None:
    """The shared stage 1: projector (+ the random vision tower) on the captions."""
    if cfg.stage1_steps <= 0:
        return None
    from training.trainer import run_training

    out = Path(cfg.out) / "stage1"
    rc = _run_config(cfg, 1, out, [{"path": str(data / "captions.json"), "domain": "captions"}], cfg.stage1_steps,
                     cfg.stage1_lr, cfg.stage1_lr, None, {})
    fp = _fingerprint({"run": rc.to_dict(), "data": _data_fp(data)})
    if _done(out, fp) is None:
        t = time.time()
        print(f"[conflict] stage 1: projector + vision tower on captions, {cfg.stage1_steps} steps", flush=True)
        s = run_training(rc)
        s.pop("trainer")
        (out / "done.json").write_text(json.dumps({"fingerprint": fp, "commit": commit, "train_loss": s["train_loss"],
                                                   "seconds": round(time.time() - t, 1)}, indent=1))
    return str(out / "adapter")


def _data_fp(data: Path) -> str:
    m = json.loads((data / "manifest.json").read_text())
    return _fingerprint({k: m[k] for k in ("seed", "per_domain", "test_per_domain", "size", "conflict", "counts")})


def run_one(cfg: ConflictConfig, spec: RunSpec, data: Path, init_adapter: str | None, commit: str = "") -> dict:
    """Train one stage-2 run and evaluate it on every domain's test set (reused when done)."""
    from training.evaluate import evaluate
    from training.model import build_model
    from training.trainer import run_training

    out = Path(cfg.out) / "runs" / spec.name
    datasets = [{"path": str(data / f"{d}_train.json"), "domain": d} for d in spec.domains]
    rc = _run_config(cfg, 2, out, datasets, cfg.steps, cfg.lr, cfg.projector_lr, init_adapter,
                     {"num_experts": spec.experts, "rank": spec.rank, "alpha": spec.alpha})
    # The stage-1 fingerprint too: a retrained stage 1 at the same path invalidates every run.
    s1 = Path(init_adapter).parent / "done.json" if init_adapter else None
    s1_fp = json.loads(s1.read_text())["fingerprint"] if s1 and s1.exists() else None
    fp = _fingerprint({"run": rc.to_dict(), "spec": dataclasses.asdict(spec), "data": _data_fp(data),
                       "eval": [cfg.eval_batch, cfg.max_new_tokens], "stage1": s1_fp})
    done = _done(out, fp)
    if done is not None:
        print(f"[conflict] {spec.name}: reused ({out / 'done.json'})", flush=True)
        return done
    t0 = time.time()
    print(f"[conflict] {spec.name}: {spec.label}: training {cfg.steps} steps x {cfg.batch}", flush=True)
    built = build_model(rc.model, stage=2)
    s = run_training(rc, built=built)
    s.pop("trainer")
    t1 = time.time()
    tests = [data / f"{d}_test.json" for d in cfg.domains]
    result, stats = evaluate(built, rc, tests, batch_size=cfg.eval_batch, max_new_tokens=cfg.max_new_tokens)
    routing = stats.write(out, "routing_eval") if spec.experts > 1 else None
    (out / "eval.json").write_text(json.dumps(result, indent=1))
    done = {"fingerprint": fp, "commit": commit, "spec": dataclasses.asdict(spec), "train_loss": s["train_loss"],
            "scores": {d: v["score"] for d, v in result["scores"]["domains"].items()},
            "macro": result["scores"]["macro"], "answer_loss": result["answer_loss"],
            "per_record": {p["question_id"]: p["score"] for p in result["predictions"] if "score" in p},
            "predictions": {p["question_id"]: p["text"] for p in result["predictions"]},
            "routing_warnings": (routing or {}).get("warnings", []),
            "seconds": {"train": round(t1 - t0, 1), "eval": round(time.time() - t1, 1)}}
    (out / "done.json").write_text(json.dumps(done, indent=1))
    print(f"[conflict] {spec.name}: {' '.join(f'{d}={v:.3f}' for d, v in done['scores'].items())} "
          f"(train {done['seconds']['train']:.0f}s, eval {done['seconds']['eval']:.0f}s)", flush=True)
    return done


# ---- analysis ----------------------------------------------------------------------------------

def paired_delta(run: dict, ref: dict, ids: list[str]) -> tuple[float, float, int]:
    """Mean per-record score difference run - ref over ids, its standard error, and n."""
    diffs = [run["per_record"][i] - ref["per_record"][i] for i in ids
             if i in run["per_record"] and i in ref["per_record"]]
    n = len(diffs)
    if n == 0:
        return 0.0, 0.0, 0
    mean = sum(diffs) / n
    var = sum((x - mean) ** 2 for x in diffs) / (n - 1) if n > 1 else 0.0
    return mean, math.sqrt(var / n), n


def significant(mean: float, se: float, n: int) -> bool:
    """|mean| above two standard errors, with at least two records (one record has no spread)."""
    return n >= 2 and (abs(mean) > 2 * se if se > 0 else abs(mean) > 0)


_WORDS = {"zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten", "eleven", "twelve"}


def number_format(text: str) -> str:
    """'digits', 'words' or 'other' for the first token of an answer."""
    tok = re.sub(r"[^a-z0-9]", " ", text.lower()).split()
    if not tok:
        return "other"
    return "digits" if tok[0].isdigit() else "words" if tok[0] in _WORDS else "other"


def conflict_slice(cfg: ConflictConfig, data: Path, done: dict) -> dict:
    """On the counting questions asked with the shared templates: the share of answers written
    in the domain's convention for that template (words or digits), per domain."""
    out = {}
    for d in cfg.domains:
        recs = json.loads((data / f"{d}_test.json").read_text())
        hits = []
        for r in recs:
            if r.get("task") != "count" or "template" not in r.get("meta", {}):
                continue
            want = number_format(r["conversations"][-1]["value"])
            pred = done["predictions"].get(r["id"])
            if pred is not None:
                hits.append(float(number_format(pred) == want))
        if hits:
            out[d] = {"score": sum(hits) / len(hits), "n": len(hits)}
    return out


def _cell(run: dict, single: dict, dom: str, ids: list[str]) -> str:
    s = run["scores"].get(dom)
    if s is None:
        return "-"
    if single is None or single is run:
        return f"{s:.3f}"
    mean, se, n = paired_delta(run, single, ids)
    return f"{s:.3f} ({mean:+.3f}{'*' if significant(mean, se, n) else ''})"


def analyse(cfg: ConflictConfig, specs: list[RunSpec], results: dict[str, dict]) -> tuple[str, dict]:
    doms = cfg.domains
    data = data_dir(cfg, cfg.conflict)
    ids = {d: [r["id"] for r in json.loads((data / f"{d}_test.json").read_text())] for d in doms}
    single = {d: results.get(f"lora_{d}") for d in doms}
    lines = [f"Scores on each domain's test set ({cfg.test_per_domain} records per domain; the benchmarks' metrics). "
             "Cell: score (change against the single-domain LoRA on that domain; * = more than 2 paired "
             "standard errors).", "",
             "| run | " + " | ".join(doms) + " | macro |", "|---|" + "---|" * (len(doms) + 1)]
    own = [single[d]["scores"][d] for d in doms if single[d]]
    if len(own) == len(doms):
        lines.append("| (a) LoRA, single domain (own domain) | " + " | ".join(f"{x:.3f}" for x in own)
                     + f" | {sum(own) / len(own):.3f} |")
    main = [s for s in specs if s.group in "bcde" and s.name in results]
    for s in main:
        r = results[s.name]
        cells = [_cell(r, single[d], d, ids[d]) for d in doms]
        lines.append(f"| ({s.group}) {s.label} | " + " | ".join(cells) + f" | {r['macro']:.3f} |")
    lines += ["", "Cross-domain scores of the single-domain runs (row: trained on; column: tested on):", "",
              "| run | " + " | ".join(doms) + " |", "|---|" + "---|" * len(doms)]
    for d in doms:
        if single[d]:
            lines.append(f"| {single[d]['spec']['label']} | " + " | ".join(f"{single[d]['scores'][e]:.3f}" for e in doms) + " |")

    # verdict
    verdict = {"conflict_domains": {}, "mole_domains": {}}
    b = results.get("lora_mix")
    dname = f"mole_{cfg.experts}"
    d_run = results.get(dname)
    for dom in doms:
        if b and single[dom]:
            m, se, n = paired_delta(b, single[dom], ids[dom])
            verdict["conflict_domains"][dom] = {"delta": m, "se": se, "n": n, "loss": m < 0 and significant(m, se, n)}
        if d_run and single[dom]:
            m, se, n = paired_delta(d_run, single[dom], ids[dom])
            mb, seb, _ = paired_delta(d_run, b, ids[dom]) if b else (0.0, 0.0, 0)
            verdict["mole_domains"][dom] = {"delta_vs_single": m, "se": se, "delta_vs_mix": mb, "se_vs_mix": seb,
                                            "loss": m < 0 and significant(m, se, n)}
    hurt = [d for d, v in verdict["conflict_domains"].items() if v["loss"]]
    verdict["conflict_appeared"] = bool(hurt)
    if hurt:
        fixed = [d for d in hurt if not verdict["mole_domains"].get(d, {"loss": True})["loss"]]
        verdict["mole_removed"] = sorted(fixed) == sorted(hurt)
        text = (f"Conflict appeared: the plain LoRA on the mixture lost significantly against the single-domain "
                f"runs on {', '.join(hurt)}. MoLE (K={cfg.experts}) "
                + ("removed it: no significant loss left on " + ", ".join(hurt) if verdict["mole_removed"]
                   else "did not remove it on " + ", ".join(d for d in hurt if d not in fixed)
                   + (f" (it did on {', '.join(fixed)})" if fixed else "")) + ".")
    else:
        verdict["mole_removed"] = None
        deltas = ", ".join(f"{d} {v['delta']:+.3f} (se {v['se']:.3f})" for d, v in verdict["conflict_domains"].items())
        mole = ", ".join(f"{d} {v['delta_vs_single']:+.3f} against single-domain, {v['delta_vs_mix']:+.3f} "
                         f"(se {v['se_vs_mix']:.3f}) against the plain mixture LoRA"
                         for d, v in verdict["mole_domains"].items())
        text = ("No significant conflict: against the single-domain runs the plain LoRA on the mixture changed by "
                f"{deltas}; none of these is beyond two standard errors, so by this experiment's criterion conflict "
                f"did not appear and there is no loss for MoLE to remove. For the record, MoLE (K={cfg.experts}): "
                f"{mole}. The knob sweep below shows how the scores move as the conflict is turned.")
    verdict["text"] = text

    # the conflict slice and the sweep
    slice_lines = ["Counting questions asked with the shared templates: share of answers in the domain's "
                   "convention (digits or words) for that template. Charts always want digits; general wants words "
                   "for the templates the knob marks as conflicted.", "",
                   "| run | knob | " + " | ".join(f"{d} (n)" for d in doms if d in ("general", "charts")) + " |",
                   "|---|---|" + "---|" * len([d for d in doms if d in ("general", "charts")])]
    sweep_lines = ["| run | knob | " + " | ".join(doms) + " | macro |", "|---|---|" + "---|" * (len(doms) + 1)]
    slices = {}
    for s in specs:
        if s.name not in results:
            continue
        sl = conflict_slice(cfg, data_dir(cfg, s.conflict), results[s.name])
        slices[s.name] = sl
        if sl:
            slice_lines.append(f"| {s.label} | {s.conflict:.1f} | " + " | ".join(
                f"{sl[d]['score']:.3f} ({sl[d]['n']})" if d in sl else "-" for d in doms if d in ("general", "charts")) + " |")
        base = s.name.split("@")[0]
        if base in cfg.sweep_runs and s.group in ("b", "d", "sweep"):
            r = results[s.name]
            sweep_lines.append(f"| {results[base]['spec']['label'] if base in results else base} | {s.conflict:.1f} | "
                               + " | ".join(f"{r['scores'].get(d, float('nan')):.3f}" for d in doms) + f" | {r['macro']:.3f} |")
    routing_lines = ["| run | domain separation, text | domain separation, image | router entropy / ln K | experts < 1% |",
                     "|---|---|---|---|---|"]
    routing = {}
    for s in specs:
        rs = routing_summary(Path(cfg.out) / "runs" / s.name / "routing_eval.json")
        if rs is None:
            continue
        routing[s.name] = rs
        routing_lines.append(f"| {s.label} | {rs['separation']['text']:.3f} | {rs['separation']['image']:.3f} | "
                             f"{rs['entropy_ratio']:.3f} | {rs['n_warnings']} |")
    sweep_rows = sorted(sweep_lines[2:], key=lambda x: (x.split("|")[1], x.split("|")[2]))
    md = "\n".join(lines + ["", "## Verdict", "", text, "", "## The conflict slice", ""] + slice_lines
                   + ["", "## The knob sweep", "", "Scores as the conflict knob is turned (same seeds, steps and "
                      "samples; only the general domain's answers to conflicted counting templates change).", ""]
                   + sweep_lines[:2] + sweep_rows
                   + ["", "## What the routers learned", "",
                      "Domain separation: per MoLE layer, the largest total-variation distance between two domains' "
                      "expert-load vectors, averaged over layers (0: every domain uses the experts alike; 1: disjoint "
                      "experts). Router entropy: mean per-token entropy of the router probabilities over ln K (1: "
                      "uniform probabilities). Experts < 1%: (layer, expert) pairs below 1% of the test tokens. "
                      "Heatmaps: `heatmaps/`.", ""] + routing_lines)
    return md, {"verdict": verdict, "conflict_slice": slices, "routing": routing}


def routing_summary(path: Path) -> dict | None:
    """Domain separation and router entropy from a run's routing_eval.json (None without one)."""
    if not path.exists():
        return None
    d = json.loads(path.read_text())
    K = d["num_experts"]
    out = {"separation": {}, "entropy_ratio": 0.0, "n_warnings": len(d["warnings"])}
    ent, n_ent = 0.0, 0
    for kind in ("text", "image"):
        seps = []
        for layer in range(len(d["layers"])):
            cells = [c for c in d["cells"] if c["layer"] == layer and c["kind"] == kind and c["tokens"] > 0]
            tv = [0.5 * sum(abs(x - y) for x, y in zip(a["fractions"], b["fractions"]))
                  for i, a in enumerate(cells) for b in cells[i + 1:]]
            if tv:
                seps.append(max(tv))
            for c in cells:
                ent += c["mean_token_entropy"] * c["tokens"]
                n_ent += c["tokens"]
        out["separation"][kind] = sum(seps) / len(seps) if seps else float("nan")
    out["entropy_ratio"] = ent / n_ent / math.log(K) if n_ent and K > 1 else float("nan")
    return out


# ---- driver ------------------------------------------------------------------------------------

def _git_commit() -> str:
    try:
        rev = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True,
                               text=True).stdout.strip()
        return rev + ("-dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def _machine() -> str:
    import torch

    if torch.cuda.is_available():
        return f"GPU {torch.cuda.get_device_name(0)}"
    return f"CPU, {os.cpu_count()} cores, {torch.get_num_threads()} torch threads ({platform.processor() or platform.machine()})"


def run_experiment(cfg: ConflictConfig, argv: list[str]) -> Path:
    import torch

    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    commit = _git_commit()  # the code that runs is the code at the start
    specs = plan(cfg)
    print(f"[conflict] {len(specs)} runs into {out}: " + ", ".join(s.name for s in specs), flush=True)
    knobs = sorted({s.conflict for s in specs})
    for k in knobs:
        build_data(cfg, k)
    adapter = stage1(cfg, data_dir(cfg, cfg.conflict), commit)
    results = {}
    for s in specs:
        results[s.name] = run_one(cfg, s, data_dir(cfg, s.conflict), adapter, commit)
    md, analysis = analyse(cfg, specs, results)
    heat = out / "heatmaps"
    heat.mkdir(exist_ok=True)
    for s in specs:
        png = out / "runs" / s.name / "routing_eval_heatmap.png"
        if png.exists():
            shutil.copy(png, heat / f"{s.name.replace('@', '_knob')}.png")
    seconds = round(time.time() - t0, 1)
    s1 = Path(cfg.out) / "stage1" / "done.json"
    compute = sum(r["seconds"]["train"] + r["seconds"]["eval"] for r in results.values()) + \
        (json.loads(s1.read_text())["seconds"] if s1.exists() else 0.0)
    run_commits = sorted({r.get("commit") or "unrecorded" for r in results.values()})
    command = "python -m training.experiments.conflict " + " ".join(argv)
    header = ["# Data-conflict experiment", "",
              f"Command: `{command.strip()}`  ", f"Commit: `{commit}`  ", f"Seed: {cfg.seed} (data, stage 1 and "
              f"every run)  ", f"Machine: {_machine()}; torch {torch.__version__}  ",
              f"Runs trained and evaluated at commit(s): {', '.join(f'`{c}`' for c in run_commits)}  ",
              f"Time: {compute / 60:.1f} min of training and evaluation (stage 1 and every run); this invocation "
              f"took {seconds / 60:.1f} min (finished runs are reused)  ",
              f"Model: {json.dumps(cfg.model)}; rank {cfg.rank}, alpha {cfg.alpha}; stage 1 {cfg.stage1_steps} steps; "
              f"stage 2 {cfg.steps} steps x batch {cfg.batch} for every run; {cfg.per_domain} training records per "
              f"domain; knob {cfg.conflict}", "", "## Scores", ""]
    (out / "results.md").write_text("\n".join(header) + md + "\n")
    (out / "results.json").write_text(json.dumps({
        "command": command.strip(), "commit": commit, "config": dataclasses.asdict(cfg), "machine": _machine(),
        "torch": torch.__version__, "seconds": seconds, "compute_seconds": round(compute, 1),
        "run_commits": run_commits, "runs": {n: {k: v for k, v in r.items() if k != "fingerprint"}
                                                                  for n, r in results.items()},
        **analysis}, indent=1))
    print(md)
    print(f"[conflict] done in {seconds / 60:.1f} min")
    return out


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    ap = argparse.ArgumentParser(prog="python -m training.experiments.conflict", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", help="JSON file with ConflictConfig keys (defaults: the CPU-sized experiment)")
    ap.add_argument("--out", help="output directory (default runs/conflict, or the config's 'out')")
    ap.add_argument("overrides", nargs="*", help="key=value, e.g. steps=20 expert_sweep=[2,4]")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    cfg = ConflictConfig.load(args.config, args.overrides)
    if args.out:
        cfg.out = args.out
    out = run_experiment(cfg, argv)
    print(out.resolve())
    return 0


if __name__ == "__main__":
    sys.exit(main())
