"""Vedas checkpoints: convert a Qwen2-VL / Qwen2.5-VL / Qwen3-VL / Chameleon base, and save a complete Hub-ready
folder.

A Vedas checkpoint folder holds `config.json` (with an `auto_map` for AutoConfig, AutoModel and
AutoModelForImageTextToText), the remote-code files, `model.safetensors`, the processor and tokenizer files, and a
`README.md` model card rendered from `MODEL_CARD.md`.
"""

import dataclasses
import json
import logging
import math
import os
import re
import shutil
from pathlib import Path

import torch
from huggingface_hub.errors import HFValidationError, StrictDataclassError
from huggingface_hub.utils import validate_repo_id
from jinja2 import Template
from safetensors import SafetensorError
from transformers import (
    AutoProcessor,
    ChameleonForConditionalGeneration,
    Qwen2_5_VLForConditionalGeneration,
    Qwen2VLForConditionalGeneration,
    Qwen3VLForConditionalGeneration,
)

import vedas
from vedas.chameleon_vedas import VedasChameleonConfig, VedasChameleonForConditionalGeneration
from vedas.configuration_vedas import SPECIAL_TOKENS, Vedas3Config, Vedas25Config, VedasConfig, VedasSettings
from vedas.modeling_vedas import (
    VEDAS_MODULES,
    Vedas3ForConditionalGeneration,
    Vedas25ForConditionalGeneration,
    VedasForConditionalGeneration,
)

from vedas.routing_vedas import DepthStepEmbedding

from .evaluation import DEFAULT_MAX_NEW_TOKENS


logger = logging.getLogger(__name__)

PACKAGE_DIR = Path(vedas.__file__).resolve().parent
REMOTE_CODE_FILES = ("configuration_vedas.py", "modeling_vedas.py", "routing_vedas.py", "replay_vedas.py")
# Vedas model_type -> the file of differences of a backbone whose classes live outside the shared files; a checkpoint
# of that backbone carries it too (and only such a checkpoint: every remote-code file a checkpoint holds is run)
BACKBONE_CODE_FILES = {"vedas_chameleon": ("chameleon_vedas.py",)}
ALL_REMOTE_CODE_FILES = REMOTE_CODE_FILES + tuple(name for files in BACKBONE_CODE_FILES.values() for name in files)
MODEL_CARD_TEMPLATE = PACKAGE_DIR / "MODEL_CARD.md"
# base model_type -> (base class, Vedas config class, Vedas model class)
BACKBONES = {
    "qwen2_vl": (Qwen2VLForConditionalGeneration, VedasConfig, VedasForConditionalGeneration),
    "qwen2_5_vl": (Qwen2_5_VLForConditionalGeneration, Vedas25Config, Vedas25ForConditionalGeneration),
    "qwen3_vl": (Qwen3VLForConditionalGeneration, Vedas3Config, Vedas3ForConditionalGeneration),
    "chameleon": (ChameleonForConditionalGeneration, VedasChameleonConfig, VedasChameleonForConditionalGeneration),
}
# Vedas model_type -> (config class, model class)
VEDAS_MODEL_TYPES = {config_class.model_type: (config_class, model_class) for _, config_class, model_class
                     in BACKBONES.values()}
VEDAS_MODULE_KEYS = VEDAS_MODULES  # the modules a base checkpoint lacks (one definition, in the model)
SAFE_WEIGHTS_NAME, SAFE_WEIGHTS_INDEX_NAME = "model.safetensors", "model.safetensors.index.json"
# Pickle-based weights run arbitrary code on load; a checkpoint that has only these is refused.
PICKLE_WEIGHTS_NAMES = ("pytorch_model.bin", "pytorch_model.bin.index.json")
PROCESSOR_CONFIG_NAMES = ("processor_config.json", "preprocessor_config.json")
# generation_config.json's max_new_tokens: the answer after the latent block (the latent steps are not counted),
# the budget evaluation gives latent mode
ANSWER_MAX_NEW_TOKENS = DEFAULT_MAX_NEW_TOKENS["latent"]
# The special-token strings and ids are assigned by the conversion itself (it adds the tokens to the tokenizer
# and records their ids); overriding them would make config and tokenizer disagree.
CONVERSION_OWNED = {f.name for f in dataclasses.fields(VedasSettings) if f.name.endswith(("_token", "_token_id"))}
OVERRIDABLE = tuple(f.name for f in dataclasses.fields(VedasSettings) if f.name not in CONVERSION_OWNED)


class CheckpointError(ValueError):
    """A checkpoint folder is missing, incomplete, corrupt or of the wrong kind."""


