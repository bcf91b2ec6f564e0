"""The conflict knob: question templates shared by the general and chart domains whose answer
convention differs between them.

Counting questions in both domains are drawn from the same ten phrasings (`SHARED_COUNT_TEMPLATES`).
Charts always answer counts in digits ("4"). The general domain answers a template in words
("four") when that template is *conflicted*, in digits otherwise. `conflict` is the share of the
ten templates that are conflicted: the first round(conflict * 10) of a fixed order, so raising the
knob only adds conflicted templates (the sets are nested) and 0.1 steps are exact.

The VQA metric maps number words to digits, so a general-domain answer of "4" still scores on
"four"; the conflict shows where the charts' relaxed accuracy meets a model that learnt words.
"""
from __future__ import annotations

from .common import NUMBER_WORDS

SHARED_COUNT_TEMPLATES = (
    "How many {objects} are there?",
    "How many {objects} are shown?",
    "How many {objects} can you see?",
    "What is the number of {objects}?",
    "Count the {objects}.",
    "How many {objects} are in the image?",
    "How many {objects} are visible?",
    "Tell me the number of {objects}.",
    "What is the count of {objects}?",
    "How many {objects} does the image contain?",
)
# Fixed, seed-independent order in which templates become conflicted as the knob rises.
_CONFLICT_ORDER = (3, 7, 0, 5, 9, 1, 6, 2, 8, 4)


def n_conflicted(conflict: float) -> int:
    if not 0.0 <= conflict <= 1.0:
        raise ValueError(f"conflict must be in [0, 1], got {conflict}")
    return int(round(conflict * len(SHARED_COUNT_TEMPLATES) + 1e-9))


def conflicted_templates(conflict: float) -> frozenset[int]:
    """Indices into SHARED_COUNT_TEMPLATES whose general-domain answers use words."""
    return frozenset(_CONFLICT_ORDER[: n_conflicted(conflict)])


def count_answer(n: int, domain: str, template: int, conflict: float) -> str:
    """The answer string for a count `n` asked with shared template `template` in `domain`."""
    if domain == "general" and template in conflicted_templates(conflict):
        return NUMBER_WORDS[n]
    return str(n)


# ---- conflict-cpu-v2 (issue 15): a conflict that only the image can resolve ------------------------

NEUTRAL_COUNT_QUESTION = "How many things are in this picture?"
NEUTRAL_TASK = "count_neutral"
# The convention of each domain for the neutral question: general answers in words, charts in digits.
NEUTRAL_CONVENTION = {"general": "words", "charts": "digits"}


def image_count(rec: dict) -> int | None:
    """The number of things on a record's image, or None when the image has no countable things
    (a form): a generated scene's shapes, an easy-VQA image's single shape, a chart's bars / slices /
    points, a receipt's items."""
    meta = rec.get("meta") or {}
    if "objects" in meta:
        return len(meta["objects"])
    if rec.get("task") == "easyvqa":
        return 1  # every easy-VQA image shows exactly one shape
    if "chart" in meta:
        return len(meta["chart"]["categories"])
    doc = meta.get("document")
    if doc and doc.get("type") == "receipt":
        return len(doc["items"])
    return None


def add_neutral_count(records: list[dict], domain: str, share: float, seed: int, split: str) -> list[dict]:
    """Rewrite about ``share`` of a domain's records into the object-neutral counting question.

    The question text is the same in both domains (``NEUTRAL_COUNT_QUESTION``), so only the image
    (a shape scene or a chart / receipt) tells the domain and with it the answer's convention:
    words in general ("three"), digits in charts ("3"). At most one record per image is rewritten
    (two identical questions on one image would be duplicates), chosen at random from the images
    with a countable content; the record keeps its id and image and gets ``task`` ``count_neutral``,
    ``meta.neutral`` = {count, convention, replaced task}. Returns a new list; records of other domains
    are returned unchanged (copied)."""
    import copy
    import random

    if not 0.0 <= share <= 1.0:
        raise ValueError(f"share must be in [0, 1], got {share}")
    out = [copy.deepcopy(r) for r in records]
    if domain not in NEUTRAL_CONVENTION or share == 0.0:
        return out
    conv = NEUTRAL_CONVENTION[domain]
    first_by_image: dict[str, int] = {}
    for i, r in enumerate(out):
        if r.get("image") and image_count(r) is not None and 0 <= image_count(r) < len(NUMBER_WORDS):
            first_by_image.setdefault(r["image"], i)
    rng = random.Random(f"neutral-{seed}-{domain}-{split}")
    images = sorted(first_by_image)
    rng.shuffle(images)
    want = int(round(share * len(out)))
    for img in images[:want]:
        r = out[first_by_image[img]]
        n = image_count(r)
        answer = NUMBER_WORDS[n] if conv == "words" else str(n)
        r["meta"] = {**(r.get("meta") or {}), "neutral": {"count": n, "convention": conv, "replaced": r.get("task")}}
        r["task"] = NEUTRAL_TASK
        r["metric"] = "exact_match"
        r["conversations"] = [{"from": "human", "value": "<image>\n" + NEUTRAL_COUNT_QUESTION},
                              {"from": "gpt", "value": answer}]
    return out
