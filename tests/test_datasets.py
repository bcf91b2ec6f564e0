"""training.data: schema, determinism, answers consistent with what was drawn, the conflict
knob and the render cache, on a small build (about 30 s on 2 shared cores)."""
import csv
import hashlib
import json
import re
import sys
from decimal import Decimal
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from training.data import build_datasets, conflicted_templates, SHARED_COUNT_TEMPLATES
from training.data.charts import load_vega, local_vega_datasets, vega_dir
from training.data.common import NUMBER_WORDS
from training.data.general import COLORS, GRID, easy_vqa_dir
from training.data.medical import DAB_BINS, DAB_THRESHOLD, IHC_TEST_X, IHC_TILE
from training.metrics import METRICS

SMALL = dict(seed=3, per_domain=24, test_per_domain=12, size=160)
FILES = [f"{d}_{s}" for d in ("general", "charts", "medical") for s in ("train", "test")]


def load(out, name):
    return json.loads((Path(out) / f"{name}.json").read_text())


def tree_digest(root: Path) -> dict:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file() and p.name != "manifest.json"}


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("render_cache")


@pytest.fixture(scope="module")
def built(tmp_path_factory, cache_dir):
    out = tmp_path_factory.mktemp("data")
    manifest = build_datasets(out, conflict=0.5, cache_dir=cache_dir, **SMALL)
    return out, manifest


def all_records(out):
    return {name: load(out, name) for name in FILES}


# --- schema --------------------------------------------------------------------------------------

def test_files_and_counts(built):
    out, m = built
    for name in FILES:
        assert len(load(out, name)) == (24 if name.endswith("train") else 12), name
    caps = load(out, "captions")
    assert caps and all(c["domain"] == "captions" for c in caps)
    assert m["counts"]["captions"] == len(caps)


def test_records_are_valid_llava_json(built):
    out, _ = built
    ids = set()
    for name, recs in {**all_records(out), "captions": load(out, "captions")}.items():
        for r in recs:
            assert set(r) >= {"id", "image", "conversations", "domain", "metric"}, r
            assert r["id"] not in ids, f"duplicate id {r['id']}"
            ids.add(r["id"])
            assert r["domain"] == ("captions" if name == "captions" else name.split("_")[0])
            assert r["metric"] in METRICS
            (q, a), = [tuple(r["conversations"][i:i + 2]) for i in range(0, len(r["conversations"]), 2)]
            assert q["from"] == "human" and a["from"] == "gpt"
            assert q["value"].startswith("<image>\n") and q["value"].count("<image>") == 1
            assert isinstance(a["value"], str) and a["value"].strip() == a["value"] and a["value"]
            assert not Path(r["image"]).is_absolute()
            img = out / r["image"]
            assert img.is_file(), img


def test_images_open(built):
    out, _ = built
    for p in sorted((out / "images").rglob("*.png")):
        with Image.open(p) as im:
            im.verify()
    expect = {"chart": (160, 160), "doc": (160, 160), "scene": (160, 160), "tissue": (160, 160),
              "ihc": (IHC_TILE, IHC_TILE)}  # drawn at --size (tissue: at most 224); IHC native
    for p in (out / "images").rglob("*_*.png"):
        assert Image.open(p).size == expect[p.name.split("_")[0]], p


def test_training_loader_accepts_files(built):
    from training.config import DatasetSpec
    from training.data import parse_records

    out, _ = built
    for i, name in enumerate(FILES + ["captions"]):
        recs, skipped = parse_records(DatasetSpec(path=str(out / f"{name}.json"), domain=name), i, "error")
        assert skipped == 0 and len(recs) == len(load(out, name))


def test_no_test_image_in_train(built):
    out, _ = built
    for d in ("general", "charts", "medical"):
        train = {hashlib.sha256((out / r["image"]).read_bytes()).hexdigest() for r in load(out, f"{d}_train")}
        test = {hashlib.sha256((out / r["image"]).read_bytes()).hexdigest() for r in load(out, f"{d}_test")}
        assert not train & test, d


# --- determinism, cache --------------------------------------------------------------------------

