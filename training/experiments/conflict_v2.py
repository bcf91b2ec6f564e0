"""``python -m training.experiments.conflict_v2 [--config FILE] [--out DIR] [--quick] [key=value ...]``

conflict-cpu-v2 (issue 15, point 2): the data-conflict experiment on the offline domains
(general, charts, medical), redesigned to be able to answer the question. Per seed it trains

  single_<d>  one plain LoRA per domain, on that domain's training records, ``epochs`` epochs;
  mix         one plain LoRA on the union of those records, the same ``epochs`` epochs
              (own-data matched: the mixture sees every record a single-domain run sees, as
              often; its step count is the sum of the single-domain runs');
  mole        MoLE with ``experts`` experts on the same union, same epochs,

after one shared stage 1 (projector and the random vision tower on the captions; the tower is
frozen in stage 2: ``model.train_vision=false``). A seed (``train.seed``) draws the adapter and
router initialisation and the data order; the data and stage 1 are the same in every seed, so arms
are paired within a seed on the same test records.

The designed conflict only the image resolves: on about ``neutral_share`` of the general and charts
records (train and test) the question is replaced by one object-neutral counting question
("How many things are in this picture?") about the record's image (shapes in a scene, bars /
slices / points of a chart, items of a receipt); general answers in words, charts in digits
(``training/data/conflict.py``). The old template knob is off (every other count is digits).

Scoring is teacher-forced, no generation (a 135M model at 64 px does not generate readable
answers): per test record the answer NLL (mean over answer tokens) and the closed-set answer: the
argmax, over every answer of the record's question type (training and test records, pooled over
domains, so the neutral count's candidates hold both "3" and "three"), of the candidate's full-answer
log-likelihood given the prompt (sum over its tokens and the end-of-turn token; ``SCORER`` 2; the
mean per token is a secondary variant); correct when it is the gold answer. On the neutral-count
records the convention score asks only whether that argmax is in the domain's convention (a word
or digits). A prior-only row answers every record with its (domain, question type)'s most common
training answer. The preregistered first-token scorer (``SCORER`` 1) could not tell numbers apart
(SmolLM2 encodes each as a space token, then digits); it is kept beside the new one for the
post-hoc deviation (``DEVIATIONS``), and runs it scored are rescored from their saved adapters.
Statistics (``stats.py``): 95 % intervals from a seeds x records bootstrap with
records clustered by image; the learnability gate; the preregistered verdict (``PREREGISTRATION``,
written to ``preregistration.md`` and committed before the full run).

Output in ``--out``: ``results.md``, ``results.json``, ``figures/``, ``preregistration.md``,
``data/``, ``stage1/`` and ``runs/s<seed>/<arm>/`` (each with ``done.json``; a run whose
fingerprint matches is reused, so a crashed experiment continues where it stopped).
"""
from __future__ import annotations

import argparse
import collections
import dataclasses
import json
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

# the run fingerprint and the reuse of a finished run are conflict.py's (same done.json contract)
from .conflict import _done, _fingerprint as _fp, _git_commit

PREREGISTRATION = """\
# conflict-cpu-v2: endpoints and criteria, fixed before the full run

Arms per seed: `single` (one LoRA per domain, own records), `mix` (one LoRA on the union of
the same records, same epochs), `mole` (MoLE, K experts, same data as `mix`); `prior` (no training:
each (domain, question type)'s most common training answer). Seeds change adapter and router
initialisation and data order; data and stage 1 are shared.

**Primary endpoint E1, per domain:** closed-set first-token accuracy over all of the domain's
test records (the argmax over the first tokens of the training answers of the record's question
type, pooled over domains; 1 when it is the gold answer's first token).

**Endpoint E2, the designed conflict (general and charts):** convention accuracy on the
neutral-count records: 1 when that argmax lies in the domain's convention (general: a number word,
charts: a digit), over the pooled candidates of both conventions.

**Secondary (reported, not in the verdict):** answer NLL per record (mean over answer tokens);
routing mutual information between domain and expert.

**Learnability gate (decides which endpoints enter the verdict):** E1 of a domain enters when the
single-domain run beats the prior-only answer on it: lower end of the 95 % seeds x records
bootstrap interval of (single - prior) above 0.05. E2 of a domain enters when the single-domain
run's convention accuracy is above a domain-blind coin flip: lower end of the interval of
(single - 0.5) above 0.05. The gate is also reported per question type (not used for the verdict).

**Intervals:** 95 % percentile intervals of a two-stage bootstrap, seeds then records (records
that share an image are resampled together), 2000 replicates (`stats.bootstrap_seeds_records`).

**Criteria (`stats.preregistered_verdict`), for each endpoint that passed its gate:**
- *conflict*: single - mix > 0 with the records-bootstrap interval excluding 0 in **every** seed;
- *MoLE recovers*: conflict, and mole - mix with its seeds x records interval above 0, and
  mole - single with its interval above -(single - mix) / 2 (non-inferior within half the conflict);
- otherwise the table says "no effect larger than X", X the minimum detectable effect at 80 %
  power of the pooled single - mix estimate (1.96 + 0.84 standard errors).
No correction for the several endpoints (at most five); each verdict is stated per endpoint.
"""


# the closed-set scorer's version: 1 = first token only (preregistered; degenerate for answers whose
# first token is shared, e.g. every number " 47.3" starts with the space token), 2 = full-answer
# log-likelihood over the type's closed answer set. A run scored by an older version is rescored
# from its saved adapter, not retrained.
SCORER = 2


DEVIATIONS = """\
## Deviations from the preregistration (post hoc)

Written on 2026-12-07, after the first analysis (commit 6e65033) and **before** the rescoring whose
numbers follow; `preregistration.md` is unchanged.

1. **E1 scorer (closed-set accuracy).** The preregistered E1 compared the candidates on their first
   token only. SmolLM2's tokenizer encodes every number as a space token followed by its digits
   (`" 47.3"` -> `" "`, `"4"`, `"7"`, `"."`, `"3"`), so all numeric candidates of a question type
   share one first token: on charts the shared space token was the argmax and the "correct" answer
   in every arm (E1 0.817 for prior, mixture and MoLE alike); the endpoint could not tell the
   answers apart. The fixed scorer ranks each candidate by its full-answer log-likelihood under
   teacher forcing given the prompt: the sum of the log-probabilities of all its labelled tokens
   (the answer and the end-of-turn token, exactly as the data pipeline encodes it), argmax over the
   candidates. **Endpoint: the sum**, decided before any rescored number was seen: it is the
   log-probability of the exact answer string, the quantity the model's own decoding ranks, and
   the end-of-turn token keeps a prefix answer ("5") from beating a longer one ("50") merely by
   being shorter. The length-normalised variant (mean log-probability per token, "E1n") is
   reported as a secondary row, not in the verdict: it has no probabilistic meaning and favours
   long candidates.
2. **Candidate set.** Preregistered: the first tokens of the training answers of the record's
   question type (pooled over domains). With full answers, many test answers (chart values, names,
   cities) never occur in training, so the gold answer would not be a candidate. New: every answer
   of the question type in the training and test records of all domains (the type's closed answer
   set; the gold is always a candidate; no per-record information is used). The prior-only row is
   the most common full training answer per (domain, type) (was: its most common first token).
3. **E2** is defined on "that argmax" and so follows the new scorer; the old E2 is shown too.

Nothing else changed: the adapters are the trained ones (rescored from the saved adapters, not
retrained; the rescoring must reproduce each record's stored answer NLL, and the old first-token
predictions are recomputed in the same pass), with the same test records, learnability gate,
bootstrap and criteria.
"""

