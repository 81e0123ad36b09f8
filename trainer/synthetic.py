"""The embedded procedural task: "follow the arrows" (docs/design.md, "The embedded default").

Each image is an N x N grid of 28 px cells. With Qwen2-VL's 14 px patches and 2 x 2 merge, one cell
is exactly one merged visual token, so reading a cell is close to a lookup and a ~2 M parameter
model can learn the task on CPU in minutes (an earlier feasibility experiment showed this for a 3x3 grid).

Every cell has a colour and holds a triangle ("arrow") with a direction and a size. By default (``style="tiles"``)
the colour fills the cell and the arrow is pale; ``style="arrows"`` draws a small coloured arrow on a pale cell
instead, which a tiny vision tower learns to read much more slowly (after 400 steps at batch 32 the tiles model
named the start cell's colour right 100/100 times, the arrows model 21/100). One cell, the start, has a thick
black border. The question asks for the colour of the arrow reached after
following ``n_moves`` arrows from the start, either as a short answer (a colour word) or as multiple
choice (the answer is an option letter). The question text never lists the options: the shared prompt builder
(:mod:`vedas_trainer.prompting`) appends them from ``choices``, in training and at test time alike.

The rationale names what is seen at every step (row, column, colour, direction): the feasibility
experiment showed that a CoT naming the colour only at the end is not learned reliably::

    start : row 2 col 3 , yellow arrow up
    step 1 : row 1 col 3 , red arrow down
    step 2 : row 2 col 3 , yellow arrow up            (multiple choice adds " , yellow is option B")

With ``n_moves`` moves there are ``n_moves + 1`` steps (the default 2-3 moves gives 3-4 steps, within
the curriculum's ``max_latent_stage`` of 4). Steps are returned as a list; the collator joins them
with blank lines, as the curriculum expects (docs/design.md, "Curriculum").

Optional distractors are small dots/squares centred on grid-line points, so they overlap the corners
or edges of several cells (and so several visual tokens) without ever covering an arrow. They carry
no meaning and never change the answer.

All text is lowercase words separated by single spaces, with punctuation as separate tokens; the
only capitals are the option letters. :func:`synthetic_vocabulary` lists every token the task can
emit, for training a word-level tokenizer.

Row and column numbers are 1-based in the text and 0-based in the scene graph.
"""

from __future__ import annotations

import hashlib
import io
import json
import random
import re
from typing import Any, Iterator, Mapping, Sequence

import datasets
import torch
from PIL import Image, ImageDraw

from .prompting import format_choices

__all__ = [
    "CELL_PX",
    "COLOURS",
    "DIRECTIONS",
    "cell_tint",
    "make_sample",
    "solve",
    "scene_hash",
    "build_synthetic_dataset",
    "build_splits",
    "FreshSyntheticDataset",
    "synthetic_vocabulary",
    "cot_step_reading",
    "synthetic_features",
    "TASK_PRESETS",
    "expand_task_kwargs",
]

# One cell = one merged visual token: 14 px patches, merged 2 x 2 by Qwen2-VL's PatchMerger.
CELL_PX = 28

# Saturated, well separated colours, so that a centre pixel identifies the colour unambiguously.
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 220),
    "yellow": (235, 200, 20),
    "purple": (150, 60, 190),
    "orange": (245, 130, 20),
}
# Distractors may also be grey; black is reserved for the start marker.
DISTRACTOR_COLOURS: dict[str, tuple[int, int, int]] = {**COLOURS, "grey": (128, 128, 128)}
BACKGROUND = (255, 255, 255)
# Coordinate tints: with ``coordinate_tints`` every cell's background is a pale colour that encodes its row (red
# channel) and column (green channel), like the labelled ranks and files of a chess board. Qwen2-VL's M-RoPE gives
# visual tokens their (row, column) only as rotary angles, which a tiny model resolves poorly (the w section gets
# the lowest frequencies); with the tint, "row 2 col 3" in the text can find its cell by content instead. All
# channels span 171-255 whatever the grid size, well clear of the saturated arrow colours.
TINT_RANGE = 84
GRID_LINE = (205, 205, 205)
START_BORDER = (0, 0, 0)
START_BORDER_PX = 3
# How far a "leading" arrow's tip reaches ahead of its cell centre: distractors on the edge midpoints (radius
# <= 3) reach 10.5 px from it, so 9 keeps them apart.
ARROW_REACH = 9
ARROW_PLACEMENTS = ("centred", "leading")

