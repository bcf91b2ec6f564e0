"""The benchmarks' answer metrics as pure functions (no model, no I/O).

Each metric takes one prediction and one ground truth (a string, or a list of acceptable strings)
and returns a score in [0, 1]:

| name (aliases)                      | benchmark | rule                                                    |
|-------------------------------------|-----------|---------------------------------------------------------|
| `exact_match` (`vqa`, `em`)         | VQAv2     | exact match after the official VQA answer normalisation  |
| `vqa_accuracy`                      | VQAv2     | min(1, matching human answers / 3), same normalisation   |
| `relaxed_accuracy` (`chartqa`)      | ChartQA   | numeric: within 5% of the target; otherwise exact        |
| `anls` (`docvqa`)                   | DocVQA    | 1 - normalised Levenshtein distance, 0 below 0.5         |
| `closed_accuracy` (`pathvqa_closed`)| PathVQA   | yes/no (first yes/no word of the prediction); else exact |
| `open_recall` (`pathvqa_open`)      | PathVQA   | share of ground-truth tokens found in the prediction     |

`score(name, prediction, answer)` dispatches by name; `score_record(record, prediction)` reads the
answer, `metric` and `domain` of a LLaVA-JSON record; `aggregate(items)` averages per domain.
"""
from __future__ import annotations

import re
from collections import Counter, defaultdict
from typing import Iterable, Mapping, Sequence

__all__ = [
    "normalize_answer", "exact_match", "vqa_accuracy", "relaxed_accuracy", "anls", "closed_accuracy", "open_recall",
    "score", "score_record", "aggregate", "METRICS", "canonical_metric",
]

# --- VQA answer normalisation (port of the official VQA evaluation, vqaEval.py) ----------------

_CONTRACTIONS = {
    "aint": "ain't", "arent": "aren't", "cant": "can't", "couldve": "could've", "couldnt": "couldn't",
    "couldn'tve": "couldn't've", "couldnt've": "couldn't've", "didnt": "didn't", "doesnt": "doesn't",
    "dont": "don't", "hadnt": "hadn't", "hadnt've": "hadn't've", "hadn'tve": "hadn't've",
    "hasnt": "hasn't", "havent": "haven't", "hed": "he'd", "hed've": "he'd've", "he'dve": "he'd've",
    "hes": "he's", "howd": "how'd", "howll": "how'll", "hows": "how's", "Id've": "I'd've",
    "I'dve": "I'd've", "Im": "I'm", "Ive": "I've", "isnt": "isn't", "itd": "it'd", "itd've": "it'd've",
    "it'dve": "it'd've", "itll": "it'll", "let's": "let's", "maam": "ma'am", "mightnt": "mightn't",
    "mightnt've": "mightn't've", "mightn'tve": "mightn't've", "mightve": "might've", "mustnt": "mustn't",
    "mustve": "must've", "neednt": "needn't", "notve": "not've", "oclock": "o'clock", "oughtnt": "oughtn't",
    "ow's'at": "'ow's'at", "'ows'at": "'ow's'at", "'ow'sat": "'ow's'at", "shant": "shan't",
    "shed've": "she'd've", "she'dve": "she'd've", "she's": "she's", "shouldve": "should've",
    "shouldnt": "shouldn't", "shouldnt've": "shouldn't've", "shouldn'tve": "shouldn't've",
    "somebody'd": "somebodyd", "somebodyd've": "somebody'd've", "somebody'dve": "somebody'd've",
    "somebodyll": "somebody'll", "somebodys": "somebody's", "someoned": "someone'd",
    "someoned've": "someone'd've", "someone'dve": "someone'd've", "someonell": "someone'll",
    "someones": "someone's", "somethingd": "something'd", "somethingd've": "something'd've",
    "something'dve": "something'd've", "somethingll": "something'll", "thats": "that's",
    "thered": "there'd", "thered've": "there'd've", "there'dve": "there'd've", "therere": "there're",
    "theres": "there's", "theyd": "they'd", "theyd've": "they'd've", "they'dve": "they'd've",
    "theyll": "they'll", "theyre": "they're", "theyve": "they've", "twas": "'twas", "wasnt": "wasn't",
    "wed've": "we'd've", "we'dve": "we'd've", "weve": "we've", "werent": "weren't", "whatll": "what'll",
    "whatre": "what're", "whats": "what's", "whatve": "what've", "whens": "when's", "whered": "where'd",
    "wheres": "where's", "whereve": "where've", "whod": "who'd", "whod've": "who'd've",
    "who'dve": "who'd've", "wholl": "who'll", "whos": "who's", "whove": "who've", "whyll": "why'll",
    "whyre": "why're", "whys": "why's", "wont": "won't", "wouldve": "would've", "wouldnt": "wouldn't",
    "wouldnt've": "wouldn't've", "wouldn'tve": "wouldn't've", "yall": "y'all", "yall'll": "y'all'll",
    "y'allll": "y'all'll", "yall'd've": "y'all'd've", "y'alld've": "y'all'd've",
    "y'all'dve": "y'all'd've", "youd": "you'd", "youd've": "you'd've", "you'dve": "you'd've",
    "youll": "you'll", "youre": "you're", "youve": "you've",
}
_NUMBER_WORDS = {
    "none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5",
    "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10",
}
_ARTICLES = {"a", "an", "the"}
_PUNCT = [";", r"/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-",
          ">", "<", "@", "`", ",", "?", "!"]