@dataclass
class V2Config:
    out: str = "runs/conflict-v2"
    data_seed: int = 0  # data and stage 1
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2])  # stage-2 seeds (adapter/router init, order)
    domains: list[str] = field(default_factory=lambda: ["general", "charts", "medical"])
    per_domain: int = 128  # training records per domain (sized from a measured step: see the README)
    test_per_domain: int = 120
    image_px: int = 336
    neutral_share: float = 0.3
    # SmolLM2-135M's first 10 of 30 decoder layers (6x cheaper a step on the shared 2-core machine)
    model: dict = field(default_factory=lambda: {"source": "smollm2", "lm_layers": 10, "image_size": 64,
                                                 "train_vision": False, "adapter_dtype": "float32"})
    rank: int = 8
    alpha: float = 16.0
    experts: int = 3
    stage1_steps: int = 48
    stage1_lr: float = 1e-3
    epochs: float = 1.0
    batch: int = 8
    lr: float = 2e-3
    router_lr: float = 1e-2
    projector_lr: float = 2e-4
    max_length: int = 128
    train: dict = field(default_factory=dict)
    eval_batch: int = 16
    gate_margin: float = 0.05
    n_boot: int = 2000

    @classmethod
    def load(cls, path: str | None, overrides=(), base: dict | None = None) -> "V2Config":
        from training.config import apply_overrides

        d = dict(base or {})
        if path:
            d.update(json.loads(Path(path).read_text()))
        d = {k: v for k, v in d.items() if not k.startswith("_")}  # "_comment" keys document a config file
        d = apply_overrides(d, overrides, example="epochs=2")
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ValueError(f"unknown conflict-v2 keys {unknown}; known: {sorted(names)}")
        cfg = cls(**d)
        if not cfg.domains or len(set(cfg.domains)) != len(cfg.domains):
            raise ValueError(f"domains must be distinct and non-empty, got {cfg.domains}")
        if not cfg.seeds or len(set(cfg.seeds)) != len(cfg.seeds):
            raise ValueError(f"seeds must be distinct and non-empty, got {cfg.seeds}")
        if not 0.0 <= cfg.neutral_share <= 1.0:
            raise ValueError(f"neutral_share must be in [0, 1], got {cfg.neutral_share}")
        if cfg.epochs <= 0 or cfg.batch < 1 or cfg.test_per_domain < 2:
            raise ValueError(f"epochs must be > 0, batch >= 1 and test_per_domain >= 2, got {cfg.epochs}, "
                             f"{cfg.batch}, {cfg.test_per_domain}")
        return cfg


QUICK = {"out": "runs/conflict-v2-quick", "seeds": [0, 1], "per_domain": 16, "test_per_domain": 8, "image_px": 64,
         "model": {"source": "tiny", "image_size": 32, "train_vision": False, "adapter_dtype": "float32"},
         "rank": 2, "alpha": 4.0, "stage1_steps": 2, "epochs": 1.0, "batch": 8, "max_length": 96, "n_boot": 200}


@dataclass
class Arm:
    name: str  # single_<d>, mix, mole
    label: str
    domains: list[str]
    experts: int


def arms(cfg: V2Config) -> list[Arm]:
    out = [Arm(f"single_{d}", f"LoRA r={cfg.rank}, {d} only", [d], 1) for d in cfg.domains]
    out.append(Arm("mix", f"LoRA r={cfg.rank}, mixture", list(cfg.domains), 1))
    out.append(Arm("mole", f"MoLE K={cfg.experts} r={cfg.rank}, mixture", list(cfg.domains), cfg.experts))
    return out


# ---- data --------------------------------------------------------------------------------------

def build_data(cfg: V2Config) -> Path:
    """The offline domains at knob 0, with the neutral count on ``neutral_share`` of general and
    charts (reused when its manifest matches)."""
    from training.data.build import build
    from training.data.conflict import NEUTRAL_TASK, add_neutral_count

    out = Path(cfg.out) / "data"
    want = {"seed": cfg.data_seed, "per_domain": cfg.per_domain, "test_per_domain": cfg.test_per_domain,
            "size": cfg.image_px, "domains": cfg.domains, "neutral_share": cfg.neutral_share, "version": 1}
    mf = out / "manifest_v2.json"
    if mf.exists() and json.loads(mf.read_text()).get("want") == want:
        return out
    build(out, seed=cfg.data_seed, per_domain=cfg.per_domain, test_per_domain=cfg.test_per_domain, conflict=0.0,
          size=cfg.image_px, domains=tuple(cfg.domains))
    counts = {}
    for d in cfg.domains:
        for split in ("train", "test"):
            p = out / f"{d}_{split}.json"
            recs = add_neutral_count(json.loads(p.read_text()), d, cfg.neutral_share, cfg.data_seed, split)
            p.write_text(json.dumps(recs, indent=1))
            counts[f"{d}_{split}"] = {"records": len(recs), "neutral": sum(r["task"] == NEUTRAL_TASK for r in recs)}
    mf.write_text(json.dumps({"want": want, "counts": counts}, indent=1))
    return out


def load_records(data: Path, domain: str, split: str) -> list[dict]:
    return json.loads((data / f"{domain}_{split}.json").read_text())


# ---- runs --------------------------------------------------------------------------------------

def _run_config(cfg: V2Config, stage: int, out: Path, datasets: list[dict], seed: int, init_adapter, model_extra,
                steps: int | None = None):
    from training.config import RunConfig

    train = {"stage": stage, "output_dir": str(out), "per_device_batch_size": cfg.batch, "seed": seed,
             "logging_steps": 5, "warmup_ratio": 0.1, "save_total_limit": 1, "init_adapter": init_adapter,
             "report_to": "none", **cfg.train}
    if steps is not None:  # stage 1
        train.update(max_steps=steps, lr=cfg.stage1_lr, projector_lr=cfg.stage1_lr)
        data = {"builtin": None, "datasets": datasets, "max_length": cfg.max_length}
        # stage 1 trains a random tower (sources tiny, smollm2) with the projector; a pretrained CLIP
        # tower stays frozen, as in LLaVA's stage 1
        model = {**cfg.model, "train_vision": cfg.model.get("source", "smollm2") in ("tiny", "smollm2")}
    else:
        train.update(num_epochs=cfg.epochs, lr=cfg.lr, projector_lr=cfg.projector_lr, router_lr=cfg.router_lr)
        data = {"builtin": None, "datasets": datasets, "max_length": cfg.max_length, "sampling": "once"}
        model = {**cfg.model, **model_extra}
    return RunConfig.from_dict({"model": model, "data": data, "train": train})


def _data_fp(data: Path) -> str:
    return _fp(json.loads((data / "manifest_v2.json").read_text()))