# (d_row, d_col) for each direction.
DIRECTIONS: dict[str, tuple[int, int]] = {"up": (-1, 0), "down": (1, 0), "left": (0, -1), "right": (0, 1)}

# Numbers are single tokens "1".."9", so grids and move counts are capped at 9.
MAX_GRID = 9
MAX_MOVES = 9
LETTERS = "ABCDEFGHIJ"

SPLIT_IDS = ("train", "validation", "test")


# --------------------------------------------------------------------------------------------------
# Scene generation
# --------------------------------------------------------------------------------------------------


def _as_rng(seed_or_rng: int | str | random.Random) -> random.Random:
    if isinstance(seed_or_rng, random.Random):
        return seed_or_rng
    # ``random.Random`` seeds str deterministically (sha512), independent of PYTHONHASHSEED.
    return random.Random(seed_or_rng)


def _pick_n_moves(rng: random.Random, n_moves: int | Sequence[int]) -> int:
    if isinstance(n_moves, int):
        return n_moves
    low, high = n_moves
    return rng.randint(low, high)


def _follow(cells: list[list[list[str]]], start: Sequence[int], n_moves: int) -> list[list[int]]:
    """Cells visited from ``start`` following ``n_moves`` arrows (start included)."""
    row, col = start
    path = [[row, col]]
    for _ in range(n_moves):
        d_row, d_col = DIRECTIONS[cells[row][col][1]]
        row, col = row + d_row, col + d_col
        path.append([row, col])
    return path


def _question_text(n_moves: int) -> str:
    # Options are not part of the question: prompting.build_prompt renders them from the sample's choices.
    noun = "arrow" if n_moves == 1 else "arrows"
    return f"start at the marked cell and follow {n_moves} {noun} . what colour is the arrow in the final cell ?"


def _step_text(label: str, row: int, col: int, colour: str, direction: str) -> str:
    return f"{label} : row {row + 1} col {col + 1} , {colour} arrow {direction}"


# what `_step_text` writes, read back from a generated rationale
_STEP_PATTERN = re.compile(r"row (\d+) col (\d+) , (\w+) arrow (\w+)")


def _triangle(cx: float, cy: float, half: int, direction: str, placement: str = "centred") -> list[tuple[float, float]]:
    """An isosceles triangle pointing in ``direction`` with a base ``2 * half`` px wide.

    ``"centred"``: centred on the cell centre (cx, cy), inside a 2*half box; its four quarters fall in the four
    14-px patches of the cell almost alike, so the direction is a fine detail of all four.
    ``"leading"``: the tip is :data:`ARROW_REACH` px ahead of the centre and the base 1 px behind it, so two
    thirds or more of the arrow lie in the two patches on the side it points to (a centred arrow puts three
    quarters of itself behind): the direction is which half of the cell is paler, a coarse feature that a tiny
    vision tower reads from each patch's mean.
    Either way the cell centre is strictly inside the triangle, which the tests use.
    """
    d_row, d_col = DIRECTIONS[direction]
    # Unit vector along the arrow (x = col, y = row) and its perpendicular.
    ux, uy = d_col, d_row
    px, py = -uy, ux
    ahead, behind = (half, half) if placement == "centred" else (ARROW_REACH, 1)
    tip = (cx + ux * ahead, cy + uy * ahead)
    base_left = (cx - ux * behind + px * half, cy - uy * behind + py * half)
    base_right = (cx - ux * behind - px * half, cy - uy * behind - py * half)
    return [tip, base_left, base_right]


