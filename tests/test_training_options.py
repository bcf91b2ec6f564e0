"""Issue 14 on a tiny random LLaVA-MoLE (CPU): fp32 adapters over a bf16 base, the Trainer's
options (epochs, grouping, eval set, schedulers, optimizers, trackers, seeds), and precision
checks. Each run is a few steps of the tiny model."""
from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from training import checkpoint as ck  # noqa: E402
from training.config import ModelConfig, load_config  # noqa: E402
from training.model import build_model, reset_adapters, upcast_trainable  # noqa: E402

CACHE = str(ROOT / ".cache" / "mole_ext")
TINY = ["model.source=tiny", f"model.cache_dir={CACHE}", "data.builtin_per_domain=8",
        "train.per_device_batch_size=4", "train.logging_steps=1", "train.warmup_ratio=0", "train.device=cpu",
        "train.report_to=none"]


def tiny_cfg(tmp, *extra):
    return load_config(None, TINY + [f"data.builtin_dir={tmp}/data", f"train.output_dir={tmp}/run"] + list(extra))


def rows(run_dir):
    return [json.loads(x) for x in (Path(run_dir) / "metrics.jsonl").read_text().splitlines() if x.strip()]


def losses(run_dir):
    return {r["global_step"]: r["loss"] for r in rows(run_dir) if "loss" in r}


def ulp_bf16(x: torch.Tensor) -> torch.Tensor:
    """The spacing of bfloat16 numbers at |x| (8 significant bits)."""
    e = torch.floor(torch.log2(x.abs().clamp_min(1e-30)))
    return torch.exp2(e - 7)


# -- precision ----------------------------------------------------------------------------------
def test_bf16_base_fp32_adapters_train_export_and_match_fp32(tmp_path):
    from training.trainer import run_training

    common = ["train.max_steps=2", "data.samples_per_epoch=8", "model.dropout=0.0", "train.save_steps=2"]
    s16 = run_training(tiny_cfg(tmp_path / "bf16", *common, "model.dtype=bfloat16"))
    m = s16["trainer"].model
    assert s16["trainer"].args.bf16  # autocast in the base's dtype by default
    trainable = {n: p for n, p in m.named_parameters() if p.requires_grad}
    assert trainable and all(p.dtype == torch.float32 for p in trainable.values())
    assert any(".router." in n for n in trainable) and any("lora_A" in n for n in trainable)
    assert any("multi_modal_projector" in n for n in trainable)
    frozen = [p for n, p in m.named_parameters() if not p.requires_grad and "language_model" in n]
    assert frozen and all(p.dtype == torch.bfloat16 for p in frozen)
    # on disk: exported adapter and checkpoint keep fp32
    run = tmp_path / "bf16" / "run"
    meta, tensors = ck.read_adapter(run / "adapter")
    for n, t in tensors.items():
        if "lora_" in n or ".router." in n or "multi_modal_projector" in n:
            assert t.dtype == torch.float32, n
    assert all(v.dtype == torch.float32 for v in ck.load_trainable(run / "checkpoint-2").values())
    # the loss is the fp32-base run's within bf16 tolerance
    s32 = run_training(tiny_cfg(tmp_path / "fp32", *common))
    assert not s32["trainer"].args.bf16
    l16, l32 = losses(run), losses(tmp_path / "fp32" / "run")
    assert sorted(l16) == sorted(l32) == [1, 2]
    for k in l16:
        assert math.isfinite(l16[k]) and abs(l16[k] - l32[k]) < 0.03 * abs(l32[k]), (k, l16, l32)


