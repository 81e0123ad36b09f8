# Copyright 2026 The Vedas authors. All rights reserved.
#
# Licensed under the Apache License, Version 2.0 (the "License");
# you may not use this file except in compliance with the License.
# You may obtain a copy of the License at
#
#     http://www.apache.org/licenses/LICENSE-2.0
#
# Unless required by applicable law or agreed to in writing, software
# distributed under the License is distributed on an "AS IS" BASIS,
# WITHOUT WARRANTIES OR CONDITIONS OF ANY KIND, either express or implied.
# See the License for the specific language governing permissions and
# limitations under the License.
"""Pure-tensor building blocks of Vedas visual replay (SCF-VR; docs/design.md, "Visual replay").

This file is shipped inside checkpoints as remote code, so it only imports `torch`, `typing` /
`dataclasses` and `transformers`, and no other file of the package.

Contents:

- `select_replay`: top-K selection of unvisited visual tokens and their softmax weights.
- `find_dense_window`: the W x W window of a merged grid holding most selected cells.
- `visual_tokens`, `dense_windows`: where each sample's visual tokens sit (column, image, merged cell), and the
  densest window of a step's selection over a sample's images.
- `window_to_pixel_box`: merged-grid window -> pixel box of the original image.
- `crop_and_resize`: crop the original image and resize it bilinearly.
- `patchify_images`: the Qwen2-VL image processor's `pixel_values` / `image_grid_thw`, in torch.

A note on layouts (Qwen2-VL / Qwen2.5-VL, transformers 5.x): `image_grid_thw` counts *patches*
(`H // patch_size`), not merged cells. The vision tower's merger outputs one token per merged cell
(`merge_size x merge_size` patches) and the processor orders patches so that the merged tokens of an
image come out in row-major order over the merged grid `(G_h, G_w) = (grid_h // merge_size,
grid_w // merge_size)`. Visual token `i` of an image therefore sits at merged cell `divmod(i, G_w)`.
"""

from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F


__all__ = [
    "ReplaySelection",
    "select_replay",
    "find_dense_window",
    "VisualTokens",
    "visual_tokens",
    "dense_windows",
    "window_to_pixel_box",
    "crop_and_resize",
    "patchify_images",
]


@dataclass
class ReplaySelection:
    """
    Result of `select_replay` for one latent step.

    Args:
        indices (`torch.LongTensor` of shape `(batch_size, k)`):
            Column indices into the saliency's `N` axis, per sample in descending saliency order. Invalid
            slots (fewer than `k` tokens were left) point to column 0 and come last.
        weights (`torch.FloatTensor` of shape `(batch_size, k)`):
            Softmax of the selected tokens' saliency over the valid slots (times the number of valid slots
            when `rescale=True`), 0 on invalid slots. Same dtype as the saliency; differentiable w.r.t. it.
        valid (`torch.BoolTensor` of shape `(batch_size, k)`):
            Whether the slot holds a real, newly selected token.
        visited (`torch.BoolTensor` of shape `(batch_size, N)`):
            The input visited set plus this step's valid selections (a new tensor).
    """

    indices: torch.LongTensor
    weights: torch.Tensor
    valid: torch.BoolTensor
    visited: torch.BoolTensor


