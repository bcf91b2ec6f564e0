"""The PEFT-style library API (mole_ext.adapter) on tiny random transformers models built
offline: LLaMA, Mistral, Qwen2 and a LLaVA wrapper around LLaMA."""
from __future__ import annotations

import json

import pytest
import torch
from torch import nn

import mole_ext
from mole_ext import LoRALinear, MoLEConfig, MoLEFFN, from_pretrained, get_mole_model, save_pretrained

transformers = pytest.importorskip("transformers")

FAMILIES = ("llama", "mistral", "qwen2")


def tiny_lm(family: str, seed: int = 0, dtype=torch.float32):
    from transformers import AutoModelForCausalLM, LlamaConfig, MistralConfig, Qwen2Config

    kind = {"llama": LlamaConfig, "mistral": MistralConfig, "qwen2": Qwen2Config}[family]
    cfg = kind(vocab_size=96, hidden_size=32, intermediate_size=48, num_hidden_layers=3, num_attention_heads=4,
               num_key_value_heads=2, max_position_embeddings=64)
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(cfg).to(dtype).eval()


def tiny_llava(seed: int = 0):
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

    text = LlamaConfig(vocab_size=96, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                       num_key_value_heads=4, max_position_embeddings=64)
    vision = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                              image_size=32, patch_size=16, projection_dim=32)
    torch.manual_seed(seed)
    return LlavaForConditionalGeneration(LlavaConfig(vision_config=vision, text_config=text, image_token_id=95)).eval()


def _randomize_adapter(model, seed=1):
    torch.manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.normal_(0, 0.1)


IDS = torch.randint(0, 95, (2, 7), generator=torch.Generator().manual_seed(3))


