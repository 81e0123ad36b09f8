"""Dataset adapters: M3CoT, ScienceQA, GQA, OneThinker-style and chat (ShareGPT-style) rows mapped to one sample schema.

Every training and evaluation path of the project consumes samples of this form (a plain dict)::

    {
        "id": str,
        "images": list[PIL.Image.Image],   # RGB, resized into [min_pixels, max_pixels]
        "question": str,
        "choices": list[str] | None,       # option texts in order; None for short answers
        "steps": list[str],                # rationale steps, split on blank lines, NOT merged
        "answer": str,                     # option letter ("A", "B", ...) or the short answer
    }

Steps are kept unmerged here; the curriculum merges them to ``max_latent_stage`` chunks with
:func:`merge_steps` (docs/design.md, "Curriculum"), so one loaded dataset serves any curriculum setting.

:func:`load_vedas_dataset` returns a :class:`datasets.Dataset` of the *raw* rows with a transform that
adapts each row when it is accessed, so images are decoded lazily (GQA alone references ~1M
question rows). An eager validation pass, on by default, finds bad rows up front: it raises the first
:class:`DataError`, or drops the bad rows with ``skip_bad_rows=True``.
"""

from __future__ import annotations

import contextlib
import functools
import io
import json
import logging
import math
import numbers
import os
import re
import struct
import threading
import warnings
import zlib
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import datasets
import numpy as np
import pyarrow as pa
from datasets.exceptions import DatasetGenerationError
from PIL import ExifTags, Image, ImageOps

from .prompting import LETTERS
from .samples import DataError, SampleCheck, text_problem

__all__ = [
    "ADAPTERS",
    "DataError",
    "MAX_DECODE_PIXELS",
    "MAX_PIXELS",
    "MIN_PIXELS",
    "SAMPLE_KEYS",
    "adapt_chat",
    "adapt_gqa",
    "adapt_m3cot",
    "adapt_onethinker",
    "adapt_scienceqa",
    "load_image",
    "load_vedas_dataset",
    "merge_steps",
    "resolve_format",
    "split_steps",
]

logger = logging.getLogger(__name__)

SAMPLE_KEYS = ("id", "images", "question", "choices", "steps", "answer")

# Defaults of Qwen2VLImageProcessor (min_pixels = 56*56, max_pixels = 28*28*1280): images already in
# these bounds pass through the processor's own smart_resize almost unchanged.
MIN_PIXELS = 56 * 56
MAX_PIXELS = 28 * 28 * 1280
# One merged visual token covers 28x28 px (14 px patches, 2x2 merge); a thinner side cannot be encoded.
MIN_SIDE = 28
# Qwen2-VL's smart_resize raises for aspect ratios above 200, which would crash the collator mid-run.
# Such strips are squeezed to 200:1 here instead; real photos and diagrams are far below it.
MAX_ASPECT_RATIO = 200
# Decompression-bomb guard used instead of Pillow's default (~89M pixels, which warns at 10000x10000
# and refuses ~179M). 2**27 pixels (~11585^2) still decodes in ~400 MB as RGB, so legitimately huge
# scans are downscaled, while a tiny file that claims billions of pixels is refused.
MAX_DECODE_PIXELS = 2**27

# Column added by load_vedas_dataset so errors name the row of the *source* file even after bad rows
# were dropped or the dataset was shuffled.
ROW_INDEX_COLUMN = "__vedas_row__"



# ----------------------------------------------------------------------------------------------------
# Rationale steps
# ----------------------------------------------------------------------------------------------------


def split_steps(rationale: str) -> list[str]:
    """Split a rationale into steps on blank lines.

    A blank line is an empty or whitespace-only line; ``\\r\\n`` and ``\\r`` line ends count as
    ``\\n``. Steps are stripped and empty ones dropped. Single line breaks stay inside a step.
    """
    steps, current = [], []
    for line in rationale.splitlines():
        if line.strip():
            current.append(line)
        elif current:
            steps.append("\n".join(current).strip())
            current = []
    if current:
        steps.append("\n".join(current).strip())
    return steps


def merge_steps(steps: Sequence[str], max_steps: int) -> list[str]:
    """Merge neighbouring steps into exactly ``max_steps`` chunks when there are more steps than that.

    Chunks are contiguous runs of steps joined with ``"\\n"``, so order and text are kept
    (``"\\n".join(chunks) == "\\n".join(steps)``). "Near-equal length" is made precise as: the split
    that minimises the sum of squared chunk lengths (in characters), found exactly by dynamic
    programming. Ties resolve deterministically towards shorter early chunks (7 equal steps into 4
    give sizes 1, 2, 2, 2). With ``max_steps`` or fewer steps, a copy of ``steps`` is returned unchanged.
    """
    if max_steps < 1:
        raise ValueError(f"max_steps must be >= 1, got {max_steps}")
    steps = list(steps)
    n = len(steps)
    if n <= max_steps:
        return steps

    # Length of "\n".join(steps[i:j]) from prefix sums: characters plus one separator per gap.
    prefix = [0]
    for step in steps:
        prefix.append(prefix[-1] + len(step))

    def cost(i: int, j: int) -> int:
        length = prefix[j] - prefix[i] + (j - i - 1)
        return length * length

    # best[k][j]: minimal cost of splitting steps[:j] into k chunks; cut[k][j]: start of the last chunk.
    # The cost is a convex function of a chunk's length, so it satisfies the quadrangle inequality and the
    # leftmost optimal cut never moves left as j grows. Divide and conquer over j uses that to search each
    # cut in a shrinking range: O(max_steps * n log n) instead of O(max_steps * n^2), which matters for
    # rationales split into thousands of lines (a naive pass over 20k steps takes minutes). Taking the
    # leftmost minimum keeps the tie-breaking of the plain dynamic programme.
    inf = float("inf")
    best = [[inf] * (n + 1) for _ in range(max_steps + 1)]
    cut = [[0] * (n + 1) for _ in range(max_steps + 1)]
    best[0][0] = 0
    for k in range(1, max_steps + 1):
        previous, current, cuts = best[k - 1], best[k], cut[k]
        # Each of the k chunks needs one step and each of the remaining max_steps - k chunks too.
        pending = [(k, n - (max_steps - k), k - 1, n - 1)]
        while pending:
            low, high, first, last = pending.pop()
            if low > high:
                continue
            j = (low + high) // 2
            best_cost, best_cut = inf, first
            for i in range(first, min(last, j - 1) + 1):
                candidate = previous[i] + cost(i, j)
                if candidate < best_cost:
                    best_cost, best_cut = candidate, i
            current[j], cuts[j] = best_cost, best_cut
            pending.append((low, j - 1, first, best_cut))
            pending.append((j + 1, high, best_cut, last))

    chunks, end = [], n
    for k in range(max_steps, 0, -1):
        start = cut[k][end]
        chunks.append("\n".join(steps[start:end]))
        end = start
    return chunks[::-1]