def remote_code_files(model_type: str | None) -> tuple[str, ...]:
    """The remote-code files a checkpoint of Vedas `model_type` carries: the shared ones and its backbone's own."""
    return REMOTE_CODE_FILES + BACKBONE_CODE_FILES.get(model_type, ())


def auto_map(model) -> dict[str, str]:
    # module.Class, the module being the remote-code file that defines the class (chameleon_vedas for Chameleon)
    config_name, model_name = (f"{type(obj).__module__.rpartition('.')[2]}.{type(obj).__name__}"
                               for obj in (model.config, model))
    return {"AutoConfig": config_name, "AutoModel": model_name, "AutoModelForImageTextToText": model_name}


def render_model_card(context: dict | None = None) -> str:
    """Fill MODEL_CARD.md (a jinja2 template with Hub YAML metadata) with the run's facts."""
    context = {"base_model": None, "base_note": None, "backbone": None, "setup": None, "results": None,
               **(context or {})}
    return Template(MODEL_CARD_TEMPLATE.read_text()).render(**context)


def card_base_model(base) -> tuple[str | None, str | None]:
    """What the model card says about the base a checkpoint came from: `(base_model, base_note)`.

    `base_model` is card metadata, which the Hub links to a model page, so it is only ever a Hub repo id: the id
    of a Hub snapshot folder (`.../models--Org--Name/snapshots/<hash>`), else a Hub id recorded in the folder's
    config.json `_name_or_path`, else None. A local folder without either gives `base_note`, a sentence for the
    card text naming the folder (by its name only: the card does not publish the machine's paths). A string that
    is not an existing path is taken as the Hub id it was given as.
    """
    if not base:
        return None, None
    text = str(base)
    path = Path(text).expanduser()
    if not path.exists():
        return (text, None) if is_hub_repo_id(text) else (None, None)
    repo_id = hub_repo_id(path)
    if repo_id is None and (path / "config.json").is_file():
        try:
            recorded = json.loads((path / "config.json").read_bytes()).get("_name_or_path")
        except (json.JSONDecodeError, UnicodeDecodeError, AttributeError):
            recorded = None
        if isinstance(recorded, str) and is_hub_repo_id(recorded) and not Path(recorded).expanduser().exists():
            repo_id = recorded
    if repo_id is not None:
        return repo_id, None
    return None, f"Base model: the local folder `{path.resolve().name}` (not a Hub snapshot, so no `base_model` link)."


def is_hub_repo_id(text: str) -> bool:
    """Whether `text` is a syntactically valid Hub model repo id (`name` or `namespace/name`)."""
    try:
        validate_repo_id(text)
    except HFValidationError:
        return False
    return True


def _write_checkpoint(model, processor, folder: Path, card_context: dict | None) -> None:
    """The files of a Vedas checkpoint, written into the (empty) `folder`."""
    model.config.auto_map = auto_map(model)
    model.config.architectures = [type(model).__name__]
    if model.generation_config.max_new_tokens is None:  # HF's fallback, max_length=20, counts the whole prompt
        model.generation_config.max_new_tokens = ANSWER_MAX_NEW_TOKENS
    model.save_pretrained(folder, safe_serialization=True)
    processor.save_pretrained(folder)
    for name in remote_code_files(model.config.model_type):
        shutil.copy2(PACKAGE_DIR / name, folder / name)
    context = {"backbone": model.config.model_type, **(card_context or {})}
    context["base_model"], note = card_base_model(context.get("base_model"))
    context["base_note"] = context.get("base_note") or note
    (folder / "README.md").write_text(render_model_card(context))


def save_vedas_checkpoint(model, processor, out_dir, card_context: dict | None = None) -> Path:
    """Write a complete, self-contained Vedas checkpoint folder (loadable with trust_remote_code), atomically.

    The files are written into `.<name>.partial` next to `out_dir`, which is then renamed to `out_dir` (an
    existing `out_dir` is moved aside first and removed after): a process killed mid-save leaves the previous
    folder or none, never a partial one. `card_context` fills MODEL_CARD.md; its `base_model` may be a local
    folder or a Hub id (see :func:`card_base_model`).
    """
    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staging, old = out_dir.parent / f".{out_dir.name}.partial", out_dir.parent / f".{out_dir.name}.replaced"
    for leftover in (staging, old):  # what a save killed earlier left behind
        if leftover.exists():
            shutil.rmtree(leftover)
    staging.mkdir()
    try:
        _write_checkpoint(model, processor, staging, card_context)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    if out_dir.exists():
        os.replace(out_dir, old)
    os.replace(staging, out_dir)
    shutil.rmtree(old, ignore_errors=True)
    return out_dir


