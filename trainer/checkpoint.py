"""Vedas checkpoints: convert a Qwen2-VL / Qwen2.5-VL base, and save a complete Hub-ready folder.

A Vedas checkpoint folder holds `config.json` (with an `auto_map` for AutoConfig, AutoModel and
AutoModelForImageTextToText), the remote-code files, `model.safetensors`, the processor and tokenizer files, and a
`README.md` model card rendered from `MODEL_CARD.md`.
"""

import dataclasses
import json
import logging
import os
import shutil
from pathlib import Path

import torch
from jinja2 import Template
from safetensors import SafetensorError
from transformers import AutoProcessor, Qwen2_5_VLForConditionalGeneration, Qwen2VLForConditionalGeneration

import vedas
from vedas.configuration_vedas import SPECIAL_TOKENS, Vedas25Config, VedasConfig, VedasSettings
from vedas.modeling_vedas import Vedas25ForConditionalGeneration, VedasForConditionalGeneration


logger = logging.getLogger(__name__)

PACKAGE_DIR = Path(vedas.__file__).resolve().parent
REMOTE_CODE_FILES = ("configuration_vedas.py", "modeling_vedas.py", "routing_vedas.py", "replay_vedas.py")
MODEL_CARD_TEMPLATE = PACKAGE_DIR / "MODEL_CARD.md"
# base model_type -> (base class, Vedas config class, Vedas model class)
BACKBONES = {
    "qwen2_vl": (Qwen2VLForConditionalGeneration, VedasConfig, VedasForConditionalGeneration),
    "qwen2_5_vl": (Qwen2_5_VLForConditionalGeneration, Vedas25Config, Vedas25ForConditionalGeneration),
}
VEDAS_MODULE_KEYS = ("depth_router", "depth_step_embed", "token_sr")
# The special-token strings and ids are assigned by the conversion itself (it adds the tokens to the tokenizer
# and records their ids); overriding them would make config and tokenizer disagree.
CONVERSION_OWNED = {f.name for f in dataclasses.fields(VedasSettings) if f.name.endswith(("_token", "_token_id"))}
OVERRIDABLE = tuple(f.name for f in dataclasses.fields(VedasSettings) if f.name not in CONVERSION_OWNED)


class CheckpointError(ValueError):
    """A checkpoint folder is missing, incomplete, corrupt or of the wrong kind."""


def auto_map(model) -> dict[str, str]:
    config_name, model_name = type(model.config).__name__, type(model).__name__
    return {
        "AutoConfig": f"configuration_vedas.{config_name}",
        "AutoModel": f"modeling_vedas.{model_name}",
        "AutoModelForImageTextToText": f"modeling_vedas.{model_name}",
    }


def render_model_card(context: dict | None = None) -> str:
    """Fill MODEL_CARD.md (a jinja2 template with Hub YAML metadata) with the run's facts."""
    context = {"base_model": None, "backbone": None, "setup": None, "results": None, **(context or {})}
    return Template(MODEL_CARD_TEMPLATE.read_text()).render(**context)