# ----------------------------------------------------------------------------------------------------
# Images
# ----------------------------------------------------------------------------------------------------

# Pillow reads its decompression-bomb limit from the module global Image.MAX_IMAGE_PIXELS, during
# open and also while loading some formats (GIF frames, TIFF tiles). It is raised to MAX_DECODE_PIXELS
# only while this module decodes, and restored when the last concurrent decode ends, so other code in
# the process keeps the limit it configured. A user limit above ours, or None, is left in place.
_limit_lock = threading.Lock()
_limit_users = 0
_saved_limit: int | None = None


@contextlib.contextmanager
def _decode_pixel_limit():
    global _limit_users, _saved_limit
    with _limit_lock:
        if _limit_users == 0:
            _saved_limit = Image.MAX_IMAGE_PIXELS
            if _saved_limit is not None and _saved_limit < MAX_DECODE_PIXELS:
                Image.MAX_IMAGE_PIXELS = MAX_DECODE_PIXELS
        _limit_users += 1
    try:
        yield Image.MAX_IMAGE_PIXELS
    finally:
        with _limit_lock:
            _limit_users -= 1
            if _limit_users == 0:
                Image.MAX_IMAGE_PIXELS = _saved_limit


def _check_pixel_bounds(min_pixels: int, max_pixels: int) -> None:
    if min_pixels < 1 or max_pixels < max(min_pixels, MIN_SIDE * MIN_SIDE):
        raise ValueError(
            f"need 1 <= min_pixels <= max_pixels and max_pixels >= {MIN_SIDE * MIN_SIDE}, "
            f"got min_pixels={min_pixels}, max_pixels={max_pixels}"
        )


def _target_size(width: int, height: int, min_pixels: int, max_pixels: int) -> tuple[int, int]:
    """Size with the aspect ratio kept (up to MAX_ASPECT_RATIO), width * height in [min_pixels,
    max_pixels] and both sides >= MIN_SIDE; the side constraint wins where they conflict."""
    w, h = float(width), float(height)
    if w > h * MAX_ASPECT_RATIO:
        w = h * MAX_ASPECT_RATIO
    elif h > w * MAX_ASPECT_RATIO:
        h = w * MAX_ASPECT_RATIO
    area = w * h
    scale = 1.0
    if area > max_pixels:
        scale = math.sqrt(max_pixels / area)
    elif area < min_pixels:
        scale = math.sqrt(min_pixels / area)
    scale = max(scale, MIN_SIDE / min(w, h))
    # Round towards the inside of the bounds: down when shrinking, up when growing.
    rounding = math.floor if scale < 1 else math.ceil
    return max(MIN_SIDE, rounding(w * scale)), max(MIN_SIDE, rounding(h * scale))


def _high_bit_depth_to_rgb(image: Image.Image) -> Image.Image:
    # Pillow's convert("RGB") clips I;16/I/F values at 255, turning a 16-bit scan almost white;
    # rescale to 8 bits instead.
    array = np.asarray(image, dtype=np.float64)
    # Float TIFFs can hold NaN or inf; one such pixel would make the range below infinite and turn the
    # whole picture black (or NaN, which the uint8 cast maps to garbage). Those pixels become black.
    finite = np.isfinite(array)
    array = np.where(finite, array, 0.0)
    low, high = (float(array[finite].min()), float(array[finite].max())) if finite.any() else (0.0, 0.0)
    if image.mode.startswith("I;16"):
        array = array / 257.0  # 65535 -> 255
    elif image.mode == "I" and (low < 0 or high > 255):
        # 16-bit PNGs open as "I" in some Pillow versions; beyond 16 bits, stretch the used range.
        array = array / 257.0 if low >= 0 and high <= 65535 else (array - low) * (255.0 / ((high - low) or 1.0))
    elif image.mode == "F":
        if low >= 0 and high <= 1:
            array = array * 255.0
        elif low < 0 or high > 255:
            array = (array - low) * (255.0 / ((high - low) or 1.0))
    return Image.fromarray(np.clip(np.rint(array), 0, 255).astype(np.uint8)).convert("RGB")


def _to_rgb(image: Image.Image) -> Image.Image:
    if image.mode == "RGB":
        return image
    if image.mode in ("I", "F") or image.mode.startswith("I;16"):
        return _high_bit_depth_to_rgb(image)
    if image.mode in ("RGBA", "RGBa", "LA", "La", "PA") or (image.mode == "P" and "transparency" in image.info):
        # Composite on white: dropping alpha would expose whatever colour transparent pixels store
        # (often black), which changes what diagrams and icons show.
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")  # L, 1, P, CMYK, YCbCr, ...


def _exif_upright(image: Image.Image) -> Image.Image:
    # Phone photos store rotation in EXIF; transformers' load_image applies it too. exif_transpose
    # copies the image even when nothing changes, so only call it when there is a rotation. A broken
    # EXIF block is not worth losing the picture over: keep the pixels as stored.
    try:
        orientation = image.getexif().get(ExifTags.Base.Orientation, 1)
    except Exception:
        return image
    return ImageOps.exif_transpose(image) if orientation != 1 else image


def _decode(image: Image.Image, min_pixels: int, max_pixels: int, *, owned: bool) -> Image.Image:
    if image.width < 1 or image.height < 1:
        raise ValueError(f"empty image of size {image.size}")
    if getattr(image, "is_animated", False) and image.tell() != 0:
        image.seek(0)  # animated GIF/PNG/WebP: use the first frame
    target = _target_size(image.width, image.height, min_pixels, max_pixels)
    if owned and target[0] * target[1] < image.width * image.height:
        # JPEG can decode at 1/2, 1/4 or 1/8 scale directly, which makes huge photos cheap; the
        # result is never smaller than `target`. No-op for other formats. The target is symmetric in
        # width and height, so computing it before the EXIF rotation is fine.
        image.draft(None, target)
    image.load()
    image = _to_rgb(_exif_upright(image))
    target = _target_size(image.width, image.height, min_pixels, max_pixels)
    if image.size != target:
        image = image.resize(target, Image.Resampling.BICUBIC, reducing_gap=3.0)
    return image


