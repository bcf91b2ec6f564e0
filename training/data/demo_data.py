"""The small generated data set of ``make demo`` and the tests (PIL drawings, made once per
(per_domain, seed, size) and cached).

Three stage-2 domains, each answerable in a few words, so that a CPU run of a few minutes learns
something measurable:

- ``shapes``: one large shape (circle, square or triangle) filling most of a white picture; "What
  colour is the shape?" (red, green, blue, yellow, equally often): one question type with four
  answers, readable from the picture's mean colour, so a random vision tower and the projector
  learn it in a few dozen steps;
- ``charts``: a bar chart of 2-4 tall bars of one colour; "How many bars are there?" (the
  shaded area grows with the count, which a small random vision tower can pick up);
- ``text``: no image, "What is P plus R?" for P, R in 1..20 (the language model mostly knows
  this; training teaches the short answer format).

``caption`` (stage 1) describes every shape picture and every other chart in one sentence ("A red
circle.", "A bar chart with 3 bars."): two thirds of stage 1 teach the colours.
``best_fixed_answer`` scores the best single constant answer on a test set: the baseline a trained
model has to beat.
"""
from __future__ import annotations

import json
import os
import random
from collections import Counter
from pathlib import Path

from ..config import DatasetSpec

VERSION = "v4"
COLORS = {"red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 80, 220), "yellow": (230, 200, 30)}
SHAPES = ["circle", "square", "triangle"]
BAR_COUNTS = (2, 3, 4)


def _draw_shape(draw, shape, color, box):
    x0, y0, x1, y1 = box
    if shape == "circle":
        draw.ellipse(box, fill=color)
    elif shape == "square":
        draw.rectangle(box, fill=color)
    else:
        draw.polygon([((x0 + x1) // 2, y0), (x1, y1), (x0, y1)], fill=color)


def _qa(question: str, answer: str, image: str | None, rid: str) -> dict:
    rec = {"id": rid}
    if image is not None:
        rec["image"] = image
        question = "<image>\n" + question
    rec["conversations"] = [{"from": "human", "value": question}, {"from": "gpt", "value": answer}]
    return rec


def make_builtin(out_dir: str | os.PathLike, per_domain: int = 48, seed: int = 0, size: int = 64) -> dict[str, list[DatasetSpec]]:
    """Generate the data set once into ``out_dir``; returns the dataset specs: ``caption`` (stage
    1: captions of every image) and ``instruct`` (stage 2: ``shapes``, ``charts``, ``text``)."""
    from PIL import Image, ImageDraw

    if per_domain < 1 or size < 16:
        raise ValueError(f"per_domain must be >= 1 and size >= 16, got per_domain={per_domain}, size={size}")
    out = Path(out_dir) / f"{VERSION}-n{per_domain}-s{seed}-px{size}"
    files = {k: out / f"{k}.json" for k in ("shapes", "charts", "text", "caption")}
    if not all(f.is_file() for f in files.values()):
        rng = random.Random(seed)
        tmp = out.with_name(out.name + f".tmp{os.getpid()}")
        (tmp / "images").mkdir(parents=True, exist_ok=True)
        recs = {k: [] for k in files}
        colours = [list(COLORS)[i % len(COLORS)] for i in range(per_domain)]  # balanced classes
        rng.shuffle(colours)
        for i in range(per_domain):
            # shapes: one large shape; its colour
            shape, cname = rng.choice(SHAPES), colours[i]
            img = Image.new("RGB", (size, size), (255, 255, 255))
            s = rng.randint(size * 3 // 4, size * 15 // 16)
            x, y = rng.randint(0, size - s), rng.randint(0, size - s)
            _draw_shape(ImageDraw.Draw(img), shape, COLORS[cname], (x, y, x + s - 1, y + s - 1))
            name = f"images/shape_{i:04d}.png"
            img.save(tmp / name)
            recs["shapes"].append(_qa("What colour is the shape?", f"{cname.capitalize()}.", name, f"shapes-{i}"))
            recs["caption"].append(_qa("Describe the image briefly.", f"A {cname} {shape}.", name, f"cap-shape-{i}"))
            # charts: n tall bars of equal width, evenly spaced
            n = rng.choice(BAR_COUNTS)
            img = Image.new("RGB", (size, size), (245, 245, 245))
            d = ImageDraw.Draw(img)
            bw = size // 8
            gap = (size - n * bw) // (n + 1)
            for k in range(n):
                h = rng.randint(7, 9) * (size - 8) // 10
                x0 = gap + k * (bw + gap)
                d.rectangle((x0, size - 4 - h, x0 + bw - 1, size - 4), fill=(60, 90, 200))
            name = f"images/chart_{i:04d}.png"
            img.save(tmp / name)
            recs["charts"].append(_qa("How many bars are there?", f"{n}", name, f"charts-{i}"))
            if i % 2 == 0:
                recs["caption"].append(_qa("Describe the image briefly.", f"A bar chart with {n} bars.", name,
                                           f"cap-chart-{i}"))
            # text: no image, short arithmetic
            p, r = rng.randint(1, 20), rng.randint(1, 20)
            recs["text"].append(_qa(f"What is {p} plus {r}?", f"{p + r}", None, f"text-{i}"))
        for key, rs in recs.items():
            (tmp / f"{key}.json").write_text(json.dumps(rs, indent=1))
        try:
            tmp.rename(out)
        except OSError:  # another process made it first
            if not out.is_dir():
                raise
    return {
        "caption": [DatasetSpec(str(files["caption"]), "caption", 1.0)],
        "instruct": [
            DatasetSpec(str(files["shapes"]), "shapes", 1.0),
            DatasetSpec(str(files["charts"]), "charts", 0.5),
            DatasetSpec(str(files["text"]), "text", 0.5),
        ],
    }


def best_fixed_answer(records: list[dict]) -> tuple[str, float]:
    """The constant answer that scores best (exact match) on ``records``, and its score."""
    from ..metrics import exact_match

    answers = [next(t["value"] for t in r["conversations"][::-1] if t["from"] == "gpt") for r in records]
    if not answers:
        raise ValueError("best_fixed_answer needs at least one record")
    best, score = "", -1.0
    for cand, _ in Counter(answers).most_common():
        s = sum(exact_match(cand, a) for a in answers) / len(answers)
        if s > score:
            best, score = cand, s
    return best, score
