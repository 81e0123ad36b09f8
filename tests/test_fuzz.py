"""Fuzzed inputs (issue 7, part 2): malformed rows, samples, images and checkpoint folders.

Every case must end in a clear error whose type is fixed (`DataError` for data, `CheckpointError` for checkpoints,
both `ValueError` subclasses) and whose message names the row, sample, file or field, or in a counted skip
(`load_vedas_dataset(..., skip_bad_rows=True)`). docs/robustness.md lists the input classes, their outcome and the
test that checks it.

The field matrices are exhaustive (every field of every format against every malformed value). Hypothesis draws
what cannot be enumerated: arbitrary JSON values, mutated image bytes, merge inputs and collator samples. The
default run checks a small fixed (derandomised) sample per property; `VEDAS_PROPERTY_EXAMPLES=N` draws N fresh cases
per property (the opt-in job).
"""

from __future__ import annotations

import io
import json
import logging
import os
import random
import re
import shutil
import struct
import time
import warnings
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from huggingface_hub.errors import StrictDataclassFieldValidationError
from hypothesis import strategies as st
from PIL import Image
from safetensors.torch import load_file
from transformers import AutoModel, AutoProcessor

from vedas.configuration_vedas import VedasConfig
from vedas_trainer.checkpoint import (
    CheckpointError,
    check_checkpoint_folder,
    convert_base,
    is_vedas_checkpoint,
    load_vedas,
)
from vedas_trainer.collator import VedasCollator
from vedas_trainer.data import (
    ADAPTERS,
    MAX_PIXELS,
    MIN_PIXELS,
    SAMPLE_KEYS,
    DataError,
    load_image,
    load_vedas_dataset,
    merge_steps,
)


_EXAMPLES = os.environ.get("VEDAS_PROPERTY_EXAMPLES")


def fuzz_settings(default_examples: int):
    """A small fixed sample in the default run; VEDAS_PROPERTY_EXAMPLES fresh random cases in the opt-in job."""
    return settings(
        max_examples=int(_EXAMPLES) if _EXAMPLES else default_examples,
        derandomize=_EXAMPLES is None,
        deadline=None,
        database=None,
        suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
    )


RED, GREEN, BLUE = (255, 0, 0), (0, 255, 0), (0, 0, 255)


def encode(image: Image.Image, fmt: str, **kwargs) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **kwargs)
    return buffer.getvalue()


def noise_image(size=(48, 40), seed=0) -> Image.Image:
    return Image.frombytes("RGB", size, random.Random(seed).randbytes(size[0] * size[1] * 3))


def animated(fmt: str, colours=(RED, BLUE, GREEN), size=(40, 40)) -> bytes:
    frames = [Image.new("RGB", size, colour) for colour in colours]
    return encode(frames[0], fmt, save_all=True, append_images=frames[1:], duration=50, loop=0)


def png_claiming_size(width: int, height: int) -> bytes:
    """A tiny PNG whose header claims width x height: a decompression bomb as far as Image.open can tell."""
    data = bytearray(encode(Image.new("L", (1, 1)), "PNG"))
    ihdr = data[12:29]
    ihdr[4:12] = struct.pack(">II", width, height)
    data[12:29] = ihdr
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(ihdr)))
    return bytes(data)


def float_tiff_with_non_finite() -> bytes:
    array = np.linspace(0.0, 1000.0, 56 * 56, dtype=np.float32).reshape(56, 56)
    array[0, 0], array[0, 1] = np.nan, np.inf
    return encode(Image.fromarray(array), "TIFF")


def in_bounds(image: Image.Image, min_pixels=MIN_PIXELS, max_pixels=MAX_PIXELS) -> bool:
    return (
        image.mode == "RGB"
        and min(image.size) >= 28
        and max(image.size) <= 200 * min(image.size)
        and image.width * image.height <= max_pixels
        and (image.width * image.height >= min_pixels or min(image.size) == 28)
    )


def load(tmp_path, source, fmt, **kwargs):
    # a private datasets cache: no reuse of (or writes to) the user's cache between examples
    return load_vedas_dataset(source, fmt, cache_dir=str(tmp_path / "hf_cache"), **kwargs)


def write_jsonl(path, rows) -> str:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return str(path)


@pytest.fixture(scope="module")
def image_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("images")
    Image.new("RGB", (80, 60), RED).save(root / "a.png")
    Image.new("RGB", (80, 60), RED).save(root / "a.jpg")
    return root


# ------------------------------------------------------------------------------------------------------------------
# Adapters: every field of every format against every malformed value
# ------------------------------------------------------------------------------------------------------------------

MISSING = object()  # the field is deleted from the row
EXTRA = "unexpected_field"  # a field no adapter knows

BAD_VALUES = {
    "missing": MISSING,
    "none": None,
    "empty": "",
    "blank": "  \t ",
    "int": 7,
    "float": 2.5,
    "bool": True,
    "empty_list": [],
    "one_item_list": ["x"],
    "dict": {"k": "v"},
    "lone_surrogate": "bad \udcff text",
    "non_utf8_bytes": b"\xff\xfe\x00 not text",
}

BASE_ROWS = {
    "m3cot": {"id": "m3-0", "question": "Which colour?", "context": "A picture.", "choices": ["red", "blue"],
              "answer": "A", "rationale": "Look at it.\n\nIt is red.", "image": "a.png"},
    "scienceqa": {"id": "sqa-0", "question": "Which colour?", "hint": "A picture.", "choices": ["red", "blue", "green"],
                  "answer": 0, "lecture": "Colours.", "solution": "It is red.", "image": "a.png"},
    "gqa": {"questionId": "g-0", "question": "Which colour?", "answer": "red", "steps": ["Look.", "Red."],
            "image": "a.png"},
    "onethinker": {"id": "o-0", "question": "Which colour?", "choices": ["red", "blue"], "answer": "red",
                   "steps": ["Look.", "Red."], "image": "a.png"},
}