# Pillow signals unreadable data with a zoo of exception types. IndexError and KeyError come from plugins
# that index into a short read (a truncated animated GIF fails in `is_animated`), MemoryError from headers
# that ask for an absurd buffer: all of them mean "this file is broken", not a bug here.
_DECODE_ERRORS = (
    OSError, SyntaxError, ValueError, EOFError, TypeError, IndexError, KeyError, ZeroDivisionError, MemoryError,
    struct.error, zlib.error, Image.DecompressionBombError,
)


def load_image(
    value: Any,
    image_root: str | os.PathLike | None = None,
    *,
    row: int | None = None,
    field: str = "image",
    min_pixels: int = MIN_PIXELS,
    max_pixels: int = MAX_PIXELS,
) -> Image.Image:
    """Decode one image into an RGB ``PIL.Image`` within the pixel bounds.

    Args:
        value: a ``PIL.Image.Image``; a path (``str`` or ``os.PathLike``, relative paths are joined to
            ``image_root``, else to the working directory); raw encoded ``bytes``; or a ``datasets``
            Image dict ``{"bytes": ..., "path": ...}`` (the bytes win when both are set).
        image_root: directory for relative paths.
        row, field: where the value came from, used only in :class:`DataError` messages.
        min_pixels, max_pixels: bounds for ``width * height`` (defaults: Qwen2-VL's processor).

    Returns:
        An RGB image: alpha composited on white; L, P, CMYK, 16-bit and float modes converted (16-bit
        rescaled, not clipped); animations reduced to their first frame; EXIF rotation applied; resized
        with the aspect ratio kept so that ``min_pixels <= w * h <= max_pixels`` and both sides are at
        least 28 px. Images up to :data:`MAX_DECODE_PIXELS` are accepted and downscaled.

    Raises:
        DataError: the value is missing, the file does not exist, or it cannot be decoded (corrupt,
            truncated, larger than :data:`MAX_DECODE_PIXELS`); the message names row, field and file.
    """
    _check_pixel_bounds(min_pixels, max_pixels)

    def fail(reason: str) -> DataError:
        return DataError(reason, row=row, field=field)

    if isinstance(value, Image.Image):
        with _decode_pixel_limit():
            try:
                return _decode(value, min_pixels, max_pixels, owned=False)
            except _DECODE_ERRORS as err:
                raise fail(f"cannot convert the given PIL image ({value.mode}, {value.size}): {err}") from err

    data, path = None, None
    if isinstance(value, Mapping):
        data, path = value.get("bytes"), value.get("path")
    elif isinstance(value, (bytes, bytearray, memoryview)):
        data = value
    elif isinstance(value, (str, os.PathLike)):
        path = value
    elif value is not None:
        raise fail(f"unsupported image value of type {type(value).__name__}")

    if data:
        source, name = io.BytesIO(data), f"<{len(data)} bytes{f' from {path!s}' if path else ''}>"
    elif path is not None and os.fspath(path) != "":
        resolved = Path(path).expanduser()
        if image_root is not None and not resolved.is_absolute():
            resolved = Path(image_root) / resolved
        if resolved.is_dir():
            raise fail(f"image path is a directory, not an image file: {str(resolved)!r}")
        if not resolved.is_file():
            raise fail(f"image file not found: {str(resolved)!r}")
        source, name = resolved, repr(str(resolved))
    else:
        raise fail("missing image")

    with _decode_pixel_limit() as limit:
        try:
            with warnings.catch_warnings():
                # Between the limit and twice it Pillow only warns at open(); the check below raises instead.
                warnings.simplefilter("ignore", Image.DecompressionBombWarning)
                image = Image.open(source)
            with image:
                if limit is not None and image.width * image.height > limit:
                    raise fail(
                        f"image {name} is {image.width}x{image.height} pixels: it exceeds the decode limit of "
                        f"{limit} pixels (vedas_trainer.data.MAX_DECODE_PIXELS / PIL.Image.MAX_IMAGE_PIXELS)"
                    )
                return _decode(image, min_pixels, max_pixels, owned=True)
        except DataError:
            raise  # the size check above; DataError is a ValueError, which the handler below would wrap again
        except Image.DecompressionBombError as err:
            # Pillow refuses at open() images over twice its limit, before our size check above can run
            raise fail(
                f"image {name} exceeds the decode limit of {limit} pixels "
                f"(vedas_trainer.data.MAX_DECODE_PIXELS / PIL.Image.MAX_IMAGE_PIXELS): {err}"
            ) from err
        except _DECODE_ERRORS as err:
            raise fail(f"cannot decode image {name}: {type(err).__name__}: {err}") from err


# ----------------------------------------------------------------------------------------------------
# Adapters: one raw row -> one sample
# ----------------------------------------------------------------------------------------------------

ImageLoader = Callable[..., Image.Image]
"""``loader(value, *, row, field) -> PIL.Image``; the default is :func:`load_image` with the adapter's
``image_root``, ``min_pixels`` and ``max_pixels``."""


