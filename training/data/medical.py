"""Medical domain: procedural H&E-like tissue tiles (normal glands, tumour, inflammation,
necrosis) with PathVQA-style closed and open questions, plus tiles cut from scikit-image's real
immunohistochemistry image (`skimage.data.immunohistochemistry()`, bundled with the wheel),
labelled by colour deconvolution (`rgb2hed`, share of DAB-positive pixels)."""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from .common import int_seed, record, rng_for

TISSUE_RENDERER_VERSION = 2
PATTERNS = ("normal glands", "tumour", "inflammation", "necrosis")
# closed yes/no wording per pattern
_PRESENT_Q = {
    "normal glands": "Does this image show normal glandular tissue?",
    "tumour": "Is there evidence of tumour in this image?",
    "inflammation": "Is there inflammation in this tissue?",
    "necrosis": "Is there necrosis in this image?",
}
_OPEN_A = {
    "normal glands": "normal glands lined by a single layer of small regular nuclei around open lumens",
    "tumour": "tumour with crowded irregular glands and large dark pleomorphic nuclei",
    "inflammation": "inflammation with a dense infiltrate of small round lymphocytes in the stroma",
    "necrosis": "necrosis with pale eosinophilic debris and fragmented nuclear dust",
}
_OPEN_Q = ["What is seen in this image?", "What does this tissue show?", "Describe the histology of this tile."]

STROMA = np.array([232, 168, 198])
CYTO = (214, 130, 176)
NUCLEUS = (72, 38, 118)
LUMEN = (246, 240, 246)

# DAB colour deconvolution: a pixel is DAB-positive when its DAB optical density exceeds this.
DAB_THRESHOLD = 0.05
DAB_BINS = ((0.3, "low"), (0.7, "moderate"), (1.01, "high"))  # upper bounds of the positive share
TISSUE_SIZE = 224
IHC_TILE = 96   # pixels cut from the 512 x 512 image, saved at native resolution
IHC_TEST_X = 320  # tiles with x >= this column are test tiles, the rest train: no pixel is shared


def _ellipse(d, cx, cy, rx, ry, fill):
    d.ellipse([cx - rx, cy - ry, cx + rx, cy + ry], fill=fill)