_PERIOD_STRIP = re.compile(r"(?!<=\d)(\.)(?!\d)")  # sic: the official pattern, kept for parity
_COMMA_STRIP = re.compile(r"(\d)(,)(\d)")


def _process_punctuation(text: str) -> str:
    out = text
    for p in _PUNCT:
        if (p + " " in text or " " + p in text) or _COMMA_STRIP.search(text) is not None:
            out = out.replace(p, "")
        else:
            out = out.replace(p, " ")
    return _PERIOD_STRIP.sub("", out)


def _process_digit_article(text: str) -> str:
    words = []
    for w in text.lower().split():
        w = _NUMBER_WORDS.get(w, w)
        if w not in _ARTICLES:
            words.append(_CONTRACTIONS.get(w, w))
    return " ".join(words)


def normalize_answer(text: str) -> str:
    """The VQA evaluation's answer normalisation: whitespace, punctuation (keeping decimal points
    and thousands commas' digits together), lowercase, number words to digits, articles dropped,
    contractions restored ("dont" -> "don't")."""
    text = str(text).replace("\n", " ").replace("\t", " ").strip()
    return _process_digit_article(_process_punctuation(text))


def _answers(answer: str | Sequence[str]) -> list[str]:
    return [answer] if isinstance(answer, str) else list(answer)


# --- metrics ---------------------------------------------------------------------------------

def exact_match(prediction: str, answer: str | Sequence[str]) -> float:
    """Exact match after the VQA normalisation; with a list, matching any answer counts."""
    pred = normalize_answer(prediction)
    return float(any(normalize_answer(a) == pred for a in _answers(answer)))


def vqa_accuracy(prediction: str, answer: str | Sequence[str]) -> float:
    """VQAv2's soft accuracy over its ten human answers: min(1, matches / 3) after normalisation.
    A single answer string is treated as exact match."""
    if isinstance(answer, str):
        return exact_match(prediction, answer)
    pred = normalize_answer(prediction)
    return min(1.0, sum(normalize_answer(a) == pred for a in answer) / 3.0)


def _to_float(text: str) -> float | None:
    text = text.strip().replace(",", "")  # "1,234" is a number in charts; pix2struct would not parse it
    try:
        if text.endswith("%"):
            return float(text[:-1]) / 100.0
        return float(text)
    except ValueError:
        return None


def relaxed_accuracy(prediction: str, answer: str | Sequence[str], tolerance: float = 0.05) -> float:
    """ChartQA relaxed accuracy (pix2struct's relaxed_correctness): when both parse as numbers and
    the target is non-zero, correct iff |pred - target| / |target| <= 5%; otherwise a
    case-insensitive exact match of the stripped strings. Best over a list of answers."""
    best = 0.0
    for gold in _answers(answer):
        p, t = _to_float(prediction), _to_float(gold)
        if p is not None and t:  # a zero target falls back to exact match, as in pix2struct
            ok = abs(p - t) / abs(t) <= tolerance
        else:
            ok = prediction.strip().lower() == gold.strip().lower()
        best = max(best, float(ok))
    return best


def _levenshtein(a: str, b: str) -> int:
    if len(a) < len(b):
        a, b = b, a
    prev = list(range(len(b) + 1))
    for i, ca in enumerate(a, 1):
        cur = [i]
        for j, cb in enumerate(b, 1):
            cur.append(min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (ca != cb)))
        prev = cur
    return prev[-1]


def anls(prediction: str, answer: str | Sequence[str], threshold: float = 0.5) -> float:
    """DocVQA Average Normalised Levenshtein Similarity for one question: the best over gold
    answers of 1 - NL, where NL = edit distance / max length of the lowercased, whitespace-
    collapsed strings, and 0 when NL >= threshold (0.5)."""
    pred = " ".join(prediction.lower().split())
    best = 0.0
    for gold in _answers(answer):
        g = " ".join(gold.lower().split())
        n = max(len(pred), len(g))
        nl = _levenshtein(pred, g) / n if n else 0.0
        best = max(best, 1.0 - nl if nl < threshold else 0.0)
    return best


_YES_NO = ("yes", "no")