def _read_config(folder: Path, kind: str) -> dict:
    """The parsed config.json of a checkpoint folder; CheckpointError naming the file if it is missing or broken."""
    config_path = folder / "config.json"
    if not folder.is_dir():
        raise CheckpointError(f"{kind} folder {str(folder)!r} does not exist.")
    if not config_path.is_file():
        raise CheckpointError(f"{str(folder)!r} has no config.json: it is not a {kind}.")
    try:
        config = json.loads(config_path.read_bytes())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise CheckpointError(f"{str(config_path)!r} is not valid JSON: {err}") from err
    if not isinstance(config, dict):
        raise CheckpointError(f"{str(config_path)!r} holds a JSON {type(config).__name__}, not an object.")
    return config


def _safetensors_header(path: Path) -> tuple[dict | None, int, str | None]:
    """(header, offset of the tensor data, None) or (None, 0, what is wrong), reading only the file's head."""
    size = path.stat().st_size
    with open(path, "rb") as file:
        prefix = file.read(8)
        if len(prefix) < 8:
            return None, 0, f"truncated: {size} bytes, too short for the 8-byte header length"
        header_length = int.from_bytes(prefix, "little")
        if header_length > size - 8:
            return None, 0, f"truncated or not safetensors: a {header_length}-byte header in a {size}-byte file"
        try:
            header = json.loads(file.read(header_length))
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            return None, 0, f"corrupt header: {err}"
    if not isinstance(header, dict):
        return None, 0, "corrupt header: not a JSON object"
    return header, 8 + header_length, None


def safetensors_problem(path) -> str | None:
    """What is wrong with a safetensors file, judged from its header and size alone (no tensor is read); None
    if it looks intact. Catches the common damage, an interrupted copy or download, before the loader fails
    with a message that names neither the file nor the cause."""
    path = Path(path)
    header, data_start, problem = _safetensors_header(path)
    if problem is not None:
        return problem
    data_end = 0
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        offsets = entry.get("data_offsets") if isinstance(entry, dict) else None
        if not (isinstance(offsets, list) and len(offsets) == 2 and all(isinstance(o, int) for o in offsets)):
            return f"corrupt header: tensor {name!r} has no valid data_offsets"
        data_end = max(data_end, offsets[1])
    size = path.stat().st_size
    if size < data_start + data_end:
        return f"truncated: {size} bytes, the header describes {data_start + data_end}"
    return None


def _weight_files(folder: Path) -> tuple[list[str], str | None]:
    """(safetensors file names the folder's weights consist of, None) or ([], what is wrong with the index)."""
    index = folder / SAFE_WEIGHTS_INDEX_NAME
    if not index.is_file():
        return [SAFE_WEIGHTS_NAME], None
    try:
        weight_map = json.loads(index.read_bytes())["weight_map"]
        return sorted(set(weight_map.values())), None
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError, AttributeError) as err:
        return [], f"a valid {SAFE_WEIGHTS_INDEX_NAME} (no readable weight_map: {type(err).__name__}: {err})"


def weights_problems(folder) -> list[str]:
    """What a folder lacks to load its weights from intact safetensors files (empty list if nothing).

    A sharded checkpoint (`model.safetensors.index.json`) must have every shard its index lists. A folder with
    only pickle weights (`pytorch_model.bin`) is refused: unpickling can run arbitrary code.
    """
    folder = Path(folder)
    indexed = (folder / SAFE_WEIGHTS_INDEX_NAME).is_file()
    if not indexed and not (folder / SAFE_WEIGHTS_NAME).is_file():
        pickled = [name for name in PICKLE_WEIGHTS_NAMES if (folder / name).is_file()]
        if pickled:
            return [f"{SAFE_WEIGHTS_NAME} (the folder has only {pickled[0]}; weights load from safetensors only, "
                    f"as unpickling can run arbitrary code: re-save with save_pretrained(safe_serialization=True))"]
        return [SAFE_WEIGHTS_NAME]
    files, problem = _weight_files(folder)
    if problem is not None:
        return [problem]
    problems = []
    for name in files:
        if not (folder / name).is_file():
            problems.append(f"{name} (listed in {SAFE_WEIGHTS_INDEX_NAME})" if indexed else name)
            continue
        problem = safetensors_problem(folder / name)
        if problem is not None:
            problems.append(f"an intact {name} ({problem})")
    return problems


# Config fields that set how many blocks the model builds, and the weight names that count those blocks. A
# corrupt count (say 10**12) is type-correct, so config validation accepts it, and building the model would
# then loop for hours instead of failing; the weights' own header says how many blocks there really are.
_BLOCK_COUNTS = (
    ("text_config.num_hidden_layers", re.compile(r"(?:^|\.)(?:language_model|model)\.layers\.(\d+)\.")),
    ("vision_config.depth", re.compile(r"(?:^|\.)visual\.blocks\.(\d+)\.")),
)


