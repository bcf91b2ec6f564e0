"""training.experiments.conflict_v2 (issue 15, conflict-cpu-v2): the image-only conflict in the
data, the scorer's candidates and convention classes, the full-answer closed-set scorer (answers
that share their first token; the cached candidate pass against a full forward pass; rescoring), the analysis on known inputs (learnability
gate, seeds x records intervals, the preregistered verdict incl. "no effect larger than X") and a
smoke run on the tiny model that is reused on a rerun."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from training.data.common import NUMBER_WORDS  # noqa: E402
from training.data.conflict import (NEUTRAL_COUNT_QUESTION, NEUTRAL_TASK, add_neutral_count,  # noqa: E402
                                    image_count)
from training.experiments import conflict_v2 as v2  # noqa: E402

CACHE = str(ROOT / ".cache" / "mole_ext")


def _scene(i, n_obj, img=None):
    return {"id": f"g{i}", "image": img or f"images/s{i}.png", "task": "color", "domain": "general",
            "metric": "exact_match", "meta": {"objects": [{"shape": "circle"}] * n_obj},
            "conversations": [{"from": "human", "value": "<image>\nWhat color?"}, {"from": "gpt", "value": "red"}]}


def test_image_count_reads_each_kind_of_image():
    assert image_count(_scene(0, 4)) == 4
    assert image_count({"task": "easyvqa", "meta": {}}) == 1
    assert image_count({"task": "value", "meta": {"chart": {"categories": ["a", "b", "c"]}}}) == 3
    assert image_count({"task": "total", "meta": {"document": {"type": "receipt", "items": ["x"] * 5}}}) == 5
    assert image_count({"task": "name", "meta": {"document": {"type": "form", "name": "x"}}}) is None


def test_add_neutral_count_share_conventions_and_one_per_image():
    # 20 records on 10 images (two questions per image)
    recs = [_scene(i, 1 + i % 6, img=f"images/s{i // 2}.png") for i in range(20)]
    out = add_neutral_count(recs, "general", 0.3, seed=0, split="train")
    neutral = [r for r in out if r["task"] == NEUTRAL_TASK]
    assert len(neutral) == 6  # round(0.3 * 20)
    assert len({r["image"] for r in neutral}) == 6  # at most one per image
    for r in neutral:
        assert r["conversations"][0]["value"] == "<image>\n" + NEUTRAL_COUNT_QUESTION
        n = len(r["meta"]["objects"])
        assert r["conversations"][1]["value"] == NUMBER_WORDS[n]  # general: words
        assert r["meta"]["neutral"] == {"count": n, "convention": "words", "replaced": "color"}
    charts = add_neutral_count([{**r, "domain": "charts"} for r in recs], "charts", 0.3, seed=0, split="train")
    assert all(r["conversations"][1]["value"].isdigit() for r in charts if r["task"] == NEUTRAL_TASK)
    assert add_neutral_count(recs, "medical", 0.3, 0, "train") == recs  # other domains: unchanged
    assert recs[0]["task"] == "color"  # the input is not modified
    # more than one image short: as many images as there are
    assert sum(r["task"] == NEUTRAL_TASK for r in add_neutral_count(recs, "general", 1.0, 0, "train")) == 10
    with pytest.raises(ValueError, match="share must be in"):
        add_neutral_count(recs, "general", 1.5, 0, "train")


def test_config_errors_name_the_key():
    with pytest.raises(ValueError, match="unknown conflict-v2 keys \\['stepz'\\]"):
        v2.V2Config.load(None, ["stepz=3"])
    with pytest.raises(ValueError, match="seeds must be distinct"):
        v2.V2Config.load(None, ["seeds=[1,1]"])
    with pytest.raises(ValueError, match="neutral_share"):
        v2.V2Config.load(None, ["neutral_share=2"])
    cfg = v2.V2Config.load(None, ["epochs=2"])
    assert cfg.model["train_vision"] is False and cfg.model["adapter_dtype"] == "float32"
    assert cfg.router_lr != cfg.lr and len(cfg.seeds) == 3 and cfg.test_per_domain >= 120


def _fake_results(single, mix, mole, prior, domain="general", conv=None):
    """results[seed/arm]['records'] from per-seed 0/1 vectors of E1 (and optionally E2)."""
    res = {}
    n = len(single[0])
    for s in range(len(single)):
        for arm, vals in ((f"single_{domain}", single), ("mix", mix), ("mole", mole)):
            recs = {}
            for i in range(n):
                r = {"domain": domain, "task": "t", "image": f"img{i // 2}", "nll": 1.0 - vals[s][i],
                     "ans_ok": float(vals[s][i]), "prior_ok": float(prior[s][i])}
                if conv is not None and i < n // 2:
                    r.update(conv_ok=float(conv[arm.split("_")[0]][s][i]), prior_conv_ok=1.0)
                recs[f"r{i:03d}"] = r
            res[f"s{s}/{arm}"] = {"records": recs, "routing": None, "seed": s, "arm": arm}
    return res


def _tiny_tokenizer():
    from training.model import ModelConfig, load_tokenizer

    return load_tokenizer(ModelConfig(source="tiny", cache_dir=CACHE))


def test_full_answer_scorer_separates_answers_that_share_their_first_token():
    """The preregistered scorer compared first tokens only: SmolLM2 encodes " 47.3" and " 12.5" as
    a space token, then digits, so it cannot tell them apart. The full-answer scorer can, and picks
    the answer with the highest total log-likelihood (known here by construction)."""
    tok = _tiny_tokenizer()
    a, b = v2.answer_tokens(tok, "47.3"), v2.answer_tokens(tok, "12.5")
    assert v2.first_token(tok, "47.3") == v2.first_token(tok, "12.5") == a[0] == b[0]  # the old scorer's blind spot
    assert a != b and a[-1] == b[-1] == tok.eos_token_id  # full answers differ; each ends with the end of turn
    # per-token log-probabilities, identical on the shared first token: the first-token scorer ties
    lp = {"47.3": [-0.1, -2.0, -2.0, -0.5, -2.0, -0.1], "12.5": [-0.1, -0.2, -0.3, -0.5, -0.2, -0.1],
          "3": [-0.1, -3.0, -0.1]}
    cands = list(lp)
    assert len({v[0] for v in lp.values()}) == 1
    i_sum, i_mean = v2.choose([lp[c] for c in cands])
    assert cands[i_sum] == "12.5" and cands[i_mean] == "12.5"
    # a short candidate wins the sum, a long one with a better mean wins the normalised variant
    i_sum, i_mean = v2.choose([[-0.5, -1.5], [-0.5, -0.4, -0.4, -0.4, -0.4]])
    assert (i_sum, i_mean) == (0, 1)
    with pytest.raises(ValueError, match="at least one token"):
        v2.choose([[-1.0], []])
    # the neutral count's convention of a full answer
    assert [v2.convention_of_answer(x) for x in ("three", " 3", "12", "red")] == ["words", "digits", "digits", None]


@pytest.mark.filterwarnings("ignore")
def test_candidate_logprobs_equal_a_full_forward_pass_per_candidate():
    """The cached candidate pass gives the same per-token log-probabilities as one forward pass
    over prompt + candidate (tiny random model, padded batch, candidates sharing their first
    token), and ``choose`` picks the brute-force argmax."""
    import torch

    from training.config import ModelConfig
    from training.model import build_model

    torch.manual_seed(0)
    built = build_model(ModelConfig(source="tiny", image_size=32, cache_dir=CACHE), stage=2)
    m, tok = built.model.eval(), built.tokenizer
    prompts = [tok("USER: how many? ASSISTANT:", add_special_tokens=False).input_ids,
               tok("USER: what is the value of the bar? ASSISTANT:", add_special_tokens=False).input_ids]
    n = max(len(p) for p in prompts)
    ids = torch.full((2, n), tok.pad_token_id)
    mask = torch.zeros((2, n), dtype=torch.long)
    for j, p in enumerate(prompts):
        ids[j, :len(p)], mask[j, :len(p)] = torch.tensor(p), 1
    answers = ["47.3", "12.5", "3", "three", "1234.5"]
    cands = [v2.answer_tokens(tok, x) for x in answers]
    with torch.no_grad():
        fwd = m(input_ids=ids, attention_mask=mask, use_cache=True)
        for j, p in enumerate(prompts):
            lp0 = torch.log_softmax(fwd.logits[j, len(p) - 1].float(), -1)
            got = v2.candidate_logprobs(m, v2._record_cache(fwd.past_key_values, j), len(p), lp0, cands,
                                        tok.pad_token_id)
            ref = []
            for c in cands:
                full = torch.tensor([p + c])
                lp = torch.log_softmax(m(input_ids=full, use_cache=False).logits[0].float(), -1)
                ref.append([float(lp[len(p) - 1 + k, t]) for k, t in enumerate(c)])
            assert [len(g) for g in got] == [len(c) for c in cands]
            np.testing.assert_allclose(np.concatenate(got), np.concatenate(ref), atol=1e-4)
            assert v2.choose(got)[0] == int(np.argmax([sum(r) for r in ref]))
            assert len({round(sum(g), 4) for g in got[:2]}) == 2  # " 47.3" and " 12.5" are told apart


def test_analysis_on_known_inputs():
    """A domain with a planted conflict that MoLE recovers passes the gate and gets the
    'Conflict' verdict; a domain the single run does not learn beyond the prior is gated out;
    intervals are the seeds x records bootstrap of the right vectors."""
    rng = np.random.default_rng(0)
    n, S = 120, 3
    prior = [np.zeros(n) for _ in range(S)]
    single = [(rng.random(n) < 0.8).astype(float) for _ in range(S)]
    mix = [s * (rng.random(n) < 0.5) for s in single]
    mole = [np.maximum(m, s * (rng.random(n) < 0.95)) for s, m in zip(single, mix)]
    conv = {"single": [np.ones(n) for _ in range(S)], "mix": [(rng.random(n) < 0.5).astype(float) for _ in range(S)],
            "mole": [np.ones(n) for _ in range(S)]}
    cfg = v2.V2Config(seeds=list(range(S)), domains=["general"], n_boot=300)
    an = v2.analyse(cfg, _fake_results(single, mix, mole, prior, conv=conv))
    e1 = an["endpoints"]["e1:general"]
    assert e1["gate"]["passed"] and e1["in_verdict"]
    assert e1["arms"]["single"]["mean"] == pytest.approx(np.mean([s.mean() for s in single]))
    assert e1["arms"]["prior"]["mean"] == 0.0
    assert e1["verdict"]["conflict"] and e1["verdict"]["recovers"]
    e2 = an["endpoints"]["e2:general"]
    assert e2["n_records"] == n // 2 and e2["gate"]["passed"]  # single always in convention: 1.0 vs 0.5
    assert e2["verdict"]["conflict"] and e2["verdict"]["recovers"]
    assert an["endpoints"]["nll:general"]["arms"]["single"]["mean"] == pytest.approx(1 - e1["arms"]["single"]["mean"])
    assert an["gate_by_type"]["general:t"]["n"] == n

    # the single run is no better than the prior: gated out; no difference: "no effect larger than X"
    same = [s.copy() for s in single]
    an = v2.analyse(cfg, _fake_results(single, same, same, prior=single))
    e1 = an["endpoints"]["e1:general"]
    assert not e1["gate"]["passed"] and not e1["in_verdict"]
    assert not e1["verdict"]["conflict"] and "no effect larger than 0.000" in e1["verdict"]["text"]
    md = v2.report(cfg, an)
    assert "excluded by the learnability gate" in md and "| prior-only" in md


@pytest.mark.filterwarnings("ignore")
def test_smoke_run_on_the_tiny_model_and_reuse(tmp_path):
    over = ["seeds=[0]", "domains=[\"general\", \"charts\"]", "per_domain=8", "test_per_domain=6",
            "model={\"source\": \"tiny\", \"image_size\": 32, \"train_vision\": false, \"cache_dir\": \"%s\"}" % CACHE,
            "stage1_steps=1", "batch=8", "n_boot=100", "train={\"device\": \"cpu\"}"]
    cfg = v2.V2Config.load(None, over, base=v2.QUICK)
    cfg.out = str(tmp_path / "v2")
    out = v2.run_experiment(cfg, over)
    res = json.loads((out / "results.json").read_text())
    assert sorted(res["runs"]) == ["s0/mix", "s0/mole", "s0/single_charts", "s0/single_general"]
    # own-data matched: the mixture's steps are the sum of the single-domain runs' (1 epoch each)
    assert res["steps"]["s0/mix"] == res["steps"]["s0/single_general"] + res["steps"]["s0/single_charts"]
    assert len(res["runs"]["s0/mix"]["records"]) == 12 and len(res["runs"]["s0/single_charts"]["records"]) == 6
    assert res["runs"]["s0/mole"]["routing"]["mi_bits"].keys() == {"image", "text", "answer"}
    assert res["runs"]["s0/mix"]["routing"] is None
    data = json.loads((out / "data" / "manifest_v2.json").read_text())["counts"]
    assert data["general_test"]["neutral"] == 2 and data["charts_train"]["neutral"] == 2  # round(0.3 * n)
    ctx = json.loads((out / "scoring_context.json").read_text())
    cand = set(ctx["candidates"][NEUTRAL_TASK])
    assert cand & set(ctx["convention_tokens"]["words"]) and cand & set(ctx["convention_tokens"]["digits"])
    for k in ("e1:general", "e1:charts", "e2:general", "e2:charts", "nll:general"):
        assert k in res["analysis"]["endpoints"], k
    md = (out / "results.md").read_text()
    assert "Verdict per endpoint" in md and (out / "preregistration.md").read_text() == v2.PREREGISTRATION
    assert (out / "figures" / "e1.png").exists() and (out / "figures" / "differences.png").exists()
    assert "Deviations from the preregistration" in md and (out / "figures" / "e1_first_token_vs_full_answer.png").exists()
    rec = next(iter(res["runs"]["s0/mix"]["records"].values()))
    assert {"ans_ok", "ans_norm_ok", "first_token_ok", "prior_ok", "prior_first_token_ok"} <= set(rec)
    done = {p: p.read_text() for p in (out / "runs").glob("s*/*/done.json")}
    v2.run_experiment(cfg, over)  # every run reused
    assert {p: p.read_text() for p in (out / "runs").glob("s*/*/done.json")} == done

    # a run scored by the first-token scorer (scorer 1) is rescored from its adapter, not retrained
    p = out / "runs" / "s0" / "mix" / "done.json"
    d = json.loads(p.read_text())
    old = {k: v for k, v in d.items() if k != "scorer"}
    old["records"] = {i: {"nll": r["nll"], "first_ok": r["first_token_ok"], "domain": r["domain"]}
                      for i, r in d["records"].items()}
    p.write_text(json.dumps(old))
    v2.run_experiment(cfg, over)
    new = json.loads(p.read_text())
    assert new["scorer"] == v2.SCORER and new["steps"] == d["steps"] and new["seconds"] == d["seconds"]
    assert new["rescored"]["from_scorer"] == 1 and new["rescored"]["first_token_agreement"] == 1.0
    for i, r in d["records"].items():
        assert new["records"][i]["ans_ok"] == r["ans_ok"] and new["records"][i]["nll"] == pytest.approx(r["nll"], abs=1e-5)
    # an adapter that does not reproduce the stored scores is refused
    bad = {**old, "records": {i: {**r, "nll": r["nll"] + 1.0} for i, r in old["records"].items()}}
    p.write_text(json.dumps(bad))
    with pytest.raises(RuntimeError, match="does not reproduce the scored run"):
        v2.run_experiment(cfg, over)


def test_gpu_recipe_is_faithful_and_parses_with_the_real_loaders(tmp_path):
    """conflict_gpu.json (issue 15 point 3): CLIP + Vicuna with a stage-1 projector (source
    separate), >= 1000 test records per domain, 3 seeds, fp32 adapters over a bf16 base, a router
    lr of its own, the tower frozen in stage 2 (and in stage 1: a pretrained CLIP)."""
    from training.trainer import precision

    path = ROOT / "training" / "experiments" / "conflict_gpu.json"
    cfg = v2.V2Config.load(str(path))
    m = cfg.model
    assert m["source"] == "separate" and "clip" in m["vision_path"].lower() and "vicuna" in m["lm_path"].lower()
    assert cfg.stage1_steps > 0  # the projector is trained in stage 1, not taken from a LLaVA checkpoint
    assert cfg.test_per_domain >= 1000 and len(cfg.seeds) == 3 and cfg.neutral_share == pytest.approx(0.3)
    assert m["adapter_dtype"] == "float32" and m["dtype"] == "bfloat16" and m["train_vision"] is False
    assert cfg.router_lr is not None and cfg.router_lr != cfg.lr
    data = tmp_path / "data"
    s1 = v2._run_config(cfg, 1, tmp_path / "s1", [{"path": str(data / "captions.json"), "domain": "captions"}],
                        cfg.data_seed, None, {}, steps=cfg.stage1_steps)
    arm = v2.arms(cfg)[-1]
    s2 = v2._run_config(cfg, 2, tmp_path / "s2", [{"path": str(data / f"{d}_train.json"), "domain": d}
                                                  for d in arm.domains], 1, str(tmp_path / "s1" / "adapter"),
                        {"num_experts": arm.experts, "rank": cfg.rank, "alpha": cfg.alpha})
    from training.config import RunConfig

    for rc in (s1, s2):
        assert RunConfig.from_dict(rc.to_dict()).to_dict() == rc.to_dict()  # the real loader takes it
        assert rc.model.train_vision is False and rc.model.adapter_dtype == "float32"
        p = precision(rc, on_gpu=True)  # raises for a bf16 base with fp32 adapters and no autocast
        assert p["bf16"] and not p["fp16"]
    assert s2.model.num_experts == cfg.experts and s2.train.router_lr == cfg.router_lr
    assert s2.train.num_epochs == cfg.epochs and s2.data.sampling == "once" and s2.train.seed == 1
    assert s1.train.stage == 1 and s1.train.max_steps == cfg.stage1_steps