def cell_tint(row: int, col: int, grid: int) -> tuple[int, int, int]:
    """The pale colour of cell (row, col) (0-based) of a ``grid`` x ``grid`` board with coordinate tints."""
    step = TINT_RANGE / (grid - 1)
    return (255 - round(step * row), 255 - round(step * col), 235)


def _render(scene: dict[str, Any]) -> Image.Image:
    grid = scene["grid_size"]
    tinted = scene.get("coordinate_tints", False)
    tiles = scene.get("style", "arrows") == "tiles"
    size = grid * CELL_PX
    image = Image.new("RGB", (size, size), BACKGROUND)
    draw = ImageDraw.Draw(image)
    for row in range(grid):
        for col in range(grid):
            x0, y0 = col * CELL_PX, row * CELL_PX
            colour, direction = scene["cells"][row][col]
            tint = cell_tint(row, col, grid) if tinted else BACKGROUND
            # "tiles": the colour fills the cell and the arrow is pale; "arrows": a coloured arrow on a pale cell.
            # Thin grid lines help locate cells but stay well away from the colours.
            background, arrow = (COLOURS[colour], tint) if tiles else (tint, COLOURS[colour])
            draw.rectangle([x0, y0, x0 + CELL_PX - 1, y0 + CELL_PX - 1], fill=background, outline=GRID_LINE, width=1)
            half = scene["sizes"][row][col]
            # Centre of the cell in pixel coordinates (pixels x0..x0+27, centre between 13 and 14).
            cx, cy = x0 + (CELL_PX - 1) / 2, y0 + (CELL_PX - 1) / 2
            draw.polygon(_triangle(cx, cy, half, direction, scene.get("arrow_placement", "centred")), fill=arrow)
    # The start marker is drawn after the grid lines so that it is never overdrawn by them.
    s_row, s_col = scene["start"]
    x0, y0 = s_col * CELL_PX, s_row * CELL_PX
    draw.rectangle(
        [x0, y0, x0 + CELL_PX - 1, y0 + CELL_PX - 1], outline=START_BORDER, width=START_BORDER_PX
    )
    for d in scene["distractors"]:
        box = [d["x"] - d["radius"], d["y"] - d["radius"], d["x"] + d["radius"], d["y"] + d["radius"]]
        fill = DISTRACTOR_COLOURS[d["colour"]]
        if d["shape"] == "dot":
            draw.ellipse(box, fill=fill)
        else:
            draw.rectangle(box, fill=fill)
    return image


def _make_distractors(rng: random.Random, grid: int, prob: float) -> list[dict[str, Any]]:
    """Small shapes centred on grid-line points (cell corners or edge midpoints).

    Arrows reach at most 9 px from their cell centre and distractors have a radius of at most 3 px,
    so a distractor overlaps the border area of 2-4 cells (2-4 visual tokens) but never an arrow: it
    cannot change what a cell shows, only adds clutter that a model has to learn to ignore.
    """
    distractors = []
    n = sum(rng.random() < prob for _ in range(grid * grid))
    for _ in range(n):
        if rng.random() < 0.5:
            # Interior corner shared by four cells.
            x = rng.randint(1, grid - 1) * CELL_PX
            y = rng.randint(1, grid - 1) * CELL_PX
        elif rng.random() < 0.5:
            # Midpoint of a vertical edge between two horizontally adjacent cells.
            x = rng.randint(1, grid - 1) * CELL_PX
            y = rng.randrange(grid) * CELL_PX + CELL_PX // 2
        else:
            x = rng.randrange(grid) * CELL_PX + CELL_PX // 2
            y = rng.randint(1, grid - 1) * CELL_PX
        distractors.append(
            {
                "x": x,
                "y": y,
                "radius": rng.choice((2, 3)),
                "shape": rng.choice(("dot", "square")),
                "colour": rng.choice(sorted(DISTRACTOR_COLOURS)),
            }
        )
    return distractors


