"""Answer extraction and normalisation: the single implementation of the scoring rules.

The training evaluation, the benchmarks and the ``evaluate`` metric in ``metrics/vedas_accuracy``
all score with :func:`extract_answer` and :func:`normalize_answer`, so that every accuracy the
project reports uses the same rules. This module depends on the standard library only.
"""

from __future__ import annotations

import re
import string
from typing import Sequence

from .prompting import LETTERS

__all__ = ["extract_answer", "normalize_answer", "is_correct"]

# Special tokens of Qwen-style vocabularies (<|im_end|>, <|endoftext|>, <|latent|>, ...) and the
# classic sentencepiece ones. They are replaced by a line break, not deleted: an end-of-turn token
# separates the answer from whatever follows it (padding, a new turn), and a line break keeps
# them apart.
_SPECIAL_TOKEN = re.compile(r"<\|[^|<>]*\|>|</?s>|<pad>|<unk>|<mask>", re.IGNORECASE)

# "answer :", "Answer:", "final answer is", "the answer is", "answer =", "answer -", "**Answer:**".
_ANSWER_MARKER = re.compile(r"\banswer\b\s*(?:is\b)?\s*[:=\-]?", re.IGNORECASE)

# A letter written as an option label: "(b)", "[B]", "b)", "B.", "B:", or the letter alone.
_LABELLED_LETTER = re.compile(r"^[\(\[]?\s*([a-z])\s*[\)\]]?\s*(?:[\.:\)\],;]|$)", re.IGNORECASE)
# A letter followed by a space and more text: "B green", "A red arrow".
_LEADING_LETTER = re.compile(r"^([a-z])\s+(\S.*)$", re.IGNORECASE | re.DOTALL)
# A letter label anywhere in the text: "option b", "choice (C)", "(d)".
_LETTER_ANYWHERE = re.compile(r"\b(?:option|choice)\s*\(?([a-z])\)?(?![\w])|\(([a-z])\)", re.IGNORECASE)

# Punctuation removed by normalize_answer; '.' between digits survives (see the docstring).
_PUNCT = re.compile("[" + re.escape(string.punctuation) + "]")
_DECIMAL_POINT = re.compile(r"(?<=\d)\.(?=\d)")


def normalize_answer(s: str | None) -> str:
    """Canonical form for comparing answers.

    Rules, in order: strip special tokens (``<|...|>``, ``<s>``, ``</s>``, ``<pad>``, ...);
    lowercase; remove punctuation, except a ``.`` between two digits ("3.5" stays "3.5"); drop a
    leading article ("the", "an", or "a" followed by another word, so a bare "a" stays the letter);
    collapse whitespace. ``None`` gives ``""``.
    """
    if s is None:
        return ""
    s = _SPECIAL_TOKEN.sub(" ", s).lower()
    s = _DECIMAL_POINT.sub("\0", s)  # protect decimal points from the punctuation filter
    s = _PUNCT.sub(" ", s).replace("\0", ".")
    words = s.split()
    if len(words) > 1 and words[0] in ("the", "an", "a"):
        words = words[1:]
    return " ".join(words)


def _final_segment(text: str) -> str:
    """The text that holds the answer: the first line after the last non-empty answer marker, or
    else the last non-empty line."""
    for match in reversed(list(_ANSWER_MARKER.finditer(text))):
        for line in text[match.end() :].splitlines():
            line = line.strip(" \t*_`'\"")
            # A marker followed by nothing (a truncated "answer :") does not count.
            if normalize_answer(line):
                return line
    lines = [line.strip(" \t*_`'\"") for line in text.splitlines()]
    lines = [line for line in lines if normalize_answer(line)]
    return lines[-1] if lines else ""


