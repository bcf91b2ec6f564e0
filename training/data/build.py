"""Build the three offline domains as LLaVA-JSON files plus images.

    python -m training.data.build --out DIR [--seed N] [--per-domain N] [--conflict F]

writes DIR/{general,charts,medical}_{train,test}.json, DIR/captions.json (stage 1: one caption per
generated training image), DIR/manifest.json (options, counts, timings) and DIR/images/. Image
paths in the JSON files are relative to DIR. The same options give the same files.
"""
from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path

from .charts import build_charts
from .common import DEFAULT_SIZE, RenderCache
from .conflict import conflicted_templates, n_conflicted, SHARED_COUNT_TEMPLATES
from .general import build_general
from .medical import build_medical

DOMAINS = {"general": build_general, "charts": build_charts, "medical": build_medical}
SPLITS = ("train", "test")


def build(out: str | Path, seed: int = 0, per_domain: int = 600, test_per_domain: int | None = None,
          conflict: float = 0.5, size: int = DEFAULT_SIZE, cache_dir: str | Path | None = None,
          use_cache: bool = True, domains=tuple(DOMAINS)) -> dict:
    """Build the data sets under `out` (emptied first). Returns the manifest.

    Args:
        per_domain: training records per domain; test_per_domain defaults to per_domain // 4.
        conflict: share of the shared counting templates whose general-domain answers use words
            (see `conflict.py`); rounded to tenths.
        size: side in pixels of generated images (easy-VQA keeps its 64 px, IHC tiles their
            96 px).
    """
    out = Path(out)
    n_conflicted(conflict)  # validates
    if out.exists():
        for p in [*(out / f"{d}_{s}.json" for d in DOMAINS for s in SPLITS), out / "captions.json", out / "images"]:
            if p.is_dir():
                shutil.rmtree(p)
            elif p.exists():
                p.unlink()
    out.mkdir(parents=True, exist_ok=True)
    cache = RenderCache(cache_dir, enabled=use_cache)
    n_test = per_domain // 4 if test_per_domain is None else test_per_domain
    t0 = time.perf_counter()
    counts, timings, captions = {}, {}, []
    for name in domains:
        state: dict = {}  # shared by a domain's splits (e.g. to keep test charts out of train)
        for split in SPLITS:
            t = time.perf_counter()
            n = per_domain if split == "train" else n_test
            recs, caps = DOMAINS[name](n, split, seed, out, size, conflict, cache, state=state)
            (out / f"{name}_{split}.json").write_text(json.dumps(recs, indent=1))
            if split == "train":
                captions += caps
            counts[f"{name}_{split}"] = len(recs)
            timings[f"{name}_{split}"] = round(time.perf_counter() - t, 2)
    (out / "captions.json").write_text(json.dumps(captions, indent=1))
    manifest = {
        "seed": seed, "per_domain": per_domain, "test_per_domain": n_test, "size": size,
        "conflict": conflict, "conflicted_templates": sorted(conflicted_templates(conflict)),
        "conflict_effective": n_conflicted(conflict) / len(SHARED_COUNT_TEMPLATES),
        "counts": {**counts, "captions": len(captions)}, "seconds": timings,
        "total_seconds": round(time.perf_counter() - t0, 2),
        "cache": {"dir": str(cache.root), "hits": cache.hits, "misses": cache.misses, "enabled": use_cache},
    }
    (out / "manifest.json").write_text(json.dumps(manifest, indent=1))
    return manifest


def main(argv=None):
    ap = argparse.ArgumentParser(prog="python -m training.data.build", description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", required=True, help="output folder (its data files are replaced)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--per-domain", type=int, default=600, help="training records per domain (default 600)")
    ap.add_argument("--test-per-domain", type=int, default=None, help="test records per domain (default N/4)")
    ap.add_argument("--conflict", type=float, default=0.5,
                    help="share of shared counting templates answered in words in general, digits in charts")
    ap.add_argument("--size", type=int, default=DEFAULT_SIZE, help=f"image side in pixels (default {DEFAULT_SIZE})")
    ap.add_argument("--cache-dir", default=None, help="render cache (default .cache/mole_ext/datasets)")
    ap.add_argument("--no-cache", action="store_true", help="render everything afresh, write no cache")
    ap.add_argument("--domains", default=",".join(DOMAINS), help="comma-separated subset of " + ",".join(DOMAINS))
    a = ap.parse_args(argv)
    doms = tuple(d for d in a.domains.split(",") if d)
    bad = [d for d in doms if d not in DOMAINS]
    if bad:
        ap.error(f"unknown domain(s) {bad}; choose from {list(DOMAINS)}")
    m = build(a.out, seed=a.seed, per_domain=a.per_domain, test_per_domain=a.test_per_domain, conflict=a.conflict,
              size=a.size, cache_dir=a.cache_dir, use_cache=not a.no_cache, domains=doms)
    for k, v in m["counts"].items():
        print(f"{k:16s} {v:6d}")
    print(f"built in {m['total_seconds']} s (cache hits {m['cache']['hits']}, misses {m['cache']['misses']}); "
          f"conflict {m['conflict_effective']}")
    print(Path(a.out).resolve())


if __name__ == "__main__":
    main()