def stage1(cfg: V2Config, data: Path) -> str | None:
    if cfg.stage1_steps <= 0:
        return None
    from training.run import run_training

    out = Path(cfg.out) / "stage1"
    rc = _run_config(cfg, 1, out, [{"path": str(data / "captions.json"), "domain": "captions"}], cfg.data_seed,
                     None, {}, steps=cfg.stage1_steps)
    fp = _fp({"run": rc.to_dict(), "data": _data_fp(data)})
    if _done(out, fp) is None:
        t, c = time.time(), time.process_time()
        print(f"[v2] stage 1: projector + vision tower on the captions, {cfg.stage1_steps} steps", flush=True)
        s = run_training(rc)
        (out / "done.json").write_text(json.dumps({"fingerprint": fp, "train_loss": s["train_loss"],
                                                   "seconds": round(time.time() - t, 1),
                                                   "cpu_seconds": round(time.process_time() - c, 1)}, indent=1))
    return str(out / "adapter")


def run_one(cfg: V2Config, arm: Arm, seed: int, data: Path, adapter: str | None, ctx: dict) -> dict:
    """Train one stage-2 run and score it on its test domains (single: its own; mixtures: all)."""
    from training.model import build_model, reset_adapters
    from training.run import run_training

    out = Path(cfg.out) / "runs" / f"s{seed}" / arm.name
    datasets = [{"path": str(data / f"{d}_train.json"), "domain": d} for d in arm.domains]
    rc = _run_config(cfg, 2, out, datasets, seed, adapter,
                     {"num_experts": arm.experts, "rank": cfg.rank, "alpha": cfg.alpha})
    s1 = Path(adapter).parent / "done.json" if adapter else None
    fp = _fp({"run": rc.to_dict(), "arm": dataclasses.asdict(arm), "data": _data_fp(data),
              "stage1": json.loads(s1.read_text())["fingerprint"] if s1 and s1.exists() else None,
              "score": [cfg.eval_batch, 1]})  # the training's identity (kept as first written; the scorer: SCORER)
    test_doms = arm.domains if len(arm.domains) == 1 else cfg.domains
    done = _done(out, fp)
    if done is not None and done.get("scorer", 1) == SCORER:
        print(f"[v2] s{seed}/{arm.name}: reused", flush=True)
        return done
    if done is not None:  # trained, scored by an older scorer: rescore the saved adapter, no retraining
        return rescore_one(rc, out, done, data, test_doms, ctx, cfg.eval_batch)
    t0, c0 = time.time(), time.process_time()
    built = build_model(rc.model, stage=2)
    reset_adapters(built.model, seed)  # the seed draws the adapter and router initialisation
    s = run_training(rc, built=built)
    steps = s["trainer"].state.global_step
    s.pop("trainer")
    t1, c1 = time.time(), time.process_time()
    scores, routing = score_run(built, rc, data, test_doms, ctx, batch=cfg.eval_batch)
    done = {"fingerprint": fp, "arm": arm.name, "seed": seed, "steps": steps, "train_loss": s["train_loss"],
            "scorer": SCORER, "records": scores, "routing": routing,
            "seconds": {"train": round(t1 - t0, 1), "score": round(time.time() - t1, 1)},
            "cpu_seconds": {"train": round(c1 - c0, 1), "score": round(time.process_time() - c1, 1)}}
    out.mkdir(parents=True, exist_ok=True)
    (out / "done.json").write_text(json.dumps(done))
    for ck in out.glob("checkpoint-*"):  # the adapter is kept; optimizer checkpoints are not needed
        shutil.rmtree(ck, ignore_errors=True)
    acc = {d: np.mean([r["ans_ok"] for r in scores.values() if r["domain"] == d]) for d in test_doms}
    print(f"[v2] s{seed}/{arm.name}: {steps} steps, closed-set " + " ".join(f"{d}={v:.3f}" for d, v in acc.items())
          + f" (train {done['seconds']['train']:.0f}s, score {done['seconds']['score']:.0f}s)", flush=True)
    return done


def rescore_one(rc, out: Path, done: dict, data: Path, test_doms: list[str], ctx: dict, batch: int) -> dict:
    """Score a finished run again from its saved adapter with the current scorer (``SCORER``);
    training, data and test records are unchanged. The old scores are checked against the new
    pass: the answer NLL (the same teacher-forced pass) must agree, else the adapter or the model
    is not the one that was scored before and the run is refused."""
    from training import checkpoint as ck
    from training.model import build_model, upcast_trainable

    t0, c0 = time.time(), time.process_time()
    built = build_model(rc.model, stage=2)
    if rc.model.adapter_dtype == "float32":
        upcast_trainable(built.model)
    ck.load_adapter_into(built.model, out / "adapter", strict=True)
    scores, routing = score_run(built, rc, data, test_doms, ctx, batch=batch)
    old = done["records"]
    if set(old) != set(scores):
        raise RuntimeError(f"{out}: rescoring saw other test records than the first scoring")
    dnll = max(abs(old[i]["nll"] - scores[i]["nll"]) for i in scores)
    if dnll > 1e-3:
        raise RuntimeError(f"{out}: the saved adapter does not reproduce the scored run (answer NLL differs by "
                           f"up to {dnll:.2g}); retrain it (delete its done.json)")
    same_ft = float(np.mean([old[i].get("first_ok", old[i].get("first_token_ok")) == scores[i]["first_token_ok"]
                             for i in scores]))
    done = {**done, "scorer": SCORER, "records": scores, "routing": routing,
            "rescored": {"from_scorer": done.get("scorer", 1), "commit": _git_commit(), "nll_max_abs_diff": dnll,
                         "first_token_agreement": same_ft, "seconds": round(time.time() - t0, 1),
                         "cpu_seconds": round(time.process_time() - c0, 1)}}
    (out / "done.json").write_text(json.dumps(done))
    acc = {d: np.mean([r["ans_ok"] for r in scores.values() if r["domain"] == d]) for d in test_doms}
    print(f"[v2] {out.parent.name}/{out.name}: rescored (scorer {SCORER}), closed-set "
          + " ".join(f"{d}={v:.3f}" for d, v in acc.items())
          + f"; NLL max diff {dnll:.1e}, old first-token agreement {same_ft:.3f} ({time.time() - t0:.0f}s)", flush=True)
    return done


# ---- scoring -----------------------------------------------------------------------------------

def first_token(tok, answer: str) -> int:
    """The first token of an answer as the data pipeline encodes it (``" " + answer``)."""
    ids = tok(" " + answer.strip(), add_special_tokens=False).input_ids
    if not ids:
        raise ValueError(f"answer {answer!r} encodes to no tokens")
    return ids[0]


def answer_tokens(tok, answer: str) -> list[int]:
    """Every labelled token of an answer as the data pipeline encodes it: ``" " + answer + eos``
    (``LlavaData.segments``; the end-of-turn token makes "5" and "50" comparable: a candidate that
    is a prefix of another does not win by being shorter)."""
    ids = tok(f" {answer.strip()}{tok.eos_token or ''}", add_special_tokens=False).input_ids
    if not ids:
        raise ValueError(f"answer {answer!r} encodes to no tokens")
    return ids


def answer_of(rec: dict) -> str:
    return next(t["value"] for t in rec["conversations"] if t["from"] == "gpt")


