"""Tests for vedas_trainer.data: step splitting/merging, image decoding, adapters and the loader.

Every fixture (JSONL/JSON/parquet files and images) is written to tmp_path; nothing is downloaded.
"""

from __future__ import annotations

import io
import itertools
import json
import logging
import pickle
import random
import re
import struct
import warnings
import zlib

import datasets
import pytest
from PIL import Image

from vedas_trainer import data as vdata
from vedas_trainer.data import (
    ADAPTERS,
    MAX_PIXELS,
    MIN_PIXELS,
    SAMPLE_KEYS,
    DataError,
    adapt_onethinker,
    adapt_scienceqa,
    load_image,
    load_vedas_dataset,
    merge_steps,
    resolve_format,
    split_steps,
)

RED, GREEN, BLUE, WHITE = (255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 255)


# ----------------------------------------------------------------------------------------------------
# Helpers
# ----------------------------------------------------------------------------------------------------


def save_image(path, color=RED, size=(80, 60), fmt=None):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, color).save(path, format=fmt)
    return path


def encode(image: Image.Image, fmt: str, **kwargs) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **kwargs)
    return buffer.getvalue()


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def load(tmp_path, source, fmt, **kwargs):
    # A private datasets cache keeps tests from touching (or reusing) ~/.cache.
    return load_vedas_dataset(source, fmt, cache_dir=str(tmp_path / "hf_cache"), **kwargs)