def _config_sections(config: dict) -> list[tuple[str, dict]]:
    """(prefix, dict) for the raw config and its text/vision sub-configs."""
    sections = [("", config)]
    for name in ("text_config", "vision_config"):
        if isinstance(config.get(name), dict):
            sections.append((f"{name}.", config[name]))
    return sections


# Backbone settings whose sign the config classes do not check and that turn every logit into NaN when not
# positive (a normalisation epsilon under a square root, the rotary base under a power).
_POSITIVE_FIELDS = ("rms_norm_eps", "layer_norm_eps", "rope_theta")


def _check_config_against_weights(folder: Path, config: dict) -> None:
    """Checks of the raw config.json against the weights' headers, before any config or model object is built.

    These are values that pass the config classes' type checks but break the build or the first forward far from
    their cause: a block count of 10**12 makes the model constructor loop for hours; a token id past the
    embedding fails at the first forward as an index error in torch (or a device-side assert on GPU); an unknown
    dtype name fails inside from_pretrained; a negative norm epsilon or rotary base loads fine and computes NaN.
    """
    names, rows = set(), None
    for file_name in _weight_files(folder)[0]:
        header, _, _ = _safetensors_header(folder / file_name)
        for name, entry in (header or {}).items():
            names.add(name)
            if name.endswith("embed_tokens.weight") and isinstance(entry, dict) and entry.get("shape"):
                rows = entry["shape"][0]
    config_path = str(folder / "config.json")
    for field, pattern in _BLOCK_COUNTS:
        section, key = field.split(".")
        declared = config[section].get(key) if isinstance(config.get(section), dict) else None
        if isinstance(declared, bool) or not isinstance(declared, int):
            continue  # absent (the class default applies) or mistyped (the config's own validation refuses it)
        found = {int(match.group(1)) for name in names if (match := pattern.search(name))}
        if found and declared != len(found):
            raise CheckpointError(
                f"{config_path!r}: {field}={declared!r}, but the weights hold {len(found)} "
                f"(indices {min(found)}-{max(found)}); config.json and the weights do not belong together."
            )
    for prefix, section in _config_sections(config):
        rope = section.get("rope_parameters")
        positive = [(key, section[key]) for key in _POSITIVE_FIELDS if key in section]
        if isinstance(rope, dict) and "rope_theta" in rope:
            positive.append(("rope_parameters.rope_theta", rope["rope_theta"]))
        for key, value in positive:
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < math.inf:
                raise CheckpointError(f"{config_path!r}: {prefix}{key}={value!r} must be a positive finite number.")
        for key, value in section.items():
            if key in ("dtype", "torch_dtype") and value is not None and value != "auto":
                if not isinstance(value, str) or not isinstance(getattr(torch, value, None), torch.dtype):
                    raise CheckpointError(f"{config_path!r}: {prefix}{key}={value!r} is not a torch dtype name.")
            if rows is not None and key.endswith("_token_id") and value is not None:
                ids = value if isinstance(value, list) else [value]
                if not all(isinstance(i, int) and not isinstance(i, bool) and 0 <= i < rows for i in ids):
                    raise CheckpointError(
                        f"{config_path!r}: {prefix}{key}={value!r} is not a token id of the {rows}-row embedding "
                        f"in the weights."
                    )


def _read_base_config(base_dir: Path) -> dict:
    config = _read_config(base_dir, "Qwen2-VL/Qwen2.5-VL/Qwen3-VL/Chameleon checkpoint")
    model_type = config.get("model_type")
    if model_type not in BACKBONES:
        raise CheckpointError(
            f"{str(base_dir)!r} has model_type={model_type!r}; Vedas converts only Qwen2-VL ('qwen2_vl'), "
            f"Qwen2.5-VL ('qwen2_5_vl'), Qwen3-VL ('qwen3_vl') and Chameleon ('chameleon') checkpoints."
        )
    return config


def load_base(base_dir, dtype=None):
    """Load a base checkpoint with its own class (so legacy key layouts are renamed); clear errors on corruption."""
    base_dir = Path(base_dir)
    config = _read_base_config(base_dir)
    base_class = BACKBONES[config["model_type"]][0]
    _check_weights(base_dir, config)
    model = _load_weights(base_class, base_dir, dtype=dtype or "auto")
    processor = _load_processor(base_dir)
    check_vocabulary(base_dir, model, processor)
    return model, processor