# field -> kind; the kind decides which malformed values the adapter may accept (ACCEPTED below)
FIELD_KINDS = {
    "m3cot": {"id": "id", "question": "text", "context": "optional_text", "choices": "choices", "answer": "letter",
              "rationale": "text", "image": "image"},
    "scienceqa": {"id": "id", "question": "text", "hint": "optional_text", "choices": "choices", "answer": "index",
                  "lecture": "optional_text", "solution": "optional_text", "image": "image"},
    "gqa": {"questionId": "id", "question": "text", "answer": "text", "steps": "steps", "image": "image"},
    "onethinker": {"id": "id", "question": "text", "choices": "optional_choices", "answer": "text_or_option",
                   "steps": "steps", "image": "image"},
}

# Malformed values a field of this kind legitimately accepts: no id means "use the row index", an int id is an id,
# optional texts may be absent or blank, OneThinker rows without options are short-answer rows, and ["x"] is a valid
# one-step list. Everything else must be refused.
ACCEPTED = {
    "id": {"missing", "none", "empty", "blank", "int"},
    "optional_text": {"missing", "none", "empty", "blank"},
    "optional_choices": {"missing", "none", "empty_list"},
    "steps": {"one_item_list"},
}

INDEX = 41


def mutated(fmt, field, value):
    row = dict(BASE_ROWS[fmt])
    if value is MISSING:
        row.pop(field, None)
    else:
        row[field] = value
    return row


def adapter_matrix():
    for fmt, kinds in FIELD_KINDS.items():
        for field, kind in kinds.items():
            for name in BAD_VALUES:
                yield fmt, field, kind, name


ADAPTER_CASES = list(adapter_matrix())


def test_adapter_field_matrix(image_root):
    """Each (format, field, malformed value) is either accepted by design or a DataError naming row and field."""
    refused = accepted = 0
    for fmt, field, kind, name in ADAPTER_CASES:
        row = mutated(fmt, field, BAD_VALUES[name])
        case = f"{fmt}.{field}={name}"
        if name in ACCEPTED.get(kind, ()):
            sample = ADAPTERS[fmt](row, INDEX, image_root=image_root)
            assert set(sample) == set(SAMPLE_KEYS), case
            assert all(image.mode == "RGB" for image in sample["images"]), case
            accepted += 1
            continue
        with pytest.raises(DataError) as info:
            ADAPTERS[fmt](row, INDEX, image_root=image_root)
        message = str(info.value)
        assert info.value.row == INDEX and message.startswith(f"row {INDEX}"), (case, message)
        assert field in message, (case, message)  # the field, e.g. "field 'answer'" or "('steps' or 'rationale')"
        refused += 1
    assert (refused, accepted) == (271, 41) and refused + accepted == len(ADAPTER_CASES)


def test_adapters_ignore_extra_fields(image_root):
    for fmt, row in BASE_ROWS.items():
        reference = ADAPTERS[fmt](row, INDEX, image_root=image_root)
        for value in BAD_VALUES.values():
            if value is MISSING:
                continue
            sample = ADAPTERS[fmt]({**row, EXTRA: value}, INDEX, image_root=image_root)
            assert {k: sample[k] for k in SAMPLE_KEYS if k != "images"} == {
                k: reference[k] for k in SAMPLE_KEYS if k != "images"
            }


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=True) | st.text(max_size=20)
    | st.binary(max_size=8),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=5), children, max_size=4),
    max_leaves=10,
)


@pytest.mark.property
@fuzz_settings(60)
@given(data=st.data())
def test_arbitrary_field_values_never_escape_as_other_errors(image_root, data):
    fmt = data.draw(st.sampled_from(sorted(BASE_ROWS)), label="format")
    field = data.draw(st.sampled_from(sorted(FIELD_KINDS[fmt])), label="field")
    value = data.draw(json_values, label="value")
    try:
        sample = ADAPTERS[fmt]({**BASE_ROWS[fmt], field: value}, INDEX, image_root=image_root)
    except DataError as err:
        assert err.row == INDEX and field in str(err)
    else:
        assert set(sample) == set(SAMPLE_KEYS)
        for text in [sample["id"], sample["question"], sample["answer"], *sample["steps"], *(sample["choices"] or [])]:
            assert isinstance(text, str) and text.strip() and text.encode("utf-8")


def test_rows_that_are_not_mappings(image_root):
    for fmt in ADAPTERS:
        for row in (["question", "answer"], "a row", 7, None):
            with pytest.raises(DataError, match=rf"^row {INDEX}: expected a row mapping"):
                ADAPTERS[fmt](row, INDEX, image_root=image_root)


# ------------------------------------------------------------------------------------------------------------------
# Loading files: counted skips, unreadable files and rows
# ------------------------------------------------------------------------------------------------------------------

