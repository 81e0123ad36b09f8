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
# and the crop side must be a multiple of 32 (56 is two Qwen2-VL cells of 28).
BACKBONE_OVERRIDES = {
    "qwen2_vl": TEST_OVERRIDES,
    "qwen2_5_vl": TEST_OVERRIDES,
    "qwen3_vl": {**TEST_OVERRIDES, "crop_resolution": 64},
}
# Every backbone: the equivalence, property and compatibility tests run over these (`all_base_dirs` /
# `all_vedas_dirs`). `BACKBONES` are the two the rest of the suite runs on (`base_dirs` / `vedas_dirs`).
ALL_BACKBONES = tuple(BACKBONE_OVERRIDES)
BACKBONES = ("qwen2_vl", "qwen2_5_vl")


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