def _check_weights(folder: Path, config: dict) -> None:
    """Intact safetensors weights that fit the raw config; checked before anything is built."""
    problems = weights_problems(folder)
    if problems:
        raise CheckpointError(f"Cannot load the weights of {str(folder)!r}: missing {'; '.join(problems)}")
    _check_config_against_weights(folder, config)


# What building a model from a type-valid but nonsensical config raises (an unknown activation name, a head
# count that makes the rotary frequencies divide by zero, an attribute of the wrong kind...): at this point the
# config has passed its own checks, so any of these means "this checkpoint is broken", not a bug in the caller.
_BUILD_ERRORS = (
    SafetensorError, OSError, RuntimeError, ValueError, TypeError, KeyError, IndexError, AttributeError,
    ZeroDivisionError, AssertionError, StrictDataclassError,
)


def _load_weights(model_class, folder: Path, **kwargs):
    try:
        # use_safetensors=True: never fall back to a pickle file that happens to lie next to the safetensors
        return model_class.from_pretrained(folder, use_safetensors=True, **kwargs)
    except _BUILD_ERRORS as err:
        weights = ", ".join(_weight_files(folder)[0]) or "(no *.safetensors file)"
        raise CheckpointError(
            f"Could not build the model of {str(folder)!r} from its config.json and load its weights ({weights}): "
            f"{type(err).__name__}: {err}"
        ) from err


def _load_processor(folder: Path, **kwargs):
    """The folder's processor, or a CheckpointError naming the missing files. They are checked before loading
    because AutoProcessor's own errors point elsewhere: at the Hub ("make sure ... is the correct path to a
    directory containing a preprocessor_config.json") or at installing sentencepiece when tokenizer.json is gone."""
    missing = []
    if not any((folder / name).is_file() for name in PROCESSOR_CONFIG_NAMES):
        missing.append(" or ".join(PROCESSOR_CONFIG_NAMES))
    if not (folder / "tokenizer.json").is_file() and not (folder / "vocab.json").is_file():
        missing.append("tokenizer.json")
    if missing:
        raise CheckpointError(f"{str(folder)!r} lacks processor files: {', '.join(missing)}.")
    try:
        processor = AutoProcessor.from_pretrained(folder, **kwargs)
    except (OSError, ValueError, TypeError, KeyError, StrictDataclassError) as err:
        raise CheckpointError(f"Could not load the processor/tokenizer files of {str(folder)!r}: {err}") from err
    if getattr(processor, "image_processor", None) is None or getattr(processor, "tokenizer", None) is None:
        raise CheckpointError(f"{str(folder)!r}: {type(processor).__name__} is not an image-text processor.")
    if getattr(processor, "chat_template", None) is None:  # ChameleonProcessor does not load its own: the tokenizer's
        processor.chat_template = getattr(processor.tokenizer, "chat_template", None)
    if not (getattr(processor, "chat_template", None) or getattr(processor.tokenizer, "chat_template", None)):
        raise CheckpointError(f"{str(folder)!r} has no chat template (chat_template.jinja): prompts cannot be built.")
    return processor


def _token_id_fields(config) -> dict[str, object]:
    """Every `*_token_id` setting of a config and its text config (eos may be a list of ids)."""
    fields = {}
    for prefix, values in (("", config.to_dict()), ("text_config.", config.get_text_config().to_dict())):
        for key, value in values.items():
            if key.endswith("_token_id") and value is not None:
                fields[prefix + key] = value
    return fields