class _RowReader:
    """Typed access to the fields of one raw row. The field rules are `SampleCheck`'s, the ones the collator applies
    to samples (`vedas_trainer.samples`); every failure is a DataError naming row, id and field."""

    def __init__(self, row: Mapping[str, Any], index: int | None, id_fields: Sequence[str], image_loader: ImageLoader):
        self.check = SampleCheck(row=index)
        if not isinstance(row, Mapping):
            raise self.check.error(None, f"expected a row mapping field names to values, got {type(row).__name__}")
        self.row, self.index, self.image_loader = row, index, image_loader
        for name in id_fields:
            sample_id = self.check.identifier(row.get(name), name)
            if sample_id is not None:
                break
        else:
            if index is None:
                raise self.error(id_fields[0], "missing required field (and no row index to fall back on)")
            sample_id = str(index)
        self.check.sample_id = self.sample_id = sample_id

    def error(self, field: str, reason: str) -> DataError:
        return self.check.error(field, reason)

    def _unicode(self, field: str, value: str) -> str:
        return self.check.text(value, field, allow_empty=True, strip=False)

    def _load(self, value, *, field: str) -> Image.Image:
        return self.image_loader(value, row=self.index, field=field)

    def has(self, field: str) -> bool:
        return self.row.get(field) is not None

    def get(self, field: str) -> Any:
        value = self.row.get(field)
        if value is None:
            raise self.error(field, "missing required field")
        return value

    def text(self, field: str, *, optional: bool = False) -> str:
        """The field's text, stripped (`optional`: "" when missing, and may be empty)."""
        value = self.row.get(field)
        if optional and value is None:
            return ""
        return self.check.text(value, field, allow_empty=optional)

    def optional_text(self, field: str) -> str:
        return self.text(field, optional=True)

    def choices(self, field: str = "choices", *, required: bool = True) -> list[str] | None:
        return self.check.choices(self.row.get(field), field, required=required)

    def letter_answer(self, choices: list[str], field: str = "answer", *, allow_text: bool = False) -> str:
        return self.check.answer(self.row.get(field), choices, field, allow_text=allow_text)

    def steps(self, *, list_field: str | None = None, text_field: str | None = None) -> list[str]:
        """Steps from a list field if present, else from splitting a rationale text field."""
        if list_field is not None and self.has(list_field):
            return self.check.steps(self.row[list_field], list_field)
        if text_field is not None and self.has(text_field):
            rationale = self.check.text(self.row[text_field], text_field, allow_empty=True, strip=False)
            return self.check.steps(split_steps(rationale), text_field)
        fields = " or ".join(repr(f) for f in (list_field, text_field) if f is not None)
        raise self.error(text_field or list_field, f"missing required field ({fields})")

    def image(self, field: str, value: Any = None) -> Image.Image:
        return self.check.image(self.row.get(field) if value is None else value, field, self._load)

    def image_list(self, field: str) -> list[Image.Image]:
        return self.check.images(self.get(field), field, self._load, required=True)


def _with_context(question: str, context: str) -> str:
    # ScienceQA's `hint` and M3CoT's `context` often carry facts the question needs ("Read the
    # text...", a passage); the sample has no separate field for it, so it leads the question.
    return f"Context: {context}\n{question}" if context else question


def _reader(row, index, id_fields, image_root, min_pixels, max_pixels, image_loader) -> _RowReader:
    if image_loader is None:
        image_loader = functools.partial(
            load_image, image_root=image_root, min_pixels=min_pixels, max_pixels=max_pixels
        )
    return _RowReader(row, index, id_fields, image_loader)


def _sample(sample_id, images, question, choices, steps, answer) -> dict[str, Any]:
    return dict(zip(SAMPLE_KEYS, (sample_id, images, question, choices, steps, answer)))


def adapt_m3cot(
    row: Mapping[str, Any],
    index: int | None = None,
    *,
    image_root: str | os.PathLike | None = None,
    min_pixels: int = MIN_PIXELS,
    max_pixels: int = MAX_PIXELS,
    image_loader: ImageLoader | None = None,
) -> dict[str, Any]:
    """M3CoT row (``id``, ``question``, ``choices``, ``answer`` letter, ``rationale``, ``image``;
    optional ``context``) -> sample.

    All adapters share this signature: ``index`` is the row's position in its source (used for the
    id when the row has none, and in error messages); ``image_loader`` replaces :func:`load_image`
    (called as ``image_loader(value, row=index, field=name)``), e.g. to cache decoded images.
    """
    r = _reader(row, index, ("id",), image_root, min_pixels, max_pixels, image_loader)
    _check_foreign_fields(r, "m3cot")
    question = _with_context(r.text("question"), r.optional_text("context"))
    choices = r.choices()
    answer = r.letter_answer(choices)
    steps = r.steps(text_field="rationale")
    return _sample(r.sample_id, [r.image("image")], question, choices, steps, answer)


def adapt_scienceqa(
    row: Mapping[str, Any],
    index: int | None = None,
    *,
    image_root: str | os.PathLike | None = None,
    min_pixels: int = MIN_PIXELS,
    max_pixels: int = MAX_PIXELS,
    image_loader: ImageLoader | None = None,
) -> dict[str, Any]:
    """ScienceQA row (``question``, ``choices``, ``answer`` int index, ``lecture``, ``solution``,
    ``image``; optional ``hint``, ``id``) -> sample; the rationale is lecture, blank line, solution.

    Text-only ScienceQA questions (``image`` None) are reported as bad rows: every Vedas step replays
    visual tokens. Load with ``skip_bad_rows=True`` to keep the image subset.
    """
    r = _reader(row, index, ("id", "pid"), image_root, min_pixels, max_pixels, image_loader)
    _check_foreign_fields(r, "scienceqa")
    question = _with_context(r.text("question"), r.optional_text("hint"))
    choices = r.choices()
    answer = r.get("answer")
    # bool is an int subclass, and a string "2" is a data error, not an index to guess at.
    if isinstance(answer, bool) or not isinstance(answer, numbers.Integral):
        raise r.error("answer", f"expected an int index into choices, got {type(answer).__name__} {answer!r}")
    if not 0 <= answer < len(choices):
        raise r.error(
            "answer", f"answer index {answer} is out of range for {len(choices)} choices (0-{len(choices) - 1})"
        )
    rationale = "\n\n".join(part for part in (r.optional_text("lecture"), r.optional_text("solution")) if part)
    steps = r.check.steps(split_steps(rationale), "lecture/solution", detail="lecture and solution are both empty")
    return _sample(r.sample_id, [r.image("image")], question, choices, steps, LETTERS[answer])


def adapt_gqa(
    row: Mapping[str, Any],
    index: int | None = None,
    *,
    image_root: str | os.PathLike | None = None,
    min_pixels: int = MIN_PIXELS,
    max_pixels: int = MAX_PIXELS,
    image_loader: ImageLoader | None = None,
) -> dict[str, Any]:
    """GQA-with-rationales row (``question``, ``answer`` short text, ``steps`` list or ``rationale``,
    ``image`` or ``imageId`` -> ``<image_root>/<imageId>.jpg``; id from ``questionId`` or ``id``)
    -> sample with ``choices`` None."""
    r = _reader(row, index, ("questionId", "question_id", "id"), image_root, min_pixels, max_pixels, image_loader)
    _check_foreign_fields(r, "gqa")
    question = r.text("question")
    answer = r.text("answer")
    steps = r.steps(list_field="steps", text_field="rationale")
    if r.has("image") or not r.has("imageId"):
        image = r.image("image")
    else:
        image_id = r.get("imageId")
        if not isinstance(image_id, (str, int)) or isinstance(image_id, bool) or str(image_id).strip() == "":
            raise r.error("imageId", f"expected an image id string, got {image_id!r}")
        image = r.image("imageId", f"{str(image_id).strip()}.jpg")
    return _sample(r.sample_id, [image], question, None, steps, answer)