def render_tissue(params: dict) -> Image.Image:
    """One tile of the named pattern, drawn from params['seed'] (everything else follows)."""
    size, pattern = params["size"], params["pattern"]
    g = np.random.default_rng(params["seed"])
    s = size / 224
    # stroma: pink with low-frequency variation and fibre streaks
    low = g.normal(0, 1, (8, 8))
    low = np.asarray(Image.fromarray(((low - low.min()) / (np.ptp(low) + 1e-9) * 255).astype(np.uint8))
                     .resize((size, size), Image.BICUBIC), dtype=np.float32) / 255 - 0.5
    base = STROMA[None, None, :] + low[..., None] * np.array([14, 22, 14])
    ang = g.uniform(0, math.pi)
    yy, xx = np.mgrid[0:size, 0:size]
    fib = np.sin((xx * math.cos(ang) + yy * math.sin(ang)) / (2.5 * s) + g.uniform(0, 6)) * 5
    base = base + fib[..., None] * np.array([0.3, 1.0, 0.6])
    if pattern == "necrosis":  # washed-out, eosinophilic, structureless
        base = base * 0.55 + np.array([238, 200, 214]) * 0.45
    img = Image.fromarray(np.clip(base, 0, 255).astype(np.uint8))
    d = ImageDraw.Draw(img)

    def nuclei(n, r_lo, r_hi, color=NUCLEUS, disc=None):
        for _ in range(n):
            if disc is None:
                cx, cy = g.uniform(0, size), g.uniform(0, size)
            else:  # a round cluster, denser at the centre
                a, rad = g.uniform(0, 2 * math.pi), disc[2] * math.sqrt(g.uniform(0, 1)) * g.uniform(0.6, 1.0)
                cx, cy = disc[0] + rad * math.cos(a), disc[1] + rad * math.sin(a)
            r = g.uniform(r_lo, r_hi) * s
            dark = g.uniform(-15, 15)
            _ellipse(d, cx, cy, r, r * g.uniform(0.7, 1.0), tuple(int(np.clip(c + dark, 0, 255)) for c in color))

    if pattern == "normal glands":
        for _ in range(g.integers(2, 5)):
            cx, cy, R = g.uniform(0.2, 0.8) * size, g.uniform(0.2, 0.8) * size, g.uniform(26, 40) * s
            _ellipse(d, cx, cy, R, R * 0.9, CYTO)
            _ellipse(d, cx, cy, R * 0.55, R * 0.5, LUMEN)
            k = int(2 * math.pi * R / (7 * s))
            for j in range(k):  # one orderly row of small nuclei at the basement membrane
                a = 2 * math.pi * j / k
                _ellipse(d, cx + 0.85 * R * math.cos(a), cy + 0.85 * 0.9 * R * math.sin(a), 2.6 * s, 2.2 * s, NUCLEUS)
        nuclei(int(15 * s * s), 1.5, 2.5, (110, 60, 140))  # sparse stromal cells
    elif pattern == "tumour":
        for _ in range(g.integers(3, 7)):  # irregular crowded nests
            cx, cy = g.uniform(0.1, 0.9) * size, g.uniform(0.1, 0.9) * size
            pts = [(cx + g.uniform(25, 55) * s * math.cos(a), cy + g.uniform(25, 55) * s * math.sin(a))
                   for a in np.linspace(0, 2 * math.pi, 9)[:-1]]
            d.polygon(pts, fill=(200, 120, 172))
        nuclei(int(160 * s * s), 3.5, 7.5, (58, 28, 100))
    elif pattern == "inflammation":
        nuclei(int(40 * s * s), 1.5, 2.5, (110, 60, 140))
        for _ in range(g.integers(2, 4)):  # dense lymphoid clusters plus a diffuse infiltrate
            cx, cy, R = g.uniform(0.2, 0.8) * size, g.uniform(0.2, 0.8) * size, g.uniform(30, 60) * s
            nuclei(int(120 * s * s), 2.0, 3.0, (45, 25, 95), (cx, cy, R))
        nuclei(int(180 * s * s), 2.0, 3.0, (45, 25, 95))
    else:  # necrosis: ghost outlines and karyorrhectic dust
        for _ in range(g.integers(3, 6)):
            cx, cy, R = g.uniform(0.1, 0.9) * size, g.uniform(0.1, 0.9) * size, g.uniform(20, 45) * s
            _ellipse(d, cx, cy, R, R * g.uniform(0.6, 1.0), (240, 214, 226))
        nuclei(int(260 * s * s), 0.6, 1.3, (90, 50, 120))
    img = img.filter(ImageFilter.GaussianBlur(0.8 * s))
    arr = np.asarray(img, dtype=np.float32) + g.normal(0, 3, (size, size, 3))
    return Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8))


def tissue_questions(pattern: str, r) -> list[tuple]:
    other = pattern if r.random() < 0.5 else r.choice([p for p in PATTERNS if p != pattern])  # yes/no balanced
    opts = list(PATTERNS)
    r.shuffle(opts)
    return [
        ("closed_yesno", _PRESENT_Q[other], "yes" if other == pattern else "no", "closed_accuracy"),
        ("closed_pattern", f"Which pattern is shown: {', '.join(opts[:-1])} or {opts[-1]}?", pattern,
         "closed_accuracy"),
        ("open", r.choice(_OPEN_Q), _OPEN_A[pattern], "open_recall"),
    ]


# --- real IHC tiles -------------------------------------------------------------------------

_IHC = None


def ihc_image() -> np.ndarray:
    global _IHC
    if _IHC is None:
        from skimage import data

        _IHC = data.immunohistochemistry()  # 512 x 512 x 3 uint8, shipped in the wheel (ihc.png)
    return _IHC