def _check_task(grid, n_colours, form, arrow_sizes, style, arrow_placement):
    """`make_sample`'s settings, checked before any drawing (one clear error naming the bad value)."""
    if not 2 <= grid <= MAX_GRID:
        raise ValueError(f"grid must be in [2, {MAX_GRID}], got {grid}")
    if not 2 <= n_colours <= len(COLOURS):
        raise ValueError(f"n_colours must be in [2, {len(COLOURS)}], got {n_colours}")
    if style not in ("tiles", "arrows"):
        raise ValueError(f"style must be 'tiles' or 'arrows', got {style!r}")
    if arrow_placement not in ARROW_PLACEMENTS:
        raise ValueError(f"arrow_placement must be one of {ARROW_PLACEMENTS}, got {arrow_placement!r}")
    if form not in (None, "short", "mc"):
        raise ValueError(f"form must be None, 'short' or 'mc', got {form!r}")
    if max(arrow_sizes) > CELL_PX // 2 - 5 or min(arrow_sizes) < 3:
        raise ValueError("arrow_sizes must lie in [3, 9] px so arrows stay clear of grid lines")


def _draw_cells(rng: random.Random, grid: int, palette: list[str]) -> list[list[list[str]]]:
    """`[colour, direction]` per cell, row by row; a cell only points where a neighbour is, so every path is well
    defined."""
    cells = []
    for row in range(grid):
        cells.append([])
        for col in range(grid):
            inside = [name for name, (d_row, d_col) in DIRECTIONS.items()
                      if 0 <= row + d_row < grid and 0 <= col + d_col < grid]
            cells[row].append([rng.choice(palette), rng.choice(inside)])
    return cells


def _rationale(cells, path) -> list[str]:
    """One CoT step per visited cell: where it is, its colour and where its arrow points."""
    steps = []
    for i, (row, col) in enumerate(path):
        colour, direction = cells[row][col]
        steps.append(_step_text("start" if i == 0 else f"step {i}", row, col, colour, direction))
    return steps