def test_deterministic_by_seed_and_cache_transparent(built, tmp_path):
    out, _ = built
    again = tmp_path / "again"
    m = build_datasets(again, conflict=0.5, use_cache=False, **SMALL)  # everything redrawn, no cache
    assert m["cache"]["hits"] == 0
    assert tree_digest(out) == tree_digest(again)
    other = tmp_path / "other"
    build_datasets(other, conflict=0.5, use_cache=False, domains=("general",), **{**SMALL, "seed": 4})
    assert load(other, "general_train") != load(out, "general_train")


def test_cache_serves_second_build(built, cache_dir, tmp_path):
    out, first = built
    assert first["cache"]["misses"] > 0
    m = build_datasets(tmp_path / "warm", conflict=0.5, cache_dir=cache_dir, **SMALL)
    assert m["cache"]["misses"] == 0 and m["cache"]["hits"] == first["cache"]["misses"]
    assert tree_digest(tmp_path / "warm") == tree_digest(out)


def test_cold_build_renders_each_slow_image_once(built, cache_dir):
    """What kept the small build fast, as behaviour instead of a wall-clock bound: every cache
    miss rendered and stored exactly one image, and repeats were served from the cache."""
    _, m = built
    stored = sorted(p.name for p in Path(cache_dir).rglob("*.png"))
    assert m["cache"]["misses"] == len(stored) == len(set(stored)) > 0


# --- answers agree with what was drawn -----------------------------------------------------------

def test_easy_vqa_records_are_the_packages(built):
    out, _ = built
    for split in ("train", "test"):
        qs = json.loads((easy_vqa_dir() / split / "questions.json").read_text())
        recs = [r for r in load(out, f"general_{split}") if r["task"] == "easyvqa"]
        assert len(recs) == 12 if split == "train" else 6
        for r in recs:
            text, ans, image_id = qs[r["meta"]["easy_vqa_index"]]
            assert r["conversations"][1]["value"] == ans
            assert r["conversations"][0]["value"].lower().endswith(text)
            src = easy_vqa_dir() / split / "images" / f"{image_id}.png"
            assert (out / r["image"]).read_bytes() == src.read_bytes()


def test_easy_vqa_located_without_import():
    assert easy_vqa_dir().is_dir()
    assert "easy_vqa" not in sys.modules and "test.test_easy_vqa" not in sys.modules


def test_scene_answers_match_pixels(built):
    from scipy import ndimage

    out, _ = built
    recs = [r for s in ("train", "test") for r in load(out, f"general_{s}") if "objects" in r.get("meta", {})]
    assert recs
    for r in recs:
        objs = r["meta"]["objects"]
        img = np.asarray(Image.open(out / r["image"]).convert("RGB")).astype(int)
        size = img.shape[0]
        # every object's colour sits at its cell centre, and the picture has as many blobs as objects
        for o in objs:
            cx = int((o["col"] + 0.5 + o["dx"]) * size / GRID)
            cy = int((o["row"] + 0.5 + o["dy"]) * size / GRID)
            assert tuple(img[cy, cx]) == COLORS[o["color"]], (r["id"], o)
        fg = np.abs(img - np.array([248, 248, 244])).sum(-1) > 30
        assert ndimage.label(fg)[1] == len(objs), r["id"]
        q, a = r["conversations"][0]["value"], r["conversations"][1]["value"]
        if r["task"] == "count":
            m = re.search(r"(circle|square|triangle|diamond|shape)s", q)
            n = sum(1 for o in objs if m.group(1) in ("shape", o["shape"]))
            assert a in (str(n), NUMBER_WORDS[n]) and r["meta"]["count"] == n
        elif r["task"] == "color":
            shape = re.search(r"color is the (\w+)\?", q).group(1)
            assert a == next(o["color"] for o in objs if o["shape"] == shape)
        elif r["task"] == "exists":
            c, s = re.search(r"Is there a (\w+) (\w+) in", q).groups()
            assert a == ("yes" if any(o["color"] == c and o["shape"] == s for o in objs) else "no")
        elif r["task"] == "position":
            c1, s1, c2, s2 = re.search(r"Is the (\w+) (\w+) to the left of the (\w+) (\w+)\?", q).groups()
            o1 = next(o for o in objs if (o["color"], o["shape"]) == (c1, s1))
            o2 = next(o for o in objs if (o["color"], o["shape"]) == (c2, s2))
            assert a == ("yes" if o1["col"] < o2["col"] else "no")