def adapt_onethinker(
    row: Mapping[str, Any],
    index: int | None = None,
    *,
    image_root: str | os.PathLike | None = None,
    min_pixels: int = MIN_PIXELS,
    max_pixels: int = MAX_PIXELS,
    image_loader: ImageLoader | None = None,
) -> dict[str, Any]:
    """OneThinker-style JSONL row (``question``, ``answer``, ``steps`` list or ``rationale``, optional
    ``choices``, ``image`` or ``images`` list, optional ``id``) -> sample.

    With choices, ``answer`` is an option letter or the exact text of one option (mapped to its
    letter); without, it is the short answer text.
    """
    r = _reader(row, index, ("id",), image_root, min_pixels, max_pixels, image_loader)
    _check_foreign_fields(r, "onethinker")
    question = r.text("question")
    choices = r.choices(required=False)
    answer = r.letter_answer(choices, allow_text=True) if choices is not None else r.text("answer")
    steps = r.steps(list_field="steps", text_field="rationale")
    images = r.image_list("images") if r.has("images") else [r.image("image")]
    return _sample(r.sample_id, images, question, choices, steps, answer)


_CHAT_ROLES = {"user": "user", "human": "user", "assistant": "assistant", "gpt": "assistant", "system": "system"}
_IMAGE_TAG = "<image>"
_ANSWER_TAG = re.compile(r"<answer>\s*(.*?)\s*</answer>", re.IGNORECASE | re.DOTALL)
_ANSWER_LINE = re.compile(r"^\s*(?:final\s+answer|answer|the\s+answer\s+is)\s*[:：]?\s*(.+?)\s*$", re.IGNORECASE)
_OPTION_LINE = re.compile(r"^\s*\(?([A-Z])[.):]\s*(.+?)\s*$")
_THINK_TAGS = re.compile(r"</?think>", re.IGNORECASE)


def _chat_turns(r: _RowReader) -> tuple[str, list[tuple[str, str, int]]]:
    """(field, [(role, text, image placeholders)]) of a `messages` (role/content) or `conversations` (from/value)
    row; content may be a string or a list of {"type": "text"|"image"} parts."""
    field = "messages" if r.has("messages") or not r.has("conversations") else "conversations"
    role_key, text_key = ("role", "content") if field == "messages" else ("from", "value")
    value = r.get(field)
    if not isinstance(value, (list, tuple)):
        raise r.error(field, f"expected a list of messages, got {type(value).__name__}")
    turns = []
    for i, message in enumerate(value):
        where = f"{field}[{i}]"
        if not isinstance(message, Mapping) or message.get(role_key) not in _CHAT_ROLES:
            raise r.error(where, f"expected a message with {role_key!r} one of {sorted(_CHAT_ROLES)}, got {message!r}")
        content, images = message.get(text_key), 0
        if isinstance(content, (list, tuple)):  # [{"type": "image"}, {"type": "text", "text": ...}]
            parts = [p for p in content if isinstance(p, Mapping)]
            images = sum(p.get("type") == "image" for p in parts)
            content = "\n".join(p.get("text") or "" for p in parts if p.get("type") == "text")
        if not isinstance(content, str):
            raise r.error(f"{where}.{text_key}", f"expected a string or a list of parts, got {type(content).__name__}")
        turns.append((_CHAT_ROLES[message[role_key]], r._unicode(f"{where}.{text_key}", content), images))
    roles = [role for role, _, _ in turns if role != "system"]
    if roles != ["user", "assistant"]:
        raise r.error(field, f"expected one user then one assistant message (a system message first is allowed), "
                             f"got roles {[role for role, _, _ in turns]}")
    return field, turns


def _split_chat_answer(r: _RowReader, text: str, field: str) -> tuple[list[str], str]:
    """(steps, answer) of an assistant message: the answer is in ``<answer>X</answer>`` or on the last line
    ``Answer: X`` (also ``Final answer: X``, ``The answer is X``); the text before it is the rationale, split into
    steps on blank lines, or on line breaks when it has no blank line. ``<think>`` tags are dropped."""
    tagged = _ANSWER_TAG.search(text)
    if tagged:
        rationale, answer = text[: tagged.start()], tagged.group(1)
    else:
        lines = text.rstrip().splitlines()
        match = _ANSWER_LINE.match(lines[-1]) if lines else None
        if match is None:
            raise r.error(field, "no answer found: end the assistant message with a line 'Answer: X' "
                                 "or wrap the answer in <answer>X</answer>")
        rationale, answer = "\n".join(lines[:-1]), match.group(1)
    answer = answer.strip().rstrip(".").strip()
    if not answer:
        raise r.error(field, "empty answer")
    rationale = _THINK_TAGS.sub("", rationale)
    steps = split_steps(rationale)
    if len(steps) == 1:
        steps = steps[0].splitlines()
    return r.check.steps(steps, field, detail="no text before the answer"), answer


def _split_chat_options(question: str) -> tuple[str, list[str] | None]:
    """A trailing block of option lines ``A. x`` / ``(B) y`` lettered from A becomes the choices."""
    lines = question.splitlines()
    start = len(lines)
    while start > 0 and _OPTION_LINE.match(lines[start - 1]):
        start -= 1
    letters = [_OPTION_LINE.match(line).group(1) for line in lines[start:]]
    if len(letters) < 2 or letters != list(LETTERS[: len(letters)]):
        return question, None
    head = lines[:start]
    if head and head[-1].strip().rstrip(":").lower() in ("options", "choices"):
        head = head[:-1]
    return "\n".join(head).strip(), [_OPTION_LINE.match(line).group(2) for line in lines[start:]]