def make_sample(
    seed_or_rng: int | str | random.Random,
    grid: int = 3,
    n_moves: int | Sequence[int] = (2, 3),
    n_colours: int = 4,
    form: str | None = None,
    mc_prob: float = 0.2,
    n_options: int = 4,
    distractor_prob: float = 0.05,
    arrow_sizes: Sequence[int] = (6, 7, 8),
    style: str = "tiles",
    coordinate_tints: bool = False,
    arrow_placement: str = "centred",
    sample_id: str | None = None,
) -> dict[str, Any]:
    """Draw one sample of the "follow the arrows" task. The defaults are the embedded default run's task.

    Args:
        seed_or_rng: an int/str seed or a ``random.Random`` (which is advanced).
        grid: cells per side (2-9); the image is ``grid * 28`` px square, ``grid**2`` visual tokens.
        n_moves: number of arrows to follow, or an inclusive ``(min, max)`` range (1-9).
        n_colours: how many of :data:`COLOURS` the arrows use (2-6); chance is ``1 / n_colours``.
        form: ``"short"`` or ``"mc"``; ``None`` picks ``"mc"`` with probability ``mc_prob``.
        n_options: options for multiple choice (capped at ``n_colours``); they always include the
            answer and are shuffled, so the letter has to be read from the question.
        distractor_prob: expected fraction of cells that add a small distractor shape.
        arrow_sizes: possible half-sizes (px) of an arrow's bounding box; each cell draws one.
        style: ``"tiles"`` (the colour fills the cell, the arrow is pale: a tiny vision tower learns to read
            colours several times faster) or ``"arrows"`` (a small coloured arrow on a pale cell).
        coordinate_tints: tint each cell's pale part (background or arrow) by its (row, column)
            (:func:`cell_tint`), so that a cell named in the text can be found by its content.
        arrow_placement: ``"centred"`` (the arrow is centred on the cell) or ``"leading"`` (it fills the half of
            the cell it points to; measured in docs/reproducibility.md, diagnosis 2: no better read); see
            :func:`_triangle`.
        sample_id: the ``id`` field; defaults to one derived from the seed when it is an int/str.

    Returns:
        The unified sample dict plus ``scene`` (the scene graph, 0-based indices) and
        ``question_kwargs`` (``n_moves``, ``form``, ``choices``): ``solve(scene, question_kwargs)``
        recomputes ``answer`` from them alone.
    """
    _check_task(grid, n_colours, form, arrow_sizes, style, arrow_placement)
    rng = _as_rng(seed_or_rng)
    moves = _pick_n_moves(rng, n_moves)
    if not 1 <= moves <= MAX_MOVES:
        raise ValueError(f"n_moves must be in [1, {MAX_MOVES}], got {moves}")
    palette = list(COLOURS)[:n_colours]
    cells = _draw_cells(rng, grid, palette)
    sizes = [[rng.choice(arrow_sizes) for _ in range(grid)] for _ in range(grid)]
    start = [rng.randrange(grid), rng.randrange(grid)]
    path = _follow(cells, start, moves)

    if form is None:
        form = "mc" if rng.random() < mc_prob else "short"
    final_colour = cells[path[-1][0]][path[-1][1]][0]
    choices = None
    if form == "mc":
        others = [c for c in palette if c != final_colour]
        choices = rng.sample(others, min(n_options, n_colours) - 1) + [final_colour]
        rng.shuffle(choices)

    scene = {
        "grid_size": grid,
        "cells": cells,
        "sizes": sizes,
        "start": start,
        "path": path,
        "distractors": _make_distractors(rng, grid, distractor_prob),
        "style": style,
        "coordinate_tints": bool(coordinate_tints),
        "arrow_placement": arrow_placement,
    }
    question_kwargs = {"n_moves": moves, "form": form, "choices": choices}
    answer = solve(scene, question_kwargs)

    steps = _rationale(cells, path)
    if choices is not None:
        # Make the colour -> letter lookup an explicit, supervised step as well.
        steps[-1] += f" , {final_colour} is option {answer}"
    if sample_id is None:
        sample_id = f"arrows-{seed_or_rng}" if isinstance(seed_or_rng, (int, str)) else "arrows"
    return {
        "id": sample_id,
        "images": [_render(scene)],
        "question": _question_text(moves),
        "choices": choices,
        "steps": steps,
        "answer": answer,
        "scene": scene,
        "question_kwargs": question_kwargs,
    }


def solve(scene: dict[str, Any], question_kwargs: dict[str, Any]) -> str:
    """The answer, derived from the scene graph alone (not from ``scene["path"]`` or the steps).

    Follows ``question_kwargs["n_moves"]`` arrows from ``scene["start"]``; returns the final cell's
    colour word, or for multiple choice the letter of that colour in ``question_kwargs["choices"]``.
    """
    row, col = scene["start"]
    for _ in range(question_kwargs["n_moves"]):
        d_row, d_col = DIRECTIONS[scene["cells"][row][col][1]]
        row, col = row + d_row, col + d_col
        if not (0 <= row < scene["grid_size"] and 0 <= col < scene["grid_size"]):
            raise ValueError("an arrow points outside the grid: invalid scene")
    colour = scene["cells"][row][col][0]
    if question_kwargs.get("form", "short") == "mc":
        return LETTERS[list(question_kwargs["choices"]).index(colour)]
    return colour


