"""Known cases for the benchmark metrics in training/metrics.py, including edge cases."""
import pytest

from training.metrics import (
    aggregate, anls, canonical_metric, closed_accuracy, exact_match, normalize_answer, open_recall,
    relaxed_accuracy, score,
)


@pytest.mark.parametrize("raw,norm", [
    ("Two", "2"),                       # number words -> digits
    ("  The Red circle. ", "red circle"),  # case, articles, trailing period
    ("an apple", "apple"),
    ("dont", "don't"),                  # contractions restored
    ("isnt it", "isn't it"),
    ("yes!", "yes"),
    ("black-and-white", "black and white"),  # hyphen with no spaces around: a space
    ("3.5", "3.5"),                     # decimal point kept
    ("1,000", "1000"),                  # thousands comma dropped
    ("a\tb\nc", "b c"),                 # whitespace; "a" is an article
    ("none", "0"),
    ("", ""),
])
def test_vqa_normalisation(raw, norm):
    assert normalize_answer(raw) == norm


def test_exact_match():
    assert exact_match("Three", "3") == 1.0
    assert exact_match("3", "three") == 1.0
    assert exact_match("the circle", "Circle.") == 1.0
    assert exact_match("circles", "circle") == 0.0
    assert exact_match("yes it is", "yes") == 0.0
    assert exact_match("", "") == 1.0
    assert exact_match("2", ["two", "3"]) == 1.0  # any of several answers


def test_vqa_accuracy():
    from training.metrics import vqa_accuracy

    humans = ["2"] * 2 + ["3"] * 8  # ten human answers: min(1, matches / 3)
    assert vqa_accuracy("two", humans) == pytest.approx(2 / 3)
    assert vqa_accuracy("3", humans) == 1.0
    assert vqa_accuracy("4", humans) == 0.0
    assert vqa_accuracy("Two.", "2") == 1.0  # a single answer: exact match


def test_relaxed_accuracy():
    assert relaxed_accuracy("105", "100") == 1.0        # exactly 5%: inclusive
    assert relaxed_accuracy("105.01", "100") == 0.0
    assert relaxed_accuracy("95", "100") == 1.0
    assert relaxed_accuracy("-10.4", "-10") == 1.0       # relative to |target|
    assert relaxed_accuracy("12%", "0.12") == 1.0        # percentages parse as fractions
    assert relaxed_accuracy("1,234", "1234") == 1.0
    assert relaxed_accuracy(" Rain ", "rain") == 1.0     # non-numeric: case-insensitive exact
    assert relaxed_accuracy("rainy", "rain") == 0.0
    assert relaxed_accuracy("three", "3") == 0.0         # no number words in ChartQA
    assert relaxed_accuracy("0.01", "0") == 0.0          # zero target: exact string match only
    assert relaxed_accuracy("0", "0") == 1.0
    assert relaxed_accuracy("7", ["100", "7.2"]) == 1.0  # best over answers


def test_anls():
    assert anls("Corner Cafe", "corner cafe") == 1.0
    assert anls("Corner  Cafe ", "Corner Cafe") == 1.0   # whitespace collapsed
    assert anls("41.28", "41.29") == pytest.approx(0.8)  # 1 edit in 5 characters
    assert anls("abcd", "abxy") == 0.0                   # NL = 0.5: at the threshold scores 0
    assert anls("abcde", "abcxy") == pytest.approx(0.6)  # NL = 0.4
    assert anls("", "") == 1.0
    assert anls("", "x") == 0.0
    assert anls("Anna Smith", ["A. Smith", "Anna Smith"]) == 1.0


def test_anls_threshold_boundary():
    assert anls("abcdefghij", "abcdefxxxx") == pytest.approx(0.6)  # NL 0.4
    assert anls("abcdefghij", "abcdexxxxx") == 0.0                 # NL 0.5


def test_closed_accuracy():
    assert closed_accuracy("Yes", "yes") == 1.0
    assert closed_accuracy("No, there is no necrosis.", "no") == 1.0
    assert closed_accuracy("no", "yes") == 0.0
    assert closed_accuracy("I cannot tell", "no") == 0.0           # no yes/no word: wrong
    assert closed_accuracy("Yes. No.", "no") == 0.0                # the first yes/no word counts
    assert closed_accuracy("Tumour.", "tumour") == 1.0             # choice among options: exact
    assert closed_accuracy("tumour or necrosis", "tumour") == 0.0
    assert closed_accuracy("The normal glands", "normal glands") == 1.0


def test_open_recall():
    gt = "tumour with crowded irregular glands"
    assert open_recall("Tumour with crowded, irregular glands.", gt) == 1.0
    assert open_recall("a tumour", gt) == pytest.approx(1 / 5)
    assert open_recall("glands glands glands", gt) == pytest.approx(1 / 5)  # multiplicity is capped
    assert open_recall("", gt) == 0.0
    assert open_recall("anything", "") == 0.0
    assert open_recall("", "") == 1.0
    assert open_recall("there are two nuclei", "2 nuclei") == 1.0  # normalised tokens


def test_score_dispatch_and_aliases():
    assert score("vqa", "Two", "2") == 1.0
    assert score("chartqa", "98", "100") == 1.0
    assert score("docvqa", "41.28", "41.29") == pytest.approx(0.8)
    assert score("pathvqa_closed", "yes", "yes") == 1.0
    assert score("pathvqa_open", "necrosis", "necrosis with debris") == pytest.approx(1 / 3)
    assert score(None, "the cat", "cat") == 1.0  # no metric key: normalised exact match
    assert canonical_metric("ChartQA") == "relaxed_accuracy"
    with pytest.raises(ValueError, match="unknown metric 'bleu'"):
        score("bleu", "a", "a")


def test_aggregate():
    items = [
        {"domain": "charts", "metric": "relaxed_accuracy", "score": 1.0},
        {"domain": "charts", "metric": "anls", "score": 0.5},
        {"domain": "general", "metric": "vqa", "score": 0.0},
        {"domain": "general", "score": 1.0},  # no metric: exact_match
        {"domain": "charts", "metric": "chartqa", "score": 0.0},
    ]
    agg = aggregate(items)
    assert list(agg["domains"]) == ["charts", "general"]
    ch = agg["domains"]["charts"]
    assert ch["n"] == 3 and ch["score"] == pytest.approx(0.5)
    assert ch["metrics"]["relaxed_accuracy"] == {"score": 0.5, "n": 2}
    assert agg["domains"]["general"]["metrics"] == {"exact_match": {"score": 0.5, "n": 2}}
    assert agg["macro"] == pytest.approx(0.5) and agg["n"] == 5
    assert aggregate([]) == {"domains": {}, "macro": 0.0, "n": 0}


def test_score_record():
    from training.metrics import score_record

    rec = {"id": "x", "image": "a.png", "domain": "charts", "metric": "chartqa",
           "conversations": [{"from": "human", "value": "<image>\nq"}, {"from": "gpt", "value": "100"}]}
    assert score_record(rec, "103") == {"id": "x", "domain": "charts", "metric": "relaxed_accuracy", "score": 1.0}
    plain = {"id": "y", "conversations": rec["conversations"]}  # no keys: file domain, exact match
    assert score_record(plain, "100.0", default_domain="mine") == \
        {"id": "y", "domain": "mine", "metric": "exact_match", "score": 0.0}
    assert score_record({**plain, "answers": ["a", "100.0"]}, "100.0")["score"] == 1.0
    with pytest.raises(ValueError, match="no gpt turn"):
        score_record({"id": "z", "conversations": []}, "a")
