"""Offline multi-domain instruction data for LLaVA-MoLE (issue 6): general (easy-VQA + generated
scenes), charts and documents (vega-datasets tables drawn with matplotlib, PIL receipts and
forms), medical (procedural H&E tiles + scikit-image's IHC image). Build with
`python -m training.datasets.build --out DIR`; see `build.build` for the options.

Named `datasets` (not `data`) because `training/data.py` already exists.
"""
from .conflict import SHARED_COUNT_TEMPLATES, conflicted_templates

__all__ = ["build", "DOMAINS", "SHARED_COUNT_TEMPLATES", "conflicted_templates"]


def __getattr__(name):
    # Lazy, so that `python -m training.datasets.build` does not import build.py twice.
    if name in ("build", "DOMAINS"):
        from . import build as _build

        return getattr(_build, name)
    raise AttributeError(name)