def convention_of_answer(answer: str) -> str | None:
    """The neutral count's convention of an answer: a number word, digits, or neither."""
    from training.data.common import NUMBER_WORDS

    a = answer.strip().lower()
    return "words" if a in NUMBER_WORDS else "digits" if a.isdigit() else None


def scoring_context(tok, data: Path, domains: list[str]) -> dict:
    """The closed answer sets and the prior.

    ``answers``: per question type, every answer of that type in the training and test records of
    all domains (the type's closed answer set, so the gold answer is always a candidate; pooled over
    domains, so the neutral count's candidates hold both "3" and "three"); ``prior_answer``: each
    (domain, type)'s most common training answer. The superseded first-token scorer's sets
    (``candidates``: first tokens of the training answers per type; ``prior``: the most common
    first token; ``convention_tokens``) are kept to report the old endpoint next to the new one."""
    from training.data.common import NUMBER_WORDS

    cands: dict[str, set] = collections.defaultdict(set)
    answers: dict[str, set] = collections.defaultdict(set)
    freq: dict[tuple, collections.Counter] = collections.defaultdict(collections.Counter)
    afreq: dict[tuple, collections.Counter] = collections.defaultdict(collections.Counter)
    for d in domains:
        for r in load_records(data, d, "train"):
            t = first_token(tok, answer_of(r))
            cands[r["task"]].add(t)
            freq[(d, r["task"])][t] += 1
            answers[r["task"]].add(answer_of(r).strip())
            afreq[(d, r["task"])][answer_of(r).strip()] += 1
        for r in load_records(data, d, "test"):
            answers[r["task"]].add(answer_of(r).strip())
    prior = {f"{d}|{task}": c.most_common(1)[0][0] for (d, task), c in freq.items()}
    prior_answer = {f"{d}|{task}": c.most_common(1)[0][0] for (d, task), c in afreq.items()}
    words = {first_token(tok, w) for w in NUMBER_WORDS}
    digits = {first_token(tok, str(i)) for i in range(len(NUMBER_WORDS))}
    if words & digits:
        raise ValueError("number words and digits share a first token: the convention score cannot see them")
    return {"answers": {k: sorted(v) for k, v in answers.items()}, "prior_answer": prior_answer,
            "candidates": {k: sorted(v) for k, v in cands.items()}, "prior": prior,
            "convention_tokens": {"words": sorted(words), "digits": sorted(digits)}}


def convention_of(token: int, ctx: dict) -> str | None:
    for conv, toks in ctx["convention_tokens"].items():
        if token in toks:
            return conv
    return None


def choose(token_logprobs: list[list[float]]) -> tuple[int, int]:
    """The closed-set answer from each candidate's per-token log-probabilities (teacher-forced,
    given the prompt): (argmax of the sum, the endpoint; argmax of the mean per token, the
    length-normalised variant). Ties go to the first candidate."""
    if not token_logprobs or any(not lp for lp in token_logprobs):
        raise ValueError("choose: every candidate needs at least one token log-probability")
    total = [float(np.sum(lp)) for lp in token_logprobs]
    mean = [t / len(lp) for t, lp in zip(total, token_logprobs)]
    return int(np.argmax(total)), int(np.argmax(mean))


def candidate_logprobs(model, past, prefix_len: int, first_logprobs, cands: list[list[int]], pad_id: int) -> list[list[float]]:
    """Per-token log-probabilities of each candidate continuation after one record's prompt.

    ``past``: the record's key/value cache (a ``DynamicCache`` of batch 1 and at least
    ``prefix_len`` positions; positions from ``prefix_len`` on are ignored); ``first_logprobs``: the
    log-softmax at the last prompt position (it predicts each candidate's first token). The
    candidates' remaining tokens run as one batch on the repeated cache: teacher forcing of the
    full answer, the same numbers as a forward pass over prompt + candidate."""
    import torch
    from transformers import DynamicCache

    out = [[float(first_logprobs[c[0]])] for c in cands]
    rest = [c[1:] for c in cands]
    L = max(len(r) for r in rest)
    if L == 0:
        return out
    n = len(cands)
    ids = torch.full((n, L), pad_id, dtype=torch.long)
    mask = torch.ones((n, prefix_len + L), dtype=torch.long)
    for i, c in enumerate(cands):
        ids[i, :len(c) - 1] = torch.tensor(c[:-1], dtype=torch.long)  # inputs: every token but the last
        mask[i, prefix_len + len(c) - 1:] = 0
    cache = DynamicCache()
    for li, layer in enumerate(past.layers):
        k = layer.keys[:, :, :prefix_len].expand(n, -1, -1, -1).contiguous()
        v = layer.values[:, :, :prefix_len].expand(n, -1, -1, -1).contiguous()
        cache.update(k, v, li)
    dev = next(model.parameters()).device
    logits = model(input_ids=ids.to(dev), attention_mask=mask.to(dev), past_key_values=cache,
                   use_cache=True).logits.float().cpu()
    lp = torch.log_softmax(logits, -1)
    for i, r in enumerate(rest):
        out[i] += [float(lp[i, k, t]) for k, t in enumerate(r)]
    return out


def _record_cache(past, j: int):
    """Record ``j``'s slice of a batch's key/value cache (batch 1)."""
    from transformers import DynamicCache

    c = DynamicCache()
    for li, layer in enumerate(past.layers):
        c.update(layer.keys[j:j + 1], layer.values[j:j + 1], li)
    return c


def score_run(built, rc, data: Path, domains: list[str], ctx: dict, batch: int = 24) -> tuple[dict, dict | None]:
    """Teacher-forced scoring of every test record of ``domains``: answer NLL, closed-set first
    token, convention (neutral count); for MoLE the domain x expert counts per layer at image,
    text and answer-predicting tokens and their mutual information."""
    import torch
    import torch.nn.functional as F

    from training.config import DatasetSpec
    from training.data import Collator, LlavaData
    from training.model import mole_modules

    from .stats import mutual_information

    model = built.model.eval()
    with torch.no_grad():
        return _score(model, built, rc, data, domains, ctx, batch, Collator, LlavaData, DatasetSpec, mole_modules,
                      mutual_information, F)