def scene_hash(sample: dict[str, Any]) -> str:
    """Canonical hash of the puzzle: arrow colours/directions, start cell and number of moves.

    Deliberately left out: arrow sizes, distractors, question form and option order. They do not
    change the reasoning, so two samples that differ only there are the same puzzle, and must not
    be split between train and test.
    """
    scene = sample["scene"]
    key = {
        "cells": [[list(cell) for cell in row] for row in scene["cells"]],
        "start": list(scene["start"]),
        "n_moves": int(sample["question_kwargs"]["n_moves"]),
    }
    return hashlib.sha1(json.dumps(key, separators=(",", ":")).encode()).hexdigest()


# --------------------------------------------------------------------------------------------------
# Presets
# --------------------------------------------------------------------------------------------------

# Named task settings, chosen with ``{"preset": NAME}`` in the task options (train.py ``--task_kwargs``,
# evaluate.py / visualize.py ``--task-kwargs``); any other key overrides the preset's value.
# "lookback": a 5 x 5 board (25 visual tokens instead of 9) and always 3 moves, so 4 steps, one per latent step of
# the embedded curriculum (max_latent_stage 4): each latent step has one cell to find among 25, where replay of
# K = 2 tokens would hit it by chance 8% of the time (22% on the 3 x 3 board). The tints give every cell a pale
# colour that encodes its row and column, so a cell named by its coordinates can be found by content.
TASK_PRESETS: dict[str, dict[str, Any]] = {
    "default": {},
    "lookback": {"grid": 5, "n_moves": [3, 3], "coordinate_tints": True},
}


def expand_task_kwargs(task_kwargs: dict[str, Any] | None) -> dict[str, Any]:
    """``make_sample`` keywords from task options that may name a preset: ``{"preset": "lookback", "mc_prob": 0}``
    gives the preset's keywords with ``mc_prob`` replaced. Without ``"preset"`` the options are returned as given."""
    options = dict(task_kwargs or {})
    name = options.pop("preset", None)
    if name is None:
        return options
    if name not in TASK_PRESETS:
        raise ValueError(f"unknown task preset {name!r}; expected one of {sorted(TASK_PRESETS)}")
    return {**TASK_PRESETS[name], **options}


# --------------------------------------------------------------------------------------------------
# datasets
# --------------------------------------------------------------------------------------------------


def synthetic_features() -> datasets.Features:
    """``datasets`` features of a synthetic sample (unified schema + scene graph)."""
    string, int32 = datasets.Value("string"), datasets.Value("int32")
    List = datasets.List
    return datasets.Features(
        {
            "id": string,
            "images": List(datasets.Image()),
            "question": string,
            "choices": List(string),
            "steps": List(string),
            "answer": string,
            "scene": {
                "grid_size": int32,
                "cells": List(List(List(string))),
                "sizes": List(List(int32)),
                "start": List(int32),
                "path": List(List(int32)),
                "distractors": List(
                    {"x": int32, "y": int32, "radius": int32, "shape": string, "colour": string}
                ),
                "style": string,
                "coordinate_tints": datasets.Value("bool"),
            },
            "question_kwargs": {"n_moves": int32, "form": string, "choices": List(string)},
        }
    )


