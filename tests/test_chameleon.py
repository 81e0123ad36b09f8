"""Vedas on Chameleon (issue 15): images are VQ codes in the language model's vocabulary, with 1-D RoPE.

What is Chameleon's own: the tiny offline base (VQ-VAE, tokenizer with the code tokens, ChameleonProcessor), replay
among the code tokens at their 1-D positions, the dense window on the VQ grid, the crop re-encoded through the VQ
encoder and the embedding, the config, the command lines, the checkpoint's extra file, the stock pipeline and the
quick training run. The equivalences (converted == base, T = 0 == base `generate` and beams, cache == no cache ==
teacher forcing, padded batch == singles, save -> load, gradient checkpointing, remote code in a fresh process) and
the properties run on Chameleon with the other backbones (`ALL_BACKBONES` in tests/conftest.py).
"""

import json
import subprocess
import sys

import pytest
import torch

from conftest import load_vedas, make_inputs, perturb_vedas, quadrant_image
from vedas.chameleon_vedas import CHAMELEON_RESCALE, VedasChameleonConfig, VedasChameleonForConditionalGeneration
from vedas_trainer.checkpoint import REMOTE_CODE_FILES, check_checkpoint_folder, load_base, remote_code_files
from vedas_trainer.testing import child_env
from vedas_trainer.tiny_base import chameleon_code_token


QUESTIONS = ["what colour is the arrow in the last cell ?", "which ?"]
IMAGES = [quadrant_image((112, 84), seed=1), quadrant_image((56, 112), seed=2)]


@pytest.fixture(scope="module")
def folders(checkpoints):
    """The session's tiny Chameleon base and its conversion (the settings of `BACKBONE_OVERRIDES["chameleon"]`)."""
    return checkpoints.base("chameleon"), checkpoints.vedas("chameleon")


@pytest.fixture(scope="module")
def base(folders):
    model, processor = load_base(folders[0])
    return model.eval(), processor


@pytest.fixture(scope="module")
def vedas(folders):
    model, processor = load_vedas(folders[1])
    assert isinstance(model, VedasChameleonForConditionalGeneration)
    return model, processor


@pytest.fixture(scope="module")
def perturbed(folders):
    model, processor = load_vedas(folders[1])
    return perturb_vedas(model), processor


def test_tiny_base_has_the_code_tokens_and_the_processor_expands_images(base):
    model, processor = base
    vocabulary = model.config.vocabulary_map
    codes = model.config.vq_config.num_embeddings
    assert all(vocabulary[chameleon_code_token(code)] == processor.tokenizer.convert_tokens_to_ids(
        chameleon_code_token(code)) for code in range(codes))
    mapping = model.model.vocabulary_mapping
    assert len(mapping.image_tokens) == codes and mapping.image_token_id == processor.image_token_id
    inputs = make_inputs(processor, QUESTIONS[:1], IMAGES[:1])
    ids = inputs["input_ids"][0]
    assert inputs["pixel_values"].shape == (1, 3, 32, 32) and int((ids == processor.image_token_id).sum()) == 64
    first = int((ids == processor.image_token_id).nonzero()[0])
    assert ids[first - 1] == processor.image_start_token_id and ids[first + 64] == processor.image_end_token_id
    tokens = model.model.get_image_tokens(inputs["pixel_values"])
    assert tokens.shape == (1, 64) and set(tokens[0].tolist()) <= set(mapping.image_tokens)
    assert len(set(tokens[0].tolist())) > 4  # the random VQ-VAE still tells the blocks apart


def test_image_code_tokens_are_never_predicted(perturbed):
    """As upstream, the code tokens' logits sit at the dtype's minimum, and only theirs: in a plain forward and in
    the answer's logits after latent steps."""
    model, processor = perturbed
    inputs = make_inputs(processor, QUESTIONS, IMAGES)
    with torch.no_grad():
        plain = model(**inputs).logits
    out = model.generate(**inputs, num_latent_steps=2, max_new_tokens=2, do_sample=False, return_dict_in_generate=True,
                         output_logits=True)
    codes = model.model.vocabulary_mapping.image_tokens
    for logits in (plain, *out.logits):
        assert bool((logits[..., codes] == torch.finfo(logits.dtype).min).all())
        assert bool((logits[..., : min(codes)] > torch.finfo(logits.dtype).min).all())


