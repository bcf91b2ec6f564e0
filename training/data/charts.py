"""Charts and documents: bar, line and pie charts drawn with matplotlib from the real tables that
`vega-datasets` bundles (local files only, never its URL datasets), and receipts and forms drawn
with PIL. Questions follow ChartQA (relaxed accuracy) and DocVQA (ANLS)."""
from __future__ import annotations

import csv
import importlib.util
import json
import re
from decimal import Decimal
from functools import lru_cache
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

from .common import fmt_number, font_path, record, rng_for
from .conflict import SHARED_COUNT_TEMPLATES, count_answer

CHART_RENDERER_VERSION = 1
MONTHS = ["Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec"]


# --- vega-datasets: the locally bundled tables ------------------------------------------------

def vega_dir() -> Path:
    """vega_datasets' package folder, found without importing it (its __init__ imports pandas,
    which we do not need: the bundled files are plain CSV and JSON)."""
    spec = importlib.util.find_spec("vega_datasets")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("vega-datasets is not installed: pip install --no-deps vega-datasets==0.9.0")
    return Path(next(iter(spec.submodule_search_locations)))


def local_vega_datasets() -> dict[str, Path]:
    """name -> file for the data sets shipped inside the wheel (`local_datasets.json`); the other
    ~50 names in `datasets.json` are fetched from the web by the package and are never used here."""
    root = vega_dir()
    return {k: root / v for k, v in json.loads((root / "local_datasets.json").read_text()).items()}


@lru_cache(maxsize=None)
def load_vega(name: str) -> tuple[dict, ...]:
    files = local_vega_datasets()
    if name not in files:
        raise ValueError(f"vega dataset {name!r} is not bundled locally; local ones: {sorted(files)}")
    path = files[name]
    if path.suffix == ".json":
        rows = json.loads(path.read_text())
    else:
        with open(path, newline="") as f:
            rows = list(csv.DictReader(f))
    return tuple(rows)


def _num(v):
    if v is None or v == "":
        return None
    return float(v)


def derive(row: dict, key: str):
    """A field or a derived field: 'year(date)' (the 4-digit year in the string), 'month(date)'."""
    m = re.fullmatch(r"(year|month)\((\w+)\)", key)
    if not m:
        return row[key]
    s = str(row[m.group(2)])
    if m.group(1) == "year":
        return re.search(r"(1[5-9]|20)\d\d", s).group(0)
    mm = re.match(r"\d{4}[-/](\d\d)", s)
    if mm:
        return MONTHS[int(mm.group(1)) - 1]
    return s[:3]  # stocks: "Jan 1 2000"


def compute_table(spec: dict) -> list[tuple[str, float]]:
    """Aggregate a vega table per `spec`: {dataset, where: {key: value}, by: key | null,
    columns: [fields] (wide tables: one category per column), value: field, agg: sum|mean|count}.
    Categories keep first-seen order."""
    rows = [r for r in load_vega(spec["dataset"])
            if all(str(derive(r, k)) == str(v) for k, v in spec.get("where", {}).items())]
    if spec.get("columns"):
        assert len(rows) == 1, f"{spec}: expected one row, got {len(rows)}"
        return [(c, float(rows[0][c])) for c in spec["columns"]]
    acc: dict[str, list[float]] = {}
    for r in rows:
        cat = str(derive(r, spec["by"]))
        v = 1.0 if spec["agg"] == "count" else _num(r[spec["value"]])
        if v is not None:
            acc.setdefault(cat, []).append(v)
    out = []
    for cat, vs in acc.items():
        out.append((cat, sum(vs) / len(vs) if spec["agg"] == "mean" else sum(vs)))
    return out


def _pick(r, table, k_min=3, k_max=7, contiguous=False):
    k = r.randint(k_min, min(k_max, len(table)))
    if contiguous:
        s = r.randrange(len(table) - k + 1)
        return table[s:s + k]
    idx = sorted(r.sample(range(len(table)), k))
    return [table[i] for i in idx]


