"""python -m training.export on a tiny trained run: a PEFT adapter + the MoLE adapter, a merged
transformers model + the MoLE adapter, --base for a moved base model, and old runs still read.
fp32 CPU logits: the training-time model, PEFT-loaded + MoLE and the run adapter reloaded are
bit-identical; the merged model differs only by the rounding of W + s B A."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

peft = pytest.importorskip("peft")

import mole_ext  # noqa: E402
from test_training import _data, tiny_cfg  # noqa: E402
from training import checkpoint as ck  # noqa: E402
from training.data import Collator, make_builtin  # noqa: E402
from training.export import export_run, load_run_model, main  # noqa: E402
from training.model import build_base  # noqa: E402


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    from training.trainer import run_training

    tmp = tmp_path_factory.mktemp("export")
    cfg = tiny_cfg(tmp, "train.max_steps=2", "train.lr=2e-2", "train.projector_lr=2e-2", "data.samples_per_epoch=8",
                   "model.dropout=0.1")
    s = run_training(cfg)
    model = s["trainer"].model.eval()
    built_specs = make_builtin(tmp / "probe", per_domain=8, seed=0, size=64)["instruct"]
    from training.model import build_model

    probe = build_model(cfg.model, stage=1)  # tokenizer and image processor for the batch
    ds = _data(probe, built_specs)
    batch = Collator(probe.tokenizer.pad_token_id)([ds[0], ds[9], ds[len(ds) - 1]])
    batch.pop("labels"), batch.pop("domain")
    with torch.no_grad():
        logits = model(**batch).logits
    return cfg, Path(cfg.train.output_dir), batch, logits


def _logits(model, batch):
    with torch.no_grad():
        return model.eval()(**batch).logits


def test_peft_export_loads_with_peft_and_mole(run, tmp_path):
    cfg, run_dir, batch, want = run
    out = tmp_path / "peft"
    r = subprocess.run([sys.executable, "-m", "training.export", "--run", str(run_dir), "--out", str(out)],
                       cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert Path(r.stdout.strip().splitlines()[-1]) == out
    pc = peft.PeftConfig.from_pretrained(str(out))
    assert (pc.peft_type, pc.r, pc.lora_alpha) == (peft.PeftType.LORA, cfg.model.rank, cfg.model.alpha)
    assert sorted(pc.modules_to_save) == ["multi_modal_projector", "vision_tower"]
    meta = json.loads((out / "mole_adapter_config.json").read_text())
    assert meta["attn_lora_modules"] == [] and len(meta["mole_modules"]) == cfg.model.tiny_layers
    assert meta["extra"]["run_config"] == cfg.to_dict()

    base = build_base(cfg.model)[0]
    with torch.no_grad():
        assert not torch.allclose(_logits(base, batch), want, atol=1e-3)  # the run changed the model
    pm = peft.PeftModel.from_pretrained(base, str(out))
    n_lora = sum(isinstance(m, peft.tuners.lora.LoraLayer) for m in pm.modules())
    assert n_lora == 4 * cfg.model.tiny_layers  # q/k/v/o of the language model only, not CLIP's
    model = mole_ext.from_pretrained(pm.get_base_model(), out)
    assert torch.equal(_logits(pm, batch), want)
    assert isinstance(model.model.language_model.layers[0].mlp, mole_ext.MoLEFFN)


def test_merged_export_loads_with_transformers(run, tmp_path):
    from transformers import LlavaForConditionalGeneration

    cfg, run_dir, batch, want = run
    out = tmp_path / "merged"
    assert main(["--run", str(run_dir), "--out", str(out), "--merge"]) == 0
    assert not (out / "adapter_config.json").exists()
    model = LlavaForConditionalGeneration.from_pretrained(out, dtype=torch.float32)
    base = build_base(cfg.model)[0]
    q, q0 = model.model.language_model.layers[0].self_attn.q_proj.weight, base.model.language_model.layers[0].self_attn.q_proj.weight
    assert not torch.allclose(q, q0)  # the attention LoRA is in the weights
    model = mole_ext.from_pretrained(model, out)
    got = _logits(model, batch)
    # W + s B A is rounded once per weight: equal up to float32 rounding, not bit for bit
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    # without the MoLE adapter the logits are off: the experts matter
    plain = LlavaForConditionalGeneration.from_pretrained(out, dtype=torch.float32)
    assert not torch.allclose(_logits(plain, batch), want, atol=1e-4)


def test_base_override_for_a_moved_llava_base_and_old_runs(run, tmp_path):
    """A run on a local LLaVA directory that has since moved: a clear error without --base, the
    same logits with it. A run written before the rename (adapter_config.json) still loads."""
    cfg, run_dir, batch, want = run
    base, tok, proc, _ = build_base(cfg.model)
    llava = tmp_path / "moved-llava"
    base.save_pretrained(llava)
    tok.save_pretrained(llava)
    proc.save_pretrained(llava)
    meta, tensors = ck.read_adapter(run_dir / "adapter")
    rc = json.loads(json.dumps(meta["config"]["run_config"]))
    rc["model"].update(source="llava", llava_path=str(tmp_path / "was-here"))
    adapter = ck.export_adapter(tmp_path / "run" / "adapter", tensors, {"run_config": rc})
    with pytest.raises(FileNotFoundError, match="was-here.*--base"):
        load_run_model(adapter, device="cpu")
    built, _ = load_run_model(adapter, device="cpu", base=str(llava))
    assert torch.equal(_logits(built.model, batch), want)
    assert main(["--run", str(tmp_path / "run"), "--out", str(tmp_path / "x")]) == 2  # the CLI says it, no traceback
    out = export_run(tmp_path / "run", tmp_path / "peft", base=str(llava))
    assert peft.PeftConfig.from_pretrained(str(out)).base_model_name_or_path == str(llava)
    with pytest.raises(ValueError, match="--base applies to sources"):
        load_run_model(run_dir / "adapter", device="cpu", base=str(llava))  # a tiny run has no base path

    old = tmp_path / "old"
    shutil.copytree(run_dir / "adapter", old)
    (old / ck.ADAPTER_META).rename(old / "adapter_config.json")
    built, _ = load_run_model(old, device="cpu")
    assert torch.equal(_logits(built.model, batch), want)
    (old / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA"}))  # a PEFT file is not ours
    with pytest.raises(ck.CheckpointError, match="not a mole_ext run adapter"):
        load_run_model(old, device="cpu")
