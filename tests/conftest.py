"""Shared fixtures: tiny base checkpoints of every backbone, built offline when first asked for, and their Vedas
conversions, plus multimodal inputs."""

import os
import sys
from pathlib import Path

# The suite runs offline (docs/security.md). The variables are set before anything imports huggingface_hub,
# transformers or datasets, which read them at import time, and child processes inherit them.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

# The socket guard: offline_site/ holds offline_guard.py and a sitecustomize.py that installs it. Prepending the
# folder to PYTHONPATH makes every child Python process of the session (examples/*.py, accelerate/torchrun workers)
# install it at start-up; pytest_configure installs it here, before collection.
OFFLINE_SITE = str(Path(__file__).resolve().parent / "offline_site")
if OFFLINE_SITE not in os.environ.get("PYTHONPATH", "").split(os.pathsep):
    os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (OFFLINE_SITE, os.environ.get("PYTHONPATH")) if p)
sys.path.insert(0, OFFLINE_SITE)
import offline_guard  # noqa: E402

import pytest
import torch

from vedas_trainer.checkpoint import convert_base, load_vedas  # noqa: F401 (re-exported for the tests)
from vedas_trainer.testing import (  # noqa: F401 (for the tests)
    answer_log_probs, make_inputs, no_eos, perturb_vedas, quadrant_image, two_prompts,
)
from vedas_trainer.tiny_base import build_tiny_base


def pytest_configure(config):
    offline_guard.install()


def pytest_unconfigure(config):
    offline_guard.uninstall()


# small K and α so that the tiny inputs exercise "fewer tokens than asked" and real selections
TEST_OVERRIDES = {"num_replay_tokens": 4, "routing_topk": 6, "crop_resolution": 56, "num_latent_steps": 2}
# backbone -> its conversion settings in the tests. Qwen3-VL cuts 16-pixel patches, so its merged cell is 32 pixels
# and the crop side must be a multiple of 32 (56 is two Qwen2-VL cells of 28). Chameleon's cell is one VQ code, 4
# pixels in the tiny base: a crop of 16 is re-encoded into 4 x 4 codes.
BACKBONE_OVERRIDES = {
    "qwen2_vl": TEST_OVERRIDES,
    "qwen2_5_vl": TEST_OVERRIDES,
    "qwen3_vl": {**TEST_OVERRIDES, "crop_resolution": 64},
    "chameleon": {**TEST_OVERRIDES, "crop_resolution": 16},
}
# Every backbone: the equivalence, property and compatibility tests run over these (`all_base_dirs` /
# `all_vedas_dirs`). `BACKBONES` are the two the rest of the suite runs on (`base_dirs` / `vedas_dirs`).
ALL_BACKBONES = tuple(BACKBONE_OVERRIDES)
BACKBONES = ("qwen2_vl", "qwen2_5_vl")


# ------------------------------------------------------------------------------ what differs between backbones
# The shared tests build some inputs by hand (latent layouts, teacher-forced references, image subsets). The Qwen
# processors give M-RoPE inputs (`image_grid_thw`, `mm_token_type_ids`) and one `pixel_values` row per patch;
# Chameleon's gives `pixel_values` alone, one `(3, S, S)` image per row (its images are VQ codes of the vocabulary,
# with 1-D positions). These helpers are the one place the tests read that difference from.
def is_chameleon(model) -> bool:
    return model.config.model_type in ("chameleon", "vedas_chameleon")


def image_args(model, inputs) -> dict:
    """`pixel_values`, `image_grid_thw` and `mm_token_type_ids` of processor `inputs`, for a Vedas `model`'s forward.
    Where the processor gives no grid or token types (Chameleon), they are derived as the model derives them when
    they are missing: the VQ grid `(1, G, G)` per image and the image-token mask."""
    pixels, grid, types = (inputs.get(key) for key in ("pixel_values", "image_grid_thw", "mm_token_type_ids"))
    if pixels is not None and grid is None:
        grid = model._vq_grid(pixels)
    if types is None:
        types = (inputs["input_ids"] == model.config.image_token_id).int()
    return {"pixel_values": pixels, "image_grid_thw": grid, "mm_token_type_ids": types}


def with_image_args(model, inputs) -> dict:
    """Processor `inputs` with `image_args` filled in (what `answer_log_probs` and `eager_saliency` read)."""
    return {**inputs, **image_args(model, inputs)}


