"""Shared pieces of the data builders: records, seeded RNGs, the render cache, fonts, numbers."""
from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
from decimal import ROUND_HALF_UP, Decimal
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]

# Images are drawn at LLaVA-1.5's input size (CLIP ViT-L/14-336) so that chart labels and receipt
# text stay legible after the processor's resize. The CPU demo's 64 px tower sees them blurred;
# pass --size to draw smaller.
DEFAULT_SIZE = 336

NUMBER_WORDS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten",
                "eleven", "twelve"]


def rng_for(seed: int, *parts) -> random.Random:
    """An independent, reproducible stream per (seed, domain, split, ...): string seeds are hashed
    with SHA-512 by `random`, so they do not depend on PYTHONHASHSEED."""
    return random.Random("/".join(str(p) for p in (seed, *parts)))


def int_seed(r: random.Random) -> int:
    return r.getrandbits(63)


def record(rid: str, image: str | None, question: str, answer: str, *, domain: str, metric: str,
           task: str, **extra) -> dict:
    """One single-turn LLaVA record; `image` is relative to the JSON file's folder."""
    rec = {"id": rid}
    if image is not None:
        rec["image"] = image
    human = ("<image>\n" + question) if image is not None else question
    rec["conversations"] = [{"from": "human", "value": human}, {"from": "gpt", "value": answer}]
    rec.update(domain=domain, metric=metric, task=task)
    rec.update(extra)
    return rec


def fmt_number(value, decimals: int) -> str:
    """Round half up to `decimals` places (what the chart labels show) without float artefacts."""
    q = Decimal(1).scaleb(-decimals) if decimals else Decimal(1)
    return str(Decimal(str(value)).quantize(q, rounding=ROUND_HALF_UP))


def font_path(bold: bool = False) -> str:
    """DejaVu Sans as shipped inside matplotlib: the same glyphs on every machine with the pinned
    matplotlib, so PIL-drawn documents are reproducible."""
    import matplotlib

    name = "DejaVuSans-Bold.ttf" if bold else "DejaVuSans.ttf"
    return str(Path(matplotlib.get_data_path()) / "fonts" / "ttf" / name)


def default_cache_dir() -> Path:
    return Path(os.environ.get("MOLE_EXT_DATA_CACHE", REPO_ROOT / ".cache" / "mole_ext" / "datasets"))


class RenderCache:
    """Content-addressed PNG cache for the slow renderers (matplotlib charts, tissue tiles).

    The key is a hash of the renderer's name, version and full parameters (and the library
    versions that draw the pixels), so a changed renderer never serves stale images."""

    def __init__(self, root: str | os.PathLike | None = None, enabled: bool = True):
        self.root = Path(root) if root is not None else default_cache_dir()
        self.enabled = enabled
        self.hits = 0
        self.misses = 0

    def key(self, kind: str, params: dict) -> str:
        blob = json.dumps([kind, params], sort_keys=True, default=str).encode()
        return hashlib.sha256(blob).hexdigest()[:32]

    def materialise(self, kind: str, params: dict, dest: Path, render) -> None:
        """Write the image for (kind, params) to `dest`, calling `render(params) -> PIL.Image`
        only on a cache miss."""
        dest.parent.mkdir(parents=True, exist_ok=True)
        if not self.enabled:
            self.misses += 1
            save_png(render(params), dest)
            return
        path = self.root / kind / f"{self.key(kind, params)}.png"
        if path.is_file():
            self.hits += 1
        else:
            self.misses += 1
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(f".{os.getpid()}.tmp")
            save_png(render(params), tmp)
            os.replace(tmp, path)  # atomic: a concurrent builder never reads half a file
        shutil.copyfile(path, dest)


def save_png(img, path: Path) -> None:
    # No metadata chunks (matplotlib would add its version and a date): same pixels, same bytes.
    img.save(path, format="PNG", optimize=False, compress_level=6)