def _one_step(tmp, adapter_dtype):
    """One AdamW step at lr 1e-5 (each weight moves by about 1e-5) on a bf16 base."""
    from training.trainer import run_training

    cfg = tiny_cfg(tmp, "model.dtype=bfloat16", f"model.adapter_dtype={adapter_dtype}", "train.max_steps=1",
                   "train.lr=1e-5", "train.lr_scheduler_type=constant", "data.samples_per_epoch=4",
                   "model.dropout=0.0", "train.max_grad_norm=0")
    built = build_model(cfg.model, stage=2)
    reset_adapters(built.model, cfg.train.seed)
    if adapter_dtype == "float32":
        upcast_trainable(built.model)
    names = [n for n, p in built.model.named_parameters() if p.requires_grad and p.ndim == 2
             and (".router." in n or "multi_modal_projector" in n)]
    before = {n: p.detach().float().clone() for n, p in built.model.named_parameters() if n in names}
    run_training(cfg, built=built)
    after = {n: p.detach().float().clone() for n, p in built.model.named_parameters() if n in names}
    return before, after


def test_update_below_a_bf16_ulp_is_kept_by_fp32_adapters(tmp_path):
    before, after = _one_step(tmp_path / "fp32", "float32")
    moved = 0
    for n in before:
        w0, w1 = before[n], after[n]
        big = w0.abs() > 0.01  # where a bf16 ulp (>= 2^-14) is far above the 1e-5 step
        d = (w1 - w0)[big]
        assert (d.abs() < 0.5 * ulp_bf16(w0[big])).all(), n  # every update is below half an ulp...
        moved += int((d != 0).sum())
        # ...so a bf16 weight would round back to where it was
        w0_16 = w0[big].bfloat16()
        assert torch.equal((w0_16.float() + d).bfloat16(), w0_16)
    assert moved > 100  # and yet the fp32 weights kept the updates
    # the same step with bf16 adapters (model.adapter_dtype=base) loses them
    before, after = _one_step(tmp_path / "bf16", "base")
    for n in before:
        big = before[n].abs() > 0.01
        assert torch.equal(before[n][big], after[n][big]), n


def test_precision_option_errors(tmp_path):
    from training.trainer import precision, training_args

    with pytest.raises(ValueError, match="train.fp16 .* needs a CUDA GPU"):
        training_args(tiny_cfg(tmp_path, "train.fp16=true"))
    with pytest.raises(ValueError, match="model.dtype=bfloat16 with float32 adapters .* set train.bf16=true"):
        training_args(tiny_cfg(tmp_path, "model.dtype=bfloat16", "train.bf16=false"))
    with pytest.raises(ValueError, match="train.fp16 and train.bf16 are both true"):
        training_args(tiny_cfg(tmp_path, "train.fp16=true", "train.bf16=true"))
    with pytest.raises(ValueError, match="train.tf32=true applies to CUDA"):
        training_args(tiny_cfg(tmp_path, "train.tf32=true"))
    with pytest.raises(ValueError, match="model.adapter_dtype must be"):
        training_args(tiny_cfg(tmp_path, "model.adapter_dtype=half"))
    # defaults: a float16 base gets fp16 autocast with loss scaling, a bf16 base bf16, on a GPU too
    f16 = tiny_cfg(tmp_path, "model.dtype=float16")
    assert precision(f16, on_gpu=True) == {"bf16": False, "fp16": True, "tf32": precision(f16, True)["tf32"]}
    assert precision(tiny_cfg(tmp_path, "model.dtype=bfloat16"), on_gpu=False)["bf16"] is True
    assert precision(tiny_cfg(tmp_path), on_gpu=False) == {"bf16": False, "fp16": False, "tf32": None}
    # a bf16 base keeping bf16 adapters may run without autocast
    assert not precision(tiny_cfg(tmp_path, "model.dtype=bfloat16", "model.adapter_dtype=base",
                                  "train.bf16=false"), on_gpu=False)["bf16"]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="fp16 autocast with loss scaling needs a CUDA GPU")
def test_fp16_base_with_loss_scaling_on_gpu(tmp_path):
    from training.trainer import run_training

    s = run_training(load_config(None, TINY[:-2] + [f"data.builtin_dir={tmp_path}/data",
                                                    f"train.output_dir={tmp_path}/run", "model.dtype=float16",
                                                    "train.max_steps=3", "data.samples_per_epoch=8"]))
    tr = s["trainer"]
    assert tr.args.fp16 and tr.accelerator.scaler is not None
    assert all(p.dtype == torch.float32 for p in tr.model.parameters() if p.requires_grad)
    assert all(math.isfinite(v) for v in losses(tmp_path / "run").values())
    info = json.loads((tmp_path / "run" / "checkpoint-3" / "info.json").read_text())
    assert info["grad_scaler"]["scale"] > 0


