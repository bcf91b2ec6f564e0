"""training.experiments.stats on known inputs: interval coverage on simulated data, Holm against a
hand-worked example, the seeds x records bootstrap, the minimum detectable effect, the learnability
gate and mutual information on known joint tables."""
from __future__ import annotations

import math
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from training.experiments import stats  # noqa: E402


def test_t_interval_by_hand():
    iv = stats.t_interval([1.0, 2.0, 3.0, 4.0])
    se = math.sqrt(5 / 3) / 2  # sd = sqrt(5/3), n = 4
    assert iv.mean == pytest.approx(2.5) and iv.se == pytest.approx(se) and iv.n == 4
    assert iv.lo == pytest.approx(2.5 - 3.182446 * se, abs=1e-5)  # t_{0.975, 3} = 3.182446
    assert iv.hi == pytest.approx(2.5 + 3.182446 * se, abs=1e-5)
    assert iv.p == pytest.approx(0.0305, abs=2e-4)  # t = 3.873 on 3 df: between 0.05 (3.18) and 0.02 (4.54)
    assert iv.excludes_zero()
    flat = stats.t_interval([0.2, 0.2, 0.2])
    assert (flat.lo, flat.hi, flat.p) == (0.2, 0.2, 0.0)
    assert stats.t_interval([0.0, 0.0]).p == 1.0


def test_t_interval_covers_the_mean_95_percent_of_the_time_with_few_seeds():
    """With 5 seeds a normal (z) interval would cover about 88 %; the t interval 95 %."""
    rng = np.random.default_rng(0)
    hits = 0
    sims = 4000
    for _ in range(sims):
        iv = stats.t_interval(rng.normal(0.3, 0.1, size=5))
        hits += iv.lo <= 0.3 <= iv.hi
    assert 0.935 <= hits / sims <= 0.965


def test_paired_difference_is_the_t_interval_of_the_differences():
    a, b = [0.9, 0.8, 0.85, 0.95], [0.7, 0.75, 0.6, 0.8]
    assert stats.paired_difference(a, b) == stats.t_interval(np.subtract(a, b))
    with pytest.raises(ValueError, match="same length"):
        stats.paired_difference([1.0, 2.0], [1.0])


def test_holm_hand_worked():
    # sorted: 0.005*4 = 0.02, 0.01*3 = 0.03, 0.03*2 = 0.06, 0.04*1 = 0.04 -> max(0.06, 0.04) = 0.06
    adj, rej = stats.holm([0.01, 0.04, 0.03, 0.005])
    assert adj == pytest.approx([0.03, 0.06, 0.06, 0.02])
    assert rej == [True, False, False, True]
    adj, rej = stats.holm([0.5, 0.9])
    assert adj == pytest.approx([1.0, 1.0]) and rej == [False, False]  # capped at 1
    with pytest.raises(ValueError, match="pvalues must lie in"):
        stats.holm([0.1, 1.5])


def test_bootstrap_sees_between_seed_variation():
    """Seed effects dominate: the two-stage bootstrap's se is that of the seed means, far above
    what resampling records alone would give."""
    rng = np.random.default_rng(1)
    seed_effects = rng.normal(0, 0.2, size=8)
    values = [rng.normal(0.5 + e, 0.05, size=200) for e in seed_effects]
    iv = stats.bootstrap_seeds_records(values, n_boot=1000, seed=0)
    means = np.array([v.mean() for v in values])
    expected = means.std(ddof=0) / math.sqrt(len(values))  # bootstrap se of a mean of 8
    assert iv.se == pytest.approx(expected, rel=0.2)
    assert iv.mean == pytest.approx(means.mean())
    assert iv.lo < means.mean() < iv.hi


def test_bootstrap_clusters_count_dependent_records_once():
    """Records duplicated in clusters of 4: cluster resampling doubles the se (sqrt 4)."""
    rng = np.random.default_rng(2)
    base = rng.normal(0, 1, size=100)
    vals = [np.repeat(base, 4)]
    clusters = [np.repeat(np.arange(100), 4)]
    naive = stats.bootstrap_seeds_records(vals, n_boot=1000, seed=0)
    clustered = stats.bootstrap_seeds_records(vals, n_boot=1000, seed=0, clusters=clusters)
    assert clustered.se / naive.se == pytest.approx(2.0, rel=0.15)
    with pytest.raises(ValueError, match="clusters\\[0\\] must have one id per record"):
        stats.bootstrap_seeds_records(vals, clusters=[np.arange(3)])


def test_minimum_detectable_effect():
    assert stats.minimum_detectable_effect(1.0) == pytest.approx(1.959964 + 0.841621, abs=1e-5)
    assert stats.minimum_detectable_effect(0.1, df=4) > stats.minimum_detectable_effect(0.1)
    # a true effect of one MDE is detected by the two-sided z-test at about the stated power
    rng = np.random.default_rng(3)
    z = rng.normal(stats.minimum_detectable_effect(1.0), 1.0, size=20000)
    assert np.mean(np.abs(z) > 1.959964) == pytest.approx(0.8, abs=0.015)
    with pytest.raises(ValueError, match="power"):
        stats.minimum_detectable_effect(1.0, power=1.5)