def test_replay_copies_code_embeddings_at_their_1d_positions(perturbed):
    """B(t) is softmax weights x the embeddings of the replayed code tokens; each replay slot takes the 1-D position
    of the code token it copies (three equal rows), and the text counter skips the slots."""
    model, processor = perturbed
    inputs = make_inputs(processor, QUESTIONS[:1], IMAGES[:1])
    calls = []
    handle = model.model.register_forward_pre_hook(lambda module, args, kwargs: calls.append(dict(kwargs)),
                                                   with_kwargs=True)
    try:
        ids, mask, _ = model._append_latent_block(inputs["input_ids"], inputs["attention_mask"], None, 2, 3)
        with torch.no_grad():
            phase = model._latent_forward(ids, mask, inputs["pixel_values"], None, None, None, num_replay_tokens=3,
                                          use_cache=True, output_latent_trace=True, return_hidden_only=True)
    finally:
        handle.remove()
    assert len(calls) == 3 and all(call["position_ids"].ndim == 2 for call in calls)  # 1-D RoPE positions
    codes = model.model.get_image_tokens(inputs["pixel_values"])[0]
    embeddings = model.get_input_embeddings()(codes)
    prompt = inputs["input_ids"].shape[1]
    positions = phase.position_ids
    assert torch.equal(positions[1], positions[0]) and torch.equal(positions[2], positions[0])
    assert torch.equal(positions[0, 0, : prompt + 1], torch.arange(prompt + 1))
    image_columns = (ids[0] == model.config.image_token_id).nonzero().squeeze(1)
    for step, trace in enumerate(phase.latent_trace, start=1):
        chosen = trace["replay_indices"][0]
        columns = [prompt + 1 + (step - 1) * 4 + slot for slot in range(3)]
        assert torch.equal(positions[0, 0, columns], image_columns[chosen])  # no padding: position == column
        assert positions[0, 0, prompt + step * 4] == prompt + step  # z(t): the text counter skips the slots
        torch.testing.assert_close(calls[step]["inputs_embeds"][0, :3],
                                   embeddings[chosen] * trace["replay_weights"][0, :, None], rtol=1e-5, atol=1e-6)


def training_batch(model, processor) -> dict:
    """One latent training row: the prompt, 2 steps of K = 4, `<|end_latent|>` (the supervised token) and the
    original image for L_recon."""
    inputs = make_inputs(processor, QUESTIONS[:1], IMAGES[:1])
    ids, mask, _ = model._append_latent_block(inputs["input_ids"], inputs["attention_mask"], None, 2, 4)
    ids = torch.cat([ids, torch.full_like(ids[:, :1], model.config.end_latent_token_id)], 1)
    mask = torch.cat([mask, torch.ones_like(mask[:, :1])], 1)
    labels = torch.full_like(ids, -100)
    labels[:, -1] = ids[:, -1]
    original = torch.tensor(list(IMAGES[0].getdata()), dtype=torch.uint8).view(84, 112, 3).permute(2, 0, 1)
    return dict(input_ids=ids, attention_mask=mask, pixel_values=inputs["pixel_values"], labels=labels,
                crop_images=[[original]])


def test_dense_window_and_crop_reencoding_use_the_vq_grid(perturbed):
    """The crop window is W x W cells of the 8 x 8 VQ grid, mapped to the central square the processor keeps; the
    crop is normalised as ChameleonImageProcessor does and encoded by the VQ encoder and the code embeddings."""
    model, processor = perturbed
    image = quadrant_image((32, 32), seed=5)
    pixels = torch.tensor(list(image.getdata()), dtype=torch.float32).view(32, 32, 3).permute(2, 0, 1)
    reference = processor.image_processor(images=[image], return_tensors="pt")["pixel_values"]
    torch.testing.assert_close(pixels[None] * CHAMELEON_RESCALE - 1, reference, rtol=0, atol=1e-5)
    with torch.no_grad():
        pooled = model._encode_crops(pixels[None] / 255)
        expected = model.get_input_embeddings()(model.model.get_image_tokens(reference)).mean(1)
    torch.testing.assert_close(pooled, expected)
    wide = torch.zeros(3, 20, 40, dtype=torch.uint8)
    assert model._grid_region(wide).shape == (3, 20, 20)

    model.train()
    try:
        out = model(**training_batch(model, processor), output_latent_trace=True)
    finally:
        model.eval()
    window = out.latent_trace[0]["crop_window"][0]
    assert window[0] == 0 and window[2] - window[1] == 3 and window[4] - window[3] == 3 and window[2] <= 8
    assert out.recon_loss is not None and torch.isfinite(out.recon_loss) and out.recon_loss > 0
    out.loss.backward()
    assert model.token_sr[0].weight.grad.abs().sum() > 0
    model.zero_grad()


