"""The one set of rules for a sample's fields, shared by the dataset adapters (`vedas_trainer.data`) and the
collator (`vedas_trainer.collator`).

A sample (the schema of `vedas_trainer.data`) has an id, a question, optional option texts, an answer (an option
letter when there are options), rationale steps and images. The adapters read those fields out of a raw row of
their format (M3CoT's ``rationale`` text, ScienceQA's integer answer, a chat transcript, ...); the collator takes
samples as they come (from `load_vedas_dataset`, the synthetic task, evaluation sets or user code). Both check each
field with the same :class:`SampleCheck` method, so the same bad value gives the same :class:`DataError` (reason
and field) on both paths; only the location differs (the source row for the adapters, the sample id or batch
position for the collator).

This module uses the standard library and Pillow only.
"""

from __future__ import annotations

import numbers
from typing import Any, Callable, Mapping, Sequence

from PIL import Image

from .prompting import LETTERS

__all__ = ["DataError", "EMPTY_RATIONALE", "SampleCheck", "text_problem"]

# The reason of every "no usable rationale step" error, whichever path and format finds it.
EMPTY_RATIONALE = "empty rationale: no non-empty steps (a latent or CoT sample needs at least one reasoning step)"


class DataError(ValueError):
    """A dataset row that cannot be turned into a sample, or a data file whose rows cannot be read.

    ``str(err)`` reads ``row 12 (id 'q-12'), field 'image': image file not found: '/data/x.png'``;
    the parts are also available as ``err.row`` (the row index in the source), ``err.sample_id``,
    ``err.field`` and ``err.reason``.
    """

    def __init__(
        self,
        reason: str,
        *,
        row: int | None = None,
        sample_id: str | None = None,
        field: str | None = None,
    ):
        # Only `reason` goes to args: BaseException pickles as cls(*args) plus __dict__, which keeps
        # the keyword-only context across processes (datasets.map(num_proc=...), DataLoader workers).
        super().__init__(reason)
        self.reason = reason
        self.row = row
        self.sample_id = sample_id
        self.field = field

    def __str__(self) -> str:
        where = []
        if self.row is not None:
            where.append(f"row {self.row}")
        if self.sample_id is not None:
            where.append(f"(id {self.sample_id!r})" if where else f"id {self.sample_id!r}")
        location = " ".join(where)
        if self.field is not None:
            location = f"{location}, field {self.field!r}" if location else f"field {self.field!r}"
        return f"{location}: {self.reason}" if location else self.reason


def text_problem(value, *, allow_empty: bool = False) -> str | None:
    """Why `value` cannot be a text field, or None when it can. Missing, not a string, empty (unless `allow_empty`),
    or not valid Unicode (Python strings may hold unpaired UTF-16 surrogates, which json.loads accepts and tokenizers
    and Arrow refuse much later, with errors that name neither the row nor the field)."""
    if value is None:
        return "missing required field"
    if not isinstance(value, str):
        return f"expected a string, got {type(value).__name__} {value!r:.80}"
    if not allow_empty and not value.strip():
        return "empty string"
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as err:
        return f"not valid Unicode: unpaired surrogate {value[err.start]!r} at character {err.start}"
    return None


ImageLoad = Callable[..., Image.Image]
"""``load(value, *, field) -> PIL.Image``: decodes or normalises one image, raising DataError naming `field`."""


