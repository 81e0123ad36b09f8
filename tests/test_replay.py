"""Tests for replay_vedas.py: the pure-tensor building blocks of visual replay (docs/design.md, "Visual replay")."""

import os
import sys

import pytest
import torch


sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from replay_vedas import (  # noqa: E402
    ReplaySelection,
    crop_and_resize,
    find_dense_window,
    patchify_images,
    select_replay,
    window_to_pixel_box,
)


# ----------------------------------------------------------------------------------------------------------------
# select_replay
# ----------------------------------------------------------------------------------------------------------------


def _all_true(b, n):
    return torch.ones(b, n, dtype=torch.bool)


def _none(b, n):
    return torch.zeros(b, n, dtype=torch.bool)


def test_select_replay_picks_topk_in_descending_order():
    saliency = torch.tensor([[0.1, 0.9, 0.3, 0.7, 0.5], [5.0, 1.0, 4.0, 2.0, 3.0]])
    sel = select_replay(saliency, _all_true(2, 5), _none(2, 5), k=3)
    assert isinstance(sel, ReplaySelection)
    assert sel.indices.dtype == torch.long and sel.indices.shape == (2, 3)
    assert sel.indices.tolist() == [[1, 3, 4], [0, 2, 4]]
    assert sel.valid.all()
    expected = torch.softmax(torch.tensor([[0.9, 0.7, 0.5], [5.0, 4.0, 3.0]]), dim=-1)
    torch.testing.assert_close(sel.weights, expected)
    torch.testing.assert_close(sel.weights.sum(-1), torch.ones(2))
    assert sel.visited.tolist() == [[False, True, False, True, True], [True, False, True, False, True]]


def test_select_replay_ties_broken_by_lower_index():
    saliency = torch.zeros(1, 6)
    sel = select_replay(saliency, _all_true(1, 6), _none(1, 6), k=3)
    assert sel.indices.tolist() == [[0, 1, 2]]
    torch.testing.assert_close(sel.weights, torch.full((1, 3), 1.0 / 3))
    # many ties (an unstable sort or topk scrambles these): lower column index first
    saliency = torch.zeros(2, 100)
    saliency[:, ::3] = 1.0
    sel = select_replay(saliency, _all_true(2, 100), _none(2, 100), k=8)
    assert sel.indices.tolist() == [[0, 3, 6, 9, 12, 15, 18, 21]] * 2


def test_select_replay_never_reselects_visited_and_exhausts():
    torch.manual_seed(0)
    n, k = 10, 4
    saliency = torch.rand(2, n)
    candidates = _all_true(2, n)
    visited = _none(2, n)
    seen = [set(), set()]
    steps = []
    for _ in range(4):  # k * T = 16 > N = 10
        visited_before = visited.clone()
        sel = select_replay(saliency, candidates, visited, k)
        # the input visited tensor is not modified in place
        assert torch.equal(visited, visited_before)
        for b in range(2):
            picked = sel.indices[b][sel.valid[b]].tolist()
            assert not (set(picked) & seen[b]), "re-selected a visited token"
            assert len(set(picked)) == len(picked)
            seen[b].update(picked)
        assert not torch.isnan(sel.weights).any()
        steps.append(sel)
        visited = sel.visited
    # step 1, 2: 4 each; step 3: the 2 remaining; step 4: nothing
    assert [s.valid.sum(-1).tolist() for s in steps] == [[4, 4], [4, 4], [2, 2], [0, 0]]
    assert steps[2].valid.tolist() == [[True, True, False, False]] * 2
    assert steps[2].indices[:, 2:].tolist() == [[0, 0], [0, 0]]
    assert (steps[2].weights[:, 2:] == 0).all()
    torch.testing.assert_close(steps[2].weights.sum(-1), torch.ones(2))
    assert torch.equal(steps[3].weights, torch.zeros(2, k))
    assert seen[0] == set(range(n)) and seen[1] == set(range(n))
    assert visited.all()
    # the first step takes the global top-4 in descending order
    assert steps[0].indices[0].tolist() == torch.argsort(saliency[0], descending=True)[:4].tolist()


