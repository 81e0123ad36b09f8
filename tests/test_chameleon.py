"""Vedas on Chameleon (issue 15): images are VQ codes in the language model's vocabulary, with 1-D RoPE.

The tiny offline base (VQ-VAE, tokenizer with the code tokens, ChameleonProcessor), the conversion, the equivalences
(converted == base, T = 0 == base `generate`, cache == no cache, padded batch == singles, save -> load), what is
Chameleon's own (replay among the code tokens at their 1-D positions, the dense window on the VQ grid, the crop
re-encoded through the VQ encoder and the embedding), remote code in a fresh process and the quick training run.
"""

import json
import subprocess
import sys

import pytest
import torch

from conftest import convert_base, load_vedas, make_inputs, no_eos, perturb_vedas, quadrant_image
from vedas.chameleon_vedas import CHAMELEON_RESCALE, VedasChameleonConfig, VedasChameleonForConditionalGeneration
from vedas_trainer.checkpoint import REMOTE_CODE_FILES, check_checkpoint_folder, load_base, remote_code_files
from vedas_trainer.testing import child_env
from vedas_trainer.tiny_base import build_tiny_base, chameleon_code_token


# small K and α as for the other backbones; the crop side is 4 VQ cells of 4 pixels
OVERRIDES = {"num_replay_tokens": 4, "routing_topk": 6, "crop_resolution": 16, "num_latent_steps": 2}
QUESTIONS = ["what colour is the arrow in the last cell ?", "which ?"]
IMAGES = [quadrant_image((112, 84), seed=1), quadrant_image((56, 112), seed=2)]


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("chameleon")
    build_tiny_base("chameleon", str(root / "base"), seed=0)
    convert_base(root / "base", root / "vedas", overrides=OVERRIDES)
    return root / "base", root / "vedas"


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