def _png_bytes(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", compress_level=1)
    return buffer.getvalue()


def _unique_samples(
    n: int, seed: int, split: str, exclude: set[str], task_kwargs: dict[str, Any]
) -> Iterator[dict[str, Any]]:
    """Yield ``n`` samples whose scene hash is not in ``exclude`` (which is updated in place)."""
    if split not in SPLIT_IDS:
        raise ValueError(f"split must be one of {SPLIT_IDS}, got {split!r}")
    produced, index = 0, 0
    # Generous, but finite: tiny configurations (e.g. a 2x2 grid) can run out of distinct puzzles.
    max_attempts = 20 * n + 1000
    while produced < n:
        if index >= max_attempts:
            raise RuntimeError(
                f"only {produced}/{n} distinct puzzles for split {split!r} after {index} draws; "
                "the task configuration has too few distinct scenes"
            )
        # One independent stream per (seed, split, index): splits never share a stream.
        rng_seed = f"vedas-arrows/{seed}/{split}/{index}"
        sample = make_sample(rng_seed, sample_id=f"arrows-{split}-{seed}-{index}", **task_kwargs)
        index += 1
        key = scene_hash(sample)
        if key in exclude:
            continue
        exclude.add(key)
        produced += 1
        yield sample


def build_synthetic_dataset(
    n: int,
    seed: int = 0,
    split: str = "train",
    *,
    exclude: set[str] | None = None,
    **task_kwargs: Any,
) -> datasets.Dataset:
    """``n`` distinct samples as a ``datasets.Dataset`` (images stored as an Image sequence).

    Samples are deterministic in ``(seed, split)``. ``exclude`` is a set of :func:`scene_hash`
    values to avoid; it is extended with the hashes of the returned samples. ``task_kwargs`` go to
    :func:`make_sample` (``grid``, ``n_moves``, ``form``, ...).
    """
    exclude = set() if exclude is None else exclude
    task_kwargs = expand_task_kwargs(task_kwargs)  # {"preset": NAME, ...}: see TASK_PRESETS
    rows = []
    for sample in _unique_samples(n, seed, split, exclude, task_kwargs):
        # Encode the PNGs here, once and with fast compression: left to ``datasets`` they are
        # encoded twice at the default level, which was ~2/3 of the build time. PNG is lossless.
        sample["images"] = [{"bytes": _png_bytes(image), "path": None} for image in sample["images"]]
        rows.append(sample)
    features = synthetic_features()
    info = datasets.DatasetInfo(description="Vedas embedded task: follow the arrows", features=features)
    return datasets.Dataset.from_list(rows, features=features, info=info, split=datasets.NamedSplit(split))


class FreshSyntheticDataset(torch.utils.data.Dataset):
    """``n`` puzzles per epoch, new ones every epoch: a map-style dataset that draws sample ``i`` of epoch ``e``
    from its own seed ``(seed, split, e, i)`` when it is read.

    Training on fresh puzzles instead of repeating a fixed set: the model cannot fit a set of puzzles, only the
    rule, and the images are drawn on the fly (about a millisecond per sample, no build time). The epoch is set
    by :meth:`set_epoch` (``vedas_trainer.trainer.CurriculumCallback`` calls it at every epoch start, on every
    process, and after a resume), so a run is reproducible and every data-parallel rank reads the same puzzles.
    Puzzles whose :func:`scene_hash` is in ``exclude`` (e.g. the test split's) are redrawn.
    """

    def __init__(self, n: int, seed: int = 0, split: str = "train", *, exclude: set[str] | None = None,
                 **task_kwargs: Any):
        if split not in SPLIT_IDS:
            raise ValueError(f"split must be one of {SPLIT_IDS}, got {split!r}")
        if n < 1:
            raise ValueError(f"n must be >= 1, got {n}")
        self.n, self.seed, self.split = int(n), seed, split
        self.exclude = set() if exclude is None else set(exclude)
        self.task_kwargs = expand_task_kwargs(task_kwargs)
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, index: int) -> dict[str, Any]:
        if not 0 <= index < self.n:
            raise IndexError(index)
        for attempt in range(1000):
            key = f"vedas-arrows-fresh/{self.seed}/{self.split}/{self.epoch}/{index}" + (f"/{attempt}" if attempt else "")
            sample = make_sample(key, sample_id=f"arrows-{self.split}-{self.seed}-e{self.epoch}-{index}",
                                 **self.task_kwargs)
            if scene_hash(sample) not in self.exclude:
                return sample
        raise RuntimeError(f"no puzzle outside the excluded set after 1000 draws (sample {index})")