def _score(model, built, rc, data, domains, ctx, batch, Collator, LlavaData, DatasetSpec, mole_modules,
           mutual_information, F):
    import torch

    specs = [DatasetSpec(path=str(data / f"{d}_test.json"), domain=d) for d in domains]
    ds = LlavaData(rc.data, built.tokenizer, built.image_processor, built.num_image_tokens, specs)
    recs = {d: load_records(data, d, "test") for d in domains}
    flat = [(d, r) for d in domains for r in recs[d]]
    if len(flat) != len(ds):
        raise RuntimeError(f"scoring: {len(ds)} encoded records for {len(flat)} test records")
    moles = mole_modules(model)
    K = moles[0][1].num_experts if moles else 1
    joint = {kind: np.zeros((len(moles), len(domains), K)) for kind in ("image", "text", "answer")}
    coll = Collator(built.tokenizer.pad_token_id)
    img_id = model.config.image_token_id
    cand_tokens = {task: [answer_tokens(built.tokenizer, x) for x in ans] for task, ans in ctx["answers"].items()}
    pad_id = built.tokenizer.pad_token_id
    out = {}
    for s in range(0, len(ds), batch):
        b = coll([ds[i] for i in range(s, min(s + batch, len(ds)))])
        labels, dom = b.pop("labels"), b.pop("domain")
        if "pixel_values" in b:
            b["pixel_values"] = b["pixel_values"].to(model.dtype)
        b = {k: v.to(model.device) for k, v in b.items()}
        fwd = model(**b, use_cache=True)
        logits = fwd.logits.float().cpu()
        ans_pos = [int((labels[j] != -100).nonzero()[0]) - 1 for j in range(labels.shape[0])]
        if moles:  # routing of this pass, before the candidate passes overwrite ``last_routing``
            ids = b["input_ids"].cpu()
            mask = b["attention_mask"].cpu().bool()
            is_img = ids == img_id
            kinds = {"image": mask & is_img, "text": mask & ~is_img, "answer": torch.zeros_like(mask)}
            for j, p in enumerate(ans_pos):
                kinds["answer"][j, p] = True
            tok_dom = dom[:, None].expand_as(ids)
            for li, (_, m) in enumerate(moles):
                e = m.last_routing.expert.reshape(ids.shape).cpu()
                for kind, sel in kinds.items():
                    np.add.at(joint[kind][li], (tok_dom[sel].numpy(), e[sel].numpy()), 1.0)
        ce = F.cross_entropy(logits[:, :-1].transpose(1, 2), labels[:, 1:], ignore_index=-100, reduction="none")
        valid = labels[:, 1:] != -100
        for j in range(labels.shape[0]):
            d, r = flat[s + j]
            pos = ans_pos[j] + 1  # the first answer token
            gold_text = answer_of(r).strip()
            gold = int(labels[j, pos])
            enc = labels[j][labels[j] != -100].tolist()
            if gold != first_token(built.tokenizer, gold_text) or \
                    enc != answer_tokens(built.tokenizer, gold_text)[:len(enc)]:
                raise RuntimeError(f"record {r['id']}: the encoded answer differs from the scorer's tokens")
            lp = torch.log_softmax(logits[j, pos - 1], -1)
            # superseded (preregistered) first-token scorer, kept for the deviation table
            cand = ctx["candidates"].get(r["task"], [])
            pred = max(cand, key=lambda t: float(lp[t])) if cand else -1
            # the endpoint: full-answer log-likelihood over the type's closed answer set
            answers = ctx["answers"][r["task"]]
            if gold_text not in answers:
                raise RuntimeError(f"record {r['id']}: gold answer {gold_text!r} is not among the candidates")
            past = _record_cache(fwd.past_key_values, j)
            tlp = candidate_logprobs(model, past, pos, lp, cand_tokens[r["task"]], pad_id)
            i_sum, i_mean = choose(tlp)
            prior_ans = ctx["prior_answer"].get(f"{d}|{r['task']}")
            row = {"domain": d, "task": r["task"], "image": r.get("image"),
                   "nll": float((ce[j] * valid[j]).sum() / valid[j].sum()),
                   "ans_ok": float(answers[i_sum] == gold_text), "ans_pred": answers[i_sum],
                   "ans_norm_ok": float(answers[i_mean] == gold_text), "ans_norm_pred": answers[i_mean],
                   "prior_ok": float(prior_ans == gold_text),
                   "first_token_ok": float(pred == gold), "first_token_pred": pred,
                   "prior_first_token_ok": float(ctx["prior"].get(f"{d}|{r['task']}") == gold)}
            neutral = (r.get("meta") or {}).get("neutral")
            if neutral:
                conv = neutral["convention"]
                pc = convention_of(int(ctx["prior"].get(f"{d}|{r['task']}", -1)), ctx)
                row.update(convention=conv, conv_ok=float(convention_of_answer(answers[i_sum]) == conv),
                           prior_conv_ok=float(convention_of_answer(prior_ans or "") == conv),
                           conv_first_token_ok=float(convention_of(pred, ctx) == conv),
                           prior_conv_first_token_ok=float(pc == conv))
            out[r["id"]] = row
    routing = None
    if moles and K > 1:
        routing = {"joint": {k: v.tolist() for k, v in joint.items()},
                   "mi_bits": {k: float(np.mean([mutual_information(v[li]) if v[li].sum() else 0.0
                                                 for li in range(len(moles))])) for k, v in joint.items()}}
    return out, routing


# ---- analysis ----------------------------------------------------------------------------------

def _clusters(ids: list[str], rows: dict) -> list[int]:
    images = {}
    return [images.setdefault(rows[i]["image"] or i, len(images)) for i in ids]


# endpoint -> (per-record field of a run, the prior's field or None)
ENDPOINT_KEYS = {"e1": ("ans_ok", "prior_ok"), "e2": ("conv_ok", "prior_conv_ok"), "e1n": ("ans_norm_ok", "prior_ok"),
                 "nll": ("nll", None), "e1ft": ("first_token_ok", "prior_first_token_ok"),
                 "e2ft": ("conv_first_token_ok", "prior_conv_first_token_ok")}
VERDICT_ENDPOINTS = ("e1", "e2")  # the preregistered verdict; e1n is secondary, e1ft / e2ft superseded


def endpoint_vectors(results: dict, cfg: V2Config, domain: str, endpoint: str) -> dict:
    """Per-seed, per-record vectors of one endpoint on one domain, aligned on the same record ids.

    ``endpoint``: a key of ``ENDPOINT_KEYS``: ``e1`` (closed-set full-answer accuracy, all records),
    ``e2`` (convention accuracy, neutral-count records), ``e1n`` (E1 length-normalised), ``nll``, and
    the superseded first-token scorer's ``e1ft`` / ``e2ft``. Returns {arm: [[per-record] per seed]}, ``ids`` and
    ``clusters`` (image ids, the same in every seed)."""
    key = ENDPOINT_KEYS[endpoint]
    seeds = [s for s in cfg.seeds if all(f"s{s}/{a}" in results for a in (f"single_{domain}", "mix", "mole"))]
    if not seeds:
        return {}
    ref = results[f"s{seeds[0]}/single_{domain}"]["records"]
    ids = sorted(i for i, r in ref.items() if r["domain"] == domain and (not endpoint.startswith("e2") or "conv_ok" in r))
    if not ids or key[0] not in ref[ids[0]]:  # no such records, or runs scored before this endpoint existed
        return {}
    vec = {"single": [], "mix": [], "mole": [], "prior": []}
    for s in seeds:
        for arm, run in (("single", f"single_{domain}"), ("mix", "mix"), ("mole", "mole")):
            rec = results[f"s{s}/{run}"]["records"]
            vec[arm].append([rec[i][key[0]] for i in ids])
        if key[1]:
            vec["prior"].append([ref[i][key[1]] for i in ids])
    if not key[1]:
        vec.pop("prior")
    return {"seeds": seeds, "ids": ids, "clusters": _clusters(ids, ref), "arms": vec}


