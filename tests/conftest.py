"""Shared fixtures: tiny base checkpoints built offline and their Vedas conversions, plus multimodal inputs."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest

from vedas_trainer.checkpoint import convert_base, load_vedas  # noqa: F401 (re-exported for the tests)
from vedas_trainer.testing import make_inputs, perturb_vedas, quadrant_image  # noqa: F401 (for the tests)
from vedas_trainer.tiny_base import build_tiny_base


BACKBONES = ("qwen2_vl", "qwen2_5_vl")
# small K and α so that the tiny inputs exercise "fewer tokens than asked" and real selections
TEST_OVERRIDES = {"num_replay_tokens": 4, "routing_topk": 6, "crop_resolution": 56, "num_latent_steps": 2}


@pytest.fixture(scope="session")
def base_dirs(tmp_path_factory):
    """backbone -> folder of a tiny base checkpoint (plain transformers model + processor)."""
    root = tmp_path_factory.mktemp("bases")
    dirs = {}
    for backbone in BACKBONES:
        build_tiny_base(backbone, str(root / backbone), seed=0)
        dirs[backbone] = root / backbone
    return dirs


@pytest.fixture(scope="session")
def vedas_dirs(base_dirs, tmp_path_factory):
    """backbone -> folder of the converted (untrained) Vedas checkpoint."""
    root = tmp_path_factory.mktemp("vedas")
    dirs = {}
    for backbone, base in base_dirs.items():
        convert_base(base, root / backbone, overrides=TEST_OVERRIDES)
        dirs[backbone] = root / backbone
    return dirs