def select_replay(
    saliency: torch.Tensor,
    candidate_mask: torch.Tensor,
    visited: torch.Tensor,
    k: int,
    rescale: bool = False,
) -> ReplaySelection:
    """
    Picks, per sample, the `k` highest-saliency visual tokens that are candidates and not yet visited.

    If fewer than `k` such tokens remain, the remaining ones are taken and the other slots are marked invalid
    (index 0, weight 0). Ties are broken by the lower column index (stable sort), so the selection is
    deterministic and independent of batching.

    Args:
        saliency (`torch.Tensor` of shape `(batch_size, N)`):
            One finite score per column (may require grad). Non-candidate columns may hold anything finite.
        candidate_mask (`torch.BoolTensor` of shape `(batch_size, N)`):
            True where the column is a real visual token of the sample's prompt.
        visited (`torch.BoolTensor` of shape `(batch_size, N)`):
            True where the token was replayed at an earlier step of the same sample.
        k (`int`):
            Number of tokens to select per sample, `k >= 0`. May exceed `N`.
        rescale (`bool`, *optional*, defaults to `False`):
            Multiply the weights by the number of valid selected tokens, so that uniform saliency keeps the
            replayed features at their original scale instead of `V / k`.

    Returns:
        `ReplaySelection` with `indices` `(batch_size, k)` long, `weights` `(batch_size, k)` (saliency dtype),
        `valid` `(batch_size, k)` bool and the updated `visited` `(batch_size, N)` bool.
    """
    if k < 0:
        raise ValueError(f"k must be >= 0, got {k}")
    if saliency.dim() != 2:
        raise ValueError(f"saliency must be (batch_size, N), got shape {tuple(saliency.shape)}")
    batch_size, num_columns = saliency.shape
    device = saliency.device
    candidate_mask = candidate_mask.to(device=device, dtype=torch.bool)
    visited = visited.to(device=device, dtype=torch.bool)
    available = candidate_mask & ~visited

    if k == 0:
        return ReplaySelection(
            indices=torch.zeros(batch_size, 0, dtype=torch.long, device=device),
            weights=saliency.new_zeros(batch_size, 0),
            valid=torch.zeros(batch_size, 0, dtype=torch.bool, device=device),
            visited=visited.clone(),
        )

    # Rank on a detached float32 key: unavailable columns get -inf so they sort behind every available one.
    # A stable sort (instead of topk) makes tie-breaking deterministic: lower column index first.
    key = saliency.detach().float().masked_fill(~available, float("-inf"))
    k_eff = min(k, num_columns)
    order = torch.sort(key, dim=-1, descending=True, stable=True).indices[:, :k_eff]
    valid = torch.gather(available, 1, order)
    # The columns of `order` are distinct (a sort's), so a plain scatter of `valid` marks exactly this step's picks.
    new_visited = visited | torch.zeros_like(visited).scatter_(1, order, valid)

    if k_eff < k:
        # k > N: the tail slots can never be filled.
        pad = k - k_eff
        order = torch.cat([order, order.new_zeros(batch_size, pad)], dim=1)
        valid = torch.cat([valid, valid.new_zeros(batch_size, pad)], dim=1)
    invalid = ~valid
    indices = order.masked_fill(invalid, 0)

    # Softmax over valid slots only, in float32. Invalid slots get the most negative finite logit rather
    # than -inf, so an all-invalid row gives a finite (uniform) softmax that the mask then zeroes: no NaN,
    # neither in the forward nor in the backward.
    selected = torch.gather(saliency, 1, indices).float()
    logits = selected.masked_fill(invalid, torch.finfo(torch.float32).min)
    weights = torch.softmax(logits, dim=-1) * valid
    if rescale:
        weights = weights * valid.sum(dim=-1, keepdim=True)
    weights = weights.to(saliency.dtype)

    return ReplaySelection(indices=indices, weights=weights, valid=valid, visited=new_visited)


