"""The embedded "follow the arrows" task (trainer/synthetic.py)."""

import io
import re

import pytest

from vedas_trainer.answers import extract_answer
from vedas_trainer.prompting import build_messages
from vedas_trainer.synthetic import (
    CELL_PX,
    COLOURS,
    DIRECTIONS,
    build_splits,
    build_synthetic_dataset,
    cell_tint,
    make_sample,
    scene_hash,
    solve,
    synthetic_vocabulary,
)

STEP = re.compile(r"^(start|step (\d)) : row (\d) col (\d) , (\w+) arrow (\w+)(?: , (\w+) is option ([A-Z]))?$")


def _png(image):
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.fixture(scope="module")
def splits():
    return build_splits(200, 50, 50, seed=123)


def test_same_seed_same_sample_different_seed_different():
    a, b, c = make_sample(7), make_sample(7), make_sample(8)
    assert _png(a["images"][0]) == _png(b["images"][0])
    assert {k: a[k] for k in a if k != "images"} == {k: b[k] for k in b if k != "images"}
    assert _png(a["images"][0]) != _png(c["images"][0])
    assert a["scene"] != c["scene"]


def test_dataset_is_deterministic():
    a = build_synthetic_dataset(20, seed=5, split="test")
    b = build_synthetic_dataset(20, seed=5, split="test")
    c = build_synthetic_dataset(20, seed=6, split="test")
    assert a.data.table.equals(b.data.table)  # every column, the PNG bytes included
    png_bytes = lambda ds: [img["bytes"] for row in ds.data.table.column("images").to_pylist() for img in row]
    assert png_bytes(a) == png_bytes(b) and png_bytes(a) != png_bytes(c)
    assert a["scene"] != c["scene"]


def test_splits_do_not_overlap(splits):
    hashes = {name: [scene_hash(row) for row in ds] for name, ds in splits.items()}
    assert [len(h) for h in hashes.values()] == [200, 50, 50]
    for name, values in hashes.items():
        assert len(set(values)) == len(values), f"duplicate puzzle inside {name}"
    assert not set(hashes["train"]) & set(hashes["test"])
    assert not set(hashes["train"]) & set(hashes["validation"])
    assert not set(hashes["validation"]) & set(hashes["test"])
    assert not set(splits["train"]["id"]) & set(splits["test"]["id"])


def test_splits_dedupe_in_a_tiny_puzzle_space():
    # A 2x2 grid with 2 colours and 1 move has only 2^4 * 2^4 * 4 = 1024 puzzles: collisions are
    # frequent, so this exercises the deduplication rather than the disjoint seeds.
    kwargs = dict(grid=2, n_colours=2, n_moves=1)
    ds = build_splits(300, 100, 100, seed=0, **kwargs)
    train = {scene_hash(r) for r in ds["train"]}
    test = {scene_hash(r) for r in ds["test"]}
    assert len(train) == 300 and len(test) == 100 and not train & test


def test_cot_consistent_with_scene_and_answer(splits):
    vocabulary = set(synthetic_vocabulary())
    for sample in splits["train"]:
        scene, kwargs = sample["scene"], sample["question_kwargs"]
        # The answer is re-derived from the scene graph alone.
        assert solve(scene, kwargs) == sample["answer"]
        assert f"follow {kwargs['n_moves']} arrow" in sample["question"]
        assert len(sample["steps"]) == kwargs["n_moves"] + 1
        assert 2 <= len(sample["steps"]) <= 4

        row, col = scene["start"]
        for i, step in enumerate(sample["steps"]):
            match = STEP.match(step)
            assert match, step
            assert match.group(1) == ("start" if i == 0 else f"step {i}")
            r, c = int(match.group(3)) - 1, int(match.group(4)) - 1
            # Each step names the cell reached so far, with that cell's colour and direction.
            assert (r, c) == (row, col), step
            assert [match.group(5), match.group(6)] == scene["cells"][r][c], step
            d_row, d_col = DIRECTIONS[match.group(6)]
            row, col = row + d_row, col + d_col
            assert set(step.split()) <= vocabulary, step

        last = STEP.match(sample["steps"][-1])
        final_colour = last.group(5)
        if kwargs["form"] == "mc":
            assert sample["choices"] == kwargs["choices"]
            assert sample["choices"][ord(sample["answer"]) - ord("A")] == final_colour
            assert last.group(8) == sample["answer"]
            assert extract_answer(f"answer : {final_colour}", sample["choices"]) == sample["answer"]
        else:
            assert sample["choices"] is None
            assert sample["answer"] == final_colour
        assert set(sample["question"].split()) <= vocabulary