def test_skip_bad_rows_counts_every_malformed_row(tmp_path, image_root, caplog):
    """All JSON-representable malformed m3cot rows in one file: each refused one is skipped and counted, with its
    source row index; the accepted ones and the good rows load."""
    shutil.copy(image_root / "a.png", tmp_path / "a.png")
    rows, expected_bad = [], []
    for fmt, field, kind, name in ADAPTER_CASES:
        value = BAD_VALUES[name]
        if fmt != "m3cot" or isinstance(value, bytes) or name == "lone_surrogate":
            continue  # bytes are not JSON; an escaped surrogate makes the file itself unreadable (tested below)
        rows.append({**BASE_ROWS[fmt], "id": f"good-{len(rows)}"})
        row = mutated(fmt, field, value)
        if field != "id":
            row["id"] = f"bad-{len(rows)}"
        if name not in ACCEPTED.get(kind, ()):
            expected_bad.append(len(rows))
        rows.append(row)
    path = write_jsonl(tmp_path / "m3cot.jsonl", rows)

    with pytest.raises(DataError) as info:
        load(tmp_path, path, "m3cot")
    assert info.value.row == expected_bad[0]

    with caplog.at_level(logging.WARNING, logger="vedas_trainer.data"):
        ds = load(tmp_path, path, "m3cot", skip_bad_rows=True)
    assert [err.row for err in ds.skipped_rows] == expected_bad
    assert len(ds) == len(rows) - len(expected_bad) and len(expected_bad) == 61
    assert f"Skipped {len(expected_bad)} of {len(rows)} rows" in caplog.text
    assert all(set(sample) == set(SAMPLE_KEYS) for sample in ds)


def line_bytes(row) -> bytes:
    return (json.dumps(row) + "\n").encode()


GOOD_ROW = {**BASE_ROWS["m3cot"], "image": "a.png"}

UNREADABLE_FILES = {
    # name: (file name, content, regex the message must match, row named by the error)
    "empty_file": ("d.jsonl", b"", r"cannot read '.*d\.jsonl': the file is empty", None),
    "blank_lines_only": ("d.jsonl", b"\n \n\t\n", r"'.*d\.jsonl': no rows", None),
    "line_not_json": ("d.jsonl", line_bytes(GOOD_ROW) + b'{"id": "x", "question": \n',
                      r"^row 1: cannot read '.*d\.jsonl': line 2: not valid JSON", 1),
    "line_not_an_object": ("d.jsonl", line_bytes(GOOD_ROW) * 2 + b"[1, 2]\n",
                           r"^row 2: cannot read '.*d\.jsonl': line 3: a JSON array where a row object", 2),
    "escaped_lone_surrogate": ("d.jsonl", line_bytes(GOOD_ROW) + line_bytes({**GOOD_ROW, "question": "x\udcff"}),
                               r"^row 1, field 'question': cannot read '.*d\.jsonl': line 2: not valid Unicode", 1),
    "array_element_not_object": ("d.json", json.dumps([GOOD_ROW, 5]).encode(),
                                 r"^row 1: cannot read '.*d\.json': array element 1: a JSON number", 1),
    "array_not_json": ("d.json", b'[{"id": "a"},\n {"id": ]', r"cannot read '.*d\.json': line 2: not valid JSON",
                       None),
    "truncated_parquet": ("d.parquet", None, r"cannot read '.*d\.parquet' as parquet: ArrowInvalid", None),
    "garbage_parquet": ("d.parquet", b"PAR1 this is not parquet", r"cannot read '.*d\.parquet' as parquet", None),
}


