"""What is Qwen3-VL's own in Vedas (issue 15): DeepStack at the prompt's image positions only, replayed tokens that are
the merged visual embeddings at their original (interleaved M-RoPE) positions, the vision tower's 16-pixel patches
in the crop re-encoding, the tiny base and conversion command lines, and the quick training run under accelerate.

The equivalences every backbone shares (converted == base, cache == no cache, batch == singles, save -> load,
T = 0 == base generate, the properties, remote code in a fresh process) run on Qwen3-VL through the backbone lists
of test_foundation, test_latent, test_generation, test_model_conventions and test_properties
(`ALL_BACKBONES` in tests/conftest.py), as they do on Chameleon.
"""

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import load_vedas, make_inputs, perturb_vedas, quadrant_image
from vedas.configuration_vedas import Vedas3Config
from vedas.modeling_vedas import Vedas3ForConditionalGeneration, _DeepStack
from vedas.replay_vedas import patchify_images
from vedas_trainer.checkpoint import check_checkpoint_folder, load_base
from vedas_trainer.testing import child_env


REPO = Path(__file__).resolve().parents[1]
TEXT_MODEL_CALLS = "text_model_calls"


def _module(name):
    spec = importlib.util.spec_from_file_location(f"vedas_example_{name}", REPO / "examples" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def qwen3(all_vedas_dirs):
    model, processor = load_vedas(all_vedas_dirs["qwen3_vl"])
    assert isinstance(model, Vedas3ForConditionalGeneration)
    return perturb_vedas(model), processor


def recorded_latent_phase(model, processor):
    """`latent_phase` on one fixed prompt, recording the keyword arguments of every text-model call (one per latent
    pass). Returns the inputs, the calls, the layout ids and the phase."""
    inputs = make_inputs(processor, ["which arrow ?"], [quadrant_image((112, 84), seed=3)])
    calls = []
    handle = model.model.language_model.register_forward_pre_hook(
        lambda module, args, kwargs: calls.append(dict(kwargs)), with_kwargs=True)
    try:
        ids, phase = latent_phase(model, inputs)
    finally:
        handle.remove()
    return inputs, calls, ids, phase


def latent_phase(model, inputs, steps=2, num_replay=3):
    """The latent phase `generate` runs (cached: one text-model call per pass), with its trace and the layout ids."""
    ids, mask, types = model._append_latent_block(inputs["input_ids"], inputs["attention_mask"],
                                                  inputs["mm_token_type_ids"], steps, num_replay)
    with torch.no_grad():
        phase = model._latent_forward(ids, mask, inputs["pixel_values"], inputs["image_grid_thw"], types, None,
                                      num_replay_tokens=num_replay, use_cache=True, output_latent_trace=True,
                                      return_hidden_only=True)
    return ids, phase


def test_deepstack_reaches_the_image_positions_of_the_prompt_only(qwen3):
    """Pass 0 (the prompt) gets DeepStack at exactly its image positions; the latent passes (replay slots and
    latents) get none. And DeepStack changes the numbers in the tiny model, so the equivalences with the base
    model (which adds it itself) do check that it is applied."""
    model, processor = qwen3
    inputs, calls, ids, phase = recorded_latent_phase(model, processor)
    assert len(calls) == 3  # the prompt, then one pass per latent step
    image = ids == model.config.image_token_id
    prompt_columns = calls[0]["inputs_embeds"].shape[1]
    assert torch.equal(calls[0]["visual_pos_masks"], image[:, :prompt_columns])
    features = calls[0]["deepstack_visual_embeds"]
    assert len(features) == len(model.config.vision_config.deepstack_visual_indexes)
    assert all(f.shape == (int(image.sum()), model.config.text_config.hidden_size) for f in features)
    assert all("visual_pos_masks" not in call and "deepstack_visual_embeds" not in call for call in calls[1:])

    with torch.no_grad():
        with_deepstack = model(**inputs).logits
        original = _DeepStack.inputs
        _DeepStack.inputs = lambda self, columns: {}
        try:
            without = model(**inputs).logits
        finally:
            _DeepStack.inputs = original
    assert (with_deepstack - without).abs().max() > 1e-3


def test_replayed_tokens_are_merged_embeddings_at_their_original_positions(qwen3):
    """B(t) in the replay slots is softmax weights x the merger output of the replayed image tokens (no DeepStack
    feature), at the (t, h, w) positions those tokens have in Qwen3-VL's own interleaved M-RoPE `get_rope_index`."""
    model, processor = qwen3
    inputs, calls, ids, phase = recorded_latent_phase(model, processor)
    with torch.no_grad():
        merged = torch.cat(model.model.get_image_features(inputs["pixel_values"],
                                                          inputs["image_grid_thw"]).pooler_output)
    prompt = inputs["input_ids"].shape[1]
    expected, _ = model.model.get_rope_index(inputs["input_ids"], mm_token_type_ids=inputs["mm_token_type_ids"],
                                             image_grid_thw=inputs["image_grid_thw"],
                                             attention_mask=inputs["attention_mask"])
    assert torch.equal(phase.position_ids[:, :, :prompt], expected)
    visual_columns = (ids[0] == model.config.image_token_id).nonzero().squeeze(1)
    for step, trace in enumerate(phase.latent_trace, start=1):
        chosen = trace["replay_indices"][0]
        columns = [prompt + 1 + (step - 1) * 4 + slot for slot in range(3)]  # after <|start_latent|> / z(t - 1)
        assert torch.equal(phase.position_ids[:, 0, columns], expected[:, 0, visual_columns[chosen]])
        slots = calls[step]["inputs_embeds"][0, :3]  # pass t starts with the replay slots of step t
        torch.testing.assert_close(slots, merged[chosen] * trace["replay_weights"][0, :, None], rtol=1e-5, atol=1e-6)


def test_patchify_images_matches_the_qwen3_vl_processor(all_base_dirs):
    """The crop re-encoding cuts 16-pixel patches normalised with mean = std = 0.5, as the Qwen3-VL processor does."""
    from transformers import AutoProcessor

    image_processor = AutoProcessor.from_pretrained(all_base_dirs["qwen3_vl"]).image_processor
    assert (image_processor.patch_size, image_processor.merge_size) == (16, 2)
    images = torch.randint(0, 256, (2, 3, 64, 96), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    reference = image_processor(images=list(images), return_tensors="pt")
    pixel_values, grid_thw = patchify_images(images.float() / 255, image_processor.patch_size,
                                             image_processor.temporal_patch_size, image_processor.merge_size,
                                             image_processor.image_mean, image_processor.image_std)
    assert torch.equal(grid_thw, reference["image_grid_thw"]) and grid_thw.tolist() == [[1, 4, 6]] * 2
    torch.testing.assert_close(pixel_values, reference["pixel_values"].float(), atol=1e-5, rtol=0)


def test_config_crop_resolution_follows_the_32_pixel_cell(all_vedas_dirs):
    assert Vedas3Config().crop_resolution == 320  # 10 x 10 merged cells, as 280 is on Qwen2-VL
    with pytest.raises(ValueError, match=r"multiple of patch_size \* spatial_merge_size \(32\), got 56"):
        Vedas3Config(crop_resolution=56)
    model, _ = load_vedas(all_vedas_dirs["qwen3_vl"])
    assert (model.config.crop_resolution, model.config.image_mean) == (64, [0.5, 0.5, 0.5])  # from the processor


def test_make_tiny_base_and_convert_base_command_lines(all_base_dirs, tmp_path):
    """`make_tiny_base.py --backbone qwen3_vl` writes the fixture's base (same seed, same weights); `convert_base.py`
    converts that folder (model_type qwen3_vl) into a complete Vedas checkpoint."""
    assert _module("make_tiny_base").main(["--backbone", "qwen3_vl", "--out", str(tmp_path / "base")]) == 0
    config = json.loads((tmp_path / "base" / "config.json").read_text())
    assert config["model_type"] == "qwen3_vl" and config["text_config"]["rope_parameters"]["mrope_interleaved"]
    ours, fixture = load_base(tmp_path / "base")[0], load_base(all_base_dirs["qwen3_vl"])[0]
    assert all(torch.equal(a, b) for a, b in zip(ours.state_dict().values(), fixture.state_dict().values()))
    argv = ["--base", str(tmp_path / "base"), "--out", str(tmp_path / "vedas"), "--set", "crop_resolution=96"]
    assert _module("convert_base").main(argv) == 0
    assert check_checkpoint_folder(tmp_path / "vedas") == []
    config = json.loads((tmp_path / "vedas" / "config.json").read_text())
    assert (config["model_type"], config["crop_resolution"]) == ("vedas_3", 96)
    assert config["auto_map"]["AutoModel"] == "modeling_vedas.Vedas3ForConditionalGeneration"


def test_train_checks_overrides_against_the_backbone_config():
    train = _module("train")
    args = train.ModelArguments(backbone="qwen3_vl", vedas_overrides='{"crop_resolution": 64}')
    train.check_model_arguments(args)
    args.vedas_overrides = '{"crop_resolution": 56}'
    with pytest.raises(train.UsageError, match="got 56"):
        train.check_model_arguments(args)
    with pytest.raises(train.UsageError, match="--backbone: .*got 'qwen4_vl'"):
        train.check_model_arguments(train.ModelArguments(backbone="qwen4_vl"))


def quick_run_under_accelerate(tmp_path, backbone: str) -> dict:
    """Run `accelerate launch examples/train.py --quick --backbone BACKBONE` (32 samples, no final evaluation), check
    that it trained across the curriculum with L_recon and wrote a complete checkpoint; return that config."""
    out = tmp_path / "run"
    command = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", "1", REPO / "examples" /
               "train.py", "--quick", "--backbone", backbone, "--n_train", "32", "--evaluate_after", "false",
               "--output_dir", out, "--report_to", "none"]
    result = subprocess.run([str(c) for c in command], cwd=REPO, env=child_env(tmp_path), capture_output=True,
                            text=True, timeout=600)
    assert result.returncode == 0, (result.stdout + result.stderr)[-6000:]
    report = json.loads((out / "report.json").read_text())
    assert report["backbone"] == backbone and report["curriculum_complete"]
    assert check_checkpoint_folder(out / "checkpoint-final") == []
    state = json.loads(sorted(out.glob("checkpoint-*/trainer_state.json"))[-1].read_text())
    assert any(entry.get("recon_loss") for entry in state["log_history"])
    return json.loads((out / "checkpoint-final" / "config.json").read_text())


def test_quick_run_under_accelerate(tmp_path):
    """The quick run on Qwen3-VL, with L_recon on crops of 64 pixels."""
    config = quick_run_under_accelerate(tmp_path, "qwen3_vl")
    assert (config["model_type"], config["crop_resolution"]) == ("vedas_3", 64)


PIPELINE_SCRIPT = """
import json, sys
from transformers import pipeline
from vedas_trainer.testing import quadrant_image
pipe = pipeline("image-text-to-text", model=sys.argv[1], trust_remote_code=True)
content = [{"type": "image", "image": quadrant_image()}, {"type": "text", "text": "what colour ?"}]
out = pipe(text=[{"role": "user", "content": content}], max_new_tokens=3, return_full_text=False)
print(json.dumps({"class": type(pipe.model).__name__, "module": type(pipe.model).__module__,
                  "text": isinstance(out[0]["generated_text"], str)}))
"""


def test_stock_image_text_to_text_pipeline(all_vedas_dirs, tmp_path):
    """transformers' `image-text-to-text` pipeline loads the checkpoint's remote code and generates (latent steps
    from the config) in a fresh process."""
    result = subprocess.run([sys.executable, "-c", PIPELINE_SCRIPT, str(all_vedas_dirs["qwen3_vl"])], cwd=tmp_path,
                            env=child_env(tmp_path), capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["class"] == "Vedas3ForConditionalGeneration" and report["text"]
    assert report["module"].startswith("transformers_modules.")