def test_config_crop_resolution_follows_the_vq_cell(vedas):
    assert VedasChameleonConfig().crop_resolution == 160  # 10 x 10 cells of Chameleon-7B's 16 pixels
    with pytest.raises(ValueError, match=r"multiple of the VQ encoder's downsampling factor \(16\), got 56"):
        VedasChameleonConfig(crop_resolution=56)
    model, _ = vedas
    assert model.config.text_config is model.config and model.config.visual_cell[0] == 4
    assert (model.config.crop_resolution, model.config.image_mean) == (16, [1.0, 1.0, 1.0])  # from the processor


def test_make_tiny_base_and_convert_base_command_lines(folders, tmp_path):
    from test_qwen3_vl import _module

    assert _module("make_tiny_base").main(["--backbone", "chameleon", "--out", str(tmp_path / "base")]) == 0
    config = json.loads((tmp_path / "base" / "config.json").read_text())
    assert config["model_type"] == "chameleon" and config["vq_config"]["num_embeddings"] == 32
    ours, fixture = load_base(tmp_path / "base")[0], load_base(folders[0])[0]
    assert all(torch.equal(a, b) for a, b in zip(ours.state_dict().values(), fixture.state_dict().values()))
    argv = ["--base", str(tmp_path / "base"), "--out", str(tmp_path / "vedas"), "--set", "crop_resolution=24"]
    assert _module("convert_base").main(argv) == 0
    assert check_checkpoint_folder(tmp_path / "vedas") == []
    config = json.loads((tmp_path / "vedas" / "config.json").read_text())
    assert (config["model_type"], config["crop_resolution"]) == ("vedas_chameleon", 24)
    assert config["auto_map"]["AutoModel"] == "chameleon_vedas.VedasChameleonForConditionalGeneration"
    (tmp_path / "vedas" / "chameleon_vedas.py").unlink()  # the backbone's own file is required like the shared ones
    assert check_checkpoint_folder(tmp_path / "vedas") == ["chameleon_vedas.py"]
    assert config["auto_map"]["AutoConfig"] == "chameleon_vedas.VedasChameleonConfig"


def test_checkpoint_carries_the_chameleon_file_and_it_follows_the_remote_code_rules(folders):
    """A Chameleon checkpoint carries the shared remote-code files and chameleon_vedas.py (a Qwen one does not), and
    that file passes the static rules of docs/security.md (tests/test_remote_code_safety.py)."""
    from test_remote_code_safety import _format, check_remote_code

    folder = folders[1]
    code = sorted(p.name for p in folder.rglob("*") if p.suffix in (".py", ".pyc", ".so", ".pyd"))
    assert code == sorted(remote_code_files("vedas_chameleon")) == sorted([*REMOTE_CODE_FILES, "chameleon_vedas.py"])
    violations = check_remote_code(folder / "chameleon_vedas.py")
    assert not violations, _format(violations)


def test_quick_run_under_accelerate(tmp_path):
    """`accelerate launch examples/train.py --quick --backbone chameleon`: it trains across the curriculum with
    L_recon on crops re-encoded by the VQ encoder and writes a complete checkpoint."""
    from test_qwen3_vl import quick_run_under_accelerate

    config = quick_run_under_accelerate(tmp_path, "chameleon")
    assert (config["model_type"], config["crop_resolution"]) == ("vedas_chameleon", 8)


PIPELINE_SCRIPT = """
import json, sys
from transformers import AutoProcessor, pipeline
from vedas_trainer.testing import quadrant_image
processor = AutoProcessor.from_pretrained(sys.argv[1], trust_remote_code=True)
processor.chat_template = processor.tokenizer.chat_template  # ChameleonProcessor does not load its own
pipe = pipeline("image-text-to-text", model=sys.argv[1], processor=processor, trust_remote_code=True)
content = [{"type": "image", "image": quadrant_image()}, {"type": "text", "text": "what colour ?"}]
out = pipe(text=[{"role": "user", "content": content}], max_new_tokens=3, return_full_text=False)
print(json.dumps({"class": type(pipe.model).__name__, "text": isinstance(out[0]["generated_text"], str)}))
"""


def test_stock_image_text_to_text_pipeline(folders, tmp_path):
    """transformers' `image-text-to-text` pipeline runs the checkpoint's remote code (latent steps from the config),
    given the processor with its chat template."""
    result = subprocess.run([sys.executable, "-c", PIPELINE_SCRIPT, str(folders[1])], cwd=tmp_path,
                            env=child_env(tmp_path), capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report == {"class": "VedasChameleonForConditionalGeneration", "text": True}