def random_chart_spec(r) -> dict:
    """Draw one chart: which table, which slice, which kind. Returns the full spec (JSON-able)."""
    for _ in range(100):
        spec = _try_chart_spec(r)
        if spec is not None:
            return spec
    raise RuntimeError("could not draw an answerable chart")


def _try_chart_spec(r) -> dict | None:
    fam = r.choice(["barley", "cars", "iowa", "weather_count", "weather_tmax", "stocks", "wheat",
                    "crimea", "employment", "airports", "driving"])
    if fam == "barley":
        year, site = r.choice(["1931", "1932"]), r.choice(["University Farm", "Waseca", "Morris", "Crookston",
                                                          "Grand Rapids", "Duluth"])
        spec = dict(dataset="barley", where={"year": year, "site": site}, by="variety", value="yield", agg="sum",
                    title=f"Barley yield at {site}, {year}", ylabel="bushels per acre", decimals=1, kind="bar")
    elif fam == "cars":
        field, unit = r.choice([("Miles_per_Gallon", "miles per gallon"), ("Horsepower", "horsepower"),
                                ("Weight_in_lbs", "weight (lbs)")])
        by = r.choice(["Origin", "Cylinders"])
        spec = dict(dataset="cars", where={}, by=by, value=field, agg="mean",
                    title=f"Average {unit} by {by.lower()}", ylabel=unit,
                    decimals=0 if field == "Weight_in_lbs" else 1, kind="bar")
        if by == "Origin" and r.random() < 0.5:
            spec.update(agg="count", value=None, title="Number of car models by origin", ylabel="models",
                        decimals=0, kind="pie")
    elif fam == "iowa":
        year = str(r.randint(2001, 2017))
        spec = dict(dataset="iowa-electricity", where={"year(year)": year}, by="source", value="net_generation",
                    agg="sum", title=f"Iowa electricity generation, {year}", ylabel="GWh", decimals=0,
                    kind=r.choice(["bar", "pie"]))
    elif fam == "weather_count":
        year = str(r.randint(2012, 2015))
        spec = dict(dataset="seattle-weather", where={"year(date)": year}, by="weather", value=None, agg="count",
                    title=f"Seattle weather: days per type, {year}", ylabel="days", decimals=0,
                    kind=r.choice(["bar", "pie"]))
    elif fam == "weather_tmax":
        year = str(r.randint(2012, 2015))
        spec = dict(dataset="seattle-weather", where={"year(date)": year}, by="month(date)", value="temp_max",
                    agg="mean", title=f"Seattle mean daily high, {year}", ylabel="°C", decimals=1,
                    kind="line", contiguous=True)
    elif fam == "stocks":
        sym, year = r.choice(["MSFT", "AMZN", "IBM", "AAPL"]), str(r.randint(2001, 2009))
        spec = dict(dataset="stocks", where={"symbol": sym, "year(date)": year}, by="month(date)", value="price",
                    agg="sum", title=f"{sym} monthly price, {year}", ylabel="US dollars", decimals=1,
                    kind="line", contiguous=True)
    elif fam == "wheat":
        spec = dict(dataset="wheat", where={}, by="year", value="wheat", agg="sum",
                    title="Price of wheat (shillings per quarter)", ylabel="shillings", decimals=0,
                    kind="line", contiguous=True)
    elif fam == "crimea":
        date = r.choice([row["date"] for row in load_vega("crimea")])
        spec = dict(dataset="crimea", where={"date": date}, columns=["disease", "wounds", "other"],
                    title=f"Crimean War deaths by cause, {date[:7]}", ylabel="deaths", decimals=0,
                    kind=r.choice(["bar", "pie"]))
    elif fam == "employment":
        month = r.choice([row["month"] for row in load_vega("us-employment")])
        cols = ["construction", "manufacturing", "retail_trade", "information", "financial_activities",
                "government", "leisure_and_hospitality", "utilities"]
        spec = dict(dataset="us-employment", where={"month": month}, columns=cols,
                    title=f"US employment by sector, {month[:7]}", ylabel="thousands of jobs", decimals=0, kind="bar")
    elif fam == "airports":
        spec = dict(dataset="airports", where={}, by="state", value=None, agg="count",
                    title="Number of airports per state", ylabel="airports", decimals=0, kind="bar", top=12)
    else:
        side = r.choice(["left", "right"])
        spec = dict(dataset="driving", where={"side": side}, by="year", value="miles", agg="sum",
                    title="Miles driven per capita per year", ylabel="miles", decimals=0, kind="line",
                    contiguous=True)
    table = compute_table(spec)
    if spec.get("top"):
        table = sorted(table, key=lambda t: -t[1])[: spec["top"]]
        table.sort()
    for _ in range(50):  # a unique largest value, and distinct shown values, keep questions answerable
        rows = _pick(r, table, 3, 6 if spec["kind"] == "pie" else 7, spec.get("contiguous", False))
        shown = [fmt_number(v, spec["decimals"]) for _, v in rows]
        top = max(Decimal(s) for s in shown)
        if len(set(shown)) == len(shown) and sum(Decimal(s) == top for s in shown) == 1 and \
                all(Decimal(s) > 0 for s in shown):
            break
    else:
        return None  # e.g. a month of the Crimean table with ties: draw another chart
    spec["categories"] = [c.replace("_", " ") for c, _ in rows]
    spec["values"] = shown
    spec["source_categories"] = [c for c, _ in rows]
    return spec