def test_upcast_is_a_no_op_on_fp32_and_reset_adapters_follows_the_seed():
    b = build_model(ModelConfig(source="tiny", cache_dir=CACHE), stage=2)
    assert upcast_trainable(b.model) == []

    def adapters(seed):
        reset_adapters(b.model, seed)
        return {n: p.detach().clone() for n, p in b.model.named_parameters()
                if ("lora_A" in n or ".router." in n) and p.requires_grad}

    a0, a0b, a1 = adapters(0), adapters(0), adapters(1)
    assert all(torch.equal(a0[k], a0b[k]) for k in a0)
    assert all(not torch.equal(a0[k], a1[k]) for k in a0)
    assert all(float(p.detach().abs().max()) == 0 for n, p in b.model.named_parameters() if "lora_B" in n)


def test_shipped_gpu_configs_train_fp32_adapters_under_bf16():
    from training.experiments.conflict_v2 import V2Config
    from training.trainer import precision

    cfgs = sorted((ROOT / "training" / "configs").glob("*.json"))
    assert len(cfgs) >= 5
    for f in cfgs:
        cfg = load_config(f)
        p = precision(cfg, on_gpu=True)  # raises for a 16-bit base without autocast
        assert cfg.model.adapter_dtype == "float32"
        if cfg.model.dtype == "bfloat16":
            assert p["bf16"] and not p["fp16"], f
    exp = V2Config.load(str(ROOT / "training" / "experiments" / "conflict_gpu.json"))
    assert exp.model["dtype"] == "bfloat16" and exp.train.get("bf16") is True
    s1 = load_config(ROOT / "training" / "configs" / "stage1_llava15_pretrain_558k.json")
    assert s1.data.template == "plain" and s1.train.projector_lr is None and s1.train.lr == 1e-3
    s2 = load_config(ROOT / "training" / "configs" / "stage2_llava15_mole_665k.json")
    assert s2.data.group_by_modality_length and s2.train.num_epochs == 1


