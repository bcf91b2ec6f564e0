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
