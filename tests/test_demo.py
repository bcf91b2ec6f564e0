"""The demo's generated data (training.data.demo_data) and `python -m training.demo` end to end on
the tiny random model (the SmolLM2 demo itself is `make demo`, timed in its docstring)."""
from __future__ import annotations

import json
from collections import Counter
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from training import checkpoint as ck  # noqa: E402
from training.data.demo_data import BAR_COUNTS, COLORS, SHAPES, best_fixed_answer, make_builtin  # noqa: E402

CACHE = ROOT / ".cache" / "mole_ext"


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_builtin(tmp_path_factory.mktemp("demo_data"), per_domain=12, seed=3, size=64)


def _records(spec):
    return json.loads(Path(spec.path).read_text())


def test_answers_match_the_pictures(data):
    from PIL import Image

    shapes, charts, text = (_records(s) for s in data["instruct"])
    root = Path(data["instruct"][0].path).parent
    for r in shapes:
        img = np.asarray(Image.open(root / r["image"]).convert("RGB")).reshape(-1, 3)
        q, a = r["conversations"][0]["value"], r["conversations"][1]["value"]
        assert q == "<image>\nWhat colour is the shape?"  # one question type: the colour
        ink = img[(img != 255).any(1)]
        assert ink.shape[0] > 0.25 * img.shape[0]  # a large shape: its colour dominates the picture
        colours, counts = np.unique(ink, axis=0, return_counts=True)
        assert tuple(colours[counts.argmax()]) == COLORS[a.rstrip(".").lower()]
    # the four colours equally often (12 records: 3 each), so the best constant answer scores 1/4
    assert sorted(Counter(r["conversations"][1]["value"] for r in shapes).values()) == [3, 3, 3, 3]
    for r in charts:
        img = np.asarray(Image.open(root / r["image"]).convert("RGB"))
        row = (img[-6] != 245).any(-1).astype(int)  # just above the baseline: every bar crosses it
        bars = int((np.diff(np.concatenate([[0], row])) == 1).sum())
        assert r["conversations"][1]["value"] == str(bars) and bars in BAR_COUNTS
    for r in text:
        p, q = map(int, r["conversations"][0]["value"][len("What is "):-1].split(" plus "))
        assert r["conversations"][1]["value"] == str(p + q) and "image" not in r
    caps = _records(data["caption"][0])  # every shape picture, every other chart
    assert len(caps) == len(shapes) + (len(charts) + 1) // 2 and all(c["image"] for c in caps)
    by_image = {c["image"]: c["conversations"][1]["value"] for c in caps}
    for r in shapes:
        colour, kind = by_image[r["image"]].rstrip(".").split()[1:]
        assert f"{colour.capitalize()}." == r["conversations"][1]["value"] and kind in SHAPES


def test_generation_is_cached_and_seeded(data, tmp_path):
    again = make_builtin(Path(data["instruct"][0].path).parents[1], per_domain=12, seed=3, size=64)
    assert [s.path for s in again["instruct"]] == [s.path for s in data["instruct"]]
    other = make_builtin(tmp_path, per_domain=12, seed=4, size=64)
    assert _records(other["instruct"][2]) != _records(data["instruct"][2])
    with pytest.raises(ValueError, match="per_domain"):
        make_builtin(tmp_path, per_domain=0)


def test_best_fixed_answer():
    recs = [{"conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": a}]}
            for a in ["Red.", "red", "Blue.", "A circle."]]
    best, score = best_fixed_answer(recs)
    assert best.lower().startswith("red") and score == 0.5  # answers are normalised like the metric
    with pytest.raises(ValueError):
        best_fixed_answer([])


def test_demo_end_to_end_on_the_tiny_model(tmp_path, capsys):
    from training.demo import main

    out = tmp_path / "run"
    assert main(["--model", "tiny", "--out", str(out), "--steps1", "1", "--steps2", "2", "--batch", "2",
                 "--test-per-domain", "2", "--cache-dir", str(CACHE)]) == 0
    text = capsys.readouterr().out
    assert "best fixed answer" in text and "untrained" in text
    assert "beats the best constant answer on:" in text
    assert "before/after" in text and "pictures:" in text and str(out / "loss_curve.png") in text
    for dom in ("shapes", "charts", "text"):
        assert f"  {dom}" in text
    m = json.loads((out / "metrics.json").read_text())
    assert set(m["eval_exact_match"]) == {"shapes", "charts", "text"}
    for v in m["eval_exact_match"].values():
        assert 0 <= v["untrained"] <= 1 and 0 <= v["trained"] <= 1 and 0 < v["best_fixed_score"] <= 1
    assert set(m["answer_loss"]) >= {"shapes", "charts", "text"}
    for f in ("config.json", "answers.jsonl", "answers_untrained.jsonl", "loss_curve.png", "routing_heatmap.png",
              "routing_eval_heatmap.png", "stage1/adapter/adapter.safetensors", "stage2/checkpoint-2/manifest.json",
              f"stage2/adapter/{ck.ADAPTER_META}"):
        assert (out / f).is_file(), f
    stages = {json.loads(x).get("stage") for x in (out / "metrics.jsonl").read_text().splitlines()}
    assert stages == {1, 2}
    rows = [json.loads(x) for x in (out / "answers.jsonl").read_text().splitlines()]
    assert len(rows) == 6 and all("score" in r for r in rows)
    assert text.strip().splitlines()[-1] == str(out.resolve())
