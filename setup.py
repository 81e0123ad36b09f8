"""Vedas: multimodal latent reasoning with visual replay and routing depth scaling.

Two import packages are installed from this repository:

* ``vedas``         -> the repository root: ``configuration_vedas.py``, ``modeling_vedas.py`` and the
                       helper modules they import. These flat files are also the remote code that every
                       checkpoint carries, so they import only each other, torch and transformers.
* ``vedas_trainer`` -> ``trainer/``: data, curriculum, collator, Trainer subclass, embedded task.
                       (A top-level ``trainer`` import would clash with an unrelated PyPI project.)
"""

import ast
from pathlib import Path

from setuptools import setup


def transformers_requirement() -> str:
    """`transformers>=5.22,<5.25` from `TRANSFORMERS_RANGE` in configuration_vedas.py, the range's one definition
    (read, not imported: transformers may not be installed yet)."""
    source = (Path(__file__).resolve().parent / "configuration_vedas.py").read_text()
    for node in ast.parse(source).body:
        if isinstance(node, ast.Assign) and getattr(node.targets[0], "id", None) == "TRANSFORMERS_RANGE":
            low, high = ast.literal_eval(node.value)
            major, minor = (int(part) for part in high.split(".")[:2])
            return f"transformers>={low},<{major}.{minor + 1}"
    raise RuntimeError("configuration_vedas.py defines no TRANSFORMERS_RANGE")

setup(
    name="vedas",
    version="0.1.0",
    description="Visual Enhanced Depth Scaling for multimodal latent reasoning (Qwen2-VL / Qwen2.5-VL)",
    long_description=__doc__,
    license="Apache-2.0",
    python_requires=">=3.10",
    package_dir={"vedas": ".", "vedas_trainer": "trainer"},
    packages=["vedas", "vedas_trainer"],
    package_data={"vedas": ["MODEL_CARD.md"]},
    install_requires=[
        "torch>=2.4",
        "torchvision>=0.19",
        transformers_requirement(),
        "accelerate>=1.10",
        "peft>=0.17",
        "datasets>=3.0",
        "evaluate>=0.4.3",
        "tokenizers>=0.21",
        "safetensors>=0.4",
        "huggingface_hub>=1.0",
        "pillow>=10.0",
        "matplotlib>=3.8",
        "tqdm>=4.66",
    ],
    extras_require={
        "test": ["pytest>=8", "hypothesis>=6.100", "tensorboard>=2.15"],
        # DeepSpeed compiles its ops at run time: ninja here, a C++ compiler from the system (.ci/run installs g++)
        "deepspeed": ["deepspeed>=0.16", "ninja"],
    },
)