def check_vocabulary(folder, model, processor) -> None:
    """Refuse weights, config and tokenizer that disagree on the vocabulary.

    A token id at or past the embedding's rows fails only at the first forward, as an index error deep in
    torch (or a device-side assert on GPU); a Vedas token whose id in config.json is not the tokenizer's id
    trains the wrong rows without any error, a vision marker that differs fails at the first forward. All of
    these come from mixing files of different checkpoints.
    """
    weight = model.get_input_embeddings().weight
    rows = (getattr(weight, "ds_shape", None) or weight.shape)[0]  # ZeRO-3 holds a slice: its full shape
    tokenizer = processor.tokenizer
    where = str(folder)
    if len(tokenizer) > rows:
        raise CheckpointError(
            f"{where!r}: the tokenizer has {len(tokenizer)} tokens but the embedding has {rows} rows "
            f"(config.json text_config.vocab_size): ids >= {rows} cannot be embedded. Tokenizer and weights come "
            f"from different checkpoints."
        )
    for field, value in _token_id_fields(model.config).items():
        for token_id in value if isinstance(value, (list, tuple)) else [value]:
            if isinstance(token_id, bool) or not isinstance(token_id, int) or not 0 <= token_id < rows:
                raise CheckpointError(
                    f"{where!r}: config.json {field}={value!r} is not a token id of the {rows}-row embedding."
                )
    # The processor writes these tokens into every multimodal prompt and the model looks for the config's ids:
    # if they differ, no image position is found and the first forward fails far from the cause.
    for field, token in (("image_token_id", getattr(processor, "image_token", None)),
                         ("video_token_id", getattr(processor, "video_token", None)),
                         ("vision_start_token_id", "<|vision_start|>"), ("vision_end_token_id", "<|vision_end|>")):
        token_id = getattr(model.config, field, None)
        found = tokenizer.convert_tokens_to_ids(token) if isinstance(token, str) else None
        if token_id is not None and found is not None and found != tokenizer.unk_token_id and found != token_id:
            raise CheckpointError(
                f"{where!r}: config.json {field}={token_id} but the tokenizer maps {token!r} to {found}."
            )
    if not isinstance(model.config, tuple(config for config, _ in VEDAS_MODEL_TYPES.values())):
        return
    for name in SPECIAL_TOKENS:
        token, token_id = getattr(model.config, f"{name}_token"), getattr(model.config, f"{name}_token_id")
        if not isinstance(token, str) or not token:
            raise CheckpointError(f"{where!r}: config.json {name}_token={token!r} is not a token string.")
        if token_id is None:
            raise CheckpointError(
                f"{where!r}: config.json has no {name}_token_id: the folder was not written by convert_base."
            )
        found = tokenizer.convert_tokens_to_ids(token)
        if found != token_id:
            raise CheckpointError(
                f"{where!r}: config.json {name}_token_id={token_id} but the tokenizer maps {token!r} to {found}."
            )


def check_overrides(overrides: dict) -> None:
    """Refuse unknown (e.g. misspelled) or conversion-owned VedasConfig fields, listing the valid ones."""
    for key in overrides:
        if key not in OVERRIDABLE:
            hint = " (assigned by the conversion)" if key in CONVERSION_OWNED else ""
            raise ValueError(f"unknown VedasConfig field {key!r}{hint}. Valid fields: {', '.join(OVERRIDABLE)}.")


def add_special_tokens(processor) -> dict[str, int]:
    """Add the latent tokens to the tokenizer; returns `{name: id}`. The ids follow the tokenizer's vocabulary, so
    with a Qwen checkpoint's spare embedding rows they reuse those rows (`convert_base` resizes only if not)."""
    tokenizer = processor.tokenizer
    tokenizer.add_tokens(list(SPECIAL_TOKENS.values()), special_tokens=True)
    ids = {name: tokenizer.convert_tokens_to_ids(token) for name, token in SPECIAL_TOKENS.items()}
    if any(i is None or i == tokenizer.unk_token_id for i in ids.values()):
        raise CheckpointError(f"The tokenizer could not add the Vedas tokens: {ids}")
    return ids


def _vedas_from_base(base, model_class, config):
    """The Vedas model of `config` holding the base model's own tensors: one copy of the weights, not two.

    The Vedas model is built on the meta device (no storage), the base's parameters and buffers are assigned to it
    (`assign=True`: the same tensors, no copy), and only the modules a base lacks (`VEDAS_MODULE_KEYS`) get storage
    and are initialised as a freshly built model initialises them: in float32 by the backbone's `_init_weights`
    (routers and `token_sr` ~ N(0, initializer_range), zero biases, e(d) = `depth_gate_init`), then cast to the
    base's dtype. Building the Vedas model for real and copying the base into it held two full models at once
    (13.3 GiB for a 2-layer 7B geometry); the base object must not be used afterwards (its tensors are shared)."""
    with torch.device("meta"):
        model = model_class(config)
    missing, unexpected = model.load_state_dict(base.state_dict(), strict=False, assign=True)
    missing = [k for k in missing if not any(part in k for part in VEDAS_MODULE_KEYS)]
    if missing or unexpected:
        raise CheckpointError(f"Base weights do not fit Vedas: missing {missing[:5]}, unexpected {unexpected[:5]}")
    base_buffers = dict(base.named_buffers())
    for name, buffer in list(model.named_buffers()):  # non-persistent buffers (rotary tables) are no weights
        if buffer.is_meta:
            owner, _, leaf = name.rpartition(".")
            model.get_submodule(owner)._buffers[leaf] = base_buffers[name]
    model.tie_weights()  # assign=True gave tied matrices (tie_word_embeddings) one Parameter object each
    _init_new_modules(model, base.dtype, base.device)
    left = [name for name, tensor in [*model.named_parameters(), *model.named_buffers()] if tensor.is_meta]
    if left:
        raise CheckpointError(f"Base weights do not fit Vedas: nothing to load into {left[:5]}")
    return model


