"""Foundation: config validation, conversion equivalence, save/load round trip, remote code in a fresh process."""

import json
import os
import shutil
import subprocess
import sys
import textwrap

import pytest
import torch
from transformers import AutoProcessor

from conftest import ALL_BACKBONES, base_positions, load_vedas, make_inputs, perturb_vedas, quadrant_image
from vedas.configuration_vedas import Vedas3Config, Vedas25Config, VedasConfig
from vedas_trainer.checkpoint import (
    REMOTE_CODE_FILES,
    BACKBONES as CLASSES,
    CheckpointError,
    check_checkpoint_folder,
    convert_base,
    count_vedas_parameters,
    load_base,
)


PROCESSORS = {"qwen2_vl": "Qwen2VLProcessor", "qwen2_5_vl": "Qwen2_5_VLProcessor", "qwen3_vl": "Qwen3VLProcessor",
              "chameleon": "ChameleonProcessor"}
TEXT = {"num_hidden_layers": 4, "hidden_size": 64, "num_attention_heads": 4, "num_key_value_heads": 2}


@pytest.mark.parametrize(
    "settings, message",
    [
        ({"num_replay_tokens": -1}, "num_replay_tokens"),
        ({"routing_topk": 0}, "routing_topk"),
        ({"routing_topk": 1.5}, r"fraction .* \(0, 1\]"),
        ({"routing_topk": [64]}, "cosine schedule"),
        ({"routing_layers": [0, 7]}, r"\[7\] outside the 4 decoder layers"),
        ({"routing": "sideways"}, "routing='sideways'"),
        ({"replay_mode": "blend"}, "replay_mode"),
        ({"replay_positions": "shuffled"}, "replay_positions"),
        ({"max_depth": 0}, "max_depth"),
        ({"window_size": 0}, "window_size"),
        ({"crop_resolution": 30}, "multiple of"),
        ({"recon_weight": -1.0}, "recon_weight"),
    ],
)
@pytest.mark.parametrize("config_class", [VedasConfig, Vedas25Config, Vedas3Config])
def test_config_rejects_nonsense(config_class, settings, message):
    with pytest.raises(ValueError, match=message):
        config_class(text_config=TEXT, **settings)


def test_config_defaults_and_round_trip(tmp_path):
    config = VedasConfig(text_config=TEXT, routing_topk=[64, 16], num_replay_tokens=16)
    assert config.routing_layers == [0, 2]  # every other layer, 0-based, by default
    assert config.num_latent_steps == 4 and config.window_size == 3 and config.max_depth == 1
    # α(l) = round(α_e + (α_s - α_e)/2 (1 + cos(π l / L))): decays from α_s at l = 0
    assert [config.routing_topk_for_layer(layer) for layer in range(4)] == [64, 57, 40, 23]
    config.save_pretrained(tmp_path)
    loaded = VedasConfig.from_pretrained(tmp_path)
    assert loaded.model_type == "vedas"
    for name in ("routing_topk", "num_replay_tokens", "routing_layers", "image_mean", "routing"):
        assert getattr(loaded, name) == getattr(config, name)
    assert loaded.text_config.hidden_size == 64