@pytest.mark.parametrize("case", sorted(UNREADABLE_FILES))
def test_unreadable_files_name_file_and_line(case, tmp_path):
    name, content, pattern, row = UNREADABLE_FILES[case]
    if content is None:  # a real parquet file cut in half
        datasets = pytest.importorskip("datasets")
        datasets.Dataset.from_list([GOOD_ROW] * 20).to_parquet(tmp_path / "full.parquet")
        full = (tmp_path / "full.parquet").read_bytes()
        content = full[: len(full) // 2]
    (tmp_path / name).write_bytes(content)
    for skip in (False, True):  # a file that does not parse has no rows to skip
        with pytest.raises(DataError) as info:
            load(tmp_path, tmp_path / name, "m3cot", skip_bad_rows=skip)
        assert re.search(pattern, str(info.value)), str(info.value)
        assert info.value.row == row


def test_non_utf8_bytes_make_only_their_row_bad(tmp_path, image_root):
    """Arrow stores a Latin-1 byte inside a JSON string unchecked; decoding fails only when the row is read."""
    shutil.copy(image_root / "a.png", tmp_path / "a.png")
    lines = [line_bytes({**GOOD_ROW, "id": f"r{i}"}) for i in range(5)]
    lines[2] = lines[2].replace(b"Which colour?", b"Which colour\xe9?")
    lines[4] = lines[4].replace(b'"r4"', b'"r\xff4"')
    (tmp_path / "latin1.jsonl").write_bytes(b"".join(lines))
    with pytest.raises(DataError, match=r"^row 2, field 'question': not valid UTF-8 \(byte 0xe9"):
        load(tmp_path, tmp_path / "latin1.jsonl", "m3cot")
    ds = load(tmp_path, tmp_path / "latin1.jsonl", "m3cot", skip_bad_rows=True)
    assert [sample["id"] for sample in ds] == ["r0", "r1", "r3"]
    assert [(err.row, err.field) for err in ds.skipped_rows] == [(2, "question"), (4, "id")]


def test_huge_rationales_stay_fast(image_root, collator_parts, caplog):
    """20 000 steps (a rationale split on every blank line) and a 1 MB single step: adapted, merged and collated in
    seconds, the target cut to max_length with a warning. merge_steps was quadratic in the step count: the collator
    spent minutes on a 20 000-step rationale."""
    many = "\n\n".join(f"step {i}: move one cell." for i in range(20_000))
    single = "word " * 200_000
    started = time.perf_counter()
    samples = [
        ADAPTERS["m3cot"]({**BASE_ROWS["m3cot"], "rationale": rationale}, i, image_root=image_root)
        for i, rationale in enumerate((many, single))
    ]
    assert len(samples[0]["steps"]) == 20_000
    merged = merge_steps(samples[0]["steps"], 4)
    assert len(merged) == 4 and "\n".join(merged) == "\n".join(samples[0]["steps"])
    processor, config = collator_parts
    with caplog.at_level(logging.WARNING, logger="vedas_trainer.collator"):
        batch = VedasCollator(processor, config, stage=0, max_latent_stage=4, max_length=256)(samples)
    assert batch["attention_mask"].sum(-1).tolist() == [256, 256]
    assert "target cut from" in caplog.text
    assert time.perf_counter() - started < 15


@pytest.mark.property
@fuzz_settings(40)
@given(steps=st.lists(st.text(alphabet="ab ", max_size=12), min_size=1, max_size=24), max_steps=st.integers(1, 6))
def test_merge_steps_matches_the_quadratic_programme(steps, max_steps):
    """The divide-and-conquer merge returns exactly what the plain O(K n^2) programme returns, ties included."""
    assert merge_steps(steps, max_steps) == _quadratic_merge(steps, max_steps)


def _quadratic_merge(steps, max_steps):
    n = len(steps)
    if n <= max_steps:
        return list(steps)
    prefix = [0]
    for step in steps:
        prefix.append(prefix[-1] + len(step))
    best = [[float("inf")] * (n + 1) for _ in range(max_steps + 1)]
    cut = [[0] * (n + 1) for _ in range(max_steps + 1)]
    best[0][0] = 0
    for k in range(1, max_steps + 1):
        for j in range(k, n - (max_steps - k) + 1):
            for i in range(k - 1, j):
                candidate = best[k - 1][i] + (prefix[j] - prefix[i] + j - i - 1) ** 2
                if candidate < best[k][j]:
                    best[k][j], cut[k][j] = candidate, i
    chunks, end = [], n
    for k in range(max_steps, 0, -1):
        chunks.append("\n".join(steps[cut[k][end]:end]))
        end = cut[k][end]
    return chunks[::-1]


# ------------------------------------------------------------------------------------------------------------------
# Images
# ------------------------------------------------------------------------------------------------------------------

def _truncated_animated_gif() -> bytes:
    data = encode(noise_image().convert("P"), "GIF", save_all=True,
                  append_images=[noise_image(seed=1).convert("P")], duration=50)
    return data[: int(len(data) * 0.53)]  # inside the second frame: Pillow's is_animated indexes past the end


# name: (encoded bytes, expected outcome): ("ok", size check) or ("error", regex on the message)
IMAGE_CLASSES = {
    "one_pixel": (lambda: encode(Image.new("RGB", (1, 1), RED), "PNG"), ("ok", (56, 56))),
    "huge_10000x10000": (lambda: encode(Image.new("1", (10_000, 10_000), 1), "PNG"), ("ok", (1001, 1001))),
    "bomb_60000x60000": (lambda: png_claiming_size(60_000, 60_000), ("error", r"exceeds the decode limit")),
    "bomb_12000x12000": (lambda: png_claiming_size(12_000, 12_000), ("error", r"12000x12000 pixels: it exceeds")),
    "thin_strip_3000x2": (lambda: encode(Image.new("RGB", (3000, 2), RED), "PNG"), ("ok", (5600, 28))),
    "cmyk_jpeg": (lambda: encode(Image.new("CMYK", (56, 56), (0, 255, 255, 0)), "JPEG"), ("ok", (56, 56))),
    "sixteen_bit_png": (lambda: encode(Image.new("I;16", (56, 56), 40_000), "PNG"), ("ok", (56, 56))),
    "palette_png": (lambda: encode(noise_image((56, 56)).convert("P"), "PNG"), ("ok", (56, 56))),
    "la_png": (lambda: encode(Image.new("LA", (56, 56), (90, 128)), "PNG"), ("ok", (56, 56))),
    "float_tiff_nan_inf": (float_tiff_with_non_finite, ("ok", (56, 56))),
    "animated_gif": (lambda: animated("GIF"), ("ok", (56, 56))),
    "animated_png": (lambda: animated("PNG"), ("ok", (56, 56))),
    "corrupt_bytes": (lambda: b"\x89PNG\r\n\x1a\n but then garbage", ("error", r"cannot decode image")),
    "truncated_png": (lambda: encode(noise_image((64, 64)), "PNG")[:3000], ("error", r"cannot decode image.*truncat")),
    "truncated_animated_gif": (_truncated_animated_gif, ("error", r"cannot decode image")),
    "empty_file": (lambda: b"", ("error", r"cannot decode image")),
}


def test_image_classes_through_loader_and_collator(tmp_path, vedas_dirs):
    """One m3cot file whose rows point at every image class: the broken ones are skipped and counted with their
    row and file, the others become RGB images in bounds and collate into finite pixel values."""
    rows = []
    for i, (name, (make, _)) in enumerate(sorted(IMAGE_CLASSES.items())):
        (tmp_path / f"{name}.img").write_bytes(make())
        rows.append({**BASE_ROWS["m3cot"], "id": name, "image": f"{name}.img"})
    path = write_jsonl(tmp_path / "images.jsonl", rows)
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        ds = load(tmp_path, path, "m3cot", skip_bad_rows=True)

    errors = {rows[err.row]["id"]: err for err in ds.skipped_rows}
    expected_errors = {name for name, (_, (kind, _)) in IMAGE_CLASSES.items() if kind == "error"}
    assert set(errors) == expected_errors
    for name, err in errors.items():
        assert err.field == "image" and f"{name}.img" in str(err) and "DataError" not in str(err), str(err)
        assert re.search(IMAGE_CLASSES[name][1][1], str(err)), str(err)

    samples = list(ds)
    assert len(samples) == len(IMAGE_CLASSES) - len(expected_errors)
    for sample in samples:
        image = sample["images"][0]
        assert in_bounds(image) and image.size == IMAGE_CLASSES[sample["id"]][1][1], (sample["id"], image.size)
    by_id = {sample["id"]: sample["images"][0] for sample in samples}
    assert by_id["animated_gif"].getpixel((28, 28)) == RED and by_id["animated_png"].getpixel((28, 28)) == RED
    assert by_id["float_tiff_nan_inf"].getpixel((0, 0)) == (0, 0, 0)  # NaN -> black, not a black image
    assert by_id["float_tiff_nan_inf"].getpixel((55, 55)) == (255, 255, 255)
    assert by_id["sixteen_bit_png"].getpixel((5, 5)) == (156, 156, 156)  # 40000 / 257, not clipped to 255

    processor = AutoProcessor.from_pretrained(vedas_dirs["qwen2_vl"], trust_remote_code=True)
    config = VedasConfig.from_pretrained(vedas_dirs["qwen2_vl"])
    batch = VedasCollator(processor, config, stage=1, max_latent_stage=2)(samples)
    assert torch.isfinite(batch["pixel_values"]).all()
    assert [crops[0].shape[1:] for crops in batch["crop_images"]] == [image.size[::-1] for image in
                                                                      (s["images"][0] for s in samples)]


IMAGE_SEEDS = {
    "png": lambda: encode(noise_image(), "PNG"),
    "jpeg": lambda: encode(noise_image(), "JPEG"),
    "progressive_jpeg": lambda: encode(noise_image(), "JPEG", progressive=True),
    "cmyk_jpeg": lambda: encode(noise_image().convert("CMYK"), "JPEG"),
    "gif": lambda: encode(noise_image().convert("P"), "GIF"),
    "animated_gif": lambda: encode(noise_image().convert("P"), "GIF", save_all=True,
                                   append_images=[noise_image(seed=1).convert("P")]),
    "animated_png": lambda: encode(noise_image(), "PNG", save_all=True, append_images=[noise_image(seed=1)]),
    "bmp": lambda: encode(noise_image(), "BMP"),
    "tiff": lambda: encode(noise_image(), "TIFF"),
    "float_tiff": float_tiff_with_non_finite,
    "webp": lambda: encode(noise_image(), "WEBP"),
    "ico": lambda: encode(noise_image(), "ICO"),
    "sixteen_bit_png": lambda: encode(Image.new("I;16", (40, 40), 300), "PNG"),
}
_SEED_BYTES = {}


def seed_bytes(name: str) -> bytes:
    if name not in _SEED_BYTES:
        _SEED_BYTES[name] = IMAGE_SEEDS[name]()
    return _SEED_BYTES[name]


mutations = st.lists(
    st.tuples(st.sampled_from(["flip", "truncate", "insert", "overwrite_int"]), st.floats(0, 1), st.binary(min_size=1, max_size=8)),
    min_size=1, max_size=6,
)


def mutate(data: bytes, ops) -> bytes:
    data = bytearray(data)
    for op, where, payload in ops:
        position = int(where * len(data))
        if op == "flip" and data:
            data[min(position, len(data) - 1)] ^= payload[0] or 1
        elif op == "truncate":
            data = data[:position]
        elif op == "insert":
            data[position:position] = payload
        elif op == "overwrite_int":  # sizes and lengths in headers: 0, huge, negative-looking
            data[position:position + 4] = payload[:1] * 4
    return bytes(data)


@pytest.mark.property
@fuzz_settings(150)
@given(name=st.sampled_from(sorted(IMAGE_SEEDS)), ops=mutations)
def test_mutated_image_bytes_decode_or_raise_data_error(name, ops):
    data = mutate(seed_bytes(name), ops)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # libtiff and the PNG plugin warn about broken chunks; the outcome counts
        try:
            image = load_image({"bytes": data, "path": f"fuzzed.{name}"}, row=3, field="image")
        except DataError as err:
            assert str(err).startswith("row 3, field 'image': ") and f"fuzzed.{name}" in str(err), str(err)
        else:
            assert in_bounds(image)
            assert np.isfinite(np.asarray(image, dtype=np.float32)).all()


def test_truncated_animated_gifs_are_data_errors():
    """Regression: Pillow's is_animated raised IndexError on GIFs cut inside a later frame, past our handler."""
    data = encode(noise_image().convert("P"), "GIF", save_all=True, append_images=[noise_image(seed=1).convert("P")])
    outcomes = set()
    for cut in range(len(data) // 2, len(data), 7):
        try:
            load_image(data[:cut], row=0)
            outcomes.add("decoded")
        except DataError as err:
            assert "cannot decode image" in str(err)
            outcomes.add("error")
    assert "error" in outcomes


# ------------------------------------------------------------------------------------------------------------------
# The collator: hand-made samples
# ------------------------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def collator_parts(vedas_dirs):
    folder = vedas_dirs["qwen2_vl"]
    return AutoProcessor.from_pretrained(folder, trust_remote_code=True), VedasConfig.from_pretrained(folder)


def good_sample(**overrides):
    sample = {"id": "s-1", "images": [Image.new("RGB", (56, 56), RED)], "question": "Which colour?",
              "choices": ["red", "blue"], "steps": ["Look.", "Red."], "answer": "A"}
    sample.update(overrides)
    return sample


# field -> malformed values the collator accepts by design (no options, no images)
COLLATOR_ACCEPTED = {"choices": {"missing", "none", "empty_list"}, "images": {"missing", "none", "empty_list"},
                     "id": {"missing", "none", "empty", "blank", "int"}, "steps": {"one_item_list"}}


def test_collator_field_matrix(collator_parts):
    processor, config = collator_parts
    collator = VedasCollator(processor, config, stage=1, max_latent_stage=2)
    refused = 0
    for field in ("id", "question", "choices", "answer", "steps", "images"):
        for name, value in BAD_VALUES.items():
            sample = good_sample()
            if value is MISSING:
                del sample[field]
            else:
                sample[field] = value
            if name in COLLATOR_ACCEPTED.get(field, ()):
                batch = collator([sample])
                assert batch["input_ids"].shape[0] == 1
                continue
            with pytest.raises(DataError) as info:
                collator([good_sample(id="before"), sample])
            message = str(info.value)
            where = "<batch position 1>" if field == "id" else "s-1"
            assert message.startswith(f"id '{where}', field '{field}"), (field, name, message)
            refused += 1
    assert refused == 60


SPECIAL_STRINGS = ["<|latent|>", "<|image_pad|>", "<|im_end|>", "<|vision_start|>", "<|replay|>"]


@pytest.mark.parametrize("field", ["question", "choices", "steps", "answer"])
def test_collator_refuses_special_token_strings(collator_parts, field):
    """A "<|latent|>" in a rationale would be tokenised as a latent slot, an "<|image_pad|>" in a question breaks the
    image placeholders: both silently wrong, so they are refused."""
    processor, config = collator_parts
    collator = VedasCollator(processor, config, stage=1, max_latent_stage=2)
    for token in SPECIAL_STRINGS:
        sample = {"question": good_sample(question=f"What {token} is it?"),
                  "choices": good_sample(choices=["red", f"blue{token}"]),
                  "steps": good_sample(steps=["Look.", f"Then {token}."]),
                  "answer": good_sample(choices=None, answer=f"red {token}")}[field]
        with pytest.raises(DataError, match=rf"^id 's-1', field '{field}.*special token '{re.escape(token)}'"):
            collator([sample])


def test_collator_refuses_non_mapping_samples(collator_parts):
    processor, config = collator_parts
    for sample in ("a sample", ["question"], None, 7):
        with pytest.raises(DataError, match=r"^id '<batch position 1>': expected a sample dict"):
            VedasCollator(processor, config)([good_sample(), sample])


DIRECT_IMAGES = {
    "one_pixel": lambda: Image.new("RGB", (1, 1), RED),
    "thin_strip": lambda: Image.new("RGB", (3000, 2), RED),
    "large_4000x3000": lambda: Image.new("RGB", (4000, 3000), RED),
    "cmyk": lambda: Image.new("CMYK", (56, 56), (0, 255, 255, 0)),
    "sixteen_bit": lambda: Image.new("I;16", (56, 56), 65535),
    "float_nan": lambda: Image.fromarray(np.full((56, 56), np.nan, dtype=np.float32)),
    "palette": lambda: Image.new("RGB", (56, 56), RED).convert("P"),
    "la": lambda: Image.new("LA", (56, 56), (90, 255)),
    "animated_gif_on_frame_2": lambda: _seeked(Image.open(io.BytesIO(animated("GIF"))), 2),
}


def _seeked(image, frame):
    image.seek(frame)
    return image


def test_collator_normalises_images_handed_in_directly(collator_parts):
    """PIL images the data loader did not produce: converted to RGB, first frame, sides >= 28 px, at most 200:1,
    within [processor min_pixels, max(data MAX_PIXELS, processor max_pixels)], so the processor never raises and the
    crop tensors stay bounded. Before, a 3000x2 strip raised inside the processor, a 1x1 image left a 1x1 crop source
    and a 16-bit image was clipped to white by the processor's own conversion."""
    processor, config = collator_parts
    collator = VedasCollator(processor, config, stage=1, max_latent_stage=2)
    samples = [good_sample(id=name, images=[make()]) for name, make in DIRECT_IMAGES.items()]
    batch = collator(samples)
    assert torch.isfinite(batch["pixel_values"]).all()
    for sample, crops in zip(samples, batch["crop_images"]):
        height, width = crops[0].shape[1:]
        assert min(height, width) >= 28 and max(height, width) <= 200 * min(height, width), sample["id"]
        assert collator.min_pixels <= height * width <= collator.max_pixels or min(height, width) == 28, sample["id"]
    crops = dict(zip(DIRECT_IMAGES, (c[0] for c in batch["crop_images"])))
    assert crops["animated_gif_on_frame_2"][:, 28, 28].tolist() == list(RED)  # the first frame, not frame 2
    assert crops["sixteen_bit"][:, 0, 0].tolist() == [255, 255, 255]
    assert crops["float_nan"].max() == 0  # non-finite pixels become black, never NaN in pixel_values


sample_values = st.one_of(st.none(), st.text(max_size=30), st.integers(), st.lists(st.text(max_size=5), max_size=3),
                          st.booleans(), st.binary(max_size=4))


@pytest.mark.property
@fuzz_settings(30)
@given(field=st.sampled_from(["id", "question", "choices", "answer", "steps", "images"]), value=sample_values)
def test_collator_arbitrary_values_collate_or_raise_data_error(collator_parts, field, value):
    processor, config = collator_parts
    try:
        batch = VedasCollator(processor, config, stage=1, max_latent_stage=2)([good_sample(**{field: value})])
    except DataError as err:
        assert str(err).startswith("id ") and f"field '{field}" in str(err), str(err)
    else:
        assert batch["input_ids"].shape[0] == 1 and (batch["labels"] != -100).any()


# ------------------------------------------------------------------------------------------------------------------
# Checkpoint folders
# ------------------------------------------------------------------------------------------------------------------

@pytest.fixture
def checkpoint(vedas_dirs, tmp_path):
    folder = tmp_path / "checkpoint"
    shutil.copytree(vedas_dirs["qwen2_vl"], folder)
    return folder


def edit_config(folder, **changes):
    config = json.loads((folder / "config.json").read_text())
    for dotted, value in changes.items():
        target, path = config, dotted.split("__")
        for key in path[:-1]:
            target = target[key]
        if value is MISSING:
            target.pop(path[-1])
        else:
            target[path[-1]] = value
    (folder / "config.json").write_text(json.dumps(config))


def truncate(folder, keep):
    path = folder / "model.safetensors"
    data = path.read_bytes()
    path.write_bytes(data[: keep(len(data))])


def pickle_only(folder):
    torch.save(load_file(folder / "model.safetensors"), folder / "pytorch_model.bin")
    (folder / "model.safetensors").unlink()


def grow_tokenizer(folder):
    processor = AutoProcessor.from_pretrained(folder, trust_remote_code=True)
    processor.tokenizer.add_tokens([f"<extra_{i}>" for i in range(100)])
    processor.tokenizer.save_pretrained(folder)


def swap_latent_ids(folder):
    config = json.loads((folder / "config.json").read_text())
    edit_config(folder, latent_token_id=config["replay_token_id"], replay_token_id=config["latent_token_id"])


# name: (damage, regex on the CheckpointError of load_vedas, what check_checkpoint_folder reports or None)
CHECKPOINT_CASES = {
    "safetensors_truncated_half": (lambda f: truncate(f, lambda n: n // 2),
                                   r"model\.safetensors \(truncated: \d+ bytes, the header describes \d+\)",
                                   "an intact model.safetensors (truncated"),
    "safetensors_truncated_in_header": (lambda f: truncate(f, lambda n: 100),
                                        r"model\.safetensors \(truncated or not safetensors: a \d+-byte header",
                                        "an intact model.safetensors (truncated"),
    "safetensors_truncated_to_4_bytes": (lambda f: truncate(f, lambda n: 4), r"model\.safetensors \(truncated: 4 bytes",
                                         "an intact model.safetensors (truncated"),
    "pickle_weights_only": (pickle_only, r"model\.safetensors \(the folder has only pytorch_model\.bin; weights load "
                                         r"from safetensors only", "model.safetensors (the folder has only"),
    "config_not_json": (lambda f: (f / "config.json").write_text("{not json"), r"config\.json' is not valid JSON",
                        "a valid config.json"),
    "config_a_list": (lambda f: (f / "config.json").write_text("[1, 2]"), r"config\.json' holds a JSON list",
                      "a valid config.json"),
    "config_hidden_size_str": (lambda f: edit_config(f, text_config__hidden_size="64"),
                               r"Invalid config\.json .*field 'hidden_size'.*expected int, got str", None),
    "config_layers_float": (lambda f: edit_config(f, text_config__num_hidden_layers=4.5),
                            r"Invalid config\.json .*field 'num_hidden_layers'.*got float", None),
    "config_vedas_field_str": (lambda f: edit_config(f, num_replay_tokens="4"),
                               r"Invalid config\.json .*num_replay_tokens must be an integer", None),
    "config_layer_count_huge": (lambda f: edit_config(f, text_config__num_hidden_layers=10**12),
                                r"text_config\.num_hidden_layers=1000000000000, but the weights hold 4", None),
    "config_vision_depth_huge": (lambda f: edit_config(f, vision_config__depth=10**12),
                                 r"vision_config\.depth=1000000000000, but the weights hold \d+", None),
    "config_dtype_unknown": (lambda f: edit_config(f, dtype="float77"), r"config\.json'?: dtype='float77' is not a "
                                                                           r"torch dtype", None),
    "config_activation_unknown": (lambda f: edit_config(f, text_config__hidden_act="swishy"),
                                  r"Could not build the model of .* from its config\.json .*KeyError.*swishy", None),
    "model_type_unknown": (lambda f: edit_config(f, model_type="llama"),
                           r"config\.json' has model_type='llama'; a Vedas checkpoint has one of",
                           "a Vedas model_type in config.json"),
    "model_type_missing": (lambda f: edit_config(f, model_type=MISSING), r"has model_type=None",
                           "a Vedas model_type in config.json"),
    "processor_config_missing": (lambda f: (f / "processor_config.json").unlink(),
                                 r"lacks processor files: processor_config\.json or preprocessor_config\.json",
                                 "processor_config.json or preprocessor_config.json"),
    "tokenizer_missing": (lambda f: (f / "tokenizer.json").unlink(), r"lacks processor files: tokenizer\.json",
                          "tokenizer.json"),
    "chat_template_missing": (lambda f: (f / "chat_template.jinja").unlink(), r"has no chat template", None),
    "tokenizer_larger_than_embedding": (grow_tokenizer, r"the tokenizer has 567 tokens but the embedding has 512 rows",
                                        None),
    "latent_token_id_out_of_range": (lambda f: edit_config(f, latent_token_id=100_000),
                                     r"latent_token_id=100000 is not a token id of the 512-row embedding", None),
    "eos_token_id_out_of_range": (lambda f: edit_config(f, text_config__eos_token_id=[2, 9999]),
                                  r"text_config\.eos_token_id=\[2, 9999\] is not a token id", None),
    "special_token_ids_swapped": (swap_latent_ids, r"latent_token_id=466 but the tokenizer maps '<\|latent\|>' to 464",
                                  None),
    "special_token_not_a_string": (lambda f: edit_config(f, latent_token=7), r"latent_token=7 is not a token string",
                                   None),
}


@pytest.mark.parametrize("case", sorted(CHECKPOINT_CASES))
def test_broken_checkpoints_are_refused_by_name(case, checkpoint):
    damage, pattern, folder_report = CHECKPOINT_CASES[case]
    damage(checkpoint)
    with pytest.raises(CheckpointError) as info:
        load_vedas(checkpoint)
    message = str(info.value)
    assert re.search(pattern, message, re.DOTALL) and str(checkpoint) in message, message
    report = check_checkpoint_folder(checkpoint)  # the pre-push check reads only small files and headers
    if folder_report is None:
        assert report == [], report
    else:
        assert any(item.startswith(folder_report) for item in report), report


def test_case_names_in_test_ids_match_the_doc():
    """docs/robustness.md lists these cases by name; a renamed case must be renamed there too."""
    doc = (Path(__file__).resolve().parents[1] / "docs" / "robustness.md").read_text()
    for name in [*CHECKPOINT_CASES, *UNREADABLE_FILES, *IMAGE_CLASSES, *DIRECT_IMAGES]:
        assert f"`{name}`" in doc, name


def test_weights_load_from_safetensors_only(checkpoint):
    """A pickle lying next to the safetensors file is never opened (it is garbage here: opening it would fail)."""
    (checkpoint / "pytorch_model.bin").write_bytes(b"\x80\x04 not a pickle at all")
    model, _ = load_vedas(checkpoint)
    reference = load_file(checkpoint / "model.safetensors")
    embedding = next(tensor for name, tensor in reference.items() if name.endswith("embed_tokens.weight"))
    assert torch.equal(model.get_input_embeddings().weight, embedding)
    assert is_vedas_checkpoint(checkpoint)


def test_convert_refuses_a_pickle_only_base(base_dirs, tmp_path):
    base = tmp_path / "base"
    shutil.copytree(base_dirs["qwen2_vl"], base)
    pickle_only(base)
    with pytest.raises(CheckpointError, match=r"has only pytorch_model\.bin; weights load from safetensors only"):
        convert_base(base, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_is_vedas_checkpoint_on_broken_configs(checkpoint):
    for content in ("{not json", "[1]", '{"model_type": null}', '{"model_type": 7}'):
        (checkpoint / "config.json").write_text(content)
        assert is_vedas_checkpoint(checkpoint) is False


@pytest.mark.property
@fuzz_settings(12)
@given(field=st.sampled_from(["routing_topk", "max_depth", "window_size", "crop_resolution", "replay_mode",
                              "routing_layers", "text_config__rms_norm_eps", "text_config__vocab_size",
                              "vision_config__patch_size", "image_token_id", "dtype", "text_config__hidden_act"]),
       value=st.one_of(st.text(max_size=6), st.floats(allow_nan=False), st.integers(-3, 64),
                       st.lists(st.integers(-2, 9), max_size=3), st.none(), st.booleans()))
def test_config_values_load_or_raise_checkpoint_error(vedas_dirs, tmp_path_factory, field, value):
    folder = tmp_path_factory.mktemp("fuzzed-config")
    shutil.copytree(vedas_dirs["qwen2_vl"], folder, dirs_exist_ok=True)
    edit_config(folder, **{field: value})
    try:
        model, processor = load_vedas(folder)
    except CheckpointError as err:
        assert str(folder) in str(err)
    else:  # accepted: then it must compute finite logits
        inputs = processor(text=["<|vision_start|><|image_pad|><|vision_end|>hi"],
                           images=[Image.new("RGB", (56, 56), RED)], return_tensors="pt")
        with torch.no_grad():
            assert torch.isfinite(model(**inputs).logits).all()


def test_automodel_outcomes_on_broken_checkpoints(checkpoint):
    """What `AutoModel.from_pretrained(..., trust_remote_code=True)` does with the same damage (recorded in
    docs/robustness.md). A truncated file is a one-line OSError naming it (the Vedas classes' `from_pretrained`,
    instead of transformers' bare SafetensorError), a mistyped field transformers' validation error naming the
    field, a pickle-only folder an OSError, with or without use_safetensors=True (tests/test_hub.py)."""
    original = checkpoint.parent / "original"
    shutil.copytree(checkpoint, original)

    truncate(checkpoint, lambda n: n // 2)
    with pytest.raises(OSError, match=r"model\.safetensors' is truncated or corrupt \(.*incomplete metadata"):
        AutoModel.from_pretrained(checkpoint, trust_remote_code=True)

    shutil.rmtree(checkpoint)
    shutil.copytree(original, checkpoint)
    edit_config(checkpoint, text_config__hidden_size="64")
    with pytest.raises(StrictDataclassFieldValidationError, match="hidden_size"):
        AutoModel.from_pretrained(checkpoint, trust_remote_code=True)

    shutil.rmtree(checkpoint)
    shutil.copytree(original, checkpoint)
    pickle_only(checkpoint)
    for kwargs in ({}, {"use_safetensors": True}):
        with pytest.raises(OSError, match="has no model.safetensors or model.safetensors.index.json"):
            AutoModel.from_pretrained(checkpoint, trust_remote_code=True, **kwargs)