def analyse(cfg: V2Config, results: dict) -> dict:
    """Arm means with intervals, the learnability gate, the preregistered verdicts, routing."""
    from .stats import bootstrap_seeds_records, learnability_gate, preregistered_verdict

    nb = cfg.n_boot
    out = {"endpoints": {}, "gate_by_type": {}, "routing": {}}
    for endpoint in ENDPOINT_KEYS:
        for d in cfg.domains:
            v = endpoint_vectors(results, cfg, d, endpoint)
            if not v:
                continue
            cl = [v["clusters"]] * len(v["seeds"])
            arms_iv = {a: bootstrap_seeds_records(x, n_boot=nb, clusters=cl).as_dict() for a, x in v["arms"].items()}
            arms_iv = {a: {**iv, "per_seed": [float(np.mean(s)) for s in v["arms"][a]]} for a, iv in arms_iv.items()}
            e = {"n_records": len(v["ids"]), "seeds": v["seeds"], "arms": arms_iv}
            if endpoint != "nll":
                prior = v["arms"]["prior"] if endpoint.startswith("e1") else [[0.5] * len(v["ids"])] * len(v["seeds"])
                e["gate"] = learnability_gate(v["arms"]["single"], prior, margin=cfg.gate_margin, n_boot=nb,
                                              clusters=cl)
                e["gate"]["against"] = "prior-only answer" if endpoint.startswith("e1") else "a coin flip (0.5)"
                e["verdict"] = preregistered_verdict(v["arms"]["single"], v["arms"]["mix"], v["arms"]["mole"],
                                                     n_boot=nb, clusters=cl)
                e["in_verdict"] = endpoint in VERDICT_ENDPOINTS and e["gate"]["passed"]
            out["endpoints"][f"{endpoint}:{d}"] = e
        if endpoint == "e1":
            for d in cfg.domains:
                v = endpoint_vectors(results, cfg, d, "e1")
                if not v:
                    continue
                ref = results[f"s{v['seeds'][0]}/single_{d}"]["records"]
                for task in sorted({ref[i]["task"] for i in v["ids"]}):
                    idx = [k for k, i in enumerate(v["ids"]) if ref[i]["task"] == task]
                    if len(idx) < 2:
                        continue
                    pick = lambda arm: [[s[k] for k in idx] for s in v["arms"][arm]]
                    cl = [[v["clusters"][k] for k in idx]] * len(v["seeds"])
                    g = learnability_gate(pick("single"), pick("prior"), margin=cfg.gate_margin, n_boot=nb, clusters=cl)
                    g.update(n=len(idx), single=float(np.mean(pick("single"))), prior=float(np.mean(pick("prior"))),
                             mix=float(np.mean(pick("mix"))), mole=float(np.mean(pick("mole"))))
                    out["gate_by_type"][f"{d}:{task}"] = g
    for name, r in results.items():
        if r.get("routing"):
            out["routing"][name] = r["routing"]["mi_bits"]
    return out


def _fmt_iv(iv: dict, d: int = 3) -> str:
    return f"{iv['mean']:.{d}f} [{iv['lo']:.{d}f}, {iv['hi']:.{d}f}]"


def _fmt_div(iv: dict, d: int = 3) -> str:
    return f"{iv['mean']:+.{d}f} [{iv['lo']:+.{d}f}, {iv['hi']:+.{d}f}]"


ENDPOINT_NAMES = {"e1": "E1 closed-set accuracy, full-answer log-likelihood (all records)",
                  "e2": "E2 convention accuracy (neutral-count records)",
                  "e1n": "E1n closed-set accuracy, length-normalised log-likelihood (secondary, not in the verdict)",
                  "nll": "answer NLL per record (lower is better; secondary)",
                  "e1ft": "E1 as preregistered: closed-set first-token accuracy (superseded)",
                  "e2ft": "E2 as preregistered: convention of the first-token argmax (superseded)"}
REPORTED = ("e1", "e2", "e1n", "nll")  # the tables; e1ft / e2ft only in the deviation section
ARM_LABELS = {"prior": "prior-only (most common training answer per type)", "single": "single-domain LoRA",
              "mix": "mixture LoRA", "mole": "MoLE"}


def summary(an: dict) -> list[str]:
    """The verdict in a few lines: which endpoints passed the gate, and what the criteria say."""
    L = []
    for ep in VERDICT_ENDPOINTS:
        rows = {k.split(":")[1]: e for k, e in an["endpoints"].items() if k.startswith(ep + ":")}
        if not rows:
            continue
        passed = [d for d, e in rows.items() if e["in_verdict"]]
        L.append(f"- **{ep.upper()}**: gate passed by {', '.join(passed) or 'no domain'}"
                 + (f"; gated out: {', '.join(d for d in rows if d not in passed)}" if len(passed) < len(rows) else "")
                 + ".")
        for d in passed:
            v = rows[d]["verdict"]
            if v["recovers"]:
                what = "conflict, and MoLE recovers it"
            elif v["conflict"]:
                what = (f"conflict (single - mix {_fmt_div(v['single_minus_mix'])}); MoLE does not recover it "
                        f"(MoLE - mix {_fmt_div(v['mole_minus_mix'])})")
            else:
                what = (f"no conflict established; no effect larger than {v['mde']:.3f} "
                        f"(single - mix {_fmt_div(v['single_minus_mix'])})")
            L.append(f"  - {d}: {what}.")
    return L


def deviation_table(an: dict) -> list[str]:
    """The superseded first-token endpoints next to the new ones, per domain and arm."""
    L = []
    for new, old in (("e1", "e1ft"), ("e2", "e2ft")):
        doms = [k.split(":")[1] for k in an["endpoints"] if k.startswith(new + ":")]
        doms = [d for d in doms if f"{old}:{d}" in an["endpoints"]]
        if not doms:
            continue
        L += [f"**{new.upper()}: first-token (preregistered, superseded) -> full-answer (new)**, mean over seeds "
              "and records", "", "| arm | " + " | ".join(doms) + " |", "|---|" + "---|" * len(doms)]
        for arm in ("prior", "single", "mix", "mole"):
            cells = []
            for d in doms:
                o, n = an["endpoints"][f"{old}:{d}"]["arms"], an["endpoints"][f"{new}:{d}"]["arms"]
                if arm not in o or arm not in n:
                    break
                cells.append(f"{o[arm]['mean']:.3f} -> {n[arm]['mean']:.3f}")
            else:
                L.append(f"| {ARM_LABELS[arm]} | " + " | ".join(cells) + " |")
        L.append("| *gate (single - " + ("prior" if new == "e1" else "0.5") + ")* | " + " | ".join(
            "{} {} -> {} {}".format(_fmt_div(an["endpoints"][f"{old}:{d}"]["gate"]["interval"]),
                                    "PASS" if an["endpoints"][f"{old}:{d}"]["gate"]["passed"] else "fail",
                                    _fmt_div(an["endpoints"][f"{new}:{d}"]["gate"]["interval"]),
                                    "PASS" if an["endpoints"][f"{new}:{d}"]["gate"]["passed"] else "fail")
            for d in doms) + " |")
        L.append("")
    return L


