"""Streaming generation with per-token routing (training.generate.stream_answer), multi-turn
prompts, and the terminal chat (training.chat), on a tiny random run (tests/tiny_run.py)."""
from __future__ import annotations

import io
import json

import pytest
import torch

from tiny_run import tiny_run

from training.data import Collator, LlavaData  # noqa: E402
from training.generate import build_prompt, generate, load_run, pixel_values, stream_answer  # noqa: E402
from training.model import mole_modules  # noqa: E402


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    run_dir, images = tiny_run(tmp_path_factory)
    built, cfg = load_run(run_dir, device="cpu")
    return run_dir, images, built, cfg


def _image(images, i=1):
    from PIL import Image

    with Image.open(images / "images" / f"shape_{i:04d}.png") as im:
        return im.convert("RGB")


@pytest.mark.parametrize("with_image", [True, False])
def test_stream_answer_equals_generate_and_routes_every_token(run, with_image):
    _, images, built, cfg = run
    img = _image(images) if with_image else None
    history = [] if with_image else [("What is 2 plus 3?", "5")]
    events = list(stream_answer(built, cfg, "What colour is the shape?", img, history, max_new_tokens=7))
    final = events[-1]
    assert final["done"] and all(not e.get("done") for e in events[:-1])
    assert "".join(e["text"] for e in events[:-1]).strip() == final["answer"]
    assert final["answer"] == generate(built, cfg, "What colour is the shape?", img, 7, history=history).strip()
    # the routing read during decoding equals a teacher-forced pass over prompt + answer tokens
    ids = build_prompt(built, cfg.data.template, "What colour is the shape?", img is not None, history)
    new = final["ids"]
    assert new and final["tokens"] == [built.tokenizer.decode([t]) for t in new]
    full = torch.cat([ids, torch.tensor([new])], 1)
    kw = {"pixel_values": pixel_values(built, [img])} if img is not None else {}
    with torch.no_grad():
        built.model(input_ids=full, attention_mask=torch.ones_like(full), **kw)
    P = ids.shape[1]
    forced = [[int(m.last_routing.expert[P + i]) for _, m in mole_modules(built.model)] for i in range(len(new))]
    assert final["experts"] == forced
    K = final["num_experts"]
    for li, row in enumerate(final["load"]):
        want = [sum(r[li] == k for r in forced) / len(forced) for k in range(K)]
        assert row == pytest.approx(want, abs=1e-4)


def test_multi_turn_prompt_matches_training_encoding(run, tmp_path):
    _, images, built, cfg = run
    rec = {"id": "two-turns", "image": str(images / "images" / "shape_0001.png"), "conversations": [
        {"from": "human", "value": "<image>\nWhat colour is the shape?"}, {"from": "gpt", "value": "Red."},
        {"from": "human", "value": "And its shape?"}, {"from": "gpt", "value": "A circle."}]}
    f = tmp_path / "conv.json"
    f.write_text(json.dumps([rec]))
    from training.config import DatasetSpec

    ds = LlavaData(cfg.data, built.tokenizer, built.image_processor, built.num_image_tokens, [DatasetSpec(str(f))])
    item = ds[0]
    ids = build_prompt(built, cfg.data.template, "And its shape?", True, [("What colour is the shape?", "Red.")])[0]
    # the training sequence starts with exactly the prompt of the second turn, then its answer
    assert torch.equal(item["input_ids"][:len(ids)], ids)
    assert (item["labels"][:len(ids)] == -100).sum() < len(ids)  # the first answer is inside, labelled
    assert (item["labels"][len(ids):] != -100).all()
    assert Collator(built.tokenizer.pad_token_id)([item])["input_ids"].shape[1] == len(item["input_ids"])


def test_chat_cli_multi_turn_commands_and_routing(run, tmp_path):
    from training.chat import main

    run_dir, images, built, _ = run
    script = "\n".join([
        "What colour is the shape?", "And its shape?", "/image /no/such/file.png", "/bogus", "/text",
        "What is 2 plus 3?", "/reset", "", "/quit", "never read"]) + "\n"
    out = io.StringIO()
    assert main(["--run", str(run_dir), "--image", str(images / "images" / "shape_0001.png"), "--device", "cpu",
                 "--max-new-tokens", "4", "--experts-layer", "-1"], stdin=io.StringIO(script), stdout=out) == 0
    text = out.getvalue()
    assert text.count("ASSISTANT> ") == 3
    assert text.count(f"experts in {built.mole_layers[-1]}:") == 3
    assert "image /no/such/file.png does not exist" in text and "unknown command /bogus" in text
    assert "new conversation without an image" in text and "conversation reset" in text
    with pytest.raises(SystemExit):
        main(["--run", str(run_dir), "--image", str(tmp_path / "missing.png")])
    with pytest.raises(SystemExit):
        main(["--run", str(run_dir), "--device", "cpu", "--experts-layer", "9"], stdin=io.StringIO(""), stdout=io.StringIO())


def test_chat_keeps_history(run):
    from training.chat import Chat

    _, images, built, cfg = run
    chat = Chat(built, cfg, _image(images), max_new_tokens=3)
    a1 = [e for e in chat.ask("What colour is the shape?") if e.get("done")][0]["answer"]
    a2 = [e for e in chat.ask("Are you sure?") if e.get("done")][0]["answer"]
    assert chat.history == [("What colour is the shape?", a1), ("Are you sure?", a2)]
    # the second answer is conditioned on the first turn
    assert a2 == generate(built, cfg, "Are you sure?", _image(images), 3,
                          history=[("What colour is the shape?", a1)]).strip()