def adapt_chat(
    row: Mapping[str, Any],
    index: int | None = None,
    *,
    image_root: str | os.PathLike | None = None,
    min_pixels: int = MIN_PIXELS,
    max_pixels: int = MAX_PIXELS,
    image_loader: ImageLoader | None = None,
) -> dict[str, Any]:
    """Chat / ShareGPT-style row (``messages`` of ``{"role", "content"}`` or ``conversations`` of ``{"from",
    "value"}``, ``images`` list or ``image``, optional ``id``) -> sample.

    * One user message, then one assistant message; a leading system message is allowed and not used.
    * The question is the user text without its ``<image>`` placeholders; when it has placeholders (or image parts),
      their number must equal the number of images. A trailing block of option lines lettered from A (``A. red``,
      ``(B) blue``, after an optional ``Options:`` line) becomes ``choices``, and the answer must then be a letter
      or an option's text.
    * The assistant text ends with the answer: ``<answer>X</answer>``, or a last line ``Answer: X`` (``Final
      answer: X``, ``The answer is X``). The text before it is the rationale: steps split on blank lines, or on line
      breaks when there is no blank line; ``<think>`` tags are dropped.
    """
    r = _reader(row, index, ("id",), image_root, min_pixels, max_pixels, image_loader)
    _check_foreign_fields(r, "chat")
    field, turns = _chat_turns(r)
    (user_index, (_, user, tagged_images)), (assistant_index, (_, reply, _)) = [
        (i, turn) for i, turn in enumerate(turns) if turn[0] != "system"]
    images = r.image_list("images") if r.has("images") else [r.image("image")]
    placeholders = user.count(_IMAGE_TAG) + tagged_images
    if placeholders and placeholders != len(images):
        raise r.error(f"{field}[{user_index}]", f"{placeholders} image placeholder(s) for {len(images)} image(s)")
    question, choices = _split_chat_options(user.replace(_IMAGE_TAG, "").strip())
    if not question:
        raise r.error(f"{field}[{user_index}]", "empty question")
    steps, answer = _split_chat_answer(r, reply, f"{field}[{assistant_index}]")
    if choices is not None:
        choices = r.check.choices(choices, f"{field}[{user_index}]")
        # "B", "(B)", "B." or "B) blue" name option B, unless the whole answer is an option's text
        letter = re.fullmatch(r"\(?([A-Z])\)?(?:[.):]\s*.*)?", answer)
        if letter and answer not in choices:
            answer = letter.group(1)
        answer = r.check.answer(answer, choices, f"{field}[{assistant_index}]", allow_text=True)
    return _sample(r.sample_id, images, question, choices, steps, answer)


# Format name -> adapter. An adapter added here works with load_vedas_dataset if it has the signature of
# adapt_m3cot (row, index, *, image_root, min_pixels, max_pixels, image_loader) and raises DataError.
ADAPTERS: dict[str, Callable[..., dict[str, Any]]] = {
    "m3cot": adapt_m3cot,
    "scienceqa": adapt_scienceqa,
    "gqa": adapt_gqa,
    "onethinker": adapt_onethinker,
    "chat": adapt_chat,
}
# Other names accepted for a format (format names are case-insensitive).
FORMAT_ALIASES = {"sharegpt": "chat"}

# The content fields each adapter reads (ids are left out: any format may carry any id column). A row of format F
# that holds a field which F does not read but another format does (M3CoT's `choices` in a GQA row, ScienceQA's
# `lecture` in an M3CoT row) is data of another format: loading it as F would silently drop that field.
FORMAT_FIELDS = {
    "m3cot": {"question", "context", "choices", "answer", "rationale", "image"},
    "scienceqa": {"question", "hint", "choices", "answer", "lecture", "solution", "image"},
    "gqa": {"question", "answer", "steps", "rationale", "image", "imageId"},
    "onethinker": {"question", "choices", "answer", "steps", "rationale", "image", "images"},
    "chat": {"messages", "conversations", "images", "image"},
}


def resolve_format(name: Any) -> str:
    """The :data:`ADAPTERS` key of a format name, case-insensitively and with aliases (``"M3CoT"`` -> ``"m3cot"``,
    ``"ShareGPT"`` -> ``"chat"``). Raises ValueError naming the name and the known formats."""
    key = name.strip().lower() if isinstance(name, str) else name
    key = FORMAT_ALIASES.get(key, key)
    if key not in ADAPTERS:
        known = sorted(ADAPTERS) + sorted(FORMAT_ALIASES)
        raise ValueError(f"unknown format {name!r}; expected one of {known} (case-insensitive)")
    return key


def _check_foreign_fields(r: _RowReader, fmt: str) -> None:
    """DataError when the row holds a non-empty field that `fmt` does not read but another format does."""
    own = FORMAT_FIELDS[fmt]
    for field, value in r.row.items():
        if field in own or value is None or (isinstance(value, (str, list, tuple, dict)) and len(value) == 0):
            continue
        owners = sorted(name for name, fields in FORMAT_FIELDS.items() if field in fields)
        if owners:
            raise r.error(field, f"the {fmt} format does not read this field, so it would be dropped; the row looks "
                                 f"like {' or '.join(owners)} data (choose that format, or remove the field)")


# ----------------------------------------------------------------------------------------------------
# Loading
# ----------------------------------------------------------------------------------------------------

_LOCAL_BUILDERS = {".json": "json", ".jsonl": "json", ".parquet": "parquet"}


def _load_raw(source, split: str, load_dataset_kwargs: dict) -> tuple[datasets.Dataset, Path | None]:
    """The raw rows and the default image root (the data file's directory for local files)."""
    if isinstance(source, datasets.Dataset):
        return source, None
    path = Path(source).expanduser()
    builder = _LOCAL_BUILDERS.get(path.suffix.lower())
    if path.is_file():
        if builder is None:
            raise ValueError(
                f"unsupported file type {path.suffix!r} for {str(path)!r}; expected one of {sorted(_LOCAL_BUILDERS)}"
            )
        return _load_file(builder, path, split, load_dataset_kwargs), path.parent
    if builder is not None:
        raise FileNotFoundError(f"no data file at {str(path)!r}")
    if path.is_dir():
        # A local copy of a Hub dataset repository: datasets infers the files and their format.
        return datasets.load_dataset(str(path), split=split, **load_dataset_kwargs), path
    # Anything else is a Hub dataset name ("derek-thomas/ScienceQA", "LightChen2333/M3CoT", ...).
    return datasets.load_dataset(str(source), split=split, **load_dataset_kwargs), None


