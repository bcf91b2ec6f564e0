"""Data for LLaVA-MoLE.

- ``training.data.loader`` (re-exported here): LLaVA-JSON loading with domains and sampling
  weights, pad-to-square images, prompt templates, answer-only labels, the collator and the
  mixture sampler, and the small built-in data set of the demo.
- ``training.data.build`` and its renderers (``general``, ``charts``, ``medical``, ``conflict``):
  the three offline domains of issue 6, ``python -m training.data.build --out DIR``; in Python
  ``build_datasets(out, seed=..., per_domain=..., conflict=...)``.
"""
from .conflict import SHARED_COUNT_TEMPLATES, conflicted_templates
from .loader import (IGNORE, SKIP_REASONS, TEMPLATES, VICUNA_SYSTEM, BadRecord, Collator, EpochSampler,
                     LlavaData, MixtureSampler, Record, expand2square, make_builtin, modality_length_grouped,
                     parse_records, resolve_max_length, resolve_specs)

__all__ = ["IGNORE", "SKIP_REASONS", "TEMPLATES", "VICUNA_SYSTEM", "BadRecord", "Collator", "EpochSampler",
           "LlavaData", "MixtureSampler", "Record", "expand2square", "make_builtin", "modality_length_grouped",
           "parse_records", "resolve_max_length", "resolve_specs",
           "build_datasets", "DOMAINS", "SHARED_COUNT_TEMPLATES", "conflicted_templates"]


def __getattr__(name):
    # Lazy: the renderers import matplotlib, and `python -m training.data.build` must not import
    # build.py twice.
    if name in ("build_datasets", "DOMAINS"):
        from .build import DOMAINS, build

        return {"build_datasets": build, "DOMAINS": DOMAINS}[name]
    raise AttributeError(name)