def render_chart(params: dict) -> Image.Image:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    size, kind = params["size"], params["kind"]
    cats, vals = params["categories"], [float(v) for v in params["values"]]
    fs = max(6.0, 8.5 * size / 336)
    with plt.rc_context({"font.size": fs, "font.family": "DejaVu Sans", "svg.hashsalt": "0"}):
        fig = plt.figure(figsize=(size / 100, size / 100), dpi=100)
        ax = fig.add_subplot(111)
        if kind == "pie":
            labels = [f"{c}\n{v}" for c, v in zip(cats, params["values"])]
            ax.pie(vals, labels=labels, startangle=90, counterclock=False, colors=plt.cm.tab10.colors[: len(vals)],
                   wedgeprops={"linewidth": 1, "edgecolor": "white"}, textprops={"fontsize": fs})
            ax.set_aspect("equal")
        else:
            x = np.arange(len(cats))
            if kind == "bar":
                ax.bar(x, vals, color=plt.cm.tab10.colors[0], width=0.65)
            else:
                ax.plot(x, vals, marker="o", color=plt.cm.tab10.colors[3], linewidth=1.5)
            for xi, v, s in zip(x, vals, params["values"]):
                ax.annotate(s, (xi, v), textcoords="offset points", xytext=(0, 3), ha="center", fontsize=fs * 0.9)
            ax.set_xticks(x)
            ax.set_xticklabels(cats, rotation=30 if max(len(c) for c in cats) > 5 else 0, ha="right"
                               if max(len(c) for c in cats) > 5 else "center")
            ax.set_ylabel(params["ylabel"])
            ax.set_ylim(0 if kind == "bar" else min(vals) - 0.15 * (max(vals) - min(vals) + 1),
                        max(vals) + 0.15 * (max(vals) - (0 if kind == "bar" else min(vals)) + 1))
            ax.spines[["top", "right"]].set_visible(False)
        ax.set_title(params["title"], fontsize=fs * 1.05)
        fig.tight_layout(pad=0.4)
        fig.canvas.draw()
        img = Image.fromarray(np.asarray(fig.canvas.buffer_rgba())[..., :3].copy())
        plt.close(fig)
    return img


def _is_number(text: str) -> bool:
    try:
        float(text)
        return True
    except ValueError:
        return False


def chart_questions(spec: dict, r, conflict: float) -> list[tuple]:
    cats, vals = spec["categories"], [Decimal(v) for v in spec["values"]]
    kind = spec["kind"]
    i = r.randrange(len(cats))
    unit = {"bar": "bars", "line": "data points", "pie": "slices"}[kind]
    t = r.randrange(len(SHARED_COUNT_TEMPLATES))
    a, b = r.sample(range(len(cats)), 2)
    big = max(range(len(cats)), key=lambda j: vals[j])
    return [
        ("value", f"What is the value for {cats[i]}?", spec["values"][i], {}),
        ("largest", "Which category has the largest value?" if kind != "line" else
         "Which label on the x-axis has the highest value?", cats[big], {}),
        ("count", SHARED_COUNT_TEMPLATES[t].format(objects=unit), count_answer(len(cats), "charts", t, conflict),
         {"template": t, "count": len(cats)}),
        ("difference", f"What is the difference between the values for {cats[a]} and {cats[b]}?",
         str(abs(vals[a] - vals[b])), {}),
    ]