def test_images_decode_with_scene_colours(splits):
    for sample in splits["test"].select(range(20)):
        (image,) = sample["images"]
        grid = sample["scene"]["grid_size"]
        assert sample["scene"]["style"] == "tiles"
        assert image.mode == "RGB" and image.size == (grid * CELL_PX, grid * CELL_PX)
        for r in range(grid):
            for c in range(grid):
                # the tile's colour, a few pixels inside its top-left corner (past the grid line, the start border
                # and any distractor, before the arrow); the arrow at the centre is pale
                expected = COLOURS[sample["scene"]["cells"][r][c][0]]
                assert image.getpixel((c * CELL_PX + 4, r * CELL_PX + 4)) == expected, (sample["id"], r, c)
                cy, cx = r * CELL_PX + CELL_PX // 2, c * CELL_PX + CELL_PX // 2
                region = [image.getpixel((cx + dx, cy + dy)) for dx in (-1, 0) for dy in (-1, 0)]
                assert all(pixel == (255, 255, 255) for pixel in region), (sample["id"], r, c, region)
        # The start cell's thick border is black (a quarter down its left edge: distractors sit
        # on cell corners and edge midpoints only).
        sr, sc = sample["scene"]["start"]
        assert image.getpixel((sc * CELL_PX + 1, sr * CELL_PX + CELL_PX // 4)) == (0, 0, 0)


def test_arrows_style_draws_coloured_arrows_on_pale_cells():
    sample = make_sample(3, style="arrows", distractor_prob=0.0)
    image, grid = sample["images"][0], sample["scene"]["grid_size"]
    for r in range(grid):
        for c in range(grid):
            assert image.getpixel((c * CELL_PX + 13, r * CELL_PX + 13)) == COLOURS[sample["scene"]["cells"][r][c][0]]
            assert image.getpixel((c * CELL_PX + 4, r * CELL_PX + 4)) == (255, 255, 255)
    with pytest.raises(ValueError, match="style must be 'tiles' or 'arrows', got 'dots'"):
        make_sample(3, style="dots")


@pytest.mark.parametrize("grid", [3, 4, 9])
@pytest.mark.parametrize("style", ["tiles", "arrows"])
def test_coordinate_tints_encode_row_and_column(grid, style):
    sample = make_sample(5, grid=grid, distractor_prob=0.0, style=style, coordinate_tints=True)
    image = sample["images"][0]
    tints = set()
    for r in range(grid):
        for c in range(grid):
            # the pale part: the arrow's centre for tiles, the cell's background for arrows
            x, y = (c * CELL_PX + 13, r * CELL_PX + 13) if style == "tiles" else (c * CELL_PX + 4, r * CELL_PX + 4)
            tint = image.getpixel((x, y))
            assert tint == cell_tint(r, c, grid), (r, c, tint)
            # pale: every colour has a channel <= 60, every tint has all channels >= 171
            assert min(tint) >= 171 and all(min(colour) <= 60 for colour in COLOURS.values())
            tints.add(tint)
    assert len(tints) == grid * grid  # every cell is identifiable by its tint alone
    plain = make_sample(5, grid=grid, distractor_prob=0.0, style=style)["images"][0]
    assert plain.getpixel((13, 13) if style == "tiles" else (4, 4)) == (255, 255, 255)


def test_distractors_do_not_change_the_answer():
    clean = make_sample(11, distractor_prob=0.0)
    cluttered = make_sample(11, distractor_prob=1.0)
    assert cluttered["scene"]["distractors"] and not clean["scene"]["distractors"]
    assert clean["answer"] == cluttered["answer"] and clean["steps"] == cluttered["steps"]
    # The images differ only inside the distractors' boxes, which never reach a cell's centre (its arrow).
    a, b = clean["images"][0], cluttered["images"][0]
    boxes = [(d["x"] - d["radius"], d["y"] - d["radius"], d["x"] + d["radius"], d["y"] + d["radius"])
             for d in cluttered["scene"]["distractors"]]
    changed = [(x, y) for x in range(a.width) for y in range(a.height) if a.getpixel((x, y)) != b.getpixel((x, y))]
    assert changed and all(any(x0 <= x <= x1 and y0 <= y <= y1 for x0, y0, x1, y1 in boxes) for x, y in changed)
    for r, row in enumerate(cluttered["scene"]["cells"]):
        for c, (colour, _) in enumerate(row):
            assert b.getpixel((c * CELL_PX + 13, r * CELL_PX + 13)) == (255, 255, 255)


@pytest.mark.parametrize("grid,n_moves", [(3, 3), (5, (1, 3)), (4, 2)])
def test_configurable_grid_and_moves(grid, n_moves):
    for seed in range(20):
        sample = make_sample(seed, grid=grid, n_moves=n_moves)
        assert sample["images"][0].size == (grid * CELL_PX,) * 2
        low, high = (n_moves, n_moves) if isinstance(n_moves, int) else n_moves
        assert low + 1 <= len(sample["steps"]) <= high + 1
        assert solve(sample["scene"], sample["question_kwargs"]) == sample["answer"]


def test_question_forms():
    short = make_sample(1, form="short")
    mc = make_sample(1, form="mc", n_options=3)
    assert short["choices"] is None and short["answer"] in COLOURS
    assert len(mc["choices"]) == 3 and mc["answer"] in "ABC"
    # the question never lists the options: the shared prompt builder appends them from `choices`
    assert "options" not in mc["question"] and "options" not in short["question"]
    (text,) = [part["text"] for part in build_messages(mc["question"], mc["choices"])[0]["content"] if "text" in part]
    assert text == mc["question"] + " options : " + " , ".join(f"{l} {c}" for l, c in zip("ABC", mc["choices"]))
    assert set(text.split()) <= set(synthetic_vocabulary())


def test_vocabulary_is_small_and_lowercase():
    vocabulary = synthetic_vocabulary()
    assert len(vocabulary) == len(set(vocabulary)) and 30 <= len(vocabulary) <= 80
    assert all(w.islower() or not w.isalpha() or (len(w) == 1 and w.isupper()) for w in vocabulary)


def test_cot_step_reading_finds_the_first_wrong_step():
    from vedas_trainer.synthetic import DIRECTIONS, build_synthetic_dataset, cot_step_reading

    sample = next(s for s in build_synthetic_dataset(20, seed=3, split="test") if len(s["steps"]) >= 3)
    steps = list(sample["steps"])
    other_direction = lambda d: next(x for x in DIRECTIONS if x != d)  # noqa: E731

    def with_step(i, text):
        return "\n\n".join(steps[:i] + [text] + steps[i + 1:]) + "\n\nanswer : x"

    head, tail = steps[0].rsplit(" arrow ", 1)
    colour = head.rsplit(" ", 1)[1]
    other_colour = "blue" if colour != "blue" else "red"
    cases = {
        "none": "\n\n".join(steps),
        "read: direction": with_step(0, f"{head} arrow {other_direction(tail.split(' ')[0])}"),
        "read: colour": with_step(0, steps[0].replace(f", {colour} arrow", f", {other_colour} arrow")),
        "start cell": with_step(0, steps[0].replace("row ", "row 9", 1)),
        "move": with_step(1, steps[1].replace("col ", "col 9", 1)),
        "too few steps": steps[0],
    }
    for expected, text in cases.items():
        result = cot_step_reading([sample], [text])
        assert result["first_error"] == {expected: 1}, (expected, text, result)
    perfect = cot_step_reading([sample], [cases["none"]])
    assert perfect["colour_accuracy"] == perfect["direction_accuracy"] == 1.0
    assert perfect["steps_read"] == len(sample["scene"]["path"])
    misread = cot_step_reading([sample], [cases["read: direction"]])
    assert misread["direction_accuracy"] == pytest.approx((len(steps) - 1) / len(steps))
    assert cot_step_reading([], [])["colour_accuracy"] is None


def _pale_pixels(image, row: int, col: int) -> list[tuple[int, int]]:
    """(x, y) within cell (row, col) of the pale (white) arrow of a "tiles" board."""
    return [(x, y) for x in range(CELL_PX) for y in range(CELL_PX)
            if image.getpixel((col * CELL_PX + x, row * CELL_PX + y)) == (255, 255, 255)]


@pytest.mark.parametrize("placement", ["leading", "centred"])
def test_arrow_placement_decides_which_patches_hold_the_arrow(placement):
    """Two thirds or more of a leading arrow lie in the two 14-px patches on the side it points to (its direction
    is which half of the cell is paler); a centred one puts its wide base, three quarters of it, behind. Both keep clear of the grid lines and of the distractors
    on cell corners and edge midpoints (radius <= 3 px)."""
    half_px = CELL_PX // 2
    for seed in range(6):
        sample = make_sample(seed, distractor_prob=0.0, arrow_placement=placement)
        scene, image = sample["scene"], sample["images"][0]
        assert scene["arrow_placement"] == placement
        for r in range(scene["grid_size"]):
            for c in range(scene["grid_size"]):
                pale = _pale_pixels(image, r, c)
                d_row, d_col = DIRECTIONS[scene["cells"][r][c][1]]
                # pixels on the pointed side of the cell's centre line (the patch boundary at 14 px)
                ahead = [(x, y) for x, y in pale
                         if (d_col and (x >= half_px) == (d_col > 0)) or (d_row and (y >= half_px) == (d_row > 0))]
                share = len(ahead) / len(pale)
                if placement == "leading":
                    assert share > 0.6, (seed, r, c, share)
                else:
                    assert share < 0.35, (seed, r, c, share)
                assert all(4 <= x <= CELL_PX - 5 and 4 <= y <= CELL_PX - 5 for x, y in pale), (seed, r, c)
    with pytest.raises(ValueError, match="arrow_placement must be one of .*got 'middle'"):
        make_sample(0, arrow_placement="middle")