def test_select_replay_invalid_slot_does_not_unmark_column_zero():
    # column 0 is selected for real while the invalid slot also points to column 0
    saliency = torch.tensor([[3.0, 1.0, 2.0]])
    candidates = torch.tensor([[True, False, False]])
    sel = select_replay(saliency, candidates, _none(1, 3), k=3)
    assert sel.indices.tolist() == [[0, 0, 0]]
    assert sel.valid.tolist() == [[True, False, False]]
    assert sel.weights.tolist() == [[1.0, 0.0, 0.0]]
    assert sel.visited.tolist() == [[True, False, False]]


def test_select_replay_zero_remaining_sample_and_k_larger_than_n():
    saliency = torch.tensor([[0.2, 0.4, 0.1], [0.3, 0.6, 0.9]], requires_grad=True)
    visited = torch.tensor([[True, True, True], [False, False, False]])
    sel = select_replay(saliency, _all_true(2, 3), visited, k=5)
    assert sel.indices.shape == (2, 5) and sel.weights.shape == (2, 5) and sel.valid.shape == (2, 5)
    assert sel.valid.tolist() == [[False] * 5, [True, True, True, False, False]]
    assert sel.indices.tolist() == [[0] * 5, [2, 1, 0, 0, 0]]
    assert torch.equal(sel.weights[0], torch.zeros(5))
    assert not torch.isnan(sel.weights).any()
    sel.weights.sum().backward()
    assert not torch.isnan(saliency.grad).any()
    assert torch.equal(saliency.grad[0], torch.zeros(3))


def test_select_replay_k_zero():
    saliency = torch.rand(3, 7, requires_grad=True)
    visited = torch.zeros(3, 7, dtype=torch.bool)
    visited[0, 2] = True
    sel = select_replay(saliency, _all_true(3, 7), visited, k=0)
    assert sel.indices.shape == (3, 0) and sel.indices.dtype == torch.long
    assert sel.weights.shape == (3, 0) and sel.valid.shape == (3, 0) and sel.valid.dtype == torch.bool
    assert torch.equal(sel.visited, visited) and sel.visited is not visited


def test_select_replay_gradient_reaches_saliency():
    saliency = torch.tensor([[0.5, 2.0, -1.0, 1.0, 0.0]], requires_grad=True)
    sel = select_replay(saliency, _all_true(1, 5), _none(1, 5), k=3)
    assert sel.indices.tolist() == [[1, 3, 0]]
    # a non-symmetric objective, so the softmax gradient is not identically zero
    loss = (sel.weights * torch.tensor([[1.0, 2.0, 3.0]])).sum()
    loss.backward()
    grad = saliency.grad[0]
    assert (grad[[1, 3, 0]].abs() > 1e-4).all()
    assert grad[2] == 0 and grad[4] == 0
    # the gradient matches an explicit softmax over the selected scores
    ref = saliency.detach()[0, [1, 3, 0]].clone().requires_grad_(True)
    (torch.softmax(ref, -1) * torch.tensor([1.0, 2.0, 3.0])).sum().backward()
    torch.testing.assert_close(grad[[1, 3, 0]], ref.grad)


def test_select_replay_low_precision_dtype_kept():
    saliency = torch.rand(2, 8).to(torch.bfloat16).requires_grad_(True)
    sel = select_replay(saliency, _all_true(2, 8), _none(2, 8), k=4)
    assert sel.weights.dtype == torch.bfloat16
    sel.weights.float().pow(2).sum().backward()
    assert saliency.grad is not None and saliency.grad.dtype == torch.bfloat16


def test_select_replay_rescale_multiplies_by_count():
    saliency = torch.tensor([[0.3, 0.1, 0.2, 0.4], [0.3, 0.1, 0.2, 0.4]])
    candidates = torch.tensor([[True, True, True, True], [True, False, False, True]])
    plain = select_replay(saliency, candidates, _none(2, 4), k=3)
    scaled = select_replay(saliency, candidates, _none(2, 4), k=3, rescale=True)
    assert torch.equal(plain.indices, scaled.indices)
    torch.testing.assert_close(scaled.weights[0], plain.weights[0] * 3)
    torch.testing.assert_close(scaled.weights[1], plain.weights[1] * 2)
    torch.testing.assert_close(scaled.weights.sum(-1), torch.tensor([3.0, 2.0]))
    # uniform saliency keeps features at their original scale
    uniform = select_replay(torch.ones(1, 6), _all_true(1, 6), _none(1, 6), k=4, rescale=True)
    torch.testing.assert_close(uniform.weights, torch.ones(1, 4))