def select_images(inputs, images: slice) -> dict:
    """`pixel_values` and `image_grid_thw` of the images `images` (in prompt order) of processor `inputs`: a Qwen
    image is `grid.prod()` rows of patches, a Chameleon image one row (and no grid)."""
    pixels, grid = inputs["pixel_values"], inputs.get("image_grid_thw")
    if grid is None:
        return {"pixel_values": pixels[images]}
    ends = grid.prod(-1).cumsum(0).tolist()
    starts = [0, *ends[:-1]]
    rows = torch.cat([torch.arange(starts[i], ends[i]) for i in range(len(ends))[images]])
    return {"pixel_values": pixels[rows], "image_grid_thw": grid[images]}


def base_positions(model, inputs) -> dict:
    """Extra arguments for plain forwards of a base model and of its Vedas conversion compared on the same inputs:
    Chameleon's own forward numbers left padding like tokens (its `generate` does not, nor does the Vedas forward),
    so on a padded batch both are given positions that count the real tokens. Without padding, and on the Qwen
    models (which derive theirs from the mask alike), nothing is added."""
    if not is_chameleon(model) or bool(inputs["attention_mask"].all()):
        return {}
    return {"position_ids": (inputs["attention_mask"].cumsum(-1) - 1).clamp(min=0)}


def vision_tower(model):
    """The module whose forward encodes the images: the Qwen vision tower, Chameleon's VQ encoder (the VQ-VAE itself
    is only called through its `encode`)."""
    return model.model.vqmodel.encoder if is_chameleon(model) else model.model.visual


class _Checkpoints:
    """The session's tiny checkpoints, each built the first time a test asks for it: `base(b)` a tiny base
    (plain transformers model + processor), `vedas(b)` its conversion with `BACKBONE_OVERRIDES[b]`."""

    def __init__(self, root: Path):
        self.root = root

    def base(self, backbone: str) -> Path:
        folder = self.root / "base" / backbone
        if not (folder / "config.json").is_file():
            build_tiny_base(backbone, str(folder), seed=0)
        return folder

    def vedas(self, backbone: str) -> Path:
        folder = self.root / "vedas" / backbone
        if not (folder / "config.json").is_file():
            convert_base(self.base(backbone), folder, overrides=BACKBONE_OVERRIDES[backbone])
        return folder


@pytest.fixture(scope="session")
def checkpoints(tmp_path_factory) -> _Checkpoints:
    return _Checkpoints(tmp_path_factory.mktemp("checkpoints"))


@pytest.fixture(scope="session")
def base_dirs(checkpoints):
    """backbone -> folder of a tiny base checkpoint, for `BACKBONES`."""
    return {backbone: checkpoints.base(backbone) for backbone in BACKBONES}


@pytest.fixture(scope="session")
def vedas_dirs(checkpoints):
    """backbone -> folder of the converted (untrained) Vedas checkpoint, for `BACKBONES`."""
    return {backbone: checkpoints.vedas(backbone) for backbone in BACKBONES}


@pytest.fixture(scope="session")
def all_base_dirs(checkpoints):
    """`base_dirs` for every backbone (`ALL_BACKBONES`)."""
    return {backbone: checkpoints.base(backbone) for backbone in ALL_BACKBONES}


@pytest.fixture(scope="session")
def all_vedas_dirs(checkpoints):
    """`vedas_dirs` for every backbone (`ALL_BACKBONES`)."""
    return {backbone: checkpoints.vedas(backbone) for backbone in ALL_BACKBONES}


@pytest.fixture
def hub_calls(monkeypatch):
    """Intercept the Hub at huggingface_hub's HfApi: record every call, upload nothing. The session is offline
    (HF_HUB_OFFLINE=1), so the fixture also switches huggingface_hub to online mode, as on a machine with network:
    everything up to the HfApi call runs for real."""
    import huggingface_hub
    from huggingface_hub import HfApi

    calls = []

    def recorder(name):
        def record(self, *args, **kwargs):
            calls.append((name, args, kwargs))
            return f"https://huggingface.co/{kwargs.get('repo_id') or args[0]}"
        return record

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    for name in ("create_repo", "upload_folder", "upload_file", "create_commit"):
        monkeypatch.setattr(HfApi, name, recorder(name))
    return calls