@pytest.mark.parametrize("family", FAMILIES)
def test_inject_train_save_load(family, tmp_path):
    base_logits = tiny_lm(family)(input_ids=IDS).logits
    model = get_mole_model(tiny_lm(family), MoLEConfig(num_experts=3, rank=4, alpha=8))
    layers = model.model.layers
    assert all(isinstance(l.mlp, MoLEFFN) for l in layers)
    assert all(isinstance(getattr(l.self_attn, p), LoRALinear) for l in layers for p in ("q_proj", "k_proj", "v_proj", "o_proj"))
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".lora_A" in n or ".lora_B" in n or ".router." in n for n in trainable)
    assert len(trainable) == 3 * (3 * 2 + 2 + 4 * 2)  # per layer: 3 MoLE projections, router, 4 attention LoRAs
    if family == "qwen2":  # q/k/v carry a bias, which stays frozen base weight
        assert layers[0].self_attn.q_proj.bias is not None and not layers[0].self_attn.q_proj.bias.requires_grad
    with torch.no_grad():  # a fresh adapter is the identity (lora_B = 0)
        torch.testing.assert_close(model(input_ids=IDS).logits, base_logits, rtol=1e-5, atol=1e-5)

    _randomize_adapter(model)
    model.train()
    model(input_ids=IDS, labels=IDS).loss.backward()
    grads = {n for n, p in model.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
    assert grads and grads <= trainable and any(".router." in n for n in grads)
    model.eval()
    with torch.no_grad():
        want = model(input_ids=IDS).logits
    assert not torch.allclose(want, base_logits, atol=1e-3)

    save_pretrained(model, tmp_path)
    meta = json.loads((tmp_path / "mole_adapter_config.json").read_text())
    assert (meta["format"], meta["format_version"], meta["config"]["num_experts"]) == ("mole_ext-adapter", 1, 3)
    assert meta["mole_modules"] == [f"model.layers.{i}.mlp" for i in range(3)]
    loaded = from_pretrained(tiny_lm(family), tmp_path)
    assert not any(p.requires_grad for p in loaded.parameters()) and not loaded.training
    with torch.no_grad():
        assert torch.equal(loaded(input_ids=IDS).logits, want)
    again = from_pretrained(tiny_lm(family), tmp_path, is_trainable=True)
    assert {n for n, p in again.named_parameters() if p.requires_grad} == trainable


def test_layers_regex_predicate_and_no_attention_lora():
    m = get_mole_model(tiny_lm("llama"), MoLEConfig(layers=[0, 2], attn_lora_targets=None, gate_mode="none",
                                                    routing="dense", num_experts=2, rank=2, alpha=4))
    assert [isinstance(l.mlp, MoLEFFN) for l in m.model.layers] == [True, False, True]
    assert not any(isinstance(x, LoRALinear) for x in m.modules())
    assert (m.model.layers[2].mlp.gate_mode, m.model.layers[2].mlp.routing, m.model.layers[2].mlp.scaling) == ("none", "dense", 2.0)

    m = get_mole_model(tiny_lm("mistral"), MoLEConfig(target_modules=r"model\.layers\.1\.mlp", attn_lora_targets=["v_proj"],
                                                      attn_lora_layers=[2]))
    assert [isinstance(l.mlp, MoLEFFN) for l in m.model.layers] == [False, True, False]
    assert [n for n, x in m.named_modules() if isinstance(x, LoRALinear)] == ["model.layers.2.self_attn.v_proj"]

    pred = lambda name, mod: name.endswith(".mlp") and name != "model.layers.0.mlp"  # noqa: E731
    m = get_mole_model(tiny_lm("qwen2"), MoLEConfig(target_modules=pred, attn_lora_targets=None))
    assert [isinstance(l.mlp, MoLEFFN) for l in m.model.layers] == [False, True, True]
    assert m.mole_config.to_dict()["target_modules"] is None  # the saved module list stands in for it


def test_llava_language_model_only_with_modules_to_save(tmp_path):
    cfg = MoLEConfig(num_experts=2, rank=4, alpha=8, modules_to_save=["multi_modal_projector"])
    model = get_mole_model(tiny_llava(), cfg)
    names = {n for n, x in model.named_modules() if isinstance(x, (LoRALinear, MoLEFFN))}
    assert names and all(n.startswith("model.language_model.layers.") for n in names)  # CLIP's q_proj untouched
    assert len([n for n in names if n.endswith(".mlp")]) == 2
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert {"model.multi_modal_projector.linear_1.weight", "model.multi_modal_projector.linear_2.bias"} <= trainable
    assert not any("vision_tower" in n for n in trainable)
    _randomize_adapter(model)
    pixels = torch.randn(1, 3, 32, 32)
    ids = torch.tensor([[1, 95, 95, 95, 95, 5, 6, 7]])
    with torch.no_grad():
        want = model(input_ids=ids, pixel_values=pixels).logits
    save_pretrained(model, tmp_path)
    loaded = from_pretrained(tiny_llava(), tmp_path)
    with torch.no_grad():
        assert torch.equal(loaded(input_ids=ids, pixel_values=pixels).logits, want)
        torch.testing.assert_close(loaded.model.multi_modal_projector.linear_1.weight,
                                   model.model.multi_modal_projector.linear_1.weight, rtol=0, atol=0)


def test_adapter_dtype_float32_on_bfloat16_base():
    m = get_mole_model(tiny_lm("llama", dtype=torch.bfloat16), MoLEConfig(rank=4, alpha=8))
    adapter = {n: p for n, p in m.named_parameters() if p.requires_grad}
    assert adapter and all(p.dtype == torch.float32 for p in adapter.values())
    assert m.model.layers[0].mlp.up_proj.weight.dtype == torch.bfloat16
    _randomize_adapter(m)
    m.train()
    out = m(input_ids=IDS, labels=IDS)
    assert out.logits.dtype == torch.bfloat16
    out.loss.backward()
    assert all(p.grad is not None and p.grad.dtype == torch.float32 for p in adapter.values())
    follow = get_mole_model(tiny_lm("llama", dtype=torch.bfloat16), MoLEConfig(adapter_dtype=None))
    assert all(p.dtype == torch.bfloat16 for p in follow.parameters())
    f64 = get_mole_model(tiny_lm("llama", dtype=torch.float64), MoLEConfig())  # float32 only upcasts 16-bit bases
    assert all(p.dtype == torch.float64 for p in f64.parameters())


def test_lora_linear_matches_peft_lora_linear():
    peft = pytest.importorskip("peft")
    torch.manual_seed(0)
    lin = nn.Linear(16, 8, bias=True)
    ours = LoRALinear(nn.Linear(16, 8, bias=True), 4, 8)
    ours.weight.data.copy_(lin.weight.data)
    ours.bias.data.copy_(lin.bias.data)
    wrapped = nn.Sequential(lin)
    pm = peft.get_peft_model(wrapped, peft.LoraConfig(r=4, lora_alpha=8, target_modules=["0"]))
    layer = pm.base_model.model[0]
    with torch.no_grad():
        ours.lora_B.normal_()
        layer.lora_A["default"].weight.copy_(ours.lora_A)
        layer.lora_B["default"].weight.copy_(ours.lora_B)
    x = torch.randn(5, 16)
    with torch.no_grad():
        assert torch.equal(ours(x), pm(x))
        merged = ours.merged()
        torch.testing.assert_close(merged(x), ours(x), rtol=1e-5, atol=1e-5)


def test_bad_config_and_bad_targets_named(tmp_path):
    for kw, word in (({"num_experts": 0}, "num_experts"), ({"rank": 2.0}, "rank"), ({"dropout": 1.0}, "dropout"),
                     ({"gate_mode": "soft"}, "gate_mode"), ({"routing": "top2"}, "routing"),
                     ({"layers": 3}, "layers"), ({"target_modules": 5}, "target_modules"),
                     ({"target_modules": "("}, "regular expression"), ({"adapter_dtype": "int8"}, "adapter_dtype"),
                     ({"modules_to_save": "x"}, "modules_to_save")):
        with pytest.raises(ValueError, match=word):
            MoLEConfig(**kw)
    with pytest.raises(TypeError, match="not a SwiGLU MLP"):
        get_mole_model(tiny_lm("llama"), MoLEConfig(target_modules=["self_attn"]))
    with pytest.raises(ValueError, match="matched no module"):
        get_mole_model(tiny_lm("llama"), MoLEConfig(target_modules=["ffn"], attn_lora_targets=None))
    with pytest.raises(ValueError, match=r"layers has \[7\], but the model has layers 0..2"):
        get_mole_model(tiny_lm("llama"), MoLEConfig(layers=[7]))
    m = get_mole_model(tiny_lm("llama"), MoLEConfig())
    with pytest.raises(ValueError, match="already carries"):
        get_mole_model(m, MoLEConfig())
    with pytest.raises(TypeError, match="MoLEConfig"):
        get_mole_model(tiny_lm("llama"), {"rank": 4})
    save_pretrained(m, tmp_path)
    meta = json.loads((tmp_path / "mole_adapter_config.json").read_text())
    meta["format_version"] = 99
    (tmp_path / "mole_adapter_config.json").write_text(json.dumps(meta))
    with pytest.raises(ValueError, match="format_version 99"):
        from_pretrained(tiny_lm("llama"), tmp_path)
    with pytest.raises(FileNotFoundError, match="not a mole_ext adapter"):
        from_pretrained(tiny_lm("llama"), tmp_path / "nowhere")
    save_pretrained(m, tmp_path / "ok")
    with pytest.raises(ValueError, match="does not fit"):  # another architecture's names
        from_pretrained(tiny_llava(), tmp_path / "ok")
    assert mole_ext.adapter.FORMAT_VERSION == 1
