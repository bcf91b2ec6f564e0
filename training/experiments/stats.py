"""Statistics shared by the experiments (issue 15): t intervals over seeds, paired differences,
Holm's step-down correction, a seeds x records bootstrap, the minimum detectable effect, the
learnability gate and the mutual information between domain and routed expert.

Conventions: intervals are two-sided at ``conf`` (default 0.95); p-values are two-sided unless
named otherwise; mutual information is in bits.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Optional, Sequence

import numpy as np
from scipy import stats as _st

__all__ = ["Interval", "t_interval", "paired_difference", "holm", "bootstrap_seeds_records",
           "minimum_detectable_effect", "learnability_gate", "mutual_information",
           "mutual_information_labels", "spearman", "preregistered_verdict"]


@dataclass
class Interval:
    """A mean with its interval: ``mean``, ``lo``, ``hi``, the standard error ``se``, the number of
    units ``n`` (seeds for a t interval), and the two-sided ``p`` of mean = 0 (None where not defined)."""
    mean: float
    lo: float
    hi: float
    se: float
    n: int
    p: Optional[float] = None

    def excludes_zero(self) -> bool:
        return self.lo > 0 or self.hi < 0

    def as_dict(self) -> dict:
        return asdict(self)

    def fmt(self, digits: int = 3) -> str:
        return f"{self.mean:+.{digits}f} [{self.lo:+.{digits}f}, {self.hi:+.{digits}f}]"


def _as_1d(x, name: str) -> np.ndarray:
    a = np.asarray(x, dtype=float)
    if a.ndim != 1:
        raise ValueError(f"{name} must be one-dimensional, got shape {a.shape}")
    if not np.all(np.isfinite(a)):
        raise ValueError(f"{name} must be finite, got {a.tolist()}")
    return a


def _check_conf(conf: float):
    if not 0.0 < conf < 1.0:
        raise ValueError(f"conf must be in (0, 1), got {conf!r}")


def t_interval(x: Sequence[float], conf: float = 0.95) -> Interval:
    """Student-t interval for the mean of independent values (one per seed) and the two-sided
    one-sample t-test p-value of mean = 0. Needs at least 2 values. Zero spread gives a
    zero-width interval and p = 0 (mean != 0) or 1 (mean = 0)."""
    _check_conf(conf)
    a = _as_1d(x, "x")
    n = a.size
    if n < 2:
        raise ValueError(f"t_interval needs at least 2 values, got {n}")
    mean = float(a.mean())
    se = float(a.std(ddof=1) / math.sqrt(n))
    if np.all(a == a[0]):  # (the float std of equal values can be ~1e-17, not 0)
        mean = float(a[0])
        return Interval(mean, mean, mean, 0.0, n, 1.0 if mean == 0.0 else 0.0)
    q = float(_st.t.ppf(0.5 + conf / 2, n - 1))
    p = float(2 * _st.t.sf(abs(mean / se), n - 1))
    return Interval(mean, mean - q * se, mean + q * se, se, n, p)


def paired_difference(a: Sequence[float], b: Sequence[float], conf: float = 0.95) -> Interval:
    """t interval of a - b over paired units (same seed in both arms)."""
    a, b = _as_1d(a, "a"), _as_1d(b, "b")
    if a.shape != b.shape:
        raise ValueError(f"paired_difference needs a and b of the same length, got {a.size} and {b.size}")
    return t_interval(a - b, conf)


def holm(pvalues: Sequence[float], alpha: float = 0.05) -> tuple[list[float], list[bool]]:
    """Holm's step-down correction. Returns (adjusted p-values, reject at ``alpha``), in input order.

    Sorted ascending p_(1) <= ... <= p_(m), the adjusted value is
    ``max_{j <= i} min(1, (m - j + 1) p_(j))``; hypothesis i is rejected when its adjusted p <= alpha.
    """
    p = _as_1d(pvalues, "pvalues")
    if np.any((p < 0) | (p > 1)):
        raise ValueError(f"pvalues must lie in [0, 1], got {p.tolist()}")
    if not 0.0 < alpha < 1.0:
        raise ValueError(f"alpha must be in (0, 1), got {alpha!r}")
    m = p.size
    order = np.argsort(p, kind="stable")
    adj = np.empty(m)
    running = 0.0
    for rank, i in enumerate(order):
        running = max(running, min(1.0, (m - rank) * p[i]))
        adj[i] = running
    return adj.tolist(), [bool(x <= alpha) for x in adj]


def bootstrap_seeds_records(values: Sequence[Sequence[float]], n_boot: int = 2000, conf: float = 0.95,
                            seed: int = 0, clusters: Optional[Sequence[Sequence[int]]] = None) -> Interval:
    """Two-stage (hierarchical) percentile bootstrap of a grand mean over seeds x records.

    ``values[s]`` holds seed s's per-record scores (for a paired comparison pass per-record
    differences of two arms on the same records). Each replicate draws seeds with replacement and
    then, within each drawn seed, records with replacement; when ``clusters[s]`` gives each
    record's cluster id (e.g. records that share an image), whole clusters are drawn instead, so
    dependent records are not counted as independent. The statistic is the mean over drawn seeds
    of each seed's mean. ``se`` is the replicates' standard deviation; ``p`` is the two-sided
    bootstrap p of mean = 0 (twice the smaller tail share, at least 1 / n_boot).
    """
    _check_conf(conf)
    if n_boot < 100:
        raise ValueError(f"n_boot must be >= 100, got {n_boot}")
    seeds = [_as_1d(v, f"values[{i}]") for i, v in enumerate(values)]
    if not seeds or any(v.size == 0 for v in seeds):
        raise ValueError("bootstrap_seeds_records needs at least one seed and one record per seed")
    if clusters is not None:
        if len(clusters) != len(seeds):
            raise ValueError(f"clusters must have one entry per seed ({len(seeds)}), got {len(clusters)}")
        groups = []
        for i, (v, c) in enumerate(zip(seeds, clusters)):
            c = np.asarray(c)
            if c.shape != v.shape:
                raise ValueError(f"clusters[{i}] must have one id per record ({v.size}), got {c.size}")
            groups.append([v[c == u] for u in np.unique(c)])
    else:
        groups = [[v[j:j + 1] for j in range(v.size)] for v in seeds]
    rng = np.random.default_rng(seed)
    # per seed: cluster sums and sizes, so a replicate is a weighted count over clusters
    sums = [np.array([g.sum() for g in gs]) for gs in groups]
    sizes = [np.array([g.size for g in gs], dtype=float) for gs in groups]
    s = len(seeds)
    reps = np.empty(n_boot)
    for r in range(n_boot):
        picked = rng.integers(0, s, size=s)
        total = 0.0
        for i in picked:
            k = sums[i].size
            cnt = np.bincount(rng.integers(0, k, size=k), minlength=k)
            total += (cnt @ sums[i]) / (cnt @ sizes[i])
        reps[r] = total / s
    mean = float(np.mean([v.mean() for v in seeds]))
    lo, hi = np.quantile(reps, [0.5 - conf / 2, 0.5 + conf / 2])
    p = float(min(1.0, max(2 * min((reps <= 0).mean(), (reps >= 0).mean()), 1.0 / n_boot)))
    return Interval(mean, float(lo), float(hi), float(reps.std(ddof=1)), s, p)


def minimum_detectable_effect(se: float, alpha: float = 0.05, power: float = 0.8, df: Optional[int] = None) -> float:
    """The smallest true effect that a two-sided test at ``alpha`` detects with probability
    ``power``, given the estimate's standard error: ``(q_{1-alpha/2} + q_power) * se``, with normal
    quantiles, or Student-t quantiles with ``df`` degrees of freedom (seeds - 1)."""
    if se < 0 or not math.isfinite(se):
        raise ValueError(f"se must be a finite number >= 0, got {se!r}")
    if not 0.0 < alpha < 1.0 or not 0.0 < power < 1.0:
        raise ValueError(f"alpha and power must be in (0, 1), got alpha={alpha!r}, power={power!r}")
    if df is not None and df < 1:
        raise ValueError(f"df must be >= 1, got {df!r}")
    dist = _st.norm if df is None else _st.t(df)
    return float((dist.ppf(1 - alpha / 2) + dist.ppf(power)) * se)


def learnability_gate(model_correct: Sequence[Sequence[float]], prior_correct: Sequence[Sequence[float]],
                      margin: float = 0.05, conf: float = 0.95, n_boot: int = 2000, seed: int = 0,
                      clusters: Optional[Sequence[Sequence[int]]] = None) -> dict:
    """Does a domain's single-domain model learn it beyond a prior-only answer?

    ``model_correct[s]`` are the single-domain run's per-record scores in seed s and
    ``prior_correct[s]`` the best fixed answer's (e.g. the training set's most common answer per
    question type) on the same records. The domain passes when the lower end of the
    seeds x records bootstrap interval of (model - prior) exceeds ``margin``. Returns
    ``{"passed", "margin", "interval"}``.
    """
    if len(model_correct) != len(prior_correct):
        raise ValueError(f"model_correct and prior_correct need the same seeds, got {len(model_correct)} "
                         f"and {len(prior_correct)}")
    diffs = []
    for i, (m, p) in enumerate(zip(model_correct, prior_correct)):
        m, p = _as_1d(m, f"model_correct[{i}]"), _as_1d(p, f"prior_correct[{i}]")
        if m.shape != p.shape:
            raise ValueError(f"seed {i}: model_correct and prior_correct must score the same records, "
                             f"got {m.size} and {p.size}")
        diffs.append(m - p)
    iv = bootstrap_seeds_records(diffs, n_boot=n_boot, conf=conf, seed=seed, clusters=clusters)
    return {"passed": bool(iv.lo > margin), "margin": margin, "interval": iv.as_dict()}


def mutual_information(joint: Sequence[Sequence[float]]) -> float:
    """I(X; Y) in bits of a joint table of counts or probabilities (rows X, columns Y), plug-in."""
    p = np.asarray(joint, dtype=float)
    if p.ndim != 2:
        raise ValueError(f"joint must be a 2-D table, got shape {p.shape}")
    if np.any(p < 0) or not np.all(np.isfinite(p)):
        raise ValueError("joint must hold finite non-negative counts")
    total = p.sum()
    if total <= 0:
        raise ValueError("joint must have a positive total")
    p = p / total
    px, py = p.sum(1, keepdims=True), p.sum(0, keepdims=True)
    nz = p > 0
    return float((p[nz] * np.log2(p[nz] / (px @ py)[nz])).sum())


def mutual_information_labels(x: Sequence[int], y: Sequence[int], nx: int, ny: int) -> float:
    """I(X; Y) in bits from paired integer labels x in [0, nx), y in [0, ny)."""
    x, y = np.asarray(x, dtype=int), np.asarray(y, dtype=int)
    if x.shape != y.shape or x.ndim != 1 or x.size == 0:
        raise ValueError(f"x and y must be non-empty 1-D label lists of equal length, got {x.shape} and {y.shape}")
    if x.min() < 0 or x.max() >= nx or y.min() < 0 or y.max() >= ny:
        raise ValueError(f"labels out of range: x must be in [0, {nx}), y in [0, {ny})")
    joint = np.zeros((nx, ny))
    np.add.at(joint, (x, y), 1.0)
    return mutual_information(joint)


def spearman(x: Sequence[float], y: Sequence[float]) -> tuple[float, float]:
    """Spearman rank correlation and its two-sided p-value."""
    x, y = _as_1d(x, "x"), _as_1d(y, "y")
    if x.size != y.size or x.size < 3:
        raise ValueError(f"spearman needs two equal-length lists of >= 3 values, got {x.size} and {y.size}")
    r = _st.spearmanr(x, y)
    return float(r.statistic), float(r.pvalue)


def preregistered_verdict(single: Sequence[Sequence[float]], mix: Sequence[Sequence[float]],
                          mole: Sequence[Sequence[float]], conf: float = 0.95, n_boot: int = 2000, seed: int = 0,
                          clusters: Optional[Sequence[Sequence[int]]] = None, alpha: float = 0.05,
                          power: float = 0.8) -> dict:
    """The criteria of issue 15 for one domain, fixed before running. Arguments are per-seed lists
    of per-record scores of the single-domain run, the mixture LoRA and MoLE on the same records.

    - conflict: mixture below single-domain with the records-bootstrap interval of single - mix
      excluding 0 in *every* seed;
    - MoLE recovers: MoLE above the mixture (seeds x records interval of mole - mix above 0) and
      non-inferior to single-domain within half the conflict (interval of mole - single above
      -conflict / 2);
    - the smallest detectable effect: ``minimum_detectable_effect`` of the pooled single - mix
      estimate, so "nothing significant" reads "no effect larger than X".
    """
    if not (len(single) == len(mix) == len(mole)) or not single:
        raise ValueError(f"single, mix and mole need the same (>= 1) seeds, got {len(single)}, {len(mix)}, {len(mole)}")
    arrs = {}
    for name, arm in (("single", single), ("mix", mix), ("mole", mole)):
        arrs[name] = [_as_1d(v, f"{name}[{i}]") for i, v in enumerate(arm)]
    for i in range(len(single)):
        if not (arrs["single"][i].shape == arrs["mix"][i].shape == arrs["mole"][i].shape):
            raise ValueError(f"seed {i}: single, mix and mole must score the same records")

    def boot(diffs, cl=None):
        return bootstrap_seeds_records(diffs, n_boot=n_boot, conf=conf, seed=seed, clusters=cl)

    d_sm = [s - m for s, m in zip(arrs["single"], arrs["mix"])]
    per_seed = [boot([d], None if clusters is None else [clusters[i]]) for i, d in enumerate(d_sm)]
    conflict = boot(d_sm, clusters)
    gain = boot([o - m for o, m in zip(arrs["mole"], arrs["mix"])], clusters)
    vs_single = boot([o - s for o, s in zip(arrs["mole"], arrs["single"])], clusters)
    mde = minimum_detectable_effect(conflict.se, alpha=alpha, power=power)
    conflict_found = all(iv.lo > 0 for iv in per_seed)
    recovers = conflict_found and gain.lo > 0 and vs_single.lo > -conflict.mean / 2
    if conflict_found:
        text = (f"Conflict: the mixture is below single-domain by {conflict.fmt()} (every seed's interval "
                f"excludes 0). " + ("MoLE recovers it: " if recovers else "MoLE does not recover it: ") +
                f"MoLE - mixture {gain.fmt()}, MoLE - single {vs_single.fmt()} (non-inferiority margin "
                f"{-conflict.mean / 2:+.3f}).")
    else:
        text = (f"No conflict established (single - mixture {conflict.fmt()}; the criterion needs every "
                f"seed's interval above 0): no effect larger than {mde:.3f} (the smallest effect detectable "
                f"at {power:.0%} power)" + (
                    "; X is 0 because the two arms agree on every record of every seed (a zero-width "
                    "interval), not because the test is sensitive" if conflict.se == 0 else "") + ".")
    return {"conflict": conflict_found, "recovers": recovers, "mde": mde, "text": text,
            "single_minus_mix": conflict.as_dict(), "per_seed_single_minus_mix": [iv.as_dict() for iv in per_seed],
            "mole_minus_mix": gain.as_dict(), "mole_minus_single": vs_single.as_dict()}