def _load_file(builder: str, path: Path, split: str, load_dataset_kwargs: dict) -> datasets.Dataset:
    if path.stat().st_size == 0:
        raise DataError(f"cannot read {str(path)!r}: the file is empty")
    try:
        return datasets.load_dataset(builder, data_files={split: str(path)}, split=split, **load_dataset_kwargs)
    except (DatasetGenerationError, pa.ArrowException, UnicodeError, StopIteration, ValueError) as err:
        # datasets reports a parse error without the file, and pyarrow's "in row 1" counts from the start of
        # a block, not of the file. Parsing failed, so finding the line again costs nothing on the happy path.
        cause = err.__cause__ if isinstance(err, DatasetGenerationError) and err.__cause__ is not None else err
        found = None
        if builder == "json" and "field" not in load_dataset_kwargs:
            found = _find_unreadable_json_row(path)
        if found is not None:
            row, field, reason = found
            # not skippable with skip_bad_rows: until the file parses, there are no rows to check or drop
            raise DataError(
                f"cannot read {str(path)!r}: {reason} (a file that does not parse cannot skip rows: fix or remove it)",
                row=row, field=field,
            ) from err
        raise DataError(f"cannot read {str(path)!r} as {builder}: {type(cause).__name__}: {cause}") from err


_JSON_TYPE_NAMES = {dict: "object", list: "array", str: "string", int: "number", float: "number", bool: "boolean"}


def _json_row_problem(value) -> tuple[str | None, str] | None:
    """(field, reason) when a parsed JSON row cannot become a dataset row, else None."""
    if not isinstance(value, dict):
        return None, f"a JSON {_JSON_TYPE_NAMES.get(type(value), 'null')} where a row object is expected"
    for key, item in value.items():
        try:
            json.dumps(item, ensure_ascii=False).encode("utf-8")
        except UnicodeEncodeError:
            # JSON may escape lone UTF-16 surrogates ("\udcff"); they are not Unicode text and Arrow refuses them
            return key, "not valid Unicode: a string holds an unpaired surrogate escape (such as \\udcff)"
    return None


def _find_unreadable_json_row(path: Path) -> tuple[int | None, str | None, str] | None:
    """(row, field, reason) of the first row of a JSON Lines file, or of a JSON array file, that cannot be
    parsed; None when every row parses (then the problem lies elsewhere and the caller reports it as is).
    The file is streamed line by line, so a broken multi-gigabyte JSONL file is not read into memory."""
    with open(path, "rb") as file:
        head = file.read(64).removeprefix(b"\xef\xbb\xbf").lstrip()
    if head.startswith(b"["):
        data = path.read_bytes().removeprefix(b"\xef\xbb\xbf")
        try:
            rows = json.loads(data.decode("utf-8"))
        except UnicodeDecodeError as err:
            line = data.count(b"\n", 0, err.start) + 1
            return None, None, f"line {line}: not valid UTF-8 (byte 0x{data[err.start]:02x})"
        except json.JSONDecodeError as err:
            return None, None, f"line {err.lineno}: not valid JSON: {err.msg} at column {err.colno}"
        if not isinstance(rows, list):
            return None
        for row, value in enumerate(rows):
            problem = _json_row_problem(value)
            if problem is not None:
                return row, problem[0], f"array element {row}: {problem[1]}"
        return None
    row = 0
    with open(path, "rb") as file:
        for line_number, line in enumerate(file, 1):
            if line_number == 1:
                line = line.removeprefix(b"\xef\xbb\xbf")
            if not line.strip():
                continue
            try:
                value = json.loads(line.decode("utf-8").rstrip("\r\n"))  # so the column counts within the line
            except UnicodeDecodeError as err:
                byte, column = line[err.start], err.start + 1
                return row, None, f"line {line_number}: not valid UTF-8 (byte 0x{byte:02x} at column {column})"
            except json.JSONDecodeError as err:
                return row, None, f"line {line_number}: not valid JSON: {err.msg} at column {err.colno}"
            problem = _json_row_problem(value)
            if problem is not None:
                return row, problem[0], f"line {line_number}: {problem[1]}"
            row += 1
    if row == 0:
        return None, None, "no rows (the file holds only blank lines)"
    return None


def _rows(raw: datasets.Dataset, batch_size: int = 256):
    """Yield (position, row dict) for every raw row. Arrow does not check that string columns hold UTF-8
    (a Latin-1 byte in a JSONL file loads fine), so decoding can fail on access; such a row is yielded as
    (position, DataError naming its source row and column) instead of aborting the whole pass."""
    for start in range(0, len(raw), batch_size):
        stop = min(start + batch_size, len(raw))
        try:
            batch = raw[start:stop]
        except UnicodeDecodeError:
            for position in range(start, stop):
                try:
                    yield position, raw[position]
                except UnicodeDecodeError as err:
                    yield position, _undecodable_row(raw, position, err)
            continue
        for i in range(stop - start):
            yield start + i, {name: values[i] for name, values in batch.items()}


def _undecodable_row(raw: datasets.Dataset, position: int, err: UnicodeDecodeError) -> DataError:
    table = raw.with_format("arrow")[position]  # the row as Arrow data, nothing decoded yet
    field = None
    for name in table.column_names:
        try:
            table.column(name).to_pylist()
        except UnicodeDecodeError:
            field = name
            break
    row = table.column(ROW_INDEX_COLUMN)[0].as_py() if ROW_INDEX_COLUMN in table.column_names else position
    byte = err.object[err.start]
    return DataError(f"not valid UTF-8 (byte 0x{byte:02x} at byte {err.start} of the value)", row=row, field=field)


def _without_decoding(feature):
    """Same feature with every Image set to decode=False: datasets would otherwise decode images on
    access, raising its own errors (without row or field) and decoding images we then re-decode."""
    if isinstance(feature, datasets.Image):
        return datasets.Image(decode=False)
    if isinstance(feature, (datasets.List, datasets.LargeList)):
        return type(feature)(_without_decoding(feature.feature))
    if isinstance(feature, dict):
        return {key: _without_decoding(value) for key, value in feature.items()}
    return feature


def _adapt_batch(batch: dict[str, list], *, adapter, image_root, min_pixels, max_pixels) -> dict[str, list]:
    """The dataset transform: raw columns -> unified sample columns."""
    indices = batch[ROW_INDEX_COLUMN]
    columns = [name for name in batch if name != ROW_INDEX_COLUMN]
    samples = [
        adapter(
            {name: batch[name][i] for name in columns},
            indices[i],
            image_root=image_root,
            min_pixels=min_pixels,
            max_pixels=max_pixels,
        )
        for i in range(len(indices))
    ]
    return {key: [sample[key] for sample in samples] for key in SAMPLE_KEYS}