def report(cfg: V2Config, an: dict) -> str:
    L = ["### Verdict in brief (preregistered criteria; E1 with the post-hoc full-answer scorer, see Deviations)", ""]
    L += summary(an) + [""]
    for endpoint in REPORTED:
        rows = {k.split(":")[1]: v for k, v in an["endpoints"].items() if k.startswith(endpoint + ":")}
        if not rows:
            continue
        L += [f"### {ENDPOINT_NAMES[endpoint]}", "",
              "Mean over seeds and records, 95 % seeds x records bootstrap interval (records clustered by image).", "",
              "| arm | " + " | ".join(f"{d} (n={rows[d]['n_records']})" for d in rows) + " |",
              "|---|" + "---|" * len(rows)]
        for arm in ("prior", "single", "mix", "mole"):
            if all(arm in rows[d]["arms"] for d in rows):
                lab = {**ARM_LABELS, "mole": f"MoLE K={cfg.experts}"}[arm]
                L.append(f"| {lab} | " + " | ".join(_fmt_iv(rows[d]["arms"][arm]) for d in rows) + " |")
        if endpoint != "nll":
            L.append("| *gate: single - " + ("prior" if endpoint.startswith("e1") else "0.5") + " (passes if lower end > "
                     f"{cfg.gate_margin})* | " + " | ".join(
                         f"{_fmt_div(rows[d]['gate']['interval'])} {'PASS' if rows[d]['gate']['passed'] else 'fail'}"
                         for d in rows) + " |")
            for key, lab in (("single_minus_mix", "single - mix"), ("mole_minus_mix", "MoLE - mix"),
                             ("mole_minus_single", "MoLE - single")):
                L.append(f"| *{lab}* | " + " | ".join(_fmt_div(rows[d]["verdict"][key]) for d in rows) + " |")
            L.append("| *single - mix per seed* | " + " | ".join(
                ", ".join(f"{iv['mean']:+.3f}{'*' if iv['lo'] > 0 else ''}" for iv in rows[d]["verdict"]["per_seed_single_minus_mix"])
                for d in rows) + " |")
            L.append("| *smallest detectable effect (80 % power)* | " + " | ".join(
                f"{rows[d]['verdict']['mde']:.3f}" for d in rows) + " |")
        L.append("")
    L += ["### Learnability gate by question type (E1 full-answer; reported, not used for the verdict)", "",
          "| domain:type | n | prior | single | mix | MoLE | single - prior [95%] | gate |", "|---|---|---|---|---|---|---|---|"]
    for k, g in an["gate_by_type"].items():
        L.append(f"| {k} | {g['n']} | {g['prior']:.3f} | {g['single']:.3f} | {g['mix']:.3f} | {g['mole']:.3f} | "
                 f"{_fmt_div(g['interval'])} | {'PASS' if g['passed'] else 'fail'} |")
    L += ["", "### Verdict per endpoint (preregistered criteria)", ""]
    for k, e in an["endpoints"].items():
        ep, d = k.split(":")
        if "verdict" not in e or ep not in VERDICT_ENDPOINTS:
            continue
        if not e["in_verdict"]:
            L.append(f"- **{ep.upper()} {d}**: excluded by the learnability gate (single - "
                     f"{'prior' if ep == 'e1' else '0.5'} = {_fmt_div(e['gate']['interval'])}). For the record: "
                     + e["verdict"]["text"])
        else:
            L.append(f"- **{ep.upper()} {d}**: " + e["verdict"]["text"])
    L += ["", "### Routing (MoLE runs): mutual information between domain and expert, bits (log2 3 = 1.585 "
          "is perfect separation), mean over layers", "", "| run | image tokens | text tokens | answer-predicting token |",
          "|---|---|---|---|"]
    for name, mi in sorted(an["routing"].items()):
        L.append(f"| {name} | {mi['image']:.3f} | {mi['text']:.3f} | {mi['answer']:.3f} |")
    return "\n".join(L) + "\n"


def figures(cfg: V2Config, an: dict, out: Path) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out.mkdir(parents=True, exist_ok=True)
    files = []
    colors = {"prior": "0.6", "single": "C0", "mix": "C1", "mole": "C2"}
    for endpoint in REPORTED:
        rows = {k.split(":")[1]: v for k, v in an["endpoints"].items() if k.startswith(endpoint + ":")}
        if not rows:
            continue
        fig, ax = plt.subplots(figsize=(1.8 + 2.2 * len(rows), 3.4))
        armlist = [a for a in ("prior", "single", "mix", "mole") if all(a in rows[d]["arms"] for d in rows)]
        w = 0.8 / len(armlist)
        for k, arm in enumerate(armlist):
            xs = np.arange(len(rows)) + (k - (len(armlist) - 1) / 2) * w
            ivs = [rows[d]["arms"][arm] for d in rows]
            m = np.array([iv["mean"] for iv in ivs])
            err = np.array([[iv["mean"] - iv["lo"] for iv in ivs], [iv["hi"] - iv["mean"] for iv in ivs]])
            ax.bar(xs, m, w, yerr=err, capsize=3, color=colors[arm], label=arm)
            for j, d in enumerate(rows):
                ps = rows[d]["arms"][arm].get("per_seed", [])
                ax.plot([xs[j]] * len(ps), ps, "k.", ms=3)
        ax.set_xticks(np.arange(len(rows)), list(rows))
        ax.set_ylabel({"e1": "closed-set accuracy", "e2": "convention accuracy", "e1n": "closed-set accuracy",
                       "nll": "answer NLL"}[endpoint])
        ax.set_title(ENDPOINT_NAMES[endpoint], fontsize=9)
        ax.legend(fontsize=7, ncol=len(armlist), loc="upper center", bbox_to_anchor=(0.5, -0.1), frameon=False)
        fig.tight_layout()
        p = out / f"{endpoint}.png"
        fig.savefig(p, dpi=120)
        plt.close(fig)
        files.append(p.name)
    # paired differences
    keys = [k for k, e in an["endpoints"].items() if "verdict" in e and k.split(":")[0] in VERDICT_ENDPOINTS]
    if keys:
        fig, ax = plt.subplots(figsize=(7, 0.5 + 0.45 * len(keys) * 3))
        y = 0
        labels = []
        for k in keys:
            v = an["endpoints"][k]["verdict"]
            for key, lab, c in (("single_minus_mix", "single - mix", "C1"), ("mole_minus_mix", "MoLE - mix", "C2"),
                                ("mole_minus_single", "MoLE - single", "C0")):
                iv = v[key]
                ax.errorbar(iv["mean"], y, xerr=[[iv["mean"] - iv["lo"]], [iv["hi"] - iv["mean"]]], fmt="o", color=c, capsize=3)
                labels.append(f"{k} {lab}")
                y += 1
        ax.axvline(0, color="k", lw=0.8)
        ax.set_yticks(range(len(labels)), labels, fontsize=7)
        ax.invert_yaxis()
        ax.set_xlabel("paired difference, 95 % seeds x records bootstrap")
        fig.tight_layout()
        p = out / "differences.png"
        fig.savefig(p, dpi=120)
        plt.close(fig)
        files.append(p.name)
    # the deviation: E1 as preregistered (first token) next to the full-answer E1
    doms = [k.split(":")[1] for k in an["endpoints"] if k.startswith("e1:") and "e1ft:" + k[3:] in an["endpoints"]]
    if doms:
        armlist = ("prior", "single", "mix", "mole")
        fig, axes = plt.subplots(1, len(doms), figsize=(1.0 + 2.6 * len(doms), 3.2), sharey=True, squeeze=False)
        for ax, d in zip(axes[0], doms):
            for k, (ep, hatch, lab) in enumerate((("e1ft", "//", "first token (superseded)"), ("e1", "", "full answer"))):
                ivs = [an["endpoints"][f"{ep}:{d}"]["arms"][a] for a in armlist]
                xs = np.arange(len(armlist)) + (k - 0.5) * 0.4
                ax.bar(xs, [iv["mean"] for iv in ivs], 0.4, hatch=hatch, color=[colors[a] for a in armlist],
                       edgecolor="k", lw=0.5, label=lab,
                       yerr=[[iv["mean"] - iv["lo"] for iv in ivs], [iv["hi"] - iv["mean"] for iv in ivs]], capsize=2)
            ax.set_xticks(np.arange(len(armlist)), armlist, fontsize=8)
            ax.set_title(d, fontsize=9)
        axes[0][0].set_ylabel("E1 closed-set accuracy")
        axes[0][0].legend(fontsize=7, frameon=False)
        fig.suptitle("E1: preregistered first-token scorer (hatched) vs full-answer scorer", fontsize=9)
        fig.tight_layout()
        p = out / "e1_first_token_vs_full_answer.png"
        fig.savefig(p, dpi=120)
        plt.close(fig)
        files.append(p.name)
    return files