def assert_sample(sample, *, id, question, choices, steps, answer, colors, size=(80, 60)):
    assert set(sample) == set(SAMPLE_KEYS)
    assert sample["id"] == id and isinstance(sample["id"], str)
    assert sample["question"] == question
    assert sample["choices"] == choices
    assert sample["steps"] == steps
    assert sample["answer"] == answer
    assert isinstance(sample["images"], list) and len(sample["images"]) == len(colors)
    for image, color in zip(sample["images"], colors):
        assert isinstance(image, Image.Image)
        assert image.mode == "RGB" and image.size == size
        assert image.getpixel((size[0] // 2, size[1] // 2)) == color


def m3cot_row(i, image="img/a.png", **overrides):
    row = {
        "id": f"m3-{i}",
        "question": f"Which colour is shown? ({i})",
        "choices": ["red", "green", "blue", "black"],
        "answer": "A",
        "rationale": "Look at the image.\n\nIt is red.",
        "image": image,
    }
    row.update(overrides)
    return row


def sqa_row(**overrides):
    row = {"question": "q", "choices": ["a", "b", "c"], "answer": 1, "lecture": "l", "solution": "s",
           "image": "img/a.png"}
    row.update(overrides)
    return row


# ----------------------------------------------------------------------------------------------------
# Steps
# ----------------------------------------------------------------------------------------------------


def test_split_steps_on_blank_lines():
    rationale = "\n  First step.\nstill first\r\n \t \r\nSecond step.\n\n\n\nThird step.  \n\n"
    assert split_steps(rationale) == ["First step.\nstill first", "Second step.", "Third step."]
    assert split_steps("one step only") == ["one step only"]
    assert split_steps("  \n\n \r\n") == []


def test_merge_steps_keeps_short_lists():
    steps = ["a", "b", "c"]
    assert merge_steps(steps, 4) == steps
    assert merge_steps(steps, 3) == steps
    assert merge_steps(steps, 3) is not steps  # a copy: callers may mutate it


def test_merge_steps_equal_steps_into_equal_chunks():
    steps = [f"step{i}" for i in range(8)]
    assert merge_steps(steps, 4) == ["step0\nstep1", "step2\nstep3", "step4\nstep5", "step6\nstep7"]


def test_merge_steps_ties_are_deterministic():
    assert merge_steps(list("abcdefg"), 4) == ["a", "b\nc", "d\ne", "f\ng"]
    assert merge_steps(list("abcde"), 2) == ["a\nb", "c\nd\ne"]


def test_merge_steps_isolates_a_long_step():
    assert merge_steps(["x" * 100, "a", "b", "c", "d"], 2) == ["x" * 100, "a\nb\nc\nd"]
    assert merge_steps(["a", "b", "c", "x" * 100], 2) == ["a\nb\nc", "x" * 100]


def _best_partition_cost(steps, k):
    """Brute force: the minimal sum of squared chunk lengths over all splits into k chunks."""
    best = None
    for cuts in itertools.combinations(range(1, len(steps)), k - 1):
        bounds = (0, *cuts, len(steps))
        cost = sum(len("\n".join(steps[a:b])) ** 2 for a, b in zip(bounds, bounds[1:]))
        best = cost if best is None else min(best, cost)
    return best


@pytest.mark.parametrize("seed", range(6))
def test_merge_steps_exact_count_order_and_balance(seed):
    rng = random.Random(seed)
    steps = [chr(97 + i) * rng.randint(1, 40) for i in range(rng.randint(5, 10))]
    chunks = merge_steps(steps, 4)
    assert len(chunks) == 4 and all(chunks)
    assert "\n".join(chunks) == "\n".join(steps)  # order and text kept
    # Each chunk is a run of whole steps.
    assert all(set(chunk.split("\n")) <= set(steps) for chunk in chunks)
    assert sum(len(chunk) ** 2 for chunk in chunks) == _best_partition_cost(steps, 4)
    assert merge_steps(steps, 4) == chunks  # deterministic


def test_merge_steps_rejects_nonpositive_max():
    with pytest.raises(ValueError):
        merge_steps(["a", "b"], 0)


# ----------------------------------------------------------------------------------------------------
# Images
# ----------------------------------------------------------------------------------------------------


def _rgba():
    image = Image.new("RGBA", (40, 40), (255, 0, 0, 255))
    image.putpixel((0, 0), (0, 0, 0, 0))  # transparent black must become white
    return encode(image, "PNG"), RED


def _la():
    image = Image.new("LA", (40, 40), (0, 255))
    image.putpixel((0, 0), (0, 0))
    return encode(image, "PNG"), (0, 0, 0)


def _l():
    return encode(Image.new("L", (40, 40), 128), "PNG"), (128, 128, 128)


def _one_bit():
    return encode(Image.new("1", (40, 40), 1), "PNG"), WHITE


def _p():
    return encode(Image.new("RGB", (40, 40), BLUE).convert("P"), "PNG"), BLUE


def _p_transparent():
    image = Image.new("P", (40, 40), 1)
    image.putpalette([0, 0, 0, 0, 255, 0] + [0] * 762)
    image.putpixel((0, 0), 0)
    return encode(image, "PNG", transparency=0), GREEN


def _cmyk():
    return encode(Image.new("CMYK", (40, 40), (0, 255, 255, 0)), "JPEG", quality=95), RED


def _i16():
    image = Image.new("I;16", (40, 40), 65535)
    image.putpixel((0, 0), 32896)  # half of 65535: must map to 128, not clip to 255
    return encode(image, "PNG"), WHITE


def _float():
    return encode(Image.new("F", (40, 40), 0.5), "TIFF"), (128, 128, 128)


def _animated_gif():
    frames = [Image.new("RGB", (40, 40), color) for color in (RED, BLUE, GREEN)]
    buffer = io.BytesIO()
    frames[0].save(buffer, format="GIF", save_all=True, append_images=frames[1:], duration=50, loop=0)
    return buffer.getvalue(), RED


def _animated_png():
    frames = [Image.new("RGBA", (40, 40), color + (255,)) for color in (GREEN, RED)]
    buffer = io.BytesIO()
    frames[0].save(buffer, format="PNG", save_all=True, append_images=frames[1:], duration=50)
    return buffer.getvalue(), GREEN


@pytest.mark.parametrize(
    "make", [_rgba, _la, _l, _one_bit, _p, _p_transparent, _cmyk, _i16, _float, _animated_gif, _animated_png]
)
def test_image_modes_become_rgb(make):
    data, centre = make()
    source = Image.open(io.BytesIO(data))
    assert source.mode != "RGB" or getattr(source, "is_animated", False)
    image = load_image(data)
    assert image.mode == "RGB"
    assert image.size == (56, 56)  # 40x40 is below min_pixels = 56*56
    assert image.getpixel((28, 28)) == pytest.approx(centre, abs=3)  # abs: JPEG (CMYK) rounding


def test_animated_pil_image_gives_first_frame():
    image = Image.open(io.BytesIO(_animated_gif()[0]))
    image.seek(2)  # a caller may hand over an animation positioned on a later frame
    assert load_image(image).getpixel((28, 28)) == RED


def test_alpha_is_composited_on_white():
    for data, _ in (_rgba(), _la(), _p_transparent()):
        assert load_image(data, min_pixels=40 * 40).getpixel((0, 0)) == WHITE


def test_sixteen_bit_is_rescaled_not_clipped():
    assert load_image(_i16()[0], min_pixels=40 * 40).getpixel((0, 0)) == (128, 128, 128)


def test_image_value_types(tmp_path):
    path = save_image(tmp_path / "imgs" / "x.png", GREEN)
    data = path.read_bytes()
    values = [
        Image.open(path),
        "x.png",  # relative to image_root
        str(path),
        path,
        data,
        {"bytes": data, "path": "ignored-when-bytes-exist.png"},
        {"bytes": None, "path": "x.png"},
    ]
    for value in values:
        image = load_image(value, tmp_path / "imgs")
        assert image.mode == "RGB" and image.size == (80, 60) and image.getpixel((5, 5)) == GREEN


def test_tiny_image_is_upscaled_into_bounds():
    image = load_image(Image.new("RGB", (1, 1), RED))
    assert MIN_PIXELS <= image.width * image.height <= MAX_PIXELS
    assert min(image.size) >= 28 and image.width == image.height
    assert image.getpixel((10, 10)) == RED


def test_large_image_is_downscaled_keeping_aspect():
    image = load_image(encode(Image.new("RGB", (4000, 3000), BLUE), "PNG"))
    assert MIN_PIXELS <= image.width * image.height <= MAX_PIXELS
    assert image.width * image.height > 0.99 * MAX_PIXELS  # not shrunk more than needed
    assert image.width / image.height == pytest.approx(4 / 3, rel=0.01)


def test_pixel_bounds_are_arguments():
    image = load_image(Image.new("RGB", (4000, 3000)), min_pixels=280 * 280, max_pixels=280 * 280)
    assert image.width * image.height <= 280 * 280
    assert image.width * image.height >= 0.98 * 280 * 280
    image = load_image(Image.new("RGB", (10, 10)), min_pixels=280 * 280, max_pixels=512 * 512)
    assert image.size == (280, 280)
    with pytest.raises(ValueError):
        load_image(Image.new("RGB", (10, 10)), min_pixels=5000, max_pixels=4000)


def test_thin_strip_gets_28px_sides():
    image = load_image(Image.new("RGB", (3000, 2)))
    assert min(image.size) >= 28
    assert image.width * image.height <= MAX_PIXELS
    assert max(image.size) / min(image.size) <= 200  # Qwen2-VL's processor rejects more


def test_huge_image_is_downscaled_not_rejected():
    # 10000x10000 = 1e8 pixels is over Pillow's default limit (~8.9e7, which warns) but a real scan.
    data = encode(Image.new("1", (10000, 10000), 1), "PNG")
    limit_before = Image.MAX_IMAGE_PIXELS
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # DecompressionBombWarning would fail the test
        image = load_image(data)
    assert image.mode == "RGB" and image.width == image.height
    assert image.width * image.height <= MAX_PIXELS
    assert Image.MAX_IMAGE_PIXELS == limit_before  # the global limit is restored


def _png_claiming_size(width, height):
    """A tiny PNG whose header claims width x height (a decompression bomb, as far as open() sees)."""
    data = bytearray(encode(Image.new("L", (1, 1)), "PNG"))
    ihdr = data[12:29]  # b"IHDR" + 13 bytes of header fields
    ihdr[4:12] = struct.pack(">II", width, height)
    data[12:29] = ihdr
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(ihdr)))
    return bytes(data)