def _init_new_modules(model, dtype, device):
    """Storage and initial values for the modules a base checkpoint lacks (see `_vedas_from_base`), each
    initialised by the `_init_weights` of the model that owns it, as `initialize_weights` does on a new model:
    the text model's for the routing layers' modules, the Vedas model's (which also sets e(d)) for the rest."""
    text_model = model._text_model
    owned_by_text = {id(m) for m in text_model.modules()}
    with torch.no_grad():
        for name, module in list(model.named_modules()):
            if name.rpartition(".")[2] not in VEDAS_MODULE_KEYS:
                continue
            module.to_empty(device=device).float()
            owner = text_model if id(module) in owned_by_text else model
            for sub in module.modules():
                # e(d) is set by VedasMixin._init_weights only: the text model's does not know DepthStepEmbedding
                (model if isinstance(sub, DepthStepEmbedding) else owner)._init_weights(sub)
            module.to(dtype)


def convert_base(base_dir, out_dir, overrides: dict | None = None, overwrite: bool = False, card_context=None):
    """Turn a base Qwen2-VL / Qwen2.5-VL / Qwen3-VL / Chameleon checkpoint into a Vedas checkpoint folder. Returns
    `(model, processor)`.

    `base_dir` is a local folder or a Hub model id (resolved through the local HF cache, downloading it when
    online: :func:`vedas_trainer.hub.resolve_model_folder`). `overrides` sets any `VedasConfig` field (e.g.
    `{"num_replay_tokens": 16, "routing_topk": 8}`). It holds one copy of the weights: the returned model owns the
    loaded base's tensors (`_vedas_from_base`).
    """
    from .hub import resolve_model_folder  # hub imports this module

    out_dir = Path(out_dir)
    check_overrides(overrides or {})
    if out_dir.exists() and any(out_dir.iterdir()) and not overwrite:
        raise FileExistsError(f"Output folder {str(out_dir)!r} exists and is not empty; pass overwrite=True (--overwrite).")
    base_dir = resolve_model_folder(base_dir)
    base, processor = load_base(base_dir)
    _, config_class, model_class = BACKBONES[base.config.model_type]

    rows = base.get_input_embeddings().weight.shape[0]
    old_vocab = len(processor.tokenizer)
    ids = add_special_tokens(processor)
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

    model = _vedas_from_base(base, model_class, config)
    with torch.no_grad():  # new token rows start at the mean embedding of the original vocabulary
        new_rows = torch.tensor(sorted(ids.values()))
        for matrix in {model.get_input_embeddings().weight, model.get_output_embeddings().weight}:
            matrix[new_rows] = matrix[:old_vocab].mean(0)
    model.generation_config = base.generation_config
    model.generation_config.pad_token_id = model.generation_config.pad_token_id or processor.tokenizer.pad_token_id
    del base  # its tensors now belong to `model`
    # the card's base_model becomes a Hub repo id or is left out (card_base_model)
    context = {"base_model": base_dir, **(card_context or {})}
    save_vedas_checkpoint(model.eval(), processor, out_dir, card_context=context)
    logger.info("Converted %s -> %s (%d new parameters)", base_dir, out_dir, count_vedas_parameters(model))
    return model, processor


def hub_repo_id(folder) -> str | None:
    """The Hub repo id of a folder from the HF cache (`.../models--Org--Name/snapshots/<hash>`), else None."""
    for part in Path(folder).resolve().parts[::-1]:
        if part.startswith("models--") and part.count("--") >= 2:
            return part[len("models--") :].replace("--", "/", 1)
    return None


def vedas_config_class(backbone: str, base=None):
    """The Vedas config class for a base: the model_type in the config.json of a local `base` folder (a base or a
    Vedas checkpoint), else the tiny base's `backbone` (a Hub id is not read here). Unknown ones fall back to
    `backbone`'s; an unknown `backbone` is a one-line ValueError naming it."""
    model_type = None
    if base is not None and (Path(base).expanduser() / "config.json").is_file():
        try:
            model_type = _read_config(Path(base).expanduser(), "checkpoint").get("model_type")
        except CheckpointError:
            model_type = None
    if model_type in VEDAS_MODEL_TYPES:
        return VEDAS_MODEL_TYPES[model_type][0]
    if model_type in BACKBONES:
        return BACKBONES[model_type][1]
    if backbone not in BACKBONES:
        raise ValueError(f"backbone must be one of {tuple(BACKBONES)}, got {backbone!r}.")
    return BACKBONES[backbone][1]