# ---- driver ------------------------------------------------------------------------------------

def run_experiment(cfg: V2Config, argv: list[str], report_only: bool = False) -> Path:
    import platform

    import torch

    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "preregistration.md").write_text(PREREGISTRATION)
    t0 = time.time()
    commit = _git_commit()
    data = build_data(cfg)
    t_data = time.time() - t0
    results = {}
    if report_only:
        for p in sorted((out / "runs").glob("s*/*/done.json")):
            d = json.loads(p.read_text())
            results[f"s{d['seed']}/{d['arm']}"] = d
    else:
        from training.model import load_tokenizer, ModelConfig

        tok = load_tokenizer(ModelConfig(**{k: v for k, v in cfg.model.items() if k in {f.name for f in dataclasses.fields(ModelConfig)}}))
        ctx = scoring_context(tok, data, cfg.domains)
        (out / "scoring_context.json").write_text(json.dumps(ctx))
        adapter = stage1(cfg, data)
        print(f"[v2] {len(cfg.seeds)} seeds x {len(arms(cfg))} arms into {out}", flush=True)
        for seed in cfg.seeds:  # a seed's arms together: a run cut short leaves whole seeds
            for arm in arms(cfg):
                results[f"s{seed}/{arm.name}"] = run_one(cfg, arm, seed, data, adapter, ctx)
    an = analyse(cfg, results)
    md = report(cfg, an)
    figs = figures(cfg, an, out / "figures")
    s1 = out / "stage1" / "done.json"
    s1d = json.loads(s1.read_text()) if s1.exists() else {}
    compute = sum(r["seconds"]["train"] + r["seconds"]["score"] for r in results.values()) + s1d.get("seconds", 0.0)
    cpu = sum(r["cpu_seconds"]["train"] + r["cpu_seconds"]["score"] for r in results.values()) + s1d.get("cpu_seconds", 0.0)
    mf = json.loads((data / "manifest_v2.json").read_text())
    steps = {n: r["steps"] for n, r in results.items()}
    command = "python -m training.experiments.conflict_v2 " + " ".join(argv)
    head = ["# conflict-cpu-v2", "", f"Command: `{command.strip()}`  ", f"Commit: `{commit}`  ",
            f"Machine: CPU, {torch.get_num_threads()} torch threads ({platform.machine()}); torch {torch.__version__}  ",
            f"Time: {compute / 60:.1f} min wall and {cpu / 60:.1f} min CPU of stage 1, training and scoring "
            f"(summed over runs; this invocation {(time.time() - t0) / 60:.1f} min wall, data {t_data:.0f} s)  ",
            f"Model: {json.dumps(cfg.model)}; rank {cfg.rank}, alpha {cfg.alpha}, K={cfg.experts}; stage 1 "
            f"{cfg.stage1_steps} steps; stage 2 {cfg.epochs:g} epoch(s) of batch {cfg.batch}, lr {cfg.lr}, router lr "
            f"{cfg.router_lr}, projector lr {cfg.projector_lr}  ",
            f"Data: {cfg.per_domain} training and {cfg.test_per_domain} test records per domain; neutral count on "
            + ", ".join(f"{k} {v['neutral']}/{v['records']}" for k, v in mf["counts"].items() if v["neutral"]) + "  ",
            f"Seeds: {sorted({r['seed'] for r in results.values()})}; steps per run: "
            + ", ".join(f"{n} {s}" for n, s in sorted(steps.items()) if n.startswith(f"s{cfg.seeds[0]}/")), "",
            "Endpoints and criteria: `preregistration.md` (committed before the full run); E1's scorer was changed "
            "post hoc: see **Deviations** at the end.", "",
            "Figures: " + ", ".join(f"`figures/{f}`" for f in figs), "", "## Results", ""]
    rescored = {n: r["rescored"] for n, r in results.items() if r.get("rescored")}
    dev = []
    if any(k.startswith("e1ft:") for k in an["endpoints"]):
        dev = ["", DEVIATIONS]
        if rescored:
            dev += [f"Rescoring ({len(rescored)} runs, scorer {SCORER}): "
                    f"{sum(r['seconds'] for r in rescored.values()) / 60:.1f} min wall, "
                    f"{sum(r['cpu_seconds'] for r in rescored.values()) / 60:.1f} min CPU summed over runs; "
                    f"largest per-record answer-NLL difference to the first scoring "
                    f"{max(r['nll_max_abs_diff'] for r in rescored.values()):.1e}; the recomputed first-token "
                    f"predictions agree with the first scoring on "
                    f"{min(r['first_token_agreement'] for r in rescored.values()):.3f} of the records or more "
                    "(lowest over runs).", ""]
        dev += deviation_table(an)
    (out / "results.md").write_text("\n".join(head) + md + "\n".join(dev))
    (out / "results.json").write_text(json.dumps({
        "command": command.strip(), "commit": commit, "config": dataclasses.asdict(cfg),
        "seconds": round(compute, 1), "cpu_seconds": round(cpu, 1), "steps": steps, "data": mf,
        "analysis": an, "runs": {n: {k: v for k, v in r.items() if k != "fingerprint"} for n, r in results.items()}},
        indent=1))
    print(md)
    print(f"[v2] done: {compute / 60:.1f} min wall, {cpu / 60:.1f} min CPU (runs summed)", flush=True)
    return out


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    ap = argparse.ArgumentParser(prog="python -m training.experiments.conflict_v2", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", help="JSON file of V2Config keys (default: the CPU-sized experiment)")
    ap.add_argument("--out", help="output directory")
    ap.add_argument("--quick", action="store_true", help="a tiny configuration (tiny random model, 2 seeds)")
    ap.add_argument("--report-only", action="store_true", help="tables and figures from the finished runs in --out")
    ap.add_argument("overrides", nargs="*", help="key=value, e.g. epochs=2 seeds=[0,1]")
    a = ap.parse_args(argv)
    cfg = V2Config.load(a.config, a.overrides, base=QUICK if a.quick else None)
    if a.out:
        cfg.out = a.out
    run_experiment(cfg, argv, report_only=a.report_only)
    return 0


if __name__ == "__main__":
    sys.exit(main())