def find_dense_window(selected_grid: torch.Tensor, window: int) -> Tuple[int, int, int, int, int]:
    """
    Finds the `window x window` window of a merged grid that contains the most selected cells.

    The window is clamped to the grid separately per axis, so on a `(G_h, G_w)` grid it is
    `min(window, G_h) x min(window, G_w)`. Window sums are computed for every top-left corner at once with an
    integral image. Ties: the first maximum in row-major order of the top-left corner wins.

    Args:
        selected_grid (`torch.Tensor` of shape `(G_h, G_w)`):
            Bool (selected or not) or integer counts per merged cell of one image.
        window (`int`):
            Window side `W >= 1`, in merged cells.

    Returns:
        `(row0, row1, col0, col1, count)`: python ints; the window covers rows `[row0, row1)` and columns
        `[col0, col1)` of the grid and holds `count` selected cells.
    """
    if selected_grid.dim() != 2:
        raise ValueError(f"selected_grid must be (G_h, G_w), got shape {tuple(selected_grid.shape)}")
    if window < 1:
        raise ValueError(f"window must be >= 1, got {window}")
    grid_h, grid_w = selected_grid.shape
    if grid_h == 0 or grid_w == 0:
        raise ValueError("selected_grid is empty")

    if selected_grid.is_floating_point():
        raise ValueError(f"selected_grid must be bool or integer counts, got {selected_grid.dtype}")
    grid = selected_grid.long()
    win_h, win_w = min(window, grid_h), min(window, grid_w)

    # integral[i, j] = sum of grid[:i, :j]; a leading zero row/column avoids special cases at the border.
    integral = F.pad(grid.cumsum(0).cumsum(1), (1, 0, 1, 0))
    # sums[r, c] = sum of grid[r:r + win_h, c:c + win_w], shape (G_h - win_h + 1, G_w - win_w + 1)
    sums = (
        integral[win_h:, win_w:]
        - integral[:-win_h, win_w:]
        - integral[win_h:, :-win_w]
        + integral[:-win_h, :-win_w]
    )
    # torch.argmax returns the first maximal index of the flattened (row-major) tensor.
    flat = int(torch.argmax(sums.reshape(-1)).item())
    row0, col0 = divmod(flat, sums.shape[1])
    count = sums.reshape(-1)[flat].item()
    return row0, row0 + win_h, col0, col0 + win_w, count



@dataclass
class VisualTokens:
    """
    Where each sample's visual tokens sit, from `visual_tokens`. `v` is the largest visual-token count of a sample.

    Args:
        columns (`torch.LongTensor` of shape `(batch_size, v)`): sequence column of each visual token, in order.
        valid (`torch.BoolTensor` of shape `(batch_size, v)`): real tokens (False past the sample's count).
        image, row, col (`torch.LongTensor` of shape `(batch_size, v)`): the token's image within its sample
            (-1 on padding) and its merged cell `(row, col)` on that image's grid.
        grids (`list[list[tuple[int, int]]]`): per sample, the merged grid `(G_h, G_w)` of each of its images.
    """

    columns: torch.LongTensor
    valid: torch.BoolTensor
    image: torch.LongTensor
    row: torch.LongTensor
    col: torch.LongTensor
    grids: List[List[Tuple[int, int]]]


def visual_tokens(is_image: torch.Tensor, image_grid_thw: Optional[torch.Tensor], merge_size: int) -> VisualTokens:
    """
    The visual tokens of each sample: `is_image` `(batch_size, l)` marks them (image slots that are not padding),
    `image_grid_thw` `(num_images, 3)` gives the patch grid of every image of the batch in order, `merge_size` the
    merger's side. Token i of an image with merged grid `(G_h, G_w)` sits at cell `divmod(i mod G_h G_w, G_w)`.
    """
    counts = is_image.sum(-1)
    width = int(counts.max()) if counts.numel() else 0
    order = torch.sort((~is_image).to(torch.int8), dim=-1, stable=True).indices[:, :width]
    valid = torch.arange(width, device=is_image.device)[None] < counts[:, None]
    image, row, col = torch.full_like(order, -1), torch.zeros_like(order), torch.zeros_like(order)
    grids = [[] for _ in range(is_image.shape[0])]
    if image_grid_thw is not None and width:
        image_iter = iter(image_grid_thw.tolist())
        for sample in range(is_image.shape[0]):  # loop over samples and images, not tokens
            offset, local = 0, 0
            while offset < int(counts[sample]):
                t, h, w = next(image_iter)
                gh, gw = h // merge_size, w // merge_size
                n = t * gh * gw
                index = torch.arange(n, device=is_image.device) % (gh * gw)
                image[sample, offset : offset + n] = local
                row[sample, offset : offset + n] = index // gw
                col[sample, offset : offset + n] = index % gw
                grids[sample].append((gh, gw))
                offset, local = offset + n, local + 1
    return VisualTokens(columns=order, valid=valid, image=image, row=row, col=col, grids=grids)


