"""Shared fixtures: tiny base checkpoints built offline and their Vedas conversions, plus multimodal inputs."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest
import torch
from PIL import Image

from vedas_trainer.checkpoint import convert_base, load_vedas  # noqa: F401 (re-exported for the tests)
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


def perturb_vedas(model, seed=0, gate=0.5):
    """Give the new modules non-trivial values so that tests exercise them (e = 0 makes RDS a no-op)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "depth_step_embed" in name:
                param.copy_(gate + 0.1 * torch.randn(param.shape, generator=generator))
            elif "depth_router" in name:
                param.copy_(torch.randn(param.shape, generator=generator))
    return model


def quadrant_image(size=(112, 84), seed=0):
    """A deterministic RGB image with coloured blocks (different sizes give different grids)."""
    generator = torch.Generator().manual_seed(seed)
    w, h = size
    pixels = (torch.rand(h // 14 + 1, w // 14 + 1, 3, generator=generator) * 255).to(torch.uint8)
    pixels = pixels.repeat_interleave(14, 0).repeat_interleave(14, 1)[:h, :w]
    return Image.fromarray(pixels.numpy())


def make_inputs(processor, questions, images):
    """Processor inputs for a batch: each sample is one image (or a list of images) and a question."""
    texts, flat_images = [], []
    for question, sample_images in zip(questions, images):
        sample_images = sample_images if isinstance(sample_images, list) else [sample_images]
        content = [{"type": "image"} for _ in sample_images] + [{"type": "text", "text": question}]
        texts.append(processor.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True))
        flat_images.extend(sample_images)
    return processor(text=texts, images=flat_images or None, return_tensors="pt", padding=True)