@pytest.mark.parametrize("backbone", ALL_BACKBONES)
def test_converted_model_equals_base_and_round_trips(backbone, all_base_dirs, all_vedas_dirs, tmp_path):
    base, base_processor = load_base(all_base_dirs[backbone])
    model, processor = load_vedas(all_vedas_dirs[backbone])
    vocab = len(base_processor.tokenizer)
    images = [quadrant_image((112, 84), seed=3), quadrant_image((56, 112), seed=4)]
    inputs = make_inputs(processor, ["what colour is it ?", "which arrow ?"], images)
    assert not bool(inputs["attention_mask"].all())  # a padded batch
    inputs = {**inputs, **base_positions(model, inputs)}
    with torch.no_grad():
        expected = base.eval()(**inputs).logits
        got = model(**inputs).logits
    torch.testing.assert_close(got[..., :vocab], expected[..., :vocab], rtol=0, atol=0)

    # save -> load gives identical logits, also after the new modules moved away from their init
    perturb_vedas(model)
    with torch.no_grad():
        before = model(**inputs).logits
    model.save_pretrained(tmp_path)
    _, config_class, model_class = CLASSES[backbone]
    reloaded, info = model_class.from_pretrained(tmp_path, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    with torch.no_grad():
        after = reloaded.eval()(**inputs).logits
    torch.testing.assert_close(after, before, rtol=0, atol=0)


@pytest.mark.parametrize("backbone", ALL_BACKBONES)
def test_checkpoint_folder_is_complete(backbone, all_vedas_dirs):
    folder = all_vedas_dirs[backbone]
    assert check_checkpoint_folder(folder) == []
    config = json.loads((folder / "config.json").read_text())
    expected = f"{module_name(CLASSES[backbone][2])}.{CLASSES[backbone][2].__name__}"
    assert config["auto_map"]["AutoModel"] == config["auto_map"]["AutoModelForImageTextToText"] == expected
    processor = AutoProcessor.from_pretrained(folder, trust_remote_code=True)
    ids = [processor.tokenizer.convert_tokens_to_ids(t) for t in ("<|start_latent|>", "<|latent|>", "<|end_latent|>")]
    assert ids == [config["start_latent_token_id"], config["latent_token_id"], config["end_latent_token_id"]]
    card = (folder / "README.md").read_text()
    assert card.startswith("---\n") and "library_name: transformers" in card and "pipeline_tag: image-text-to-text" in card


def test_new_parameters_are_a_small_fraction(all_vedas_dirs):
    model, _ = load_vedas(all_vedas_dirs["qwen2_vl"])
    added = count_vedas_parameters(model)
    hidden, layers = model.config.text_config.hidden_size, model.config.routing_layers
    # one d->1 router (+ bias) and one D x d step embedding per routing layer, token_sr is d->d->d
    assert added == len(layers) * (hidden + 1 + hidden) + 2 * (hidden * hidden + hidden)


REMOTE_SCRIPT = textwrap.dedent(
    """
    import sys, json
    sys.path = [p for p in sys.path if p not in ("", ".")]
    try:
        import vedas
        raise SystemExit("the repository is importable: the check would prove nothing")
    except ImportError:
        pass
    import torch
    from PIL import Image
    from transformers import AutoModel, AutoModelForImageTextToText, AutoProcessor
    folder = sys.argv[1]
    model = AutoModel.from_pretrained(folder, trust_remote_code=True).eval()
    model2 = AutoModelForImageTextToText.from_pretrained(folder, trust_remote_code=True)
    processor = AutoProcessor.from_pretrained(folder, trust_remote_code=True)
    processor.tokenizer.padding_side = "left"
    if processor.chat_template is None:  # ChameleonProcessor does not load its own: the tokenizer's is the one
        processor.chat_template = processor.tokenizer.chat_template
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "what colour ?"}]}]
    text = processor.apply_chat_template(messages, add_generation_prompt=True)
    inputs = processor(text=[text], images=[Image.new("RGB", (56, 56), (200, 30, 30))], return_tensors="pt")
    out = model.generate(**inputs, num_latent_steps=2, max_new_tokens=3, do_sample=False)
    print(json.dumps({"module": type(model).__module__, "module2": type(model2).__module__,
                      "class": type(model).__name__, "new_tokens": out.shape[1] - inputs["input_ids"].shape[1],
                      "processor": type(processor).__name__}))
    """
)


@pytest.mark.parametrize("backbone", ALL_BACKBONES)
def test_remote_code_loads_in_a_fresh_process(backbone, all_vedas_dirs, tmp_path):
    folder = tmp_path / "checkpoint"
    shutil.copytree(all_vedas_dirs[backbone], folder)
    workdir = tmp_path / "elsewhere"
    workdir.mkdir()
    script = workdir / "load.py"
    script.write_text(REMOTE_SCRIPT)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(HF_HUB_OFFLINE="1", HF_MODULES_CACHE=str(tmp_path / "modules"), PYTHONNOUSERSITE="1")
    # hide the editable install of this repository: run with an isolated site that lacks the finder
    result = subprocess.run(
        [sys.executable, "-c", _WITHOUT_REPO_PREFIX + f"exec(open({str(script)!r}).read())", str(folder)],
        cwd=workdir, env=env, capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["module"].startswith("transformers_modules.")
    assert report["module"].endswith(module_name(CLASSES[backbone][2]))  # chameleon_vedas on Chameleon
    assert report["module2"] == report["module"]
    assert report["class"] == CLASSES[backbone][2].__name__
    assert report["new_tokens"] == 1 + 2 + 1 + 3  # start marker, 2 latents, end marker, 3 answer tokens
    assert report["processor"] == PROCESSORS[backbone]


def module_name(cls) -> str:
    """The remote-code file (without .py) that defines `cls`."""
    return cls.__module__.rpartition(".")[2]


# Remove the editable-install finders of `vedas`/`vedas_trainer` before anything is imported.
_WITHOUT_REPO_PREFIX = (
    "import sys\n"
    "sys.meta_path[:] = [f for f in sys.meta_path if 'editable' not in type(f).__module__.lower() "
    "and 'editable' not in repr(f).lower()]\n"
    "sys.path[:] = [p for p in sys.path if 'editable' not in p and '__editable__' not in p]\n"
)


def test_remote_code_files_import_only_torch_transformers_and_each_other(all_vedas_dirs):
    allowed = {"torch", "transformers", "math", "dataclasses", "typing", "warnings", "__future__"}
    for name in REMOTE_CODE_FILES:
        source = (all_vedas_dirs["qwen2_vl"] / name).read_text()
        for line in source.splitlines():
            stripped = line.strip()
            if stripped.startswith(("import ", "from ")) and not stripped.startswith("from ."):
                module = stripped.split()[1].split(".")[0]
                assert module in allowed, f"{name} imports {module!r}"


def test_convert_refuses_non_qwen_folder_and_existing_output(tmp_path, all_base_dirs):
    (tmp_path / "llama").mkdir()
    (tmp_path / "llama" / "config.json").write_text(json.dumps({"model_type": "llama"}))
    with pytest.raises(CheckpointError, match="model_type='llama'"):
        convert_base(tmp_path / "llama", tmp_path / "out")
    with pytest.raises(CheckpointError, match="no config.json"):
        convert_base(tmp_path, tmp_path / "out2")
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "file.txt").write_text("keep me")
    with pytest.raises(FileExistsError, match="overwrite"):
        convert_base(all_base_dirs["qwen2_vl"], tmp_path / "busy")
    assert (tmp_path / "busy" / "file.txt").read_text() == "keep me"


def test_corrupt_safetensors_gives_a_clear_error(tmp_path, all_base_dirs):
    broken = tmp_path / "broken"
    shutil.copytree(all_base_dirs["qwen2_vl"], broken)
    weights = broken / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])  # truncated
    with pytest.raises(CheckpointError, match="model.safetensors"):
        convert_base(broken, tmp_path / "out")


def test_the_package_exports_every_backbone_lazily():
    """`vedas.<name>` gives each backbone's config and model class (and the cache), imported on first access: the
    names of `__all__` are the classes of the remote-code modules."""
    import vedas
    from vedas import chameleon_vedas, configuration_vedas, modeling_vedas, routing_vedas

    modules = {"configuration_vedas": configuration_vedas, "modeling_vedas": modeling_vedas,
               "routing_vedas": routing_vedas, "chameleon_vedas": chameleon_vedas}
    for name in ("Vedas3Config", "Vedas3ForConditionalGeneration", "Vedas25Config", "VedasCache"):
        assert name in vedas.__all__
    for name, module in vedas._EXPORTS.items():
        assert getattr(vedas, name) is getattr(modules[module], name), name
    assert vedas.Vedas3ForConditionalGeneration.config_class is vedas.Vedas3Config