def dense_windows(indices: torch.Tensor, valid: torch.Tensor, visual: VisualTokens, window: int) -> list:
    """
    Per sample, `(image, row0, row1, col0, col1)` of the densest `window x window` window of its selected visual
    tokens (`indices` `(batch_size, k)` into `visual`'s tokens, `valid` `(batch_size, k)`), or None when nothing
    was selected. Across a sample's images the first image with the highest count wins.
    """
    windows = []
    for sample in range(indices.shape[0]):
        chosen = indices[sample][valid[sample]]
        best = None
        for image, (gh, gw) in enumerate(visual.grids[sample] if chosen.numel() else []):
            on_image = chosen[visual.image[sample, chosen] == image]
            if on_image.numel() == 0:
                continue
            grid = torch.zeros(gh, gw, dtype=torch.long, device=indices.device)
            grid[visual.row[sample, on_image], visual.col[sample, on_image]] = 1
            r0, r1, c0, c1, count = find_dense_window(grid, window)
            if best is None or count > best[1]:  # first maximum wins across images
                best = ((image, r0, r1, c0, c1), count)
        windows.append(best[0] if best else None)
    return windows


def window_to_pixel_box(
    window_rows: Sequence[int],
    window_cols: Sequence[int],
    grid_hw: Sequence[int],
    image_hw: Sequence[int],
) -> Tuple[int, int, int, int]:
    """
    Maps a window of an image's merged grid to a pixel box of the original image.

    The processor resized the original image to exactly `G_h x G_w` merged cells, so merged cell `(r, c)`
    covers rows `[r * H / G_h, (r + 1) * H / G_h)` and columns `[c * W / G_w, (c + 1) * W / G_w)` of the
    original. The box is rounded outward to whole pixels (exact integer arithmetic) and clamped to the image.

    Args:
        window_rows (`Sequence[int]`): `(row0, row1)`, window rows `[row0, row1)` of the merged grid.
        window_cols (`Sequence[int]`): `(col0, col1)`, window columns `[col0, col1)`.
        grid_hw (`Sequence[int]`): `(G_h, G_w)`, the merged grid (`image_grid_thw[1:] // merge_size`).
        image_hw (`Sequence[int]`): `(H, W)`, the original image size in pixels.

    Returns:
        `(top, left, bottom, right)` python ints: the crop is `image[:, top:bottom, left:right]`.
    """
    row0, row1 = (int(v) for v in window_rows)
    col0, col1 = (int(v) for v in window_cols)
    grid_h, grid_w = (int(v) for v in grid_hw)
    height, width = (int(v) for v in image_hw)
    if grid_h <= 0 or grid_w <= 0 or height <= 0 or width <= 0:
        raise ValueError(f"grid_hw {grid_hw} and image_hw {image_hw} must be positive")
    if not (row0 < row1 and col0 < col1):
        raise ValueError(f"empty window rows {window_rows} cols {window_cols}")

    def ceil_div(a: int, b: int) -> int:
        return -((-a) // b)

    top = min(max(row0 * height // grid_h, 0), height)
    bottom = min(max(ceil_div(row1 * height, grid_h), 0), height)
    left = min(max(col0 * width // grid_w, 0), width)
    right = min(max(ceil_div(col1 * width, grid_w), 0), width)
    return top, left, bottom, right


def crop_and_resize(
    image: torch.Tensor,
    box: Sequence[int],
    size: Sequence[int],
) -> torch.Tensor:
    """
    Crops `box` out of an original image and resizes it bilinearly (antialiased) to `size`.

    Args:
        image (`torch.Tensor` of shape `(3, H, W)`):
            The original image, uint8 in [0, 255] or float in [0, 1].
        box (`Sequence[int]`):
            `(top, left, bottom, right)` in pixels, as returned by `window_to_pixel_box`.
        size (`Sequence[int]`):
            `(h, w)` target size, e.g. the encoder's standard input resolution.

    Returns:
        `torch.FloatTensor` of shape `(3, h, w)`, float32 in [0, 1].
    """
    if image.dim() != 3:
        raise ValueError(f"image must be (C, H, W), got shape {tuple(image.shape)}")
    top, left, bottom, right = (int(v) for v in box)
    height, width = image.shape[-2:]
    top, left = max(top, 0), max(left, 0)
    bottom, right = min(bottom, height), min(right, width)
    if bottom <= top or right <= left:
        raise ValueError(f"empty crop box {tuple(box)} for an image of size {(height, width)}")
    out_h, out_w = (int(v) for v in size)

    if image.is_floating_point():
        pixels = image.to(torch.float32)
    else:
        pixels = image.to(torch.float32) / 255.0
    crop = pixels[:, top:bottom, left:right]
    resized = F.interpolate(
        crop.unsqueeze(0), size=(out_h, out_w), mode="bilinear", align_corners=False, antialias=True
    ).squeeze(0)
    # Antialiased bilinear is a convex combination, but rounding can step a hair outside [0, 1].
    return resized.clamp_(0.0, 1.0)


def patchify_images(
    images: torch.Tensor,
    patch_size: int,
    temporal_patch_size: int,
    merge_size: int,
    image_mean: Union[float, Sequence[float]],
    image_std: Union[float, Sequence[float]],
) -> Tuple[torch.Tensor, torch.LongTensor]:
    """
    Normalises and patchifies already-resized images exactly like `Qwen2VLImageProcessor` (transformers 5.x).

    Each image is repeated `temporal_patch_size` times along time (a still image is one temporal patch), then
    cut into `patch_size x patch_size` patches ordered merge-block by merge-block: merged cells in row-major
    order, and the `merge_size x merge_size` patches of one cell consecutive in row-major order. Each patch is
    flattened as `(channel, temporal, patch_row, patch_col)`.

    Args:
        images (`torch.Tensor` of shape `(num_images, channels, H, W)`):
            Float images in [0, 1]; `H` and `W` multiples of `patch_size * merge_size`.
        patch_size (`int`): Spatial patch size of the vision encoder (14 for Qwen2-VL).
        temporal_patch_size (`int`): Temporal patch size (2 for Qwen2-VL).
        merge_size (`int`): Spatial merge size of the merger (2 for Qwen2-VL).
        image_mean (`float` or `Sequence[float]`): Per-channel mean (processor's `image_mean`).
        image_std (`float` or `Sequence[float]`): Per-channel std (processor's `image_std`).

    Returns:
        `pixel_values` (`torch.FloatTensor` of shape `(num_images * grid_h * grid_w, C * T * P * P)`, float32)
        and `image_grid_thw` (`torch.LongTensor` of shape `(num_images, 3)`, rows `[1, grid_h, grid_w]` with
        `grid_h = H // patch_size`, i.e. in patches, not merged cells).
    """
    if images.dim() != 4:
        raise ValueError(f"images must be (num_images, C, H, W), got shape {tuple(images.shape)}")
    num_images, channels, height, width = images.shape
    factor = patch_size * merge_size
    if height % factor or width % factor:
        raise ValueError(f"image size {(height, width)} must be a multiple of patch_size * merge_size = {factor}")
    grid_h, grid_w = height // patch_size, width // patch_size

    pixels = images.to(torch.float32)
    mean = torch.as_tensor(image_mean, dtype=torch.float32, device=pixels.device).reshape(-1, 1, 1)
    std = torch.as_tensor(image_std, dtype=torch.float32, device=pixels.device).reshape(-1, 1, 1)
    pixels = (pixels - mean) / std

    patches = pixels.reshape(
        num_images,
        channels,
        grid_h // merge_size,
        merge_size,
        patch_size,
        grid_w // merge_size,
        merge_size,
        patch_size,
    )
    # (num_images, grid_h / merge, grid_w / merge, merge, merge, channel, patch, patch)
    patches = patches.permute(0, 2, 5, 3, 6, 1, 4, 7)
    # A still image fills every temporal slot with the same frame; the time axis sits between channel and
    # patch rows, so each patch vector is laid out (C, T, P, P).
    patches = patches.unsqueeze(6).expand(-1, -1, -1, -1, -1, -1, temporal_patch_size, -1, -1)
    pixel_values = patches.reshape(
        num_images * grid_h * grid_w, channels * temporal_patch_size * patch_size * patch_size
    )
    image_grid_thw = torch.tensor([1, grid_h, grid_w], dtype=torch.long, device=pixels.device).repeat(num_images, 1)
    return pixel_values, image_grid_thw