def save_vedas_checkpoint(model, processor, out_dir, card_context: dict | None = None) -> Path:
    """Write a complete, self-contained Vedas checkpoint folder (loadable with trust_remote_code)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    model.config.auto_map = auto_map(model)
    model.config.architectures = [type(model).__name__]
    model.save_pretrained(out_dir, safe_serialization=True)
    processor.save_pretrained(out_dir)
    for name in REMOTE_CODE_FILES:
        shutil.copy2(PACKAGE_DIR / name, out_dir / name)
    context = {"backbone": model.config.model_type, **(card_context or {})}
    (out_dir / "README.md").write_text(render_model_card(context))
    return out_dir


def _read_base_config(base_dir: Path) -> dict:
    config_path = base_dir / "config.json"
    if not base_dir.is_dir():
        raise CheckpointError(f"Base checkpoint folder {str(base_dir)!r} does not exist.")
    if not config_path.is_file():
        raise CheckpointError(f"{str(base_dir)!r} has no config.json: it is not a Qwen2-VL/Qwen2.5-VL checkpoint.")
    try:
        config = json.loads(config_path.read_text())
    except json.JSONDecodeError as err:
        raise CheckpointError(f"{str(config_path)!r} is not valid JSON: {err}") from err
    model_type = config.get("model_type")
    if model_type not in BACKBONES:
        raise CheckpointError(
            f"{str(base_dir)!r} has model_type={model_type!r}; Vedas converts only Qwen2-VL ('qwen2_vl') and "
            f"Qwen2.5-VL ('qwen2_5_vl') checkpoints."
        )
    return config


def load_base(base_dir, dtype=None):
    """Load a base checkpoint with its own class (so legacy key layouts are renamed); clear errors on corruption."""
    base_dir = Path(base_dir)
    model_type = _read_base_config(base_dir)["model_type"]
    base_class = BACKBONES[model_type][0]
    try:
        model = base_class.from_pretrained(base_dir, dtype=dtype or "auto")
    except (SafetensorError, OSError, RuntimeError, ValueError) as err:
        weights = sorted(p.name for p in base_dir.glob("*.safetensors")) or ["(no *.safetensors file)"]
        raise CheckpointError(f"Could not load the weights of {str(base_dir)!r} ({', '.join(weights)}): {err}") from err
    try:
        processor = AutoProcessor.from_pretrained(base_dir)
    except (OSError, ValueError, TypeError) as err:
        raise CheckpointError(f"Could not load the processor/tokenizer files of {str(base_dir)!r}: {err}") from err
    return model, processor


def check_overrides(overrides: dict) -> None:
    """Refuse unknown (e.g. misspelled) or conversion-owned VedasConfig fields, listing the valid ones."""
    for key in overrides:
        if key not in OVERRIDABLE:
            hint = " (assigned by the conversion)" if key in CONVERSION_OWNED else ""
            raise ValueError(f"unknown VedasConfig field {key!r}{hint}. Valid fields: {', '.join(OVERRIDABLE)}.")


def add_special_tokens(processor, embedding_rows: int) -> dict[str, int]:
    """Add the latent tokens to the tokenizer; returns `{name: id}`. Ids below `embedding_rows` reuse spare rows."""
    tokenizer = processor.tokenizer
    tokenizer.add_tokens(list(SPECIAL_TOKENS.values()), special_tokens=True)
    ids = {name: tokenizer.convert_tokens_to_ids(token) for name, token in SPECIAL_TOKENS.items()}
    if any(i is None or i == tokenizer.unk_token_id for i in ids.values()):
        raise CheckpointError(f"The tokenizer could not add the Vedas tokens: {ids}")
    return ids


def convert_base(base_dir, out_dir, overrides: dict | None = None, overwrite: bool = False, card_context=None):
    """Turn a base Qwen2-VL / Qwen2.5-VL checkpoint into a Vedas checkpoint folder. Returns `(model, processor)`.

    `overrides` sets any `VedasConfig` field (e.g. `{"num_replay_tokens": 16, "routing_topk": 8}`).
    """
    base_dir, out_dir = Path(base_dir), Path(out_dir)
    check_overrides(overrides or {})
    if out_dir.exists() and any(out_dir.iterdir()) and not overwrite:
        raise FileExistsError(f"Output folder {str(out_dir)!r} exists and is not empty; pass overwrite=True (--overwrite).")
    base, processor = load_base(base_dir)
    _, config_class, model_class = BACKBONES[base.config.model_type]

    rows = base.get_input_embeddings().weight.shape[0]
    old_vocab = len(processor.tokenizer)
    ids = add_special_tokens(processor, rows)
    settings = base.config.to_dict()
    settings.pop("model_type", None)
    settings.pop("architectures", None)
    settings.pop("auto_map", None)
    settings.update({f"{name}_token_id": i for name, i in ids.items()})
    image_processor = processor.image_processor
    settings["image_mean"] = list(getattr(image_processor, "image_mean", None) or settings.get("image_mean", []) or [])
    settings["image_std"] = list(getattr(image_processor, "image_std", None) or settings.get("image_std", []) or [])
    if len(settings["image_mean"]) != 3:
        settings.pop("image_mean")
        settings.pop("image_std")
    settings.update(overrides or {})
    config = config_class(**settings)
    if max(ids.values()) >= rows:  # no spare rows left: grow the embeddings (multiple of 64, like Qwen)
        rows = (max(ids.values()) + 64) // 64 * 64
        base.resize_token_embeddings(rows, mean_resizing=False)
        config.text_config.vocab_size = rows

    model = model_class(config).to(base.dtype)
    missing, unexpected = model.load_state_dict(base.state_dict(), strict=False)
    missing = [k for k in missing if not any(part in k for part in VEDAS_MODULE_KEYS)]
    if missing or unexpected:
        raise CheckpointError(f"Base weights do not fit Vedas: missing {missing[:5]}, unexpected {unexpected[:5]}")
    with torch.no_grad():  # new token rows start at the mean embedding of the original vocabulary
        new_rows = torch.tensor(sorted(ids.values()))
        for matrix in {model.get_input_embeddings().weight, model.get_output_embeddings().weight}:
            matrix[new_rows] = matrix[:old_vocab].mean(0)
    model.generation_config = base.generation_config
    model.generation_config.pad_token_id = model.generation_config.pad_token_id or processor.tokenizer.pad_token_id
    # the card's base_model must be a Hub repo id (a local folder name is not one)
    context = {"base_model": hub_repo_id(base_dir), **(card_context or {})}
    if out_dir.exists() and overwrite:
        shutil.rmtree(out_dir)
    save_vedas_checkpoint(model.eval(), processor, out_dir, card_context=context)
    logger.info("Converted %s -> %s (%d new parameters)", base_dir, out_dir, count_vedas_parameters(model))
    return model, processor


def hub_repo_id(folder) -> str | None:
    """The Hub repo id of a folder from the HF cache (`.../models--Org--Name/snapshots/<hash>`), else None."""
    for part in Path(folder).resolve().parts[::-1]:
        if part.startswith("models--") and part.count("--") >= 2:
            return part[len("models--") :].replace("--", "/", 1)
    return None


def is_vedas_checkpoint(folder) -> bool:
    config = Path(folder) / "config.json"
    return config.is_file() and json.loads(config.read_text()).get("model_type", "").startswith("vedas")


def load_vedas(folder, **overrides):
    """Load a Vedas checkpoint with this package's classes (any config field can be overridden) and its processor,
    set up for left padding."""
    folder = Path(folder)
    model_type = json.loads((folder / "config.json").read_text())["model_type"]
    _, config_class, model_class = BACKBONES["qwen2_vl" if model_type == "vedas" else "qwen2_5_vl"]
    config = config_class.from_pretrained(folder, **overrides)
    model = model_class.from_pretrained(folder, config=config).eval()
    processor = AutoProcessor.from_pretrained(folder, trust_remote_code=True)
    processor.tokenizer.padding_side = "left"
    return model, processor


def count_vedas_parameters(model) -> int:
    return sum(p.numel() for n, p in model.named_parameters() if any(k in n for k in VEDAS_MODULE_KEYS))


def check_checkpoint_folder(folder) -> list[str]:
    """Names of what a complete Vedas checkpoint folder lacks (empty list if complete)."""
    folder = Path(folder)
    required = ["config.json", "model.safetensors", "README.md", "tokenizer.json", "tokenizer_config.json",
                *REMOTE_CODE_FILES]
    missing = [name for name in required if not (folder / name).is_file()]
    if not any((folder / n).is_file() for n in ("processor_config.json", "preprocessor_config.json")):
        missing.append("processor_config.json or preprocessor_config.json")
    if (folder / "config.json").is_file():
        config = json.loads((folder / "config.json").read_text())
        for key in ("AutoConfig", "AutoModel", "AutoModelForImageTextToText"):
            if key not in config.get("auto_map", {}):
                missing.append(f"config.json auto_map[{key!r}]")
    return missing


__all__ = ["convert_base", "save_vedas_checkpoint", "check_checkpoint_folder", "render_model_card", "CheckpointError"]