class SampleCheck:
    """Checks the fields of one sample and returns them in their canonical form; every failure is a
    :class:`DataError` naming the location (`row` and/or `sample_id`) and the field.

    Args:
        row: the row index in the source file (adapters), or None (collator).
        sample_id: the sample's id, once known (set the attribute when it is read later).
        control_strings: special-token strings refused inside text (the collator passes its tokenizer's: a
            ``<|latent|>`` in a rationale would be read as a latent slot). The adapters do not know the tokenizer.
    """

    def __init__(self, *, row: int | None = None, sample_id: str | None = None, control_strings: Sequence[str] = ()):
        self.row, self.sample_id, self.control_strings = row, sample_id, tuple(control_strings)

    def error(self, field: str | None, reason: str) -> DataError:
        return DataError(reason, row=self.row, sample_id=self.sample_id, field=field)

    # ------------------------------------------------------------------ scalars
    def text(self, value, field: str, *, allow_empty: bool = False, strip: bool = True) -> str:
        """`value` as sample text (stripped unless `strip=False`): a valid Unicode string, non-empty unless
        `allow_empty`, without control-token strings."""
        problem = text_problem(value, allow_empty=allow_empty)
        if problem:
            raise self.error(field, problem)
        for token in self.control_strings:
            if token in value:
                raise self.error(
                    field, f"contains the special token {token!r}, which the tokenizer would read as a control token"
                )
        return value.strip() if strip else value

    def identifier(self, value, field: str = "id") -> str | None:
        """The sample id as a string, or None when absent (None or ""). It seeds the curriculum's per-sample draws
        and names the sample in every error, so it has to be a stable scalar: str() of a dict or a float would
        "work" and hide a broken column."""
        if value is None or value == "":
            return None
        if isinstance(value, bool) or not isinstance(value, (str, numbers.Integral)):
            raise self.error(field, f"expected a string or integer id, got {type(value).__name__} {value!r:.80}")
        return self.text(str(value), field, allow_empty=True, strip=False)

    # ------------------------------------------------------------------ options and answer
    def choices(self, value, field: str = "choices", *, required: bool = False) -> list[str] | None:
        """The option texts, stripped, or None for a short-answer sample (None or an empty list, unless
        `required`). 2 to 26 non-empty texts."""
        if value is None or (not required and isinstance(value, (list, tuple)) and len(value) == 0):
            if required:
                raise self.error(field, "missing required field")
            return None
        if not isinstance(value, (list, tuple)):
            raise self.error(field, f"expected a list of option texts, got {type(value).__name__}")
        if not 2 <= len(value) <= len(LETTERS):
            raise self.error(field, f"expected 2 to {len(LETTERS)} options, got {len(value)}")
        return [self.text(choice, f"{field}[{i}]") for i, choice in enumerate(value)]

    def answer(self, value, choices: Sequence[str] | None, field: str = "answer", *, allow_text: bool = False) -> str:
        """The answer, stripped. With options it must be an option letter in range (either case; returned in upper
        case) or, with `allow_text`, the exact text of one option (returned as its letter)."""
        answer = self.text(value, field)
        if choices is None:
            return answer
        last = LETTERS[len(choices) - 1]
        if len(answer) == 1 and answer.upper() in LETTERS:
            letter = answer.upper()
            if LETTERS.index(letter) >= len(choices):
                raise self.error(field, f"answer {letter!r} is out of range for {len(choices)} choices (A-{last})")
            return letter
        if allow_text and answer in choices:
            return LETTERS[list(choices).index(answer)]
        if allow_text:
            raise self.error(field, f"answer {answer!r:.80} is neither an option letter (A-{last}) nor the text of "
                                    f"an option")
        raise self.error(field, f"answer {answer!r:.80} is not an option letter (A-{last})")

    # ------------------------------------------------------------------ rationale
    def steps(self, value, field: str = "steps", *, detail: str | None = None) -> list[str]:
        """The rationale steps, stripped, blank ones dropped; at least one must remain (`detail` says, for a
        rationale read out of another field, where it came from)."""
        if value is None:
            raise self.error(field, "missing required field")
        # a str is iterable: list("abc") would silently train three one-character steps
        if not isinstance(value, (list, tuple)):
            raise self.error(field, f"expected a list of step strings, got {type(value).__name__}")
        steps = [self.text(step, f"{field}[{i}]", allow_empty=True) for i, step in enumerate(value)]
        steps = [step for step in steps if step]  # blank steps would become empty latent chunks
        if not steps:
            raise self.error(field, EMPTY_RATIONALE if detail is None else f"{EMPTY_RATIONALE}: {detail}")
        return steps

    # ------------------------------------------------------------------ images
    def images(self, value, field: str, load: ImageLoad, *, required: bool) -> list[Image.Image]:
        """The images, each passed through `load` (decode or normalise) under the field ``{field}[i]``. A lone PIL
        image counts as a list of one. Without `required`, None and an empty list mean "no image"."""
        if value is None:
            if required:
                raise self.error(field, "missing image")
            return []
        if isinstance(value, Image.Image):
            value = [value]
        if not isinstance(value, (list, tuple)):
            raise self.error(field, f"expected a list of images, got {type(value).__name__}")
        if not value and required:
            raise self.error(field, "empty image list")
        return [self.image(item, f"{field}[{i}]", load) for i, item in enumerate(value)]

    def image(self, value, field: str, load: ImageLoad) -> Image.Image:
        try:
            return load(value, field=field)
        except DataError as err:
            if err.row is None:
                err.row = self.row
            if err.sample_id is None:
                err.sample_id = self.sample_id
            raise

    # ------------------------------------------------------------------ a whole sample
    def sample(self, sample: Mapping[str, Any], load: ImageLoad, *, need_steps: bool = True,
               require_images: bool = False) -> dict[str, Any]:
        """A checked copy of a sample dict (the schema of `vedas_trainer.data`) with its fields in canonical
        form. An integer answer is a short numeric answer ("3"). `need_steps=False` (the No-CoT baseline) leaves the
        steps unread and returns none."""
        question = self.text(sample.get("question"), "question")
        choices = self.choices(sample.get("choices"))
        answer = sample.get("answer")
        if isinstance(answer, numbers.Integral) and not isinstance(answer, bool):
            answer = str(answer)
        answer = self.answer(answer, choices)
        steps = self.steps(sample.get("steps")) if need_steps else []
        images = self.images(sample.get("images"), "images", load, required=require_images)
        return {"id": sample.get("id"), "images": images, "question": question, "choices": choices,
                "steps": steps, "answer": answer}