# --- documents: receipts and forms (PIL) -------------------------------------------------------

ITEMS = ["Coffee", "Tea", "Bagel", "Muffin", "Sandwich", "Salad", "Soup", "Juice", "Water", "Cookie",
         "Croissant", "Pasta", "Pizza", "Burger", "Fries", "Yogurt", "Apple", "Banana", "Milk", "Bread"]
SHOPS = ["Corner Cafe", "Green Market", "Daily Bread", "Blue Door Deli", "Harbor Foods", "Maple Bistro"]
FIRST = ["Anna", "Ben", "Carla", "David", "Elena", "Farid", "Grace", "Hugo", "Irene", "Jonas", "Kira", "Liam"]
LAST = ["Smith", "Garcia", "Novak", "Okafor", "Larsen", "Moreau", "Tanaka", "Rossi", "Keller", "Silva"]
CITIES = ["Boston", "Denver", "Austin", "Seattle", "Chicago", "Portland", "Atlanta", "Phoenix"]


def make_document(r) -> dict:
    if r.random() < 0.6:
        items = r.sample(ITEMS, r.randint(2, 6))
        prices = [fmt_number(r.randint(50, 2500) / 100, 2) for _ in items]
        total = fmt_number(sum(Decimal(p) for p in prices), 2)
        return {"type": "receipt", "shop": r.choice(SHOPS), "items": items, "prices": prices, "total": total,
                "date": f"2024-{r.randint(1, 12):02d}-{r.randint(1, 28):02d}"}
    return {"type": "form", "name": f"{r.choice(FIRST)} {r.choice(LAST)}", "city": r.choice(CITIES),
            "date": f"20{r.randint(10, 24)}-{r.randint(1, 12):02d}-{r.randint(1, 28):02d}",
            "invoice": str(r.randint(10000, 99999)), "amount": fmt_number(r.randint(1000, 99999) / 100, 2)}


def draw_document(doc: dict, size: int) -> Image.Image:
    img = Image.new("RGB", (size, size), (252, 252, 250))
    d = ImageDraw.Draw(img)
    s = size / 336
    font = ImageFont.truetype(font_path(), max(8, round(15 * s)))
    bold = ImageFont.truetype(font_path(bold=True), max(9, round(17 * s)))
    x0, x1, y = round(24 * s), size - round(24 * s), round(18 * s)
    step = round(24 * s)
    if doc["type"] == "receipt":
        d.text((size / 2, y), doc["shop"], font=bold, fill=(0, 0, 0), anchor="mt")
        y += step
        d.text((size / 2, y), doc["date"], font=font, fill=(60, 60, 60), anchor="mt")
        y += round(step * 1.3)
        for item, price in zip(doc["items"], doc["prices"]):
            d.text((x0, y), item, font=font, fill=(0, 0, 0))
            d.text((x1, y), price, font=font, fill=(0, 0, 0), anchor="ra")
            y += step
        d.line([(x0, y + 2), (x1, y + 2)], fill=(0, 0, 0), width=max(1, round(s)))
        y += round(step * 0.5)
        d.text((x0, y), "TOTAL", font=bold, fill=(0, 0, 0))
        d.text((x1, y), doc["total"], font=bold, fill=(0, 0, 0), anchor="ra")
    else:
        d.text((size / 2, y), "INVOICE", font=bold, fill=(0, 0, 0), anchor="mt")
        y += round(step * 1.6)
        for label, key in [("Name", "name"), ("City", "city"), ("Date", "date"), ("Invoice no.", "invoice"),
                           ("Amount due", "amount")]:
            d.text((x0, y), f"{label}:", font=font, fill=(70, 70, 70))
            d.text((x0 + round(120 * s), y), doc[key], font=font, fill=(0, 0, 0))
            d.line([(x0 + round(118 * s), y + round(19 * s)), (x1, y + round(19 * s))], fill=(170, 170, 170))
            y += round(step * 1.5)
    return img