def is_vedas_checkpoint(folder) -> bool:
    try:
        return _read_config(Path(folder), "Vedas checkpoint").get("model_type") in VEDAS_MODEL_TYPES
    except CheckpointError:
        return False


def load_vedas(folder, **overrides):
    """Load a Vedas checkpoint with this package's classes (any config field can be overridden) and its processor,
    set up for left padding.

    Weights load from safetensors only. Every problem is a `CheckpointError` naming the folder and the file or
    field: a missing or broken config.json, a model_type that is not Vedas, missing, truncated or pickle-only
    weights, missing processor files, a tokenizer or special-token ids that do not fit the embedding.

    A folder without the remote-code files (`modeling_vedas.py`, ...) loads, with a warning: this function builds
    the model from the installed package's classes and never runs code from the folder, so the files are not
    needed here (and a stale copy in the folder would not be used). Such a folder does not load with
    `AutoModel.from_pretrained(..., trust_remote_code=True)`, and `push_to_hub.py` refuses it.
    """
    folder = Path(folder)
    config_dict = _read_config(folder, "Vedas checkpoint")
    model_type = config_dict.get("model_type")
    if model_type not in VEDAS_MODEL_TYPES:
        raise CheckpointError(
            f"{str(folder / 'config.json')!r} has model_type={model_type!r}; a Vedas checkpoint has one of "
            f"{sorted(VEDAS_MODEL_TYPES)} (convert a Qwen2-VL/Qwen2.5-VL/Qwen3-VL/Chameleon base with "
            f"examples/convert_base.py)."
        )
    config_class, model_class = VEDAS_MODEL_TYPES[model_type]
    _check_weights(folder, config_dict)
    missing_code = [name for name in remote_code_files(model_type) if not (folder / name).is_file()]
    if missing_code:
        logger.warning(
            "%r lacks the remote-code files %s: loading it with the installed vedas classes, but AutoModel "
            "(trust_remote_code=True) and the Hub cannot load it; re-save it with save_vedas_checkpoint.",
            str(folder), ", ".join(missing_code),
        )
    try:
        config = config_class.from_pretrained(folder, **overrides)
    except (ValueError, TypeError, KeyError, IndexError, AttributeError, StrictDataclassError) as err:
        source = f"config.json with overrides {overrides}" if overrides else "config.json"
        raise CheckpointError(f"Invalid {source} in {str(folder)!r}: {err}") from err
    model = _load_weights(model_class, folder, config=config).eval()
    processor = _load_processor(folder, trust_remote_code=True)
    check_vocabulary(folder, model, processor)
    processor.tokenizer.padding_side = "left"
    return model, processor


def count_vedas_parameters(model) -> int:
    return sum(p.numel() for n, p in model.named_parameters() if any(k in n for k in VEDAS_MODULE_KEYS))


def check_checkpoint_folder(folder) -> list[str]:
    """What a complete Vedas checkpoint folder lacks (empty list if complete): missing files, and intact
    versions of broken ones ("an intact model.safetensors (truncated: ...)"). Reads only small files and the
    safetensors headers, so it is cheap enough to run before every push."""
    folder = Path(folder)
    required = ["config.json", "README.md", "tokenizer.json", "tokenizer_config.json", *REMOTE_CODE_FILES]
    missing = [name for name in required if not (folder / name).is_file()]
    missing += weights_problems(folder)
    if not any((folder / name).is_file() for name in PROCESSOR_CONFIG_NAMES):
        missing.append(" or ".join(PROCESSOR_CONFIG_NAMES))
    if (folder / "config.json").is_file():
        try:
            config = _read_config(folder, "Vedas checkpoint")
        except CheckpointError as err:
            return missing + [f"a valid config.json ({err})"]
        if config.get("model_type") not in VEDAS_MODEL_TYPES:
            missing.append(f"a Vedas model_type in config.json (one of {sorted(VEDAS_MODEL_TYPES)}, "
                           f"found {config.get('model_type')!r})")
        # the backbone's own file of differences (the shared files are in `required`)
        missing += [name for name in BACKBONE_CODE_FILES.get(config.get("model_type"), ())
                    if not (folder / name).is_file()]
        auto_map = config.get("auto_map")
        for key in ("AutoConfig", "AutoModel", "AutoModelForImageTextToText"):
            if not isinstance(auto_map, dict) or key not in auto_map:
                missing.append(f"config.json auto_map[{key!r}]")
    return missing


__all__ = [
    "convert_base", "save_vedas_checkpoint", "check_checkpoint_folder", "check_vocabulary", "load_vedas",
    "render_model_card", "safetensors_problem", "weights_problems", "CheckpointError",
]
