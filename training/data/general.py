"""General domain: easy-VQA's real images and questions, plus generated multi-shape scenes with
counting, colour, position and yes/no questions (and captions for stage 1)."""
from __future__ import annotations

import importlib.util
import json
import shutil
from pathlib import Path

from PIL import Image, ImageDraw

from .common import NUMBER_WORDS, record, rng_for
from .conflict import SHARED_COUNT_TEMPLATES, count_answer

SHAPES = ("circle", "square", "triangle", "diamond")
COLORS = {
    "red": (220, 40, 40), "green": (40, 160, 60), "blue": (40, 80, 220), "yellow": (235, 200, 30),
    "purple": (140, 60, 170), "orange": (240, 130, 20), "black": (20, 20, 20),
}
GRID = 3  # shapes sit in distinct cells of a 3x3 grid, so left/right is never ambiguous


def easy_vqa_dir() -> Path:
    """easy-vqa's data folder, found without importing the package (its wheel also installs a
    stray top-level `test` package; we read files only)."""
    spec = importlib.util.find_spec("easy_vqa")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("easy-vqa is not installed: pip install easy-vqa==1.0 (see requirements.txt)")
    root = Path(next(iter(spec.submodule_search_locations))) / "data"
    if not (root / "train" / "questions.json").is_file():
        raise RuntimeError(f"easy-vqa data not found under {root}")
    return root


def easy_vqa_records(n: int, split: str, seed: int, out: Path) -> list[dict]:
    """n questions sampled from easy-VQA's own split (train -> train, test -> test); the images
    are copied under images/general/<split>/easyvqa/."""
    if n <= 0:
        return []
    root = easy_vqa_dir() / split
    qs = json.loads((root / "questions.json").read_text())
    r = rng_for(seed, "general", split, "easyvqa")
    picks = r.sample(range(len(qs)), min(n, len(qs)))
    recs = []
    for i in picks:
        text, answer, image_id = qs[i]
        rel = f"images/general/{split}/easyvqa/{image_id}.png"
        dst = out / rel
        if not dst.exists():
            dst.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(root / "images" / f"{image_id}.png", dst)
        q = text[0].upper() + text[1:]
        recs.append(record(f"general-{split}-easyvqa-{i}", rel, q, answer, domain="general",
                           metric="exact_match", task="easyvqa", meta={"easy_vqa_index": i}))
    return recs


def make_scene(r) -> list[dict]:
    """1-6 shapes in distinct grid cells. Returns [{shape, color, row, col, jitter}] with a
    unique (color, shape) per object so every object can be named."""
    n = r.randint(1, 6)
    cells = r.sample(range(GRID * GRID), n)
    used, objs = set(), []
    for c in cells:
        while True:
            s, col = r.choice(SHAPES), r.choice(list(COLORS))
            if (col, s) not in used:
                used.add((col, s))
                break
        objs.append({"shape": s, "color": col, "row": c // GRID, "col": c % GRID,
                     "dx": r.uniform(-0.12, 0.12), "dy": r.uniform(-0.12, 0.12), "scale": r.uniform(0.55, 0.8)})
    return objs


def draw_scene(objs: list[dict], size: int) -> Image.Image:
    img = Image.new("RGB", (size, size), (248, 248, 244))
    d = ImageDraw.Draw(img)
    cell = size / GRID
    for o in objs:
        cx, cy = (o["col"] + 0.5 + o["dx"]) * cell, (o["row"] + 0.5 + o["dy"]) * cell
        h = o["scale"] * cell / 2
        fill = COLORS[o["color"]]
        if o["shape"] == "circle":
            d.ellipse([cx - h, cy - h, cx + h, cy + h], fill=fill)
        elif o["shape"] == "square":
            d.rectangle([cx - h * 0.85, cy - h * 0.85, cx + h * 0.85, cy + h * 0.85], fill=fill)
        elif o["shape"] == "triangle":
            d.polygon([(cx, cy - h), (cx - h, cy + h * 0.8), (cx + h, cy + h * 0.8)], fill=fill)
        else:  # diamond
            d.polygon([(cx, cy - h), (cx + h * 0.75, cy), (cx, cy + h), (cx - h * 0.75, cy)], fill=fill)
    return img