def test_select_replay_respects_candidate_mask():
    # high scores on padding / text columns must never be picked
    saliency = torch.tensor([[9.0, 8.0, 0.1, 0.2, 0.3, 7.0], [0.5, 0.4, 9.0, 9.0, 0.1, 0.2]])
    candidates = torch.tensor([[False, False, True, True, True, False], [True, True, False, False, True, True]])
    visited = _none(2, 6)
    chosen = [set(), set()]
    for _ in range(3):
        sel = select_replay(saliency, candidates, visited, k=2)
        for b in range(2):
            chosen[b].update(sel.indices[b][sel.valid[b]].tolist())
        visited = sel.visited
    assert chosen[0] == {2, 3, 4}
    assert chosen[1] == {0, 1, 4, 5}
    assert not (visited & ~candidates).any()
    sel = select_replay(saliency, candidates, _none(2, 6), k=2)
    assert sel.indices.tolist() == [[4, 3], [0, 1]]


# ----------------------------------------------------------------------------------------------------------------
# find_dense_window
# ----------------------------------------------------------------------------------------------------------------


def _window_brute_force(grid, window):
    gh, gw = grid.shape
    wh, ww = min(window, gh), min(window, gw)
    best = None
    for r in range(gh - wh + 1):
        for c in range(gw - ww + 1):
            s = int(grid[r : r + wh, c : c + ww].sum())
            if best is None or s > best[4]:
                best = (r, r + wh, c, c + ww, s)
    return best


def test_find_dense_window_basic_and_count():
    grid = torch.zeros(5, 5, dtype=torch.bool)
    grid[2, 3] = grid[3, 3] = grid[3, 4] = grid[4, 4] = True
    grid[0, 0] = True
    assert find_dense_window(grid, 2) == (2, 4, 3, 5, 3)
    assert find_dense_window(grid, 3) == (2, 5, 2, 5, 4)


def test_find_dense_window_first_maximum_wins():
    grid = torch.zeros(4, 4, dtype=torch.bool)
    grid[0, 3] = True
    grid[3, 0] = True
    # every window holds at most one cell; the first maximum in row-major order of the top-left corner is
    # the window at (0, 2), which contains (0, 3).
    assert find_dense_window(grid, 2) == (0, 2, 2, 4, 1)
    # two separated equal clusters: the upper-left one wins
    grid = torch.zeros(6, 6, dtype=torch.long)
    grid[4:6, 0:2] = 1
    grid[0:2, 4:6] = 1
    assert find_dense_window(grid, 2) == (0, 2, 4, 6, 4)
    # same row: the left one wins
    grid = torch.zeros(3, 7, dtype=torch.long)
    grid[1, 1] = grid[1, 5] = 2
    assert find_dense_window(grid, 1) == (1, 2, 1, 2, 2)


def test_find_dense_window_non_square_and_clamped():
    grid = torch.tensor([[1, 0, 0, 1, 1], [0, 0, 1, 1, 0]], dtype=torch.bool)
    # 2 x 5 grid, W = 3 -> window 2 x 3
    assert find_dense_window(grid, 3) == (0, 2, 2, 5, 4)
    # W larger than both axes -> the whole grid
    assert find_dense_window(grid, 10) == (0, 2, 0, 5, 5)
    # tall grid: 6 x 1 with W = 2 -> window 2 x 1
    tall = torch.tensor([[0], [1], [0], [1], [1], [0]])
    assert find_dense_window(tall, 2) == (3, 5, 0, 1, 2)