def build_splits(
    n_train: int, n_val: int, n_test: int, seed: int = 0, **task_kwargs: Any
) -> datasets.DatasetDict:
    """Train/validation/test splits with disjoint seeds and no shared puzzle (by scene hash)."""
    seen: set[str] = set()
    # Test first: its content then does not depend on n_train/n_val, so growing the training set
    # never changes the held-out numbers.
    test = build_synthetic_dataset(n_test, seed, "test", exclude=seen, **task_kwargs)
    val = build_synthetic_dataset(n_val, seed, "validation", exclude=seen, **task_kwargs)
    train = build_synthetic_dataset(n_train, seed, "train", exclude=seen, **task_kwargs)
    return datasets.DatasetDict({"train": train, "validation": val, "test": test})


# --------------------------------------------------------------------------------------------------
# Vocabulary
# --------------------------------------------------------------------------------------------------


def synthetic_vocabulary() -> list[str]:
    """Every word/punctuation token the task can emit, for any supported configuration.

    Covers questions, options, steps, answers and the ``answer : X`` line that prompts/targets use.
    Order is fixed (first appearance), so a tokenizer trained on it is reproducible.
    """
    words: list[str] = []
    texts = [
        _question_text(1),
        _question_text(2),
        format_choices(list(COLOURS)),  # what the prompt builder appends for multiple choice
        _step_text("start", 0, 0, "red", "up"),
        _step_text("step 1", 0, 0, "red", "up"),
        "answer : red",
        " , red is option A",
        " ".join(COLOURS),
        " ".join(DIRECTIONS),
        " ".join(str(i) for i in range(1, max(MAX_GRID, MAX_MOVES) + 1)),
        " ".join(LETTERS[: len(COLOURS)]),
    ]
    for text in texts:
        for word in text.split():
            if word not in words:
                words.append(word)
    return words


# --------------------------------------------------------------------------------------------------
# Where explicit CoT goes wrong
# --------------------------------------------------------------------------------------------------


def _first_error(steps, cells, path) -> str:
    """The first wrong thing in one generated rationale: the start cell, a move (a cell that does not follow from the
    previous step's direction as written), or a read (colour or direction of the cell the step names)."""
    grid = len(cells)
    for i, (row, col, colour, direction) in enumerate(steps[: len(path)]):
        if i == 0 and [row, col] != list(path[0]):
            return "start cell"
        if i > 0:
            d_row, d_col = DIRECTIONS.get(steps[i - 1][3], (grid, grid))
            if (row, col) != (steps[i - 1][0] + d_row, steps[i - 1][1] + d_col):
                return "move"
        if not (0 <= row < grid and 0 <= col < grid):
            return "move"
        if colour != cells[row][col][0]:
            return "read: colour"
        if direction != cells[row][col][1] and i < len(path) - 1:
            return "read: direction"
    return "too few steps" if len(steps) < len(path) else "none"


def cot_step_reading(samples: Sequence[Mapping], texts: Sequence[str]) -> dict:
    """What explicit-CoT generations get right, step by step, on the synthetic task (each sample's ``scene`` is the
    truth): how often a step reads the colour and the direction of the cell it names, and the first error of each
    rationale ("none" when every step is right; the last step's direction is not needed and not counted there)."""
    reads = {"colour": [0, 0], "direction": [0, 0]}
    first = {}
    for sample, text in zip(samples, texts):
        cells, path = sample["scene"]["cells"], sample["scene"]["path"]
        steps = [(int(r) - 1, int(c) - 1, colour, d) for r, c, colour, d in _STEP_PATTERN.findall(text)]
        for row, col, colour, direction in steps[: len(path)]:
            if 0 <= row < len(cells) and 0 <= col < len(cells):
                reads["colour"][0] += colour == cells[row][col][0]
                reads["direction"][0] += direction == cells[row][col][1]
                reads["colour"][1] += 1
                reads["direction"][1] += 1
        kind = _first_error(steps, cells, path)
        first[kind] = first.get(kind, 0) + 1
    return {"steps_read": reads["colour"][1], "first_error": dict(sorted(first.items())),
            **{f"{what}_accuracy": (ok / n if n else None) for what, (ok, n) in reads.items()}}
