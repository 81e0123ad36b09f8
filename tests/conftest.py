"""Shared fixtures: tiny base checkpoints built offline and their Vedas conversions, plus multimodal inputs."""

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