def document_questions(doc: dict, r) -> list[tuple]:
    if doc["type"] == "receipt":
        i = r.randrange(len(doc["items"]))
        return [("total", "What is the total amount on the receipt?", doc["total"], {}),
                ("price", f"What is the price of the {doc['items'][i].lower()}?", doc["prices"][i], {}),
                ("n_items", "How many items are listed on the receipt?", str(len(doc["items"])), {}),
                ("shop", "What is the name of the shop?", doc["shop"], {})]
    return [("name", "What is the name on the form?", doc["name"], {}),
            ("amount", "What is the amount due?", doc["amount"], {}),
            ("invoice", "What is the invoice number?", doc["invoice"], {}),
            ("city", "Which city is written on the form?", doc["city"], {})]


def build_charts(n: int, split: str, seed: int, out: Path, size: int, conflict: float, cache,
                 state: dict | None = None, per_image: int = 3):
    """About 60% chart questions (relaxed accuracy), 40% document questions (ANLS). `state` is
    shared between the splits of one build: a chart drawn for train is never drawn for test."""
    import matplotlib

    seen = (state if state is not None else {}).setdefault("chart_keys", set())

    recs, caps = [], []
    r = rng_for(seed, "charts", split)
    n_chart = round(n * 0.6)
    k = 0
    while len(recs) < n_chart:
        spec = random_chart_spec(r)
        ident = json.dumps({k: spec[k] for k in ("dataset", "where", "categories", "kind")}, sort_keys=True)
        if ident in seen:
            continue
        seen.add(ident)
        params = {**spec, "size": size, "renderer": CHART_RENDERER_VERSION, "mpl": matplotlib.__version__}
        rel = f"images/charts/{split}/chart_{k:05d}.png"
        cache.materialise("chart", params, out / rel, render_chart)
        for j, (task, q, a, extra) in enumerate(r.sample(chart_questions(spec, r, conflict), per_image)):
            if len(recs) >= n_chart:
                break
            # A category label that reads as a number (a year, a cylinder count) must match exactly:
            # ChartQA's 5% tolerance would accept 1990 for 1986.
            metric = "exact_match" if task == "largest" and _is_number(a) else "relaxed_accuracy"
            recs.append(record(f"charts-{split}-chart-{k}-{j}", rel, q, a, domain="charts",
                               metric=metric, task=task, meta={"chart": spec, **extra}))
        caps.append(record(f"caption-{split}-chart-{k}", rel, "Describe the image briefly.",
                           f"A {spec['kind']} chart titled \"{spec['title']}\" with {len(spec['categories'])} "
                           f"categories: {', '.join(spec['categories'])}.",
                           domain="captions", metric="exact_match", task="caption"))
        k += 1
    k = 0
    while len(recs) < n:
        doc = make_document(r)
        rel = f"images/charts/{split}/doc_{k:05d}.png"
        (out / rel).parent.mkdir(parents=True, exist_ok=True)
        draw_document(doc, size).save(out / rel)
        for j, (task, q, a, extra) in enumerate(r.sample(document_questions(doc, r), 2)):
            if len(recs) >= n:
                break
            recs.append(record(f"charts-{split}-doc-{k}-{j}", rel, q, a, domain="charts", metric="anls",
                               task=task, meta={"document": doc}))
        what = f"a receipt from {doc['shop']} with {len(doc['items'])} items" if doc["type"] == "receipt" \
            else f"an invoice form for {doc['name']}"
        caps.append(record(f"caption-{split}-doc-{k}", rel, "Describe the image briefly.",
                           f"A scanned document: {what}.", domain="captions", metric="exact_match", task="caption"))
        k += 1
    rng_for(seed, "charts", split, "shuffle").shuffle(recs)
    return recs, caps
