"""training.evaluate writes LLaVA's answers JSONL, reads LLaVA's question JSONL, runs test sets
without answers (answered, not scored), resolves images against --image-root, and batches
generation without changing the answers. Tiny random run (tests/tiny_run.py)."""
from __future__ import annotations

import json
import shutil

import pytest

from tiny_run import tiny_run

from training.evaluate import main, read_questions  # noqa: E402

LLAVA_KEYS = {"question_id", "prompt", "text", "answer_id", "model_id", "metadata"}


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    return tiny_run(tmp_path_factory)


def _lines(path):
    return [json.loads(x) for x in path.read_text().splitlines()]


def test_answers_jsonl_with_and_without_answers(run, tmp_path):
    run_dir, data = run
    shapes = json.loads((data / "shapes.json").read_text())[:3]
    # LLaVA's question format, answers withheld, images under another root
    root = tmp_path / "imgs"
    shutil.copytree(data / "images", root / "images")
    questions = tmp_path / "questions.jsonl"
    questions.write_text("".join(json.dumps({"question_id": 100 + i, "image": r["image"], "category": "hidden",
                                             "text": r["conversations"][0]["value"].replace("<image>\n", "")}) + "\n"
                                 for i, r in enumerate(shapes)))
    answers = tmp_path / "out" / "answers.jsonl"
    assert main(["--run", str(run_dir), "--data", str(questions), "--answers-file", str(answers),
                 "--image-root", str(root), "--out", str(tmp_path / "eval"), "--max-new-tokens", "3",
                 "--batch-size", "2", "--model-id", "tiny-mole"]) == 0
    rows = _lines(answers)
    assert [r["question_id"] for r in rows] == [100, 101, 102]
    for r, rec in zip(rows, shapes):
        assert LLAVA_KEYS <= set(r) and r["model_id"] == "tiny-mole" and r["domain"] == "hidden"
        assert r["prompt"] == rec["conversations"][0]["value"].replace("<image>\n", "")
        assert "score" not in r and isinstance(r["text"], str)
    assert len({r["answer_id"] for r in rows}) == 3
    res = json.loads((tmp_path / "eval" / "eval.json").read_text())
    assert res["answered"] == 3 and res["scored"] == 0 and res["scores"]["n"] == 0

    # LLaVA-JSON with answers next to a record without one: scored where an answer exists
    mixed = [shapes[0], {"id": "open", "image": shapes[1]["image"],
                         "conversations": [{"from": "human", "value": "<image>\nWhat is this?"}]}]
    f = tmp_path / "imgs" / "mixed.json"
    f.write_text(json.dumps(mixed))
    assert main(["--run", str(run_dir), "--data", str(f), "--out", str(tmp_path / "eval2"),
                 "--max-new-tokens", "3"]) == 0
    rows = _lines(tmp_path / "eval2" / "answers.jsonl")
    assert [r["question_id"] for r in rows] == ["shapes-0", "open"]
    assert 0.0 <= rows[0]["score"] <= 1.0 and rows[0]["answer"] == shapes[0]["conversations"][1]["value"]
    assert "score" not in rows[1]
    res = json.loads((tmp_path / "eval2" / "eval.json").read_text())
    assert res["scored"] == 1 and res["scores"]["domains"]["mixed"]["n"] == 1
    assert set(res["answer_loss"]) == {"mixed", "all"}  # the loss pass ran on the answered record only


def test_batching_does_not_change_answers(run, tmp_path):
    run_dir, data = run
    out = {}
    for bs in (1, 5):
        assert main(["--run", str(run_dir), "--data", str(data / "shapes.json"), "--data", str(data / "text.json"),
                     "--limit", "4", "--batch-size", str(bs), "--max-new-tokens", "4", "--no-loss",
                     "--out", str(tmp_path / f"b{bs}")]) == 0
        out[bs] = [(r["question_id"], r["text"], r["score"]) for r in _lines(tmp_path / f"b{bs}" / "answers.jsonl")]
    assert out[1] == out[5] and len(out[1]) == 8


def test_bad_inputs_are_named(run, tmp_path):
    run_dir, data = run
    q = tmp_path / "q.jsonl"
    q.write_text(json.dumps({"question_id": 1, "image": "images/shape_0000.png", "text": "What?"}) + "\n")
    with pytest.raises(ValueError, match="--image-root"):  # images resolve next to q.jsonl by default
        main(["--run", str(run_dir), "--data", str(q), "--out", str(tmp_path / "e")])
    q.write_text(json.dumps({"question_id": 1, "image": "images/shape_0000.png"}) + "\n")
    with pytest.raises(ValueError, match="record 1: no question"):
        read_questions(q)
    with pytest.raises(ValueError, match="cannot read the test file"):
        read_questions(tmp_path / "missing.json")
    with pytest.raises(SystemExit):
        main(["--run", str(run_dir), "--data", str(q), "--batch-size", "0"])
    with pytest.raises(SystemExit):
        main(["--run", str(run_dir), "--data", str(q), "--image-root", str(tmp_path / "nope")])
