"""training.experiments.conflict: the run plan, the statistics of the verdict, the conflict slice,
config errors, an end-to-end run on the tiny model (results written, runs reused on a rerun), and
``model.lm_layers`` (a truncated pretrained language model for CPU-sized experiments)."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from training.config import ModelConfig  # noqa: E402
from training.experiments.conflict import (ConflictConfig, number_format, paired_delta, plan,  # noqa: E402
                                           routing_summary, run_experiment, significant)
from training.model import build_model  # noqa: E402

CACHE = str(ROOT / ".cache" / "mole_ext")


def test_plan_has_runs_a_to_e_and_the_sweep():
    cfg = ConflictConfig(rank=8, alpha=16, experts=3, expert_sweep=[2, 3, 8], sweep=[0.0, 0.5, 1.0], conflict=0.5)
    runs = {s.name: s for s in plan(cfg)}
    assert [runs[f"lora_{d}"].domains for d in cfg.domains] == [[d] for d in cfg.domains]
    assert runs["lora_mix"].group == "b" and runs["lora_mix"].experts == 1
    c = runs["lora_mix_r32"]
    assert c.group == "c" and c.rank == 32 and c.alpha / c.rank == 16 / 8  # 4x rank, same alpha/r
    assert runs["mole_3"].group == "d" and runs["mole_3"].experts == 3
    assert {n for n, s in runs.items() if s.group == "e"} == {"mole_2", "mole_8"}  # K=3 is (d), not repeated
    sweep = {n: s.conflict for n, s in runs.items() if s.group == "sweep"}
    assert sweep == {"lora_mix@0.0": 0.0, "mole_3@0.0": 0.0, "lora_mix@1.0": 1.0, "mole_3@1.0": 1.0}
    assert all(s.conflict == 0.5 for s in runs.values() if s.group != "sweep")


def test_config_errors():
    with pytest.raises(ValueError, match="unknown conflict-experiment keys \\['stepz'\\]"):
        ConflictConfig.load(None, ["stepz=3"])
    with pytest.raises(ValueError, match="conflict knob values must be in \\[0, 1\\]"):
        ConflictConfig.load(None, ["sweep=[1.5]"])
    with pytest.raises(ValueError, match="sweep_runs names 'nope'"):
        plan(ConflictConfig(sweep_runs=["nope"]))
    assert ConflictConfig.load(None, ["steps=7", "domains=[\"general\"]"]).steps == 7


def test_paired_delta_and_significance():
    ref = {"per_record": {"a": 1.0, "b": 1.0, "c": 0.0, "d": 1.0}}
    run = {"per_record": {"a": 0.0, "b": 1.0, "c": 0.0, "d": 0.0, "x": 1.0}}
    mean, se, n = paired_delta(run, ref, ["a", "b", "c", "d", "x"])  # x: not in ref, not counted
    diffs = torch.tensor([-1.0, 0.0, 0.0, -1.0])
    assert n == 4 and mean == pytest.approx(diffs.mean().item())
    assert se == pytest.approx((diffs.std() / 2).item())
    assert not significant(mean, se, n)  # -0.5 with se 0.289
    assert significant(-1.0, 0.0, 5)  # every record lost
    assert not significant(-1.0, 0.0, 1)  # one record is no evidence
    assert not significant(0.0, 0.0, 10)


def test_number_format():
    assert [number_format(x) for x in ["4", "four.", " Twelve apples", "4.5", "none", ""]] == \
        ["digits", "words", "words", "digits", "other", "other"]


def test_routing_summary(tmp_path):
    """Domain separation = mean over layers of the largest pairwise total-variation distance."""
    cells = [
        {"layer": 0, "domain": "a", "kind": "text", "tokens": 10, "fractions": [1.0, 0.0], "mean_token_entropy": 0.0},
        {"layer": 0, "domain": "b", "kind": "text", "tokens": 30, "fractions": [0.0, 1.0], "mean_token_entropy": 0.4},
        {"layer": 1, "domain": "a", "kind": "text", "tokens": 10, "fractions": [0.5, 0.5], "mean_token_entropy": 0.0},
        {"layer": 1, "domain": "b", "kind": "text", "tokens": 0, "fractions": [0.0, 0.0], "mean_token_entropy": 0.0},
        {"layer": 0, "domain": "a", "kind": "image", "tokens": 10, "fractions": [0.6, 0.4], "mean_token_entropy": 0.0},
        {"layer": 0, "domain": "b", "kind": "image", "tokens": 10, "fractions": [0.4, 0.6], "mean_token_entropy": 0.0},
    ]
    p = tmp_path / "routing_eval.json"
    p.write_text(json.dumps({"layers": ["l0", "l1"], "domains": ["a", "b"], "num_experts": 2, "cells": cells,
                             "warnings": ["w"]}))
    rs = routing_summary(p)
    assert rs["separation"]["text"] == pytest.approx(1.0)  # layer 1 has one domain with tokens: no pair
    assert rs["separation"]["image"] == pytest.approx(0.2)
    assert rs["entropy_ratio"] == pytest.approx(30 * 0.4 / 70 / torch.log(torch.tensor(2.0)).item())
    assert rs["n_warnings"] == 1
    assert routing_summary(tmp_path / "missing.json") is None


def test_tiny_experiment_end_to_end_and_reuse(tmp_path):
    """Every run trains and is scored on every domain; results.md/json hold the table, verdict,
    slice and sweep; a second invocation reuses every finished run."""
    over = ["model={\"source\": \"tiny\", \"cache_dir\": \"%s\"}" % CACHE, "per_domain=8", "test_per_domain=4",
            "steps=1", "stage1_steps=1", "batch=2", "expert_sweep=[2]", "sweep=[1.0]", "sweep_runs=[\"lora_mix\"]",
            "domains=[\"general\", \"charts\"]", "eval_batch=4", "max_new_tokens=3", "train={\"device\": \"cpu\"}"]
    cfg = ConflictConfig.load(None, over)
    cfg.out = str(tmp_path / "exp")
    out = run_experiment(cfg, over)
    res = json.loads((out / "results.json").read_text())
    names = ["lora_general", "lora_charts", "lora_mix", "lora_mix_r32", "mole_3", "mole_2", "lora_mix@1.0"]
    assert sorted(res["runs"]) == sorted(names)
    for n in names:
        r = res["runs"][n]
        assert set(r["scores"]) == {"general", "charts"} and len(r["per_record"]) == 8
        assert all(0.0 <= s <= 1.0 for s in r["per_record"].values())
    v = res["verdict"]
    assert set(v["conflict_domains"]) == {"general", "charts"}
    assert v["conflict_appeared"] == any(d["loss"] for d in v["conflict_domains"].values())
    assert v["text"].startswith("Conflict appeared" if v["conflict_appeared"] else "No significant conflict")
    md = (out / "results.md").read_text()
    for needle in ["| (a) LoRA, single domain (own domain) |", "| (b) LoRA r=8, mixture |", "| (c) LoRA r=32, mixture |",
                   "| (d) MoLE K=3 r=8, mixture |", "| (e) MoLE K=2 r=8, mixture |", "## Verdict", "## The knob sweep",
                   "| LoRA r=8, mixture | 1.0 |", "Commit: `", "## What the routers learned", "| MoLE K=3 r=8, mixture | "]:
        assert needle in md, needle
    assert (out / "heatmaps" / "mole_3.png").exists() and (out / "heatmaps" / "mole_2.png").exists()
    assert not (out / "heatmaps" / "lora_mix.png").exists()  # one expert: nothing to route
    # The general test answers depend on the knob, the charts answers do not.
    k05 = json.loads((out / "data" / "knob0.5" / "charts_test.json").read_text())
    k10 = json.loads((out / "data" / "knob1.0" / "charts_test.json").read_text())
    assert k05 == k10

    stamps = {p: p.stat().st_mtime_ns for p in (out / "runs").glob("*/done.json")}
    assert len(stamps) == len(names)
    run_experiment(cfg, over)  # everything reused: no run is redone
    assert {p: p.stat().st_mtime_ns for p in (out / "runs").glob("*/done.json")} == stamps
    assert json.loads((out / "results.json").read_text())["runs"]["mole_3"]["per_record"] == res["runs"]["mole_3"]["per_record"]
    before = json.loads((out / "runs" / "mole_3" / "done.json").read_text())["fingerprint"]

    cfg.stage1_lr = cfg.stage1_lr / 2  # a different stage 1 retrains stage 1 and every run after it
    run_experiment(cfg, over)
    # behaviour, not file times: the run was redone against the new stage 1 (its fingerprint moved)
    assert json.loads((out / "runs" / "mole_3" / "done.json").read_text())["fingerprint"] != before


def test_lm_layers_truncates_a_pretrained_language_model(tmp_path):
    from transformers import LlamaForCausalLM

    base = build_model(ModelConfig(source="tiny", cache_dir=CACHE), stage=1)
    lm = LlamaForCausalLM(base.model.config.text_config)  # 2 layers
    lm.save_pretrained(tmp_path / "lm")
    base.tokenizer.save_pretrained(tmp_path / "lm")
    base.model.model.vision_tower.save_pretrained(tmp_path / "vision")
    kw = dict(source="separate", lm_path=str(tmp_path / "lm"), vision_path=str(tmp_path / "vision"))
    b = build_model(ModelConfig(**kw, lm_layers=1), stage=2)
    layers = b.model.model.language_model.layers
    assert len(layers) == 1 and b.model.config.text_config.num_hidden_layers == 1 and len(b.mole_layers) == 1
    torch.testing.assert_close(layers[0].self_attn.q_proj.weight, lm.model.layers[0].self_attn.q_proj.weight)
    with pytest.raises(ValueError, match="model.lm_layers must be between 1 and 2"):
        build_model(ModelConfig(**kw, lm_layers=3), stage=1)
    with pytest.raises(ValueError, match="model.lm_layers applies to sources smollm2 and separate"):
        build_model(ModelConfig(source="tiny", cache_dir=CACHE, lm_layers=1), stage=1)