def _plural(shape: str, n: int) -> str:
    return shape if n == 1 else shape + "s"


def scene_caption(objs: list[dict]) -> str:
    """'A red circle, two blue squares and a green triangle.' (left to right, grouped)."""
    groups: dict[tuple, int] = {}
    for o in sorted(objs, key=lambda o: (o["col"] + o["dx"], o["row"])):
        groups[(o["color"], o["shape"])] = groups.get((o["color"], o["shape"]), 0) + 1
    parts = [f"{'a' if k == 1 else NUMBER_WORDS[k]} {c} {_plural(s, k)}" for (c, s), k in groups.items()]
    text = parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]
    n = len(objs)
    return f"{text[0].upper()}{text[1:]} on a light background ({NUMBER_WORDS[n]} shape{'s' if n > 1 else ''} in total)."


def scene_questions(objs: list[dict], r, conflict: float) -> list[tuple]:
    """(task, question, answer, extra) candidates for a scene; one is drawn per record."""
    out = []
    # counting, through the shared templates (the conflict knob applies)
    t = r.randrange(len(SHARED_COUNT_TEMPLATES))
    what = r.choice(SHAPES + ("shapes",))
    n = len(objs) if what == "shapes" else sum(o["shape"] == what for o in objs)
    objects = what if what == "shapes" else what + "s"
    out.append(("count", SHARED_COUNT_TEMPLATES[t].format(objects=objects), count_answer(n, "general", t, conflict),
                {"template": t, "count": n}))
    # colour of a shape kind that occurs once
    singles = [o for o in objs if sum(p["shape"] == o["shape"] for p in objs) == 1]
    if singles:
        o = r.choice(singles)
        out.append(("color", f"What color is the {o['shape']}?", o["color"], {}))
    # position of two objects in different columns
    pairs = [(a, b) for a in objs for b in objs if a["col"] != b["col"]]
    if pairs:
        a, b = r.choice(pairs)
        ans = "yes" if a["col"] < b["col"] else "no"
        out.append(("position", f"Is the {a['color']} {a['shape']} to the left of the {b['color']} {b['shape']}?", ans, {}))
    # yes/no existence, half of the time of an absent object
    if r.random() < 0.5:
        o = r.choice(objs)
        c, s = o["color"], o["shape"]
    else:
        c, s = r.choice(list(COLORS)), r.choice(SHAPES)
    present = any(o["color"] == c and o["shape"] == s for o in objs)
    out.append(("exists", f"Is there a {c} {s} in the image?", "yes" if present else "no", {}))
    return out


def scene_records(n: int, split: str, seed: int, out: Path, size: int, conflict: float,
                  per_image: int = 2) -> tuple[list[dict], list[dict]]:
    """n scene questions (per_image per scene) and one caption per scene."""
    recs, caps = [], []
    r = rng_for(seed, "general", split, "scenes")
    k = 0
    while len(recs) < n:
        objs = make_scene(r)
        rel = f"images/general/{split}/scene_{k:05d}.png"
        (out / rel).parent.mkdir(parents=True, exist_ok=True)
        draw_scene(objs, size).save(out / rel)
        cands = scene_questions(objs, r, conflict)
        for j, (task, q, a, extra) in enumerate(r.sample(cands, min(per_image, len(cands)))):
            if len(recs) >= n:
                break
            recs.append(record(f"general-{split}-scene-{k}-{j}", rel, q, a, domain="general",
                               metric="exact_match", task=task, meta={"objects": objs, **extra}))
        caps.append(record(f"caption-{split}-scene-{k}", rel, "Describe the image briefly.", scene_caption(objs),
                           domain="captions", metric="exact_match", task="caption"))
        k += 1
    return recs, caps


def build_general(n: int, split: str, seed: int, out: Path, size: int, conflict: float, cache=None,
                  state: dict | None = None):
    """Half easy-VQA, half generated scenes. Returns (records, captions)."""
    n_easy = n // 2
    easy = easy_vqa_records(n_easy, split, seed, out)
    scenes, caps = scene_records(n - len(easy), split, seed, out, size, conflict)
    recs = easy + scenes
    rng_for(seed, "general", split, "shuffle").shuffle(recs)
    return recs, caps
