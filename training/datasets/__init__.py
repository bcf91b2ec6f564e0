"""Offline multi-domain instruction data for LLaVA-MoLE (issue 6): general (easy-VQA + generated
scenes), charts and documents (vega-datasets tables drawn with matplotlib, PIL receipts and
forms), medical (procedural H&E tiles + scikit-image's IHC image). Build with
`python -m training.datasets.build --out DIR`; in Python `build_datasets(out, seed=..., per_domain=..., conflict=...)`.

Named `datasets` (not `data`) because `training/data.py` already exists.
"""
from .conflict import SHARED_COUNT_TEMPLATES, conflicted_templates

__all__ = ["build_datasets", "DOMAINS", "SHARED_COUNT_TEMPLATES", "conflicted_templates"]


def __getattr__(name):
    # Lazy, so that `python -m training.datasets.build` does not import build.py twice.
    if name in ("build_datasets", "DOMAINS"):
        from .build import DOMAINS, build

        return {"build_datasets": build, "DOMAINS": DOMAINS}[name]
    raise AttributeError(name)