class _ValidationImageLoader:
    """Image loader for the validation pass: decodes each distinct file once.

    GQA asks ~20 questions per image, so checking every row would decode each file many times. The
    outcome per file is remembered; rows sharing a bad file each still get their own DataError. The
    decoded pixels are discarded (the samples built during validation are thrown away).
    """

    def __init__(self, image_root, min_pixels: int, max_pixels: int):
        self.load = functools.partial(load_image, image_root=image_root, min_pixels=min_pixels, max_pixels=max_pixels)
        self.image_root = image_root
        self.outcomes: dict[str, str | None] = {}
        self.placeholder = Image.new("RGB", (MIN_SIDE, MIN_SIDE), (255, 255, 255))

    def __call__(self, value, *, row, field) -> Image.Image:
        path = value.get("path") if isinstance(value, Mapping) and not value.get("bytes") else value
        if not isinstance(path, (str, os.PathLike)) or os.fspath(path) == "":
            self.load(value, row=row, field=field)  # bytes, PIL images, missing: nothing to share
            return self.placeholder
        key = os.path.normpath(os.path.join(os.fspath(self.image_root or ""), os.fspath(path)))
        if key not in self.outcomes:
            try:
                self.load(value, row=row, field=field)
                self.outcomes[key] = None
            except DataError as err:
                self.outcomes[key] = err.reason
                raise
        if self.outcomes[key] is not None:
            raise DataError(self.outcomes[key], row=row, field=field)
        return self.placeholder


def load_vedas_dataset(
    source: str | os.PathLike | datasets.Dataset,
    format: str,
    split: str = "train",
    image_root: str | os.PathLike | None = None,
    skip_bad_rows: bool = False,
    max_pixels: int = MAX_PIXELS,
    min_pixels: int = MIN_PIXELS,
    validate: bool = True,
    **load_dataset_kwargs,
) -> datasets.Dataset:
    """Load M3CoT / ScienceQA / GQA / OneThinker-style data as Vedas samples.

    Args:
        source: a local ``.json`` / ``.jsonl`` / ``.parquet`` file (read with
            ``datasets.load_dataset("json" | "parquet", data_files=...)``), a Hub dataset name or a local
            directory holding a copy of one (read with ``datasets.load_dataset(source, split=split)``), or
            an in-memory ``datasets.Dataset`` of raw rows.
        format: a key of :data:`ADAPTERS` (``"m3cot"``, ``"scienceqa"``, ``"gqa"``, ``"onethinker"``, ``"chat"``)
            or an alias (``"sharegpt"``), in any case (:func:`resolve_format`).
        split: the split to load (for a local file, the name the split gets).
        image_root: directory that relative image paths and GQA ``imageId`` s resolve against; for a
            local file it defaults to the file's directory, for a local dataset directory to itself.
        skip_bad_rows: drop rows that fail validation instead of raising; the count and the first few
            reasons are logged as a warning and the errors kept in ``dataset.skipped_rows``.
        max_pixels, min_pixels: image size bounds, see :func:`load_image`.
        validate: adapt every row once, images included, before returning, so bad rows surface now and
            not hours into training (each distinct image file is decoded once). With ``False`` loading
            is instant and a bad row raises :class:`DataError` when it is accessed. ``skip_bad_rows=True``
            always validates.
        **load_dataset_kwargs: passed to ``datasets.load_dataset`` (``name``, ``revision``, ``cache_dir``, ...).

    Returns:
        A ``datasets.Dataset`` of the raw rows (plus a ``__vedas_row__`` column with the source row index)
        whose transform adapts rows on access: ``ds[i]`` is a sample dict with exactly the keys of
        :data:`SAMPLE_KEYS` and freshly decoded images, ``ds[i:j]`` a dict of lists. ``column_names``
        lists the raw columns, so use it with ``Trainer(args=TrainingArguments(..., remove_unused_columns=False))``.
        ``dataset.skipped_rows`` is the list of :class:`DataError` of dropped rows (empty when none); it
        is a plain attribute, so datasets derived with ``select``/``shuffle``/... do not carry it.

    Raises:
        DataError: the first bad row, unless ``skip_bad_rows``; or a local file that does not parse (empty,
            not JSON, a line that is not an object), naming its first unreadable line. A string that is not
            valid UTF-8 makes only its own row bad (Arrow stores such bytes unchecked; validation finds them,
            with ``validate=False`` pyarrow's UnicodeDecodeError surfaces when the row is read).
        ValueError: unknown ``format``, or pixel bounds that cannot be met.
    """
    format = resolve_format(format)
    _check_pixel_bounds(min_pixels, max_pixels)
    adapter = ADAPTERS[format]

    raw, default_root = _load_raw(source, split, load_dataset_kwargs)
    image_root = image_root if image_root is not None else default_root
    for name, feature in raw.features.items():
        undecoded = _without_decoding(feature)
        if undecoded != feature:
            raw = raw.cast_column(name, undecoded)
    if ROW_INDEX_COLUMN not in raw.column_names:
        raw = raw.add_column(ROW_INDEX_COLUMN, list(range(len(raw))))

    skipped: list[DataError] = []
    if validate or skip_bad_rows:
        loader = _ValidationImageLoader(image_root, min_pixels, max_pixels)
        good = []
        for position, row in _rows(raw):
            try:
                if isinstance(row, DataError):
                    raise row
                index = row.pop(ROW_INDEX_COLUMN)
                adapter(row, index, image_root=image_root, min_pixels=min_pixels, max_pixels=max_pixels,
                        image_loader=loader)
            except DataError as err:
                if not skip_bad_rows:
                    raise
                skipped.append(err)
            else:
                good.append(position)
        if skipped:
            name = "an in-memory dataset" if isinstance(source, datasets.Dataset) else repr(os.fspath(source))
            logger.warning(
                "Skipped %d of %d rows of %s (format %r) that cannot be used; first %d: %s",
                len(skipped), len(raw), name, format, min(len(skipped), 5), "; ".join(str(e) for e in skipped[:5]),
            )
            raw = raw.select(good)

    transform = functools.partial(
        _adapt_batch, adapter=adapter, image_root=image_root, min_pixels=min_pixels, max_pixels=max_pixels
    )
    dataset = raw.with_transform(transform)
    dataset.skipped_rows = skipped
    return dataset