def test_learnability_gate():
    rng = np.random.default_rng(4)
    prior = [(rng.random(120) < 0.5).astype(float) for _ in range(3)]
    learned = [np.maximum(p, (rng.random(120) < 0.8).astype(float)) for p in prior]  # ~0.9 vs 0.5
    assert stats.learnability_gate(learned, prior, margin=0.05)["passed"]
    same = [p.copy() for p in prior]
    assert not stats.learnability_gate(same, prior, margin=0.05)["passed"]
    tenth = [np.full(100, 0.6) for _ in range(3)]
    base = [np.full(100, 0.5) for _ in range(3)]
    assert stats.learnability_gate(tenth, base, margin=0.05)["passed"]
    assert not stats.learnability_gate(tenth, base, margin=0.2)["passed"]  # the margin counts
    with pytest.raises(ValueError, match="same seeds"):
        stats.learnability_gate(tenth, base[:2])
    with pytest.raises(ValueError, match="score the same records"):
        stats.learnability_gate([np.ones(3)], [np.ones(4)])


def test_mutual_information_known_tables():
    assert stats.mutual_information([[1, 1], [1, 1]]) == pytest.approx(0.0)
    assert stats.mutual_information(np.eye(3) * 7) == pytest.approx(math.log2(3))
    h = -(0.2 * math.log2(0.2) + 0.8 * math.log2(0.8))
    assert stats.mutual_information([[0.4, 0.1], [0.1, 0.4]]) == pytest.approx(1 - h)
    # domain 0 -> expert 0; domains 1 and 2 share expert 1: I = H(expert) = H(1/3, 2/3)
    x, y = [0, 0, 1, 1, 2, 2], [0, 0, 1, 1, 1, 1]
    assert stats.mutual_information_labels(x, y, 3, 2) == pytest.approx(
        -(1 / 3 * math.log2(1 / 3) + 2 / 3 * math.log2(2 / 3)))
    with pytest.raises(ValueError, match="labels out of range"):
        stats.mutual_information_labels([0, 3], [0, 0], 3, 1)
    with pytest.raises(ValueError, match="non-negative"):
        stats.mutual_information([[1, -1], [0, 1]])


def test_errors_name_the_argument():
    with pytest.raises(ValueError, match="at least 2 values"):
        stats.t_interval([1.0])
    with pytest.raises(ValueError, match="conf must be in"):
        stats.t_interval([1.0, 2.0], conf=95)
    with pytest.raises(ValueError, match="x must be finite"):
        stats.t_interval([1.0, float("nan")])


def test_preregistered_verdict():
    """A clear conflict that MoLE recovers; a null result reported as 'no effect larger than X'."""
    rng = np.random.default_rng(5)
    n, seeds = 200, 3
    single = [(rng.random(n) < 0.8).astype(float) for _ in range(seeds)]
    mix = [s * (rng.random(n) < 0.6) for s in single]  # loses ~40 % of single's right answers
    mole = [np.maximum(m, s * (rng.random(n) < 0.9)) for s, m in zip(single, mix)]  # wins most back
    v = stats.preregistered_verdict(single, mix, mole, n_boot=500)
    assert v["conflict"] and v["recovers"] and v["text"].startswith("Conflict:")
    assert v["single_minus_mix"]["mean"] == pytest.approx(np.mean([(s - m).mean() for s, m in zip(single, mix)]))
    v = stats.preregistered_verdict(single, mix, [m.copy() for m in mix], n_boot=500)
    assert v["conflict"] and not v["recovers"]
    same = [s.copy() for s in single]
    v = stats.preregistered_verdict(single, same, same, n_boot=500)
    assert not v["conflict"] and not v["recovers"]
    assert v["mde"] == 0.0 and "no effect larger than 0.000" in v["text"] and "zero-width" in v["text"]
    noisy = [(rng.random(n) < 0.8).astype(float) for _ in range(seeds)]  # same rate, independent draws
    v = stats.preregistered_verdict(single, noisy, noisy, n_boot=500)
    assert not v["conflict"] and 0.05 < v["mde"] < 0.2 and f"{v['mde']:.3f}" in v["text"]
    with pytest.raises(ValueError, match="same \\(>= 1\\) seeds"):
        stats.preregistered_verdict(single, mix[:2], mole)


def test_bootstrap_interval_coverage_on_simulated_data():
    """The seeds x records bootstrap covers the true mean at about its nominal 95 %: records alone
    (one seed, 0/1 scores) and seeds x records with seed effects and image clusters of 3 records."""
    rng = np.random.default_rng(7)
    hits = 0
    for _ in range(300):
        v = [(rng.random(80) < 0.7).astype(float)]
        iv = stats.bootstrap_seeds_records(v, n_boot=200, seed=int(rng.integers(1 << 30)))
        hits += iv.lo <= 0.7 <= iv.hi
    assert 0.90 <= hits / 300 <= 0.99
    hits = 0
    for _ in range(150):
        vals, cl = [], []
        for s in range(10):
            img = rng.normal(0.5 + rng.normal(0, 0.05), 0.1, size=20)  # seed effect, then image effect
            vals.append(np.repeat(img, 3) + rng.normal(0, 0.1, size=60))
            cl.append(np.repeat(np.arange(20), 3))
        iv = stats.bootstrap_seeds_records(vals, n_boot=200, clusters=cl, seed=int(rng.integers(1 << 30)))
        hits += iv.lo <= 0.5 <= iv.hi
    assert 0.85 <= hits / 150 <= 0.99