def test_decompression_bomb_is_a_data_error():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(DataError, match=r"row 4, field 'image'.*bomb.png"):
            load_image({"bytes": _png_claiming_size(60000, 60000), "path": "bomb.png"}, row=4)


def test_missing_and_corrupt_images(tmp_path):
    with pytest.raises(DataError, match=r"^row 7, field 'image': image file not found: .*nope\.png"):
        load_image("nope.png", tmp_path, row=7)
    (tmp_path / "bad.png").write_bytes(b"definitely not a png")
    with pytest.raises(DataError, match=r"row 7, field 'images\[1\]': cannot decode image .*bad\.png"):
        load_image("bad.png", tmp_path, row=7, field="images[1]")
    with pytest.raises(DataError, match=r"row 7, field 'image': .*empty image"):
        load_image(Image.new("RGB", (0, 5)), row=7)
    for value in (None, "", {"bytes": None, "path": None}):
        with pytest.raises(DataError, match="missing image"):
            load_image(value, row=7)


def test_truncated_image_is_a_data_error(tmp_path):
    noise = Image.frombytes("RGB", (64, 64), random.Random(0).randbytes(64 * 64 * 3))
    data = encode(noise, "PNG")
    (tmp_path / "cut.png").write_bytes(data[: len(data) // 2])
    with pytest.raises(DataError, match=r"row 2, field 'image': cannot decode image .*cut\.png.*truncated"):
        load_image("cut.png", tmp_path, row=2)


# ----------------------------------------------------------------------------------------------------
# DataError
# ----------------------------------------------------------------------------------------------------


def test_data_error_message_and_pickling():
    err = DataError("boom", row=3, sample_id="q1", field="image")
    assert str(err) == "row 3 (id 'q1'), field 'image': boom"
    assert isinstance(err, ValueError)
    copy = pickle.loads(pickle.dumps(err))
    assert str(copy) == str(err) and (copy.row, copy.sample_id, copy.field, copy.reason) == (3, "q1", "image", "boom")
    assert str(DataError("boom", field="answer")) == "field 'answer': boom"


# ----------------------------------------------------------------------------------------------------
# Adapters through the loader
# ----------------------------------------------------------------------------------------------------


def test_registry():
    assert set(ADAPTERS) == {"m3cot", "scienceqa", "gqa", "onethinker", "chat"}
    with pytest.raises(ValueError, match="unknown format 'vqa'.*case-insensitive"):
        load_vedas_dataset("whatever.jsonl", "vqa")


def test_format_names_are_case_insensitive(tmp_path):
    assert [resolve_format(n) for n in ("M3CoT", " ScienceQA", "GQA", "OneThinker", "ShareGPT", "Chat")] == [
        "m3cot", "scienceqa", "gqa", "onethinker", "chat", "chat"]
    save_image(tmp_path / "img" / "a.png", RED)
    ds = load(tmp_path, write_jsonl(tmp_path / "m3cot.jsonl", [m3cot_row(0)]), "M3CoT")
    assert ds[0]["choices"] == ["red", "green", "blue", "black"] and ds[0]["answer"] == "A"


def test_rows_of_another_format_are_refused_naming_row_and_field(tmp_path):
    """M3CoT rows loaded as GQA used to load with their choices dropped."""
    save_image(tmp_path / "img" / "a.png", RED)
    path = write_jsonl(tmp_path / "m3cot.jsonl", [m3cot_row(0), m3cot_row(1)])
    with pytest.raises(DataError, match=r"^row 0 \(id 'm3-0'\), field 'choices': the gqa format does not read this "
                                        r"field.*looks like m3cot or onethinker or scienceqa data \(choose") as info:
        load(tmp_path, path, "gqa")
    assert info.value.row == 0 and info.value.field == "choices"
    # ScienceQA rows as M3CoT: the lecture would be dropped
    with pytest.raises(DataError, match=r"^row 7 .*field 'lecture': the m3cot format does not read.*scienceqa"):
        ADAPTERS["m3cot"]({**m3cot_row(7), "lecture": "Colours."}, 7, image_root=tmp_path)
    # empty or null fields of other formats (union columns of parquet files) are not data
    sample = ADAPTERS["m3cot"]({**m3cot_row(7), "lecture": "", "steps": None, "images": []}, 7, image_root=tmp_path)
    assert sample["answer"] == "A"


def test_directory_as_image_path_says_directory(tmp_path):
    (tmp_path / "img").mkdir()
    with pytest.raises(DataError, match=r"^row 3, field 'image': image path is a directory, not an image file: .*img"):
        load_image("img", tmp_path, row=3)


# ----------------------------------------------------------------------------------------------------
# Chat (ShareGPT-style) rows
# ----------------------------------------------------------------------------------------------------


def chat_row(user="<image>What colour is the box?", reply="There is one box.\n\nIt is red.\nAnswer: red", **extra):
    row = {"messages": [{"role": "user", "content": user}, {"role": "assistant", "content": reply}],
           "images": ["a.png"]}
    row.update(extra)
    return row


def test_chat_jsonl(tmp_path):
    save_image(tmp_path / "a.png", RED)
    save_image(tmp_path / "b.jpg", BLUE)
    rows = [
        chat_row(id="c-0"),
        # multiple choice with an options block, a system message, <think> tags and <answer> tags
        {"messages": [{"role": "system", "content": "You are helpful."},
                      {"role": "user", "content": "<image>\n<image>\nWhich one is blue?\nOptions:\nA. the first\n"
                                                  "B. the second"},
                      {"role": "assistant", "content": "<think>The first is red.\nThe second is blue.</think>"
                                                       "<answer>B</answer>"}],
         "images": ["a.png", "b.jpg"]},
        # ShareGPT/LLaVA layout, the answer given as an option's text, list-of-parts content
        {"conversations": [{"from": "human", "value": "<image>Colour?\n(A) red\n(B) blue"},
                           {"from": "gpt", "value": "Look at it.\n\nIt is red.\n\nThe answer is red."}],
         "image": "a.png"},
        {"messages": [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Colour?"}]},
                      {"role": "assistant", "content": [{"type": "text", "text": "It is red.\nFinal answer: red"}]}],
         "images": ["a.png"]},
    ]
    ds = load(tmp_path, write_jsonl(tmp_path / "chat.jsonl", rows), "sharegpt")
    assert_sample(ds[0], id="c-0", question="What colour is the box?", choices=None,
                  steps=["There is one box.", "It is red."], answer="red", colors=[RED])
    assert ds[1]["question"] == "Which one is blue?" and ds[1]["choices"] == ["the first", "the second"]
    assert ds[1]["steps"] == ["The first is red.", "The second is blue."] and ds[1]["answer"] == "B"
    assert len(ds[1]["images"]) == 2 and ds[1]["images"][1].getpixel((10, 10)) == pytest.approx(BLUE, abs=3)
    assert (ds[2]["question"], ds[2]["choices"], ds[2]["steps"], ds[2]["answer"]) == (
        "Colour?", ["red", "blue"], ["Look at it.", "It is red."], "A")
    assert (ds[3]["question"], ds[3]["steps"], ds[3]["answer"]) == ("Colour?", ["It is red."], "red")


CHAT_BAD_ROWS = {
    "no_answer": (chat_row(reply="It is red."), "messages[1]", "no answer found"),
    "empty_rationale": (chat_row(reply="Answer: red"), "messages[1]", "empty rationale"),
    "placeholders": (chat_row(user="<image><image>Colour?"), "messages[0]", "2 image placeholder(s) for 1 image(s)"),
    "roles": (chat_row(messages=[{"role": "user", "content": "q"}]), "messages", "one user then one assistant"),
    "bad_role": (chat_row(messages=[{"role": "bot", "content": "q"}]), "messages[0]", "'role' one of"),
    "letter_out_of_range": (chat_row(user="<image>Colour?\nA. red\nB. blue", reply="It is red.\nAnswer: C"),
                            "messages[1]", "answer 'C' is out of range for 2 choices (A-B)"),
    "question_field": (chat_row(question="Colour?"), "question", "the chat format does not read"),
    "missing_image": (chat_row(images=["nope.png"]), "images[0]", "image file not found"),
}


@pytest.mark.parametrize("case", sorted(CHAT_BAD_ROWS))
def test_chat_bad_rows_name_row_and_field(tmp_path, case):
    save_image(tmp_path / "a.png", RED)
    bad, field, fragment = CHAT_BAD_ROWS[case]
    path = write_jsonl(tmp_path / "chat.jsonl", [chat_row(), bad])
    with pytest.raises(DataError) as info:
        load(tmp_path, path, "chat")
    assert str(info.value).startswith("row 1") and info.value.field == field and fragment in str(info.value)


def test_m3cot_jsonl(tmp_path):
    save_image(tmp_path / "img" / "a.png", RED)
    save_image(tmp_path / "img" / "b.png", BLUE)
    rows = [
        m3cot_row(0, rationale="Look at the image.\n\nIt is red.\n\nSo A."),
        m3cot_row(1, image="img/b.png", answer="c", context="A colour chart.", rationale="Blue.\r\n\r\nSo C."),
    ]
    ds = load(tmp_path, write_jsonl(tmp_path / "m3cot.jsonl", rows), "m3cot")
    assert isinstance(ds, datasets.Dataset) and len(ds) == 2 and ds.skipped_rows == []
    assert_sample(
        ds[0], id="m3-0", question="Which colour is shown? (0)", choices=["red", "green", "blue", "black"],
        steps=["Look at the image.", "It is red.", "So A."], answer="A", colors=[RED],
    )
    assert_sample(
        ds[1], id="m3-1", question="Context: A colour chart.\nWhich colour is shown? (1)",
        choices=["red", "green", "blue", "black"], steps=["Blue.", "So C."], answer="C", colors=[BLUE],
    )
    batch = ds[0:2]
    assert set(batch) == set(SAMPLE_KEYS) and batch["answer"] == ["A", "C"]


def test_scienceqa_json(tmp_path):
    save_image(tmp_path / "a.png", GREEN)
    rows = [
        {"question": "Which is a mammal?", "choices": ["frog", "dog", "snake"], "answer": 1, "hint": "",
         "lecture": "Mammals have fur.\n\nMost give birth to live young.", "solution": "A dog has fur.",
         "image": "a.png"},
        {"id": "sqa-9", "question": "Which is hotter?", "choices": ["ice", "fire"], "answer": 0,
         "hint": "Think of temperature.", "lecture": "", "solution": "Fire is hot.", "image": "a.png"},
    ]
    path = tmp_path / "scienceqa.json"
    path.write_text(json.dumps(rows))  # a JSON array, not JSON lines
    ds = load(tmp_path, path, "scienceqa")
    assert_sample(
        ds[0], id="0", question="Which is a mammal?", choices=["frog", "dog", "snake"],
        steps=["Mammals have fur.", "Most give birth to live young.", "A dog has fur."], answer="B", colors=[GREEN],
    )
    assert_sample(
        ds[1], id="sqa-9", question="Context: Think of temperature.\nWhich is hotter?", choices=["ice", "fire"],
        steps=["Fire is hot."], answer="A", colors=[GREEN],
    )


def test_gqa_parquet_with_image_ids(tmp_path):
    save_image(tmp_path / "images" / "n123.jpg", RED, fmt="JPEG")
    save_image(tmp_path / "images" / "n456.jpg", BLUE, fmt="JPEG")
    rows = [
        {"questionId": "q1", "imageId": "n123", "question": "What colour is the box?", "answer": "red",
         "rationale": "There is a box.\n\nThe box is red.", "steps": None},
        {"questionId": "q2", "imageId": "n456", "question": "Is it blue?", "answer": "yes",
         "rationale": None, "steps": ["The box is blue.", "  ", "So yes."]},
    ]
    path = tmp_path / "gqa.parquet"
    datasets.Dataset.from_list(rows).to_parquet(str(path))
    ds = load(tmp_path, path, "gqa", image_root=tmp_path / "images")
    # JPEG of a flat colour decodes within a step or two of the original.
    for sample, expected in zip(ds, [RED, BLUE]):
        assert sample["images"][0].getpixel((10, 10)) == pytest.approx(expected, abs=3)
    assert ds[0]["id"] == "q1" and ds[0]["answer"] == "red" and ds[0]["choices"] is None
    assert ds[0]["steps"] == ["There is a box.", "The box is red."]
    assert ds[1]["steps"] == ["The box is blue.", "So yes."]  # given steps kept, empty ones dropped
    assert ds[1]["question"] == "Is it blue?" and set(ds[1]) == set(SAMPLE_KEYS)


def test_gqa_image_bytes_in_parquet(tmp_path):
    data = encode(Image.new("RGB", (80, 60), GREEN), "PNG")
    rows = [{"id": "g0", "question": "Colour?", "answer": "green", "rationale": "It is green.",
             "image": {"bytes": data, "path": "g0.png"}}]
    path = tmp_path / "gqa_bytes.parquet"
    datasets.Dataset.from_list(rows).to_parquet(str(path))
    assert_sample(load(tmp_path, path, "gqa")[0], id="g0", question="Colour?", choices=None,
                  steps=["It is green."], answer="green", colors=[GREEN])


def test_onethinker_jsonl(tmp_path):
    save_image(tmp_path / "a.png", RED)
    save_image(tmp_path / "b.png", BLUE)
    rows = [
        {"id": "ot-0", "question": "Which image is blue?", "choices": ["first", "second"], "answer": "B",
         "steps": ["Image one is red.", "Image two is blue."], "images": ["a.png", "b.png"]},
        {"id": "ot-1", "question": "Which one is red?", "choices": ["the first", "the second"], "answer": "the first",
         "rationale": "The first is red.", "image": "a.png"},
        {"question": "What colour?", "answer": "blue", "rationale": "It is blue.\n\nAnswer blue.", "image": "b.png"},
    ]
    ds = load(tmp_path, write_jsonl(tmp_path / "ot.jsonl", rows), "onethinker")
    assert_sample(ds[0], id="ot-0", question="Which image is blue?", choices=["first", "second"],
                  steps=["Image one is red.", "Image two is blue."], answer="B", colors=[RED, BLUE])
    assert_sample(ds[1], id="ot-1", question="Which one is red?", choices=["the first", "the second"],
                  steps=["The first is red."], answer="A", colors=[RED])
    assert_sample(ds[2], id="2", question="What colour?", choices=None,
                  steps=["It is blue.", "Answer blue."], answer="blue", colors=[BLUE])


def test_hub_name_goes_to_load_dataset(tmp_path, monkeypatch):
    calls = []
    save_image(tmp_path / "a.png", RED)
    raw = datasets.Dataset.from_list([m3cot_row(0, image=str(tmp_path / "a.png"))])

    def fake_load_dataset(path, *args, **kwargs):
        calls.append((path, args, kwargs))
        return raw

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    ds = load_vedas_dataset("LightChen2333/M3CoT", "m3cot", split="validation", revision="main")
    assert calls == [("LightChen2333/M3CoT", (), {"split": "validation", "revision": "main"})]
    assert ds[0]["id"] == "m3-0"


def test_local_dataset_directory(tmp_path):
    repo = tmp_path / "m3cot_repo"
    save_image(repo / "img" / "a.png", GREEN)
    (repo / "data").mkdir()
    datasets.Dataset.from_list([m3cot_row(0), m3cot_row(1)]).to_parquet(str(repo / "data" / "test-00000.parquet"))
    ds = load(tmp_path, repo, "m3cot", split="test")
    assert [sample["id"] for sample in ds] == ["m3-0", "m3-1"]
    assert ds[1]["images"][0].getpixel((1, 1)) == GREEN  # relative paths resolve against the directory
    with pytest.raises(FileNotFoundError):
        load(tmp_path, tmp_path / "absent.jsonl", "m3cot")


def test_hub_image_features_are_decoded_by_us(tmp_path):
    # Hub datasets store images as datasets.Image features; decoding must go through load_image
    # (pixel bounds, RGB, errors naming the row) rather than datasets' own decoder.
    tiny = encode(Image.new("RGBA", (8, 8), (0, 0, 255, 255)), "PNG")
    rows = [
        m3cot_row(0, image={"bytes": tiny, "path": "t.png"}),
        m3cot_row(1, image={"bytes": b"junk", "path": "j.png"}),
    ]
    raw = datasets.Dataset.from_list(rows).cast_column("image", datasets.Image())
    with pytest.raises(DataError, match=r"row 1 \(id 'm3-1'\), field 'image'.*j\.png"):
        load_vedas_dataset(raw, "m3cot")
    ds = load_vedas_dataset(raw, "m3cot", skip_bad_rows=True)
    assert len(ds) == 1 and [err.row for err in ds.skipped_rows] == [1]
    image = ds[0]["images"][0]
    assert image.mode == "RGB" and image.size == (56, 56) and image.getpixel((3, 3)) == BLUE


# ----------------------------------------------------------------------------------------------------
# Bad rows
# ----------------------------------------------------------------------------------------------------


def _bad_row_cases(tmp_path):
    (tmp_path / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n but then garbage")
    noise = Image.frombytes("RGB", (64, 64), random.Random(1).randbytes(64 * 64 * 3))
    data = encode(noise, "PNG")
    (tmp_path / "truncated.png").write_bytes(data[: len(data) // 2])
    return {
        "missing_image": ("m3cot", m3cot_row(2, image="img/missing.png"), "image", "missing.png"),
        "corrupt_image": ("m3cot", m3cot_row(2, image="corrupt.png"), "image", "corrupt.png"),
        "truncated_image": ("m3cot", m3cot_row(2, image="truncated.png"), "image", "truncated.png"),
        "empty_rationale": ("m3cot", m3cot_row(2, rationale="\n \n\n\t"), "rationale", "empty rationale"),
        "letter_out_of_range": ("m3cot", m3cot_row(2, answer="E"), "answer", "out of range"),
        "not_a_letter": ("m3cot", m3cot_row(2, answer="red"), "answer", "option letter"),
        "empty_question": ("m3cot", m3cot_row(2, question="   "), "question", "empty"),
        "missing_choices": ("m3cot", m3cot_row(2, choices=None), "choices", "missing required field"),
        "sqa_index_out_of_range": ("scienceqa", sqa_row(answer=3), "answer", "out of range"),
        "sqa_no_rationale": ("scienceqa", sqa_row(lecture="", solution=" "), "lecture/solution", "empty rationale"),
        "gqa_missing_image_id_file": (
            "gqa", {"id": "g", "question": "q", "answer": "a", "rationale": "r", "imageId": "n999"},
            "imageId", "n999.jpg",
        ),
        "onethinker_missing_answer": (
            "onethinker", {"question": "q", "answer": None, "steps": ["s"], "image": "img/a.png"}, "answer", "missing",
        ),
        "onethinker_bad_image_in_list": (
            "onethinker", {"question": "q", "answer": "a", "steps": ["s"], "images": ["img/a.png", "corrupt.png"]},
            "images[1]", "corrupt.png",
        ),
    }


def _good_row(fmt, i):
    if fmt == "m3cot":
        return m3cot_row(i)
    if fmt == "scienceqa":
        return sqa_row()
    if fmt == "gqa":
        return {"id": f"g{i}", "question": "q", "answer": "a", "rationale": "r", "imageId": "a"}
    return {"question": "q", "answer": "a", "steps": ["s"], "images": ["img/a.png"]}


CASE_NAMES = [
    "missing_image", "corrupt_image", "truncated_image", "empty_rationale", "letter_out_of_range", "not_a_letter",
    "empty_question", "missing_choices", "sqa_index_out_of_range", "sqa_no_rationale", "gqa_missing_image_id_file",
    "onethinker_missing_answer", "onethinker_bad_image_in_list",
]


@pytest.mark.parametrize("case", CASE_NAMES)
def test_bad_row_raises_naming_row_and_field(tmp_path, case):
    fmt, bad, field, fragment = _bad_row_cases(tmp_path)[case]
    save_image(tmp_path / "img" / "a.png")
    save_image(tmp_path / "img" / "a.jpg", fmt="JPEG")  # GQA resolves imageId "a" to <image_root>/a.jpg
    rows = [_good_row(fmt, 0), _good_row(fmt, 1), bad, _good_row(fmt, 3)]
    path = write_jsonl(tmp_path / "rows.jsonl", rows)
    kwargs = {"image_root": tmp_path / "img"} if fmt == "gqa" else {}
    with pytest.raises(DataError) as info:
        load(tmp_path, path, fmt, **kwargs)
    message = str(info.value)
    assert re.match(r"row 2\b", message), message
    assert f"field '{field}'" in message and fragment in message, message
    assert info.value.row == 2 and info.value.field == field
    # The same rows load once the bad one is dropped: the error really was about that row.
    ds = load(tmp_path, path, fmt, skip_bad_rows=True, **kwargs)
    assert len(ds) == 3 and [err.row for err in ds.skipped_rows] == [2]


def test_scienceqa_answer_as_string_is_rejected(tmp_path):
    save_image(tmp_path / "a.png")
    row = sqa_row(answer="2", image="a.png")
    with pytest.raises(DataError, match=r"^row 7 \(id '7'\), field 'answer': expected an int index.*str '2'"):
        adapt_scienceqa(row, 7, image_root=tmp_path)
    with pytest.raises(DataError, match="expected an int index"):
        adapt_scienceqa({**row, "answer": True}, 7, image_root=tmp_path)
    # Through the loader (a column of strings: JSON readers coerce mixed int/str columns).
    path = write_jsonl(tmp_path / "sqa.jsonl", [row, {**row, "answer": "1"}])
    with pytest.raises(DataError, match=r"^row 0\b.*field 'answer'"):
        load(tmp_path, path, "scienceqa")
    ds = load(tmp_path, path, "scienceqa", skip_bad_rows=True)
    assert len(ds) == 0 and len(ds.skipped_rows) == 2
    assert adapt_scienceqa({**row, "answer": 2}, 7, image_root=tmp_path)["answer"] == "C"


def test_onethinker_answer_must_name_an_option(tmp_path):
    save_image(tmp_path / "a.png")
    row = {"question": "q", "choices": ["red", "blue"], "answer": "green", "steps": ["s"], "image": "a.png"}
    with pytest.raises(DataError, match=r"row 5 .*field 'answer': answer 'green' is neither an option letter \(A-B\) nor the text of an option"):
        adapt_onethinker(row, 5, image_root=tmp_path)
    assert adapt_onethinker({**row, "answer": "blue"}, 5, image_root=tmp_path)["answer"] == "B"


def test_skip_bad_rows_counts_and_logs(tmp_path, caplog):
    save_image(tmp_path / "img" / "a.png")
    rows = [
        m3cot_row(0),
        m3cot_row(1, image="img/missing.png"),
        m3cot_row(2),
        m3cot_row(3, rationale=""),
        m3cot_row(4, answer="F"),
        m3cot_row(5),
    ]
    path = write_jsonl(tmp_path / "m3cot.jsonl", rows)
    with caplog.at_level(logging.WARNING, logger="vedas_trainer.data"):
        ds = load(tmp_path, path, "m3cot", skip_bad_rows=True)
    assert [sample["id"] for sample in ds] == ["m3-0", "m3-2", "m3-5"]
    assert [(err.row, err.field) for err in ds.skipped_rows] == [(1, "image"), (3, "rationale"), (4, "answer")]
    warning = "\n".join(record.getMessage() for record in caplog.records if record.levelno == logging.WARNING)
    assert "Skipped 3 of 6 rows" in warning
    assert "row 1 (id 'm3-1'), field 'image'" in warning and "row 4 (id 'm3-4'), field 'answer'" in warning


def test_images_are_decoded_lazily(tmp_path):
    image_path = save_image(tmp_path / "img" / "a.png", RED)
    rows = [m3cot_row(0), m3cot_row(1, image="img/missing.png")]
    path = write_jsonl(tmp_path / "m3cot.jsonl", rows)
    ds = load(tmp_path, path, "m3cot", validate=False)  # no eager pass: the bad row loads
    assert len(ds) == 2
    save_image(image_path, BLUE)  # the file changes after loading; access sees the new pixels
    assert ds[0]["images"][0].getpixel((1, 1)) == BLUE
    with pytest.raises(DataError, match=r"row 1 \(id 'm3-1'\), field 'image'.*missing\.png"):
        ds[1]
    # Shuffling keeps the source row index in messages.
    shuffled = ds.select([1, 0])
    with pytest.raises(DataError, match=r"^row 1\b"):
        shuffled[0]


def test_validation_decodes_each_file_once(tmp_path, monkeypatch):
    save_image(tmp_path / "img" / "a.png")
    path = write_jsonl(tmp_path / "m3cot.jsonl", [m3cot_row(i) for i in range(5)])
    opened = []
    real_open = Image.open
    monkeypatch.setattr(vdata.Image, "open", lambda fp, *a, **k: opened.append(fp) or real_open(fp, *a, **k))
    ds = load(tmp_path, path, "m3cot")
    assert len(opened) == 1
    ds[3]
    assert len(opened) == 2