def test_find_dense_window_counts_and_random_against_brute_force():
    counts = torch.tensor([[0, 3, 0], [1, 0, 0], [0, 0, 2]])
    assert find_dense_window(counts, 2) == (0, 2, 0, 2, 4)
    gen = torch.Generator().manual_seed(1)
    for _ in range(20):
        gh, gw = torch.randint(1, 8, (2,), generator=gen).tolist()
        window = int(torch.randint(1, 5, (1,), generator=gen))
        grid = torch.rand(gh, gw, generator=gen) < 0.4
        result = find_dense_window(grid, window)
        assert result == _window_brute_force(grid.long(), window)
        assert all(isinstance(v, int) for v in result)


def test_find_dense_window_rejects_bad_window():
    with pytest.raises(ValueError):
        find_dense_window(torch.ones(3, 3, dtype=torch.bool), 0)


# ----------------------------------------------------------------------------------------------------------------
# window_to_pixel_box + crop_and_resize
# ----------------------------------------------------------------------------------------------------------------

COLOURS = torch.tensor([[255, 0, 0], [0, 255, 0], [0, 0, 255], [255, 255, 0]], dtype=torch.uint8)


def _quadrant_image(height, width):
    image = torch.zeros(3, height, width, dtype=torch.uint8)
    h2, w2 = height // 2, width // 2
    image[:, :h2, :w2] = COLOURS[0, :, None, None]
    image[:, :h2, w2:] = COLOURS[1, :, None, None]
    image[:, h2:, :w2] = COLOURS[2, :, None, None]
    image[:, h2:, w2:] = COLOURS[3, :, None, None]
    return image


def test_window_to_pixel_box_exact_and_outward_rounding():
    assert window_to_pixel_box((2, 4), (2, 4), (4, 4), (64, 64)) == (32, 32, 64, 64)
    # 10 px over 3 cells: rows [1, 2) cover [3.33, 6.67) -> rounded outward to [3, 7)
    assert window_to_pixel_box((1, 2), (0, 3), (3, 3), (10, 10)) == (3, 0, 7, 10)
    # non-square: 50 x 70 image, 4 x 4 grid, rows [1, 3) -> [12.5, 37.5) -> [12, 38); cols [1, 2) -> [17.5, 35)
    assert window_to_pixel_box((1, 3), (1, 2), (4, 4), (50, 70)) == (12, 17, 38, 35)
    # windows beyond the grid are clamped to the image
    assert window_to_pixel_box((-1, 5), (3, 9), (4, 4), (50, 70)) == (0, 52, 50, 70)


@pytest.mark.parametrize("height,width", [(64, 64), (50, 70)])
def test_window_crop_is_bottom_right_quadrant(height, width):
    image = _quadrant_image(height, width)
    grid_hw = (4, 4)
    selected = torch.zeros(grid_hw, dtype=torch.bool)
    selected[2:4, 2:4] = True
    selected[0, 0] = True
    row0, row1, col0, col1, count = find_dense_window(selected, 2)
    assert (row0, row1, col0, col1, count) == (2, 4, 2, 4, 4)
    box = window_to_pixel_box((row0, row1), (col0, col1), grid_hw, (height, width))
    assert box == (height // 2, width // 2, height, width)
    crop = crop_and_resize(image, box, (28, 42))
    assert crop.shape == (3, 28, 42) and crop.dtype == torch.float32
    expected = (COLOURS[3].float() / 255)[:, None, None].expand(3, 28, 42)
    torch.testing.assert_close(crop, expected, atol=1e-6, rtol=0)
    # a window over the top-left quadrant is entirely colour 0; the float input path gives the same result
    box = window_to_pixel_box((0, 2), (0, 2), grid_hw, (height, width))
    crop = crop_and_resize(image.float() / 255, box, (16, 16))
    torch.testing.assert_close(crop, (COLOURS[0].float() / 255)[:, None, None].expand(3, 16, 16), atol=1e-6, rtol=0)


def test_crop_and_resize_matches_interpolate_and_is_in_range():
    gen = torch.Generator().manual_seed(0)
    image = torch.randint(0, 256, (3, 40, 60), dtype=torch.uint8, generator=gen)
    box = (5, 10, 35, 50)
    out = crop_and_resize(image, box, (12, 20))
    ref = torch.nn.functional.interpolate(
        image[None, :, 5:35, 10:50].float() / 255, size=(12, 20), mode="bilinear", align_corners=False, antialias=True
    )[0]
    torch.testing.assert_close(out, ref.clamp(0, 1))
    assert out.min() >= 0 and out.max() <= 1
    with pytest.raises(ValueError):
        crop_and_resize(image, (10, 10, 10, 20), (4, 4))


# ----------------------------------------------------------------------------------------------------------------
# patchify_images
# ----------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", ["torchvision", "pil"])
def test_patchify_images_matches_qwen2vl_processor_defaults(backend):
    from transformers import Qwen2VLImageProcessor, Qwen2VLImageProcessorPil

    cls = Qwen2VLImageProcessor if backend == "torchvision" else Qwen2VLImageProcessorPil
    processor = cls(do_resize=False)
    gen = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (2, 3, 56, 84), dtype=torch.uint8, generator=gen)
    ref = processor(images=list(images), return_tensors="pt")
    pixel_values, grid_thw = patchify_images(
        images.float() / 255,
        processor.patch_size,
        processor.temporal_patch_size,
        processor.merge_size,
        processor.image_mean,
        processor.image_std,
    )
    assert pixel_values.shape == ref["pixel_values"].shape == (2 * 4 * 6, 3 * 2 * 14 * 14)
    assert pixel_values.dtype == torch.float32
    assert grid_thw.dtype == torch.long
    assert torch.equal(grid_thw, ref["image_grid_thw"])
    assert grid_thw.tolist() == [[1, 4, 6], [1, 4, 6]]
    torch.testing.assert_close(pixel_values, ref["pixel_values"].float(), atol=1e-5, rtol=0)