def dab_fraction(rgb: np.ndarray, threshold: float = DAB_THRESHOLD) -> float:
    """Share of pixels whose DAB channel (rgb2hed) exceeds `threshold`."""
    from skimage.color import rgb2hed

    return float((rgb2hed(rgb)[..., 2] > threshold).mean())


def dab_bin(fraction: float) -> str:
    return next(name for hi, name in DAB_BINS if fraction < hi)


def ihc_questions(fraction: float, r) -> list[tuple]:
    level = dab_bin(fraction)
    return [
        ("dab_level", "What is the level of brown DAB staining in this tile: low, moderate or high?", level,
         "closed_accuracy"),
        ("dab_majority", "Is more than half of this tile positive for DAB staining?",
         "yes" if fraction > 0.5 else "no", "closed_accuracy"),
        ("dab_open", "Describe the immunohistochemical staining.",
         f"{level} DAB staining with brown positive cells and blue hematoxylin counterstain", "open_recall"),
    ]


def build_medical(n: int, split: str, seed: int, out: Path, size: int, conflict: float, cache,
                  state: dict | None = None, per_image: int = 2):
    """About 75% procedural tissue questions, 25% questions on real IHC tiles. Tissue tiles are
    drawn at min(size, TISSUE_SIZE): texture, not text, so 224 px is plenty."""
    size = min(size, TISSUE_SIZE)
    recs, caps = [], []
    r = rng_for(seed, "medical", split)
    n_tissue = round(n * 0.75)
    k = 0
    while len(recs) < n_tissue:
        pattern = PATTERNS[k % len(PATTERNS)] if r.random() < 0.5 else r.choice(PATTERNS)
        params = {"pattern": pattern, "seed": int_seed(r), "size": size, "renderer": TISSUE_RENDERER_VERSION}
        rel = f"images/medical/{split}/tissue_{k:05d}.png"
        cache.materialise("tissue", params, out / rel, render_tissue)
        for j, (task, q, a, metric) in enumerate(r.sample(tissue_questions(pattern, r), per_image)):
            if len(recs) >= n_tissue:
                break
            recs.append(record(f"medical-{split}-tissue-{k}-{j}", rel, q, a, domain="medical", metric=metric,
                               task=task, meta={"pattern": pattern}))
        caps.append(record(f"caption-{split}-tissue-{k}", rel, "Describe the image briefly.",
                           f"An H&E stained tissue section showing {_OPEN_A[pattern]}.",
                           domain="captions", metric="exact_match", task="caption"))
        k += 1
    ihc = ihc_image()
    hi = ihc.shape[1] - IHC_TILE
    x_lo, x_hi = (IHC_TEST_X, hi) if split == "test" else (0, IHC_TEST_X - IHC_TILE)
    k = 0
    while len(recs) < n:
        x, y = r.randint(x_lo, x_hi), r.randint(0, ihc.shape[0] - IHC_TILE)
        tile = np.ascontiguousarray(ihc[y:y + IHC_TILE, x:x + IHC_TILE])
        frac = dab_fraction(tile)
        rel = f"images/medical/{split}/ihc_{k:05d}.png"
        (out / rel).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(tile).save(out / rel)
        for j, (task, q, a, metric) in enumerate(r.sample(ihc_questions(frac, r), per_image)):
            if len(recs) >= n:
                break
            recs.append(record(f"medical-{split}-ihc-{k}-{j}", rel, q, a, domain="medical", metric=metric, task=task,
                               meta={"x": x, "y": y, "dab_fraction": round(frac, 6)}))
        caps.append(record(f"caption-{split}-ihc-{k}", rel, "Describe the image briefly.",
                           f"An immunohistochemistry tile with {dab_bin(frac)} DAB staining.",
                           domain="captions", metric="exact_match", task="caption"))
        k += 1
    rng_for(seed, "medical", split, "shuffle").shuffle(recs)
    return recs, caps