def test_converted_model_equals_base(base, vedas):
    """Logits over the base vocabulary, bit for bit: unpadded prompts, and a padded batch at the positions
    `generate` gives both (Chameleon's own forward counts padding)."""
    (base_model, base_processor), (model, processor) = base, vedas
    vocab = len(base_processor.tokenizer)
    for question, image in zip(QUESTIONS, IMAGES):
        inputs = make_inputs(processor, [question], [image])
        with torch.no_grad():
            torch.testing.assert_close(model(**inputs).logits[..., :vocab], base_model(**inputs).logits[..., :vocab],
                                       rtol=0, atol=0)
    inputs = make_inputs(processor, QUESTIONS, IMAGES)
    positions = (inputs["attention_mask"].cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        got = model(**inputs, position_ids=positions).logits[..., :vocab]
        expected = base_model(**inputs, position_ids=positions).logits[..., :vocab]
    torch.testing.assert_close(got, expected, rtol=0, atol=0)
    assert bool((got[..., model.model.vocabulary_mapping.image_tokens] == torch.finfo(got.dtype).min).all())


def test_no_latent_steps_is_base_generate(base, vedas):
    (base_model, _), (model, processor) = base, vedas
    inputs = make_inputs(processor, QUESTIONS, IMAGES)
    options = dict(max_new_tokens=5, do_sample=False, **no_eos(model))
    expected = base_model.generate(**inputs, **options)
    assert torch.equal(model.generate(**inputs, num_latent_steps=0, **options), expected)


def test_beams_are_the_base_models_and_latent_beams_run(base, vedas, perturbed):
    """Beam search at T = 0 is the base model's (the images grouped per row for the beams); with latent steps,
    cached and uncached beams agree, and every returned sequence of a prompt starts with its latent block."""
    (base_model, _), (model, processor) = base, vedas
    inputs = make_inputs(processor, QUESTIONS, IMAGES)
    options = dict(max_new_tokens=3, num_beams=2, num_return_sequences=2, do_sample=False, **no_eos(model))
    expected = base_model.generate(**inputs, **options)
    assert torch.equal(model.generate(**inputs, num_latent_steps=0, **options), expected)
    latent, _ = perturbed
    cached = latent.generate(**inputs, num_latent_steps=2, **options)
    assert torch.equal(latent.generate(**inputs, num_latent_steps=2, use_cache=False, **options), cached)
    latents = (cached == latent.config.latent_token_id).sum(-1)
    assert cached.shape[0] == 4 and latents.tolist() == [2, 2, 2, 2]


def test_cached_latent_generation_equals_uncached_and_teacher_forcing(perturbed):
    model, processor = perturbed
    inputs = make_inputs(processor, QUESTIONS[:1], IMAGES[:1])
    out = model.generate(**inputs, num_latent_steps=3, max_new_tokens=4, do_sample=False, return_dict_in_generate=True,
                         output_logits=True, output_latent_trace=True, **no_eos(model))
    uncached = model.generate(**inputs, num_latent_steps=3, max_new_tokens=4, do_sample=False, use_cache=False,
                              **no_eos(model))
    assert torch.equal(out.sequences, uncached)
    mask = torch.ones_like(out.sequences)
    ids, mask, _ = model.expand_latent_sequences(out.sequences, mask)
    with torch.no_grad():
        forced = model(input_ids=ids, attention_mask=mask, pixel_values=inputs["pixel_values"],
                       output_latent_trace=True)
    for i, logits in enumerate(out.logits):  # the logits predicting the 4 answer tokens
        torch.testing.assert_close(forced.logits[:, ids.shape[1] - 5 + i], logits, atol=1e-4, rtol=1e-4)
    for generated, teacher in zip(out.latent_trace, forced.latent_trace):
        assert torch.equal(generated["replay_indices"], teacher["replay_indices"])


def test_padded_batch_equals_singles(perturbed):
    model, processor = perturbed
    options = dict(num_latent_steps=2, max_new_tokens=4, do_sample=False, return_dict_in_generate=True,
                   output_latent_trace=True, **no_eos(model))
    batch = model.generate(**make_inputs(processor, QUESTIONS, IMAGES), **options)
    for row, (question, image) in enumerate(zip(QUESTIONS, IMAGES)):
        single = model.generate(**make_inputs(processor, [question], [image]), **options)
        assert torch.equal(batch.sequences[row, -single.sequences.shape[1]:], single.sequences[0])
        for step_batch, step_single in zip(batch.latent_trace, single.latent_trace):
            assert torch.equal(step_batch["replay_indices"][row], step_single["replay_indices"][0])
            assert step_batch["crop_window"][row] == step_single["crop_window"][0]


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


def test_gradient_checkpointing_keeps_the_loss_and_the_gradients(folders):
    """Under gradient checkpointing (the layers keep the KV cache) the loss and every gradient are the ones without."""
    model, processor = load_vedas(folders[1])
    perturb_vedas(model).train()
    batch = training_batch(model, processor)

    def loss_and_grads():
        model.zero_grad()
        loss = model(**batch).loss
        loss.backward()
        return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    loss, grads = loss_and_grads()
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    loss_checkpointed, grads_checkpointed = loss_and_grads()
    torch.testing.assert_close(loss_checkpointed, loss)
    assert grads.keys() == grads_checkpointed.keys() and any("depth_router" in n for n in grads)
    for name, grad in grads.items():
        torch.testing.assert_close(grads_checkpointed[name], grad, rtol=1e-4, atol=1e-6, msg=name)


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


def test_save_load_identical_outputs(perturbed, tmp_path):
    model, processor = perturbed
    inputs = make_inputs(processor, QUESTIONS, IMAGES)
    options = dict(max_new_tokens=4, do_sample=False, **no_eos(model))
    before = model.generate(**inputs, **options)
    model.save_pretrained(tmp_path)
    reloaded, info = VedasChameleonForConditionalGeneration.from_pretrained(tmp_path, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    assert torch.equal(reloaded.eval().generate(**inputs, **options), before)


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


REMOTE_SCRIPT = """
import json, sys
sys.meta_path[:] = [f for f in sys.meta_path if 'editable' not in repr(f).lower()
                    and 'editable' not in type(f).__module__.lower()]
sys.path[:] = [p for p in sys.path if p not in ('', '.') and 'editable' not in p]
try:
    import vedas
    raise SystemExit("the repository is importable: the check would prove nothing")
except ImportError:
    pass
from PIL import Image
from transformers import AutoModel, AutoProcessor
model = AutoModel.from_pretrained(sys.argv[1], trust_remote_code=True).eval()
processor = AutoProcessor.from_pretrained(sys.argv[1], trust_remote_code=True)
processor.chat_template = processor.tokenizer.chat_template  # ChameleonProcessor does not load its own
messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "what colour ?"}]}]
text = processor.apply_chat_template(messages, add_generation_prompt=True)
inputs = processor(text=[text], images=[Image.new("RGB", (56, 56), (200, 30, 30))], return_tensors="pt")
out = model.generate(**inputs, num_latent_steps=2, max_new_tokens=3, do_sample=False, return_dict_in_generate=True,
                     output_latent_trace=True, suppress_tokens=[model.generation_config.eos_token_id])
print(json.dumps({"module": type(model).__module__, "class": type(model).__name__,
                  "new_tokens": out.sequences.shape[1] - inputs["input_ids"].shape[1],
                  "replayed": [t["replay_indices"][0].tolist() for t in out.latent_trace]}))
"""


def test_remote_code_loads_and_generates_in_a_fresh_process(folders, tmp_path):
    workdir = tmp_path / "elsewhere"
    workdir.mkdir()
    env = {key: value for key, value in child_env(tmp_path).items() if key != "PYTHONPATH"}
    result = subprocess.run([sys.executable, "-c", REMOTE_SCRIPT, str(folders[1])], cwd=workdir, env=env,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["module"].startswith("transformers_modules.") and report["module"].endswith("chameleon_vedas")
    assert report["class"] == "VedasChameleonForConditionalGeneration"
    assert report["new_tokens"] == 1 + 2 + 1 + 3  # start marker, 2 latents, end marker, 3 answer tokens
    assert [len(step) for step in report["replayed"]] == [4, 4] and all(i >= 0 for s in report["replayed"] for i in s)


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