def _vega_rows(name):
    """Independent reader of the bundled files (not the builder's)."""
    path = local_vega_datasets()[name]
    if path.suffix == ".json":
        return json.loads(path.read_text())
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def _field(row, key):
    m = re.fullmatch(r"(year|month)\((\w+)\)", key)
    if not m:
        return str(row[key])
    s = str(row[m.group(2)])
    if m.group(1) == "year":
        return re.findall(r"\d{4}", s)[0] if re.match(r"\d{4}", s) else s[-4:]
    months = ["Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec"]
    return months[int(s[5:7]) - 1] if re.match(r"\d{4}[-/]\d\d", s) else s[:3]


def _expected_value(spec, cat):
    rows = [r for r in _vega_rows(spec["dataset"]) if all(_field(r, k) == str(v) for k, v in spec["where"].items())]
    if spec.get("columns"):
        return Decimal(str(rows[0][cat]))
    vals = [r[spec["value"]] if spec["value"] else 1 for r in rows if _field(r, spec["by"]) == cat]
    vals = [Decimal(str(v)) for v in vals if v not in (None, "")]
    total = sum(vals)
    return total / len(vals) if spec["agg"] == "mean" else total


def test_chart_answers_match_vega_tables(built):
    out, _ = built
    recs = [r for s in ("train", "test") for r in load(out, f"charts_{s}") if "chart" in r.get("meta", {})]
    assert recs
    for r in recs:
        spec = r["meta"]["chart"]
        assert spec["dataset"] in local_vega_datasets()
        q = Decimal(1).scaleb(-spec["decimals"])
        for cat, shown in zip(spec["source_categories"], spec["values"]):
            assert _expected_value(spec, cat).quantize(q, rounding="ROUND_HALF_UP") == Decimal(shown), (spec, cat)
        cats, vals = spec["categories"], [Decimal(v) for v in spec["values"]]
        q_text, a = r["conversations"][0]["value"], r["conversations"][1]["value"]
        if r["task"] != "largest":
            assert r["metric"] == "relaxed_accuracy"
        if r["task"] == "value":
            cat = re.search(r"value for (.+)\?$", q_text).group(1)
            assert a == spec["values"][cats.index(cat)]
        elif r["task"] == "largest":
            assert vals[cats.index(a)] == max(vals) and vals.count(max(vals)) == 1
            assert r["metric"] == ("exact_match" if re.fullmatch(r"[\d.]+", a) else "relaxed_accuracy")
        elif r["task"] == "count":
            assert a == str(len(cats))  # charts always answer counts in digits
        elif r["task"] == "difference":
            c1, c2 = re.search(r"values for (.+) and (.+)\?$", q_text).groups()
            assert Decimal(a) == abs(vals[cats.index(c1)] - vals[cats.index(c2)])


def test_document_answers(built):
    out, _ = built
    recs = [r for s in ("train", "test") for r in load(out, f"charts_{s}") if "document" in r.get("meta", {})]
    assert recs and all(r["metric"] == "anls" for r in recs)
    for r in recs:
        doc, a = r["meta"]["document"], r["conversations"][1]["value"]
        if doc["type"] == "receipt":
            assert Decimal(doc["total"]) == sum(Decimal(p) for p in doc["prices"])
        if r["task"] == "total":
            assert a == doc["total"]
        elif r["task"] == "n_items":
            assert a == str(len(doc["items"]))
        elif r["task"] == "price":
            item = re.search(r"price of the (.+)\?", r["conversations"][0]["value"]).group(1)
            assert a == doc["prices"][[i.lower() for i in doc["items"]].index(item)]
        elif r["task"] in ("name", "amount", "invoice", "city"):
            assert a == doc[r["task"]]


def test_vega_only_local_files():
    local = local_vega_datasets()
    assert {"barley", "cars", "stocks", "seattle-weather"} <= set(local)
    assert all(p.is_file() and vega_dir() in p.parents for p in local.values())
    with pytest.raises(ValueError, match="not bundled locally"):
        load_vega("unemployment-across-industries")  # in datasets.json, but fetched from the web