def test_patchify_images_matches_processor_nondefault_sizes():
    from transformers import Qwen2VLImageProcessor

    # an image size the (resizing) processor leaves unchanged; odd temporal size and merge 3
    kwargs = dict(
        patch_size=4, temporal_patch_size=3, merge_size=3, image_mean=[0.2, 0.4, 0.6], image_std=[0.5, 0.25, 0.1]
    )
    processor = Qwen2VLImageProcessor(min_pixels=12 * 12, max_pixels=10**6, **kwargs)
    gen = torch.Generator().manual_seed(3)
    image = torch.randint(0, 256, (3, 24, 36), dtype=torch.uint8, generator=gen)
    ref = processor(images=[image], return_tensors="pt")
    assert ref["image_grid_thw"].tolist() == [[1, 6, 9]]  # the processor did not resize
    pixel_values, grid_thw = patchify_images(image[None].float() / 255, **kwargs)
    assert torch.equal(grid_thw, ref["image_grid_thw"])
    torch.testing.assert_close(pixel_values, ref["pixel_values"], atol=1e-5, rtol=0)


def test_patchify_merged_tokens_are_row_major_over_merged_grid():
    # Give every merged cell of a 4 x 5 merged grid its own value: the k-th group of merge^2 consecutive
    # patches must be merged cell divmod(k, G_w), and each patch vector is laid out (C, T, P, P).
    patch, merge, temporal = 2, 2, 2
    g_h, g_w = 4, 5
    cell_ids = torch.arange(g_h * g_w, dtype=torch.float32).reshape(g_h, g_w) / 100
    image = cell_ids.repeat_interleave(patch * merge, 0).repeat_interleave(patch * merge, 1)
    image = torch.stack([image, image + 0.3, image + 0.6])[None]
    pixel_values, grid_thw = patchify_images(image, patch, temporal, merge, 0.0, 1.0)
    assert grid_thw.tolist() == [[1, g_h * merge, g_w * merge]]
    per_cell = pixel_values.reshape(g_h * g_w, merge * merge, 3, temporal, patch, patch)
    for channel, offset in enumerate([0.0, 0.3, 0.6]):
        expected = (torch.arange(g_h * g_w, dtype=torch.float32) / 100 + offset)[:, None, None, None, None]
        torch.testing.assert_close(per_cell[:, :, channel], expected.expand(-1, merge * merge, temporal, patch, patch))


def test_patchify_rejects_unaligned_size():
    with pytest.raises(ValueError):
        patchify_images(torch.rand(1, 3, 30, 28), 14, 2, 2, 0.5, 0.5)