# -- data pipeline ------------------------------------------------------------------------------
def _bad_data(tmp):
    """A LLaVA JSON with four kinds of bad records among good ones; returns (json path, ids)."""
    from PIL import Image

    d = tmp / "bad"
    d.mkdir(parents=True)
    g = torch.Generator().manual_seed(0)
    for i in range(6):
        arr = (torch.rand(40, 48, 3, generator=g) * 255).to(torch.uint8).numpy()
        Image.fromarray(arr).save(d / f"ok{i}.jpg", quality=90)
    full = (d / "ok0.jpg").read_bytes()
    (d / "truncated.jpg").write_bytes(full[: len(full) // 2])
    Image.open(d / "truncated.jpg").verify()  # PIL's verify() does not notice the truncation

    def rec(rid, image, q, a="a red square."):
        r = {"id": rid, "conversations": [{"from": "human", "value": q}, {"from": "gpt", "value": a}]}
        if image:
            r["image"] = image
        return r

    recs = [rec(f"good{i}", f"ok{i}.jpg", "<image>\nWhat is shown?") for i in range(6)]
    recs += [rec("text-ok", None, "What is 2 plus 2?", "4")]
    recs += [rec("trunc-jpeg", "truncated.jpg", "<image>\nWhat is shown?"),
             rec("missing", "nope.jpg", "<image>\nWhat is shown?"),
             rec("answer-cut", "ok1.jpg", "<image>\n" + "please look closely " * 80 + "?"),
             rec("image-cut", "ok2.jpg", "word " * 250 + "<image>\nWhat?")]
    p = d / "data.json"
    p.write_text(json.dumps(recs))
    return p


def test_bad_records_counted_by_reason_across_workers_or_named_in_error_mode(tmp_path, caplog):
    import logging

    from training.data import BadRecord
    from training.trainer import run_training

    p = _bad_data(tmp_path)
    ds = json.dumps([{"path": str(p), "domain": "bad"}])
    common = [f"data.datasets={ds}", "data.on_bad_record=skip", "train.num_epochs=1",
              "train.dataloader_workers=2", "model.dropout=0.0"]
    with caplog.at_level(logging.WARNING):
        s = run_training(tiny_cfg(tmp_path / "a", *common))
    want = {"corrupt_image": 1, "missing_image": 1, "answer_truncated": 1, "image_tokens_do_not_fit": 1}
    assert s["skipped_by_reason"] == want and s["skipped_records"] == 4
    summary = json.loads((tmp_path / "a" / "run" / "summary.json").read_text())
    assert summary["skipped_by_reason"] == want
    assert s["global_step"] == 2  # 7 usable records, batch 4, one epoch
    assert "data: 4 records skipped" in caplog.text and "trunc-jpeg" in caplog.text
    # a record whose file breaks after the (cached) up-front check fails at load in a DataLoader
    # worker: counted once (it is a record, not a draw), not replaced by another record
    run_b = tmp_path / "b" / "run"
    run_b.mkdir(parents=True)
    (run_b / "data_check.json").write_bytes((tmp_path / "a" / "run" / "data_check.json").read_bytes())
    (p.parent / "ok3.jpg").write_bytes((p.parent / "ok3.jpg").read_bytes()[:300])
    s = run_training(tiny_cfg(tmp_path / "b", *common, "train.num_epochs=2"))
    assert s["skipped_by_reason"] == {**want, "corrupt_image": 2}
    assert s["global_step"] == 4
    # error mode: the first bad record stops the run, naming file and record
    with pytest.raises(BadRecord, match=r"data\.json: record (trunc-jpeg|missing)"):
        run_training(tiny_cfg(tmp_path / "c", f"data.datasets={ds}", "train.max_steps=1"))


def test_error_mode_names_truncated_answers_and_image_cuts(tmp_path):
    from training.data import BadRecord, LlavaData
    from training.config import DataConfig, DatasetSpec

    b = build_model(ModelConfig(source="tiny", cache_dir=CACHE), stage=1)
    p = _bad_data(tmp_path)
    good = json.loads(p.read_text())
    for rid, msg in (("answer-cut", "truncates every answer token away"), ("image-cut", "cuts into the 16 image tokens"),
                     ("trunc-jpeg", "cannot read image .*truncated.jpg")):
        q = p.parent / f"{rid}.json"
        q.write_text(json.dumps([r for r in good if r["id"] in ("good0", rid)]))
        ds = LlavaData(DataConfig(), b.tokenizer, b.image_processor, b.num_image_tokens, [DatasetSpec(str(q))])
        ds[0]
        with pytest.raises(BadRecord, match=rf"{rid}\.json: record {rid}: .*{msg}"):
            ds[1]
    with pytest.raises(ValueError, match="data.max_length=16 cannot hold the model's 16 image tokens"):
        LlavaData(DataConfig(max_length=16), b.tokenizer, b.image_processor, b.num_image_tokens, [DatasetSpec(str(p))])
    assert LlavaData(DataConfig(), b.tokenizer, b.image_processor, 576, [DatasetSpec(str(q))]).max_length == 2048


def test_plain_template_for_stage_1(tmp_path):
    from training.config import DataConfig, DatasetSpec
    from training.data import IGNORE, BadRecord, LlavaData
    from training.trainer import run_training

    b = build_model(ModelConfig(source="tiny", cache_dir=CACHE), stage=1)
    p = _bad_data(tmp_path)
    recs = [r for r in json.loads(p.read_text()) if r["id"] in ("good0", "text-ok")]
    q = p.parent / "plain.json"
    q.write_text(json.dumps(recs))
    ds = LlavaData(DataConfig(template="plain"), b.tokenizer, b.image_processor, b.num_image_tokens, [DatasetSpec(str(q))])
    it = ds[0]
    img = b.model.config.image_token_id
    ids, labels = it["input_ids"].tolist(), it["labels"].tolist()
    n_bos = len(ds.bos)
    assert ids[n_bos:n_bos + 16] == [img] * 16  # the image right after BOS, no system prompt, no question
    assert b.tokenizer.decode(it["input_ids"][n_bos + 16:]) == "a red square.\n"
    assert labels[:n_bos + 16] == [IGNORE] * (n_bos + 16) and labels[n_bos + 16:] == ids[n_bos + 16:]
    with pytest.raises(BadRecord, match="plain template takes single-turn records with an image"):
        ds[1]
    # stage 1 with only train.lr set trains the projector at train.lr (LLaVA's unset mm_projector_lr)
    s = run_training(tiny_cfg(tmp_path / "s1", "train.stage=1", "data.builtin=caption", "data.template=plain",
                              "train.lr=1e-3", "train.max_steps=1", "data.samples_per_epoch=4",
                              "train.lr_scheduler_type=constant"))
    groups = s["trainer"].optimizer.param_groups
    assert groups and all(g["lr"] == 1e-3 for g in groups)
    assert any(g["name"].startswith("proj") for g in groups)


# -- samplers -----------------------------------------------------------------------------------
def test_epoch_sampler_once_per_epoch_and_modality_length_grouping():
    from training.data import EpochSampler, MixtureSampler, modality_length_grouped

    s = EpochSampler(23, seed=1)
    e0 = list(s)
    assert sorted(e0) == list(range(23))
    s.set_epoch(1)
    e1 = list(s)
    assert sorted(e1) == list(range(23)) and e1 != e0
    s.set_epoch(0)
    assert list(s) == e0  # deterministic in (seed, epoch): a resumed run sees the same order
    has_image = [i % 3 != 0 for i in range(23)]
    lengths = [(i * 37) % 101 for i in range(23)]
    g = EpochSampler(23, seed=1, group=(lengths, has_image, 4, 8))
    order = list(g)
    assert sorted(order) == list(range(23))
    batches = [order[i:i + 4] for i in range(0, 20, 4)]
    full = [b for b in batches if len({has_image[i] for i in b}) == 1]
    assert len(full) >= 4  # every full batch but the leftovers is one modality
    for b in full:  # sorted by length inside its megabatch
        assert [lengths[i] for i in b] == sorted((lengths[i] for i in b), reverse=True)
    # the weighted mixture keeps its draw (with replacement) under grouping
    m = MixtureSampler([list(range(10)), list(range(10, 23))], [1.0, 1.0], 40, seed=2)
    mg = MixtureSampler([list(range(10)), list(range(10, 23))], [1.0, 1.0], 40, seed=2,
                        group=(lengths, has_image, 4, 16))
    assert sorted(list(m)) == sorted(list(mg))
    gen = torch.Generator().manual_seed(0)
    assert sorted(modality_length_grouped(list(range(23)), lengths, has_image, 4, 8, gen)) == list(range(23))


# -- the Trainer's options ----------------------------------------------------------------------
def test_epochs_eval_set_best_checkpoint_tracker_and_optimizer_options(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from training.data import make_builtin
    from training.trainer import run_training

    ev = make_builtin(tmp_path / "evaldata", per_domain=4, seed=1, size=64)["instruct"]
    evals = json.dumps([{"path": e.path, "domain": e.domain} for e in ev])
    cfg = tiny_cfg(tmp_path, "train.num_epochs=1", "data.group_by_modality_length=true",
                   f"data.eval_datasets={evals}", "train.eval_steps=2", "train.save_steps=2",
                   "train.load_best_at_end=true", "train.report_to=tensorboard", "train.optim=adamw_torch_fused",
                   "train.router_lr=3e-3", "train.projector_lr=1e-3", "train.lr=2e-2", "train.seed=3",
                   "train.lr_scheduler_type=linear", "model.dropout=0.0", "train.save_total_limit=1",
                   "train.collapse_fraction=0.4")
    s = run_training(cfg)
    tr = s["trainer"]
    run = Path(cfg.train.output_dir)
    # one epoch: each of the 24 records once, batch 4
    assert s["global_step"] == 6 and type(tr._get_train_sampler()).__name__ == "EpochSampler"
    # per-domain validation loss every eval_steps, and at the end
    evs = [r for r in rows(run) if "eval_loss" in r]
    assert [r["global_step"] for r in evs] == [2, 4, 6, 6]
    for r in evs:
        assert {"eval_loss_shapes", "eval_loss_charts", "eval_loss_text", "eval_balance_loss"} <= set(r)
        assert min(r[f"eval_loss_{d}"] for d in ("shapes", "charts", "text")) <= r["eval_loss"] \
            <= max(r[f"eval_loss_{d}"] for d in ("shapes", "charts", "text"))
    assert s["eval"]["eval_loss"] == evs[-1]["eval_loss"]
    # best checkpoint: the lowest eval_loss among the saved ones is kept past save_total_limit and loaded
    best = min(evs[:3], key=lambda r: r["eval_loss"])
    assert s["best"]["step"] == best["global_step"] and (run / s["best"]["checkpoint"]).is_dir()
    loaded = ck.load_trainable(run / s["best"]["checkpoint"])
    params = dict(tr.model.named_parameters())
    assert all(torch.equal(params[k].detach().cpu(), v) for k, v in loaded.items())
    # optimizer: fused AdamW, router / projector / main learning rates, linear schedule
    opt = tr.optimizer
    assert opt.defaults.get("fused") is True
    lrs = {g["name"].rsplit("_", 1)[0]: g["initial_lr"] for g in opt.param_groups}
    assert lrs == {"main": 2e-2, "router": 3e-3, "proj": 1e-3}
    lr_rows = [r["learning_rate"] for r in rows(run) if "learning_rate" in r]
    assert all(a > b for a, b in zip(lr_rows, lr_rows[1:]))  # linear decay
    # windowed routing scalars in the tracker and in metrics.jsonl; collapse warnings as they happen
    tb = [p for p in run.rglob("events.out.tfevents.*")]
    assert tb
    acc = EventAccumulator(str(tb[0].parent))
    acc.Reload()
    tags = acc.Tags()["scalars"]
    assert "train/routing/dead_experts" in tags and "train/routing/layer0/load_entropy" in tags, tags
    assert "eval/loss_shapes" in tags
    train_rows = [r for r in rows(run) if "loss" in r]
    assert all("routing/layer1/min_share" in r for r in train_rows)
    # collapse_fraction=0.4 with 3 experts: some expert of every layer is always under 40%, so every
    # window reports dead experts and the first logging step warns about each of them
    assert all(r["routing/dead_experts"] >= 2 for r in train_rows)
    first = [e for e in tr.collapse_events if e["step"] == 1]
    assert {e["layer"] for e in first} == {0, 1} and s["collapse_events"] == tr.collapse_events


def test_option_pass_through_and_errors(tmp_path):
    from training.trainer import sampling_mode, training_args

    cfg = tiny_cfg(tmp_path, "train.torch_compile=true", "train.lr_scheduler_type=constant_with_warmup")
    args = training_args(cfg)
    assert args.torch_compile and args.lr_scheduler_type == "constant_with_warmup"
    assert args.report_to == [] or args.report_to == "none" or args.report_to == ["none"]
    for bad, msg in (("train.report_to=mlflow", "train.report_to must be"),
                     ("train.optim=sgd", "train.optim must be one of"),
                     ("train.eval_steps=5", "train.eval_steps needs data.eval_datasets"),
                     ("train.load_best_at_end=true", "train.load_best_at_end needs"),
                     ("train.num_epochs=0", "train.num_epochs must be positive")):
        with pytest.raises(ValueError, match=msg):
            training_args(tiny_cfg(tmp_path, bad))
    with pytest.raises(ValueError, match="data.sampling must be"):
        sampling_mode(tiny_cfg(tmp_path, "data.sampling=random"))
    assert sampling_mode(tiny_cfg(tmp_path, "train.num_epochs=2")) == "once"
    assert sampling_mode(tiny_cfg(tmp_path)) == "weighted"


def test_up_front_check_runs_once_and_is_reused(tmp_path, monkeypatch):
    from training.config import DataConfig, DatasetSpec
    from training.data import LlavaData

    b = build_model(ModelConfig(source="tiny", cache_dir=CACHE), stage=1)
    p = _bad_data(tmp_path)
    cfg = DataConfig(on_bad_record="skip")
    cache = tmp_path / "run" / "data_check.json"
    first = LlavaData(cfg, b.tokenizer, b.image_processor, b.num_image_tokens, [DatasetSpec(str(p))],
                      check_cache=cache, progress=False)
    assert cache.is_file() and first.skipped == 4

    def no_second_check(self, progress):  # what another rank (or a resume) must not do
        raise AssertionError("the data check ran twice")

    monkeypatch.setattr(LlavaData, "_run_check", no_second_check)
    again = LlavaData(cfg, b.tokenizer, b.image_processor, b.num_image_tokens, [DatasetSpec(str(p))],
                      check_cache=cache, progress=False)
    assert [r.id for r in again.records] == [r.id for r in first.records]
    assert again.skip_reasons == first.skip_reasons and again.lengths == first.lengths
    # a changed data file (or setting) invalidates the cached result
    recs = json.loads(p.read_text())[:7]
    p.write_text(json.dumps(recs))
    with pytest.raises(AssertionError, match="ran twice"):
        LlavaData(cfg, b.tokenizer, b.image_processor, b.num_image_tokens, [DatasetSpec(str(p))],
                  check_cache=cache, progress=False)


def test_train_vision_false_freezes_a_random_tower_in_stage_2():
    default = build_model(ModelConfig(source="tiny", cache_dir=CACHE), stage=2).model
    frozen = build_model(ModelConfig(source="tiny", cache_dir=CACHE, train_vision=False), stage=2).model
    assert all(p.requires_grad for p in default.model.vision_tower.parameters())  # a random tower trains
    assert not any(p.requires_grad for p in frozen.model.vision_tower.parameters())
    assert all(p.requires_grad for p in frozen.model.multi_modal_projector.parameters())
    assert any(p.requires_grad for n, p in frozen.named_parameters() if ".router." in n)


def test_two_ranks_check_once_and_aggregate_skips(tmp_path):
    """Two gloo ranks, two DataLoader workers each: the cached up-front check is reused by both
    ranks, and a record that fails at load (in some rank's worker, in both epochs) is counted
    once in summary.json."""
    import os
    import socket
    import subprocess

    from training.config import DataConfig, DatasetSpec
    from training.data import LlavaData

    p = _bad_data(tmp_path)
    run = tmp_path / "run"
    b = build_model(ModelConfig(source="tiny", cache_dir=CACHE), stage=2)
    LlavaData(DataConfig(on_bad_record="skip"), b.tokenizer, b.image_processor, b.num_image_tokens,
              [DatasetSpec(str(p), "bad")], check_cache=run / "data_check.json", progress=False)
    (p.parent / "ok3.jpg").write_bytes((p.parent / "ok3.jpg").read_bytes()[:300])  # breaks after the check
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ds = json.dumps([{"path": str(p), "domain": "bad"}])
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "python"), str(ROOT)]), "OMP_NUM_THREADS": "1"}
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                        str(port), "-m", "training.train", *TINY, f"data.builtin_dir={tmp_path}/data",
                        f"train.output_dir={run}", f"data.datasets={ds}", "data.on_bad_record=skip",
                        "train.num_epochs=2", "train.dataloader_workers=2", "train.per_device_batch_size=2"],
                       cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-4000:]
    assert "data check: decoding" not in r.stderr and r.stderr.count("data check: reusing") == 2
    summary = json.loads((run / "summary.json").read_text())
    assert summary["skipped_by_reason"] == {"corrupt_image": 2, "missing_image": 1, "answer_truncated": 1,
                                            "image_tokens_do_not_fit": 1}
    assert summary["global_step"] == 4  # 7 records, global batch 4: 2 steps per epoch