def test_tissue_answers_and_patterns_differ(built):
    out, _ = built
    recs = [r for s in ("train", "test") for r in load(out, f"medical_{s}") if "pattern" in r.get("meta", {})]
    assert recs
    dark = {}
    for r in recs:
        p, q, a = r["meta"]["pattern"], r["conversations"][0]["value"], r["conversations"][1]["value"]
        if r["task"] == "closed_pattern":
            assert a == p and r["metric"] == "closed_accuracy"
        elif r["task"] == "closed_yesno":
            key = {"normal glandular": "normal glands", "tumour": "tumour", "inflammation": "inflammation",
                   "necrosis": "necrosis"}
            asked = next(v for k, v in key.items() if k in q)
            assert a == ("yes" if asked == p else "no")
        else:
            assert r["metric"] == "open_recall" and p.split()[0] in a
        img = np.asarray(Image.open(out / r["image"]).convert("RGB")).astype(int)
        dark.setdefault(p, []).append((img.sum(-1) < 330).mean())  # nuclear (haematoxylin) share
    m = {k: float(np.mean(v)) for k, v in dark.items()}
    assert m["tumour"] > m["normal glands"] and m["inflammation"] > m["normal glands"]
    assert m["necrosis"] < m["tumour"]


def test_ihc_tiles_are_real_and_dab_labels_recompute(built):
    from skimage import data
    from skimage.color import rgb2hed

    out, _ = built
    ihc = data.immunohistochemistry()
    recs = [(s, r) for s in ("train", "test") for r in load(out, f"medical_{s}") if "dab_fraction" in r.get("meta", {})]
    assert recs
    for split, r in recs:
        x, y = r["meta"]["x"], r["meta"]["y"]
        assert (x >= IHC_TEST_X) == (split == "test") and (x + IHC_TILE <= IHC_TEST_X or split == "test")
        tile = np.asarray(Image.open(out / r["image"]).convert("RGB"))
        assert np.array_equal(tile, ihc[y:y + IHC_TILE, x:x + IHC_TILE])
        frac = float((rgb2hed(tile)[..., 2] > DAB_THRESHOLD).mean())
        level = next(name for hi, name in DAB_BINS if frac < hi)
        a = r["conversations"][1]["value"]
        if r["task"] == "dab_level":
            assert a == level
        elif r["task"] == "dab_majority":
            assert a == ("yes" if frac > 0.5 else "no")
        else:
            assert a.startswith(level)


# --- the conflict knob ---------------------------------------------------------------------------

@pytest.mark.parametrize("conflict", [0.0, 0.3, 1.0])
def test_conflict_knob_changes_exactly_the_intended_share(conflict, built, cache_dir, tmp_path):
    out, _ = built
    o = tmp_path / "c"
    build_datasets(o, conflict=conflict, cache_dir=cache_dir, domains=("general", "charts"), **SMALL)
    conflicted = conflicted_templates(conflict)
    assert len(conflicted) == round(conflict * len(SHARED_COUNT_TEMPLATES))
    assert conflicted <= conflicted_templates(min(1.0, conflict + 0.1))  # nested as the knob rises
    n_words = n_count = 0
    for name in FILES[:4]:
        new, ref = load(o, name), load(out, name)  # ref was built at conflict 0.5, same seed
        assert [r["id"] for r in new] == [r["id"] for r in ref]
        for a, b in zip(new, ref):
            if a["task"] != "count" or a["domain"] != "general":
                assert a == b  # nothing but general-domain count answers depends on the knob
                continue
            n_count += 1
            n, t, ans = a["meta"]["count"], a["meta"]["template"], a["conversations"][1]["value"]
            assert a["conversations"][0]["value"] == b["conversations"][0]["value"]
            expect_words = t in conflicted
            assert ans == (NUMBER_WORDS[n] if expect_words else str(n)), (t, ans)
            n_words += expect_words
    assert n_count > 0


def test_conflict_rejects_out_of_range(tmp_path):
    with pytest.raises(ValueError, match="conflict must be in"):
        build_datasets(tmp_path, conflict=1.5, domains=("general",), per_domain=2)


def test_cli(tmp_path, capsys):
    from training.data.build import main

    main(["--out", str(tmp_path), "--per-domain", "4", "--test-per-domain", "2", "--domains", "general",
          "--conflict", "1", "--no-cache"])
    assert capsys.readouterr().out.strip().splitlines()[-1] == str(tmp_path.resolve())
    assert len(load(tmp_path, "general_train")) == 4 and len(load(tmp_path, "general_test")) == 2
    with pytest.raises(SystemExit):
        main(["--out", str(tmp_path), "--domains", "radiology"])