def closed_accuracy(prediction: str, answer: str | Sequence[str]) -> float:
    """PathVQA closed-set accuracy. For yes/no ground truth the first "yes" or "no" word of the
    normalised prediction decides ("No, there is no necrosis." is "no"); other closed answers
    (a choice among named options) need a normalised exact match."""
    words = normalize_answer(prediction).split()
    for gold in _answers(answer):
        g = normalize_answer(gold)
        if g in _YES_NO:
            said = next((w for w in words if w in _YES_NO), None)
            if said == g:
                return 1.0
        elif " ".join(words) == g:
            return 1.0
    return 0.0


def open_recall(prediction: str, answer: str | Sequence[str]) -> float:
    """PathVQA open-set recall (LLaVA-Med's metric): the share of the ground truth's normalised
    tokens (counted with multiplicity) that appear in the prediction. Best over answers; an
    empty ground truth scores 1 only against an empty prediction."""
    pred = Counter(normalize_answer(prediction).split())
    best = 0.0
    for gold in _answers(answer):
        g = Counter(normalize_answer(gold).split())
        total = sum(g.values())
        if total == 0:
            r = float(sum(pred.values()) == 0)
        else:
            r = sum((g & pred).values()) / total
        best = max(best, r)
    return best


METRICS = {
    "exact_match": exact_match,
    "vqa_accuracy": vqa_accuracy,
    "relaxed_accuracy": relaxed_accuracy,
    "anls": anls,
    "closed_accuracy": closed_accuracy,
    "open_recall": open_recall,
}
_ALIASES = {
    "vqa": "exact_match", "em": "exact_match", "vqa_exact_match": "exact_match",
    "chartqa": "relaxed_accuracy", "relaxed": "relaxed_accuracy",
    "docvqa": "anls",
    "pathvqa_closed": "closed_accuracy", "closed": "closed_accuracy",
    "pathvqa_open": "open_recall", "open": "open_recall", "recall": "open_recall",
}


def canonical_metric(name: str | None) -> str:
    """The canonical metric name for `name` or an alias; None means `exact_match` (the default
    for records without a `metric` key). Unknown names raise ValueError listing the known ones."""
    if name is None:
        return "exact_match"
    key = name.strip().lower()
    key = _ALIASES.get(key, key)
    if key not in METRICS:
        known = sorted(set(METRICS) | set(_ALIASES))
        raise ValueError(f"unknown metric {name!r}; known: {', '.join(known)}")
    return key


def score(metric: str | None, prediction: str, answer: str | Sequence[str]) -> float:
    """Score one prediction with the named metric (canonical name or alias, see `METRICS`)."""
    return METRICS[canonical_metric(metric)](prediction, answer)


def score_record(record: Mapping, prediction: str, default_domain: str = "default") -> dict:
    """Score a prediction for a LLaVA-JSON record: the answer is the last `gpt` turn, the metric
    the record's `metric` key (default `exact_match`), the domain its `domain` key (default
    `default_domain`, e.g. the JSON file's stem). An `answers` list on the record (several
    acceptable answers, as in VQAv2 or DocVQA) takes precedence over the gpt turn.

    Returns {"id", "domain", "metric", "score"}: ready for `aggregate`."""
    if "answers" in record:
        answer = record["answers"]
    else:
        gpt = [t["value"] for t in record.get("conversations", []) if t.get("from") == "gpt"]
        if not gpt:
            raise ValueError(f"record {record.get('id')!r} has no gpt turn to score against")
        answer = gpt[-1]
    metric = canonical_metric(record.get("metric"))
    return {"id": record.get("id"), "domain": record.get("domain", default_domain), "metric": metric,
            "score": METRICS[metric](prediction, answer)}


def aggregate(items: Iterable[Mapping]) -> dict:
    """Average scores per domain and per (domain, metric).

    Args:
        items: mappings with keys `domain`, `metric` and `score` (e.g. one per test record).
    Returns:
        {"domains": {domain: {"score": mean, "n": count, "metrics": {metric: {"score", "n"}}}},
         "macro": mean of the domain means (each domain weighs the same), "n": total count}.
        Domains appear in first-seen order. Empty input gives no domains and a macro of 0.0.
    """
    sums: dict[str, dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
    order: list[str] = []
    for it in items:
        d = str(it["domain"])
        if d not in sums:
            order.append(d)
        sums[d][canonical_metric(it.get("metric"))].append(float(it["score"]))
    domains = {}
    for d in order:
        by_metric = sums[d]
        flat = [s for v in by_metric.values() for s in v]
        domains[d] = {
            "score": sum(flat) / len(flat), "n": len(flat),
            "metrics": {m: {"score": sum(v) / len(v), "n": len(v)} for m, v in by_metric.items()},
        }
    macro = sum(v["score"] for v in domains.values()) / len(domains) if domains else 0.0
    return {"domains": domains, "macro": macro, "n": sum(v["n"] for v in domains.values())}