def _letter_from(segment: str, n_choices: int | None, choice_texts: list[str] | None) -> str | None:
    """A letter if the segment starts with one, under the rules of :func:`extract_answer`."""
    valid = LETTERS[:n_choices] if n_choices is not None else LETTERS

    match = _LABELLED_LETTER.match(segment)
    if match and match.group(1).upper() in valid:
        return match.group(1).upper()

    match = _LEADING_LETTER.match(segment)
    if match:
        letter, rest = match.group(1).upper(), normalize_answer(match.group(2))
        if choice_texts is not None:
            # "B green": trust the letter when its option is "green". Any other case ("a red"
            # with "red" being option C) is left to the option-text search, which reads "a" as
            # an article.
            if letter in valid and choice_texts[LETTERS.index(letter)] == rest:
                return letter
            return None
        # Without choices, "a" and "i" are English words, not reliable letters.
        if letter not in ("A", "I") and letter in valid:
            return letter
    return None


def _option_from(segment: str, choice_texts: list[str]) -> str | None:
    """The letter of the option whose text is the segment, or the only option named in it."""
    norm = normalize_answer(segment)
    for i, text in enumerate(choice_texts):
        if text and norm == text:
            return LETTERS[i]
    padded = f" {norm} "
    named = {i for i, text in enumerate(choice_texts) if text and f" {text} " in padded}
    # Drop options contained in a longer named one ("red" inside "dark red").
    named = {
        i for i in named if not any(i != j and f" {choice_texts[i]} " in f" {choice_texts[j]} " for j in named)
    }
    if len(named) == 1:
        return LETTERS[named.pop()]
    return None


def extract_answer(text: str | None, choices: Sequence[str] | None = None) -> str | None:
    """Extract the final answer from generated text.

    Returns an uppercase option letter ("B") for a letter answer, otherwise the normalised short
    answer (see :func:`normalize_answer`), or ``None`` when nothing usable is found.

    Rules:

    1. Special tokens (``<|im_end|>``, ``<|endoftext|>``, ``<|latent|>``, ``<|end_latent|>``, any
       ``<|...|>``, ``<s>``, ``</s>``, ``<pad>``) become line breaks. Empty or ``None`` text -> ``None``.
    2. The answer segment is the first non-empty line after the *last* answer marker ("answer :",
       "Answer:", "the answer is", "final answer =", case-insensitive) that has something after
       it, so a CoT before the final "answer :" line is ignored and so is a truncated trailing
       marker. Without any marker, the last non-empty line is the segment.
    3. Letters. A leading letter written as a label -- "B", "(B)", "[b]", "b)", "B.", "B:",
       "Answer: B. green" -- is the answer, in upper case. With ``choices``, it must be one of the
       first ``len(choices)`` letters; a leading letter followed by plain text ("B green") counts
       only if that text is the letter's option. Without ``choices``, "B green" gives "B" but "a"
       and "i" followed by text are read as words ("a red arrow").
    4. With ``choices``: an option text instead of a letter maps back to its letter, case- and
       punctuation-insensitively ("Green." -> "B" if choices[1] == "green"). If the segment is
       not exactly an option, but names exactly one option as whole words ("the arrow is
       green"), that option's letter; if it names several, none. Last, "option c" / "(c)"
       anywhere in the segment. Otherwise ``None``.
    5. Without ``choices``: the normalised segment ("Red." -> "red"), or ``None`` if empty.
    """
    if not text:
        return None
    text = _SPECIAL_TOKEN.sub("\n", text)
    segment = _final_segment(text)
    if not segment:
        return None

    choice_texts = [normalize_answer(c) for c in choices] if choices is not None else None
    letter = _letter_from(segment, len(choice_texts) if choice_texts is not None else None, choice_texts)
    if letter is not None:
        return letter
    if choice_texts is None:
        return normalize_answer(segment) or None

    letter = _option_from(segment, choice_texts)
    if letter is not None:
        return letter
    for match in _LETTER_ANYWHERE.finditer(segment):
        found = (match.group(1) or match.group(2)).upper()
        if found in LETTERS[: len(choice_texts)]:
            return found
    return None


def is_correct(prediction: str | None, reference: str, choices: Sequence[str] | None = None) -> bool:
    """Whether the raw generated ``prediction`` answers ``reference`` (a letter or short answer)."""
    extracted = extract_answer(prediction, choices)
    return extracted is not None and normalize_answer(extracted) == normalize_answer(reference)
