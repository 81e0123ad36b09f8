"""Fidelity checks from the code review (issue 13): gradients under gradient checkpointing, the literal Eq. 11
option, config checks."""

import warnings

import pytest
import torch

from conftest import BACKBONES, load_vedas, make_inputs, perturb_vedas, quadrant_image
from test_latent import training_batch


@pytest.fixture(scope="module", params=BACKBONES)
def model_and_processor(request, vedas_dirs):
    model, processor = load_vedas(vedas_dirs[request.param])
    return perturb_vedas(model), processor


def _gradients(model, batch, checkpointing=None):
    """Every parameter's gradient after one training forward and backward (with gradient checkpointing when
    `checkpointing` is `{"use_reentrant": ...}`), and the losses."""
    model.zero_grad()
    model.train()
    if checkpointing is not None:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=checkpointing)
    try:
        out = model(**batch)
        out.loss.backward()
    finally:
        if checkpointing is not None:
            model.gradient_checkpointing_disable()
        model.eval()
    grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    return grads, (out.ce_loss.detach(), out.recon_loss.detach())


@pytest.mark.parametrize("reentrant", [False, True])
def test_gradient_checkpointing_gives_the_same_gradients(model_and_processor, reentrant):
    """All parameter gradients, not only the losses, equal those without checkpointing: the replay weights reach
    q_proj / k_proj through the saliency, and the router, e(d) and token_sr (crop images, recon on) train."""
    model, processor = model_and_processor
    batch = training_batch(model, processor)
    reference, ref_losses = _gradients(model, batch)
    names = list(reference)
    for part in ("self_attn.q_proj", "self_attn.k_proj", "depth_router", "depth_step_embed", "token_sr"):
        assert any(part in n and reference[n].abs().sum() > 0 for n in names), part
    grads, losses = _gradients(model, batch, checkpointing={"use_reentrant": reentrant})
    torch.testing.assert_close(losses, ref_losses, atol=1e-5, rtol=1e-5)
    assert sorted(grads) == sorted(reference), set(reference) ^ set(grads)
    # relative to each gradient's scale: the saliency path to q_proj / k_proj is small next to the attention's own
    far = {}
    for name in names:
        error = float((grads[name] - reference[name]).abs().max() / reference[name].abs().max().clamp(min=1e-12))
        if error > 1e-4:
            far[name] = error
    assert not far, far


def _routing_layer_outputs(model, depth_residual, hidden, state_args):
    """(layer output, backbone-only output, selection) of routing layer 0 on `hidden` `(1, l, d)`."""
    layer = model.model.language_model.layers[0]
    positions = torch.arange(hidden.shape[1])[None, None].expand(3, 1, -1)
    embeddings = model.model.language_model.rotary_emb(hidden, positions)
    state = model._routing_state(**state_args, record_scores=True)
    saved, layer.depth_residual = layer.depth_residual, depth_residual
    try:
        with torch.no_grad():
            out = layer(hidden, position_embeddings=embeddings, vedas_state=state)
            base = layer(hidden, position_embeddings=embeddings)
    finally:
        layer.depth_residual = saved
    return out, base, state.router_scores[(0, 0)][1]


def test_literal_eq11_scales_every_token_by_one_plus_e(vedas_dirs):
    """`depth_residual="literal"`: out = h + e ⊙ (h + m ⊙ s ⊙ (f(h) - h)) = gated out + e ⊙ h, so an unselected
    token is h ⊙ (1 + e(d)) and a selected one adds the gated update on top; `"gated"` (the default) keeps h."""
    model, _ = load_vedas(vedas_dirs["qwen2_vl"], depth_residual="literal")
    assert model.config.depth_residual == "literal"
    routing_layers = [layer for layer in model.model.language_model.layers if layer.is_routing_layer]
    assert routing_layers and all(layer.depth_residual == "literal" for layer in routing_layers)
    perturb_vedas(model)
    e = model.model.language_model.layers[0].depth_step_embed.weight[0].detach()
    hidden = torch.randn(1, 10, model.config.text_config.hidden_size, generator=torch.Generator().manual_seed(0))
    valid = torch.ones(1, 10, dtype=torch.bool)
    state_args = dict(token_valid=valid, prompt_mask=valid)  # top-α (6) of the 10 tokens
    literal, base, selected = _routing_layer_outputs(model, "literal", hidden, state_args)
    gated, _, same_selection = _routing_layer_outputs(model, "gated", hidden, state_args)
    assert torch.equal(selected, same_selection) and 0 < int(selected.sum()) < 10
    torch.testing.assert_close(gated[~selected], base[~selected], atol=0, rtol=0)
    torch.testing.assert_close(literal[~selected], base[~selected] * (1 + e), atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(literal, gated + base * e, atol=1e-5, rtol=1e-5)
    assert (gated[selected] - base[selected]).abs().max() > 1e-3  # the second pass changed the selected tokens


def test_literal_eq11_with_zero_e_is_the_base_model(vedas_dirs):
    """Like the default, the literal form computes the base model while e(d) = 0 (a converted checkpoint)."""
    gated, processor = load_vedas(vedas_dirs["qwen2_vl"])
    literal, _ = load_vedas(vedas_dirs["qwen2_vl"], depth_residual="literal")
    inputs = make_inputs(processor, ["what colour ?"], [quadrant_image()])
    with torch.no_grad():
        torch.testing.assert_close(literal(**inputs).logits, gated(**inputs).logits, atol=0, rtol=0)
    with pytest.raises(ValueError, match="depth_residual"):
        load_vedas(vedas_dirs["qwen2_vl"], depth_residual="paper")


@pytest.mark.parametrize("field, value", [
    ("num_latent_steps", True), ("num_replay_tokens", False), ("window_size", True), ("max_depth", True),
    ("routing_layers", [0, True]), ("recon_weight", True),
    ("num_latent_steps", 65), ("num_replay_tokens", 1025),
])
def test_config_refuses_booleans_and_counts_past_the_bounds(field, value):
    """Booleans are not integers here (JSON `true` would read as 1), and T and K have the bounds generate uses."""
    from vedas.configuration_vedas import MAX_LATENT_STEPS, MAX_REPLAY_TOKENS, VedasConfig

    assert (MAX_LATENT_STEPS, MAX_REPLAY_TOKENS) == (64, 1024)
    with pytest.raises(ValueError, match=rf"VedasConfig\.{field}"):
        VedasConfig(**{field: value})
    config = VedasConfig(num_latent_steps=MAX_LATENT_STEPS, num_replay_tokens=MAX_REPLAY_TOKENS, routing_layers=[0])
    assert (config.num_latent_steps, config.num_replay_tokens, config.routing_layers) == (64, 1024, [0])


def test_config_warns_about_a_misspelt_key_naming_the_field(vedas_dirs):
    from vedas.configuration_vedas import VedasConfig

    with pytest.warns(UserWarning, match="'num_latent_step'.*did you mean 'num_latent_steps'"):
        config = VedasConfig(num_latent_step=3)
    assert config.num_latent_steps == 4  # the intended field keeps its default
    with pytest.warns(UserWarning, match="'replay_mod'.*did you mean 'replay_mode'"):
        VedasConfig.from_pretrained(vedas_dirs["qwen2_vl"], replay_mod="soft_mix")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # backbone keys and real fields stay silent
        VedasConfig(num_latent_steps=3, use_cache=False, tie_word_embeddings=False)
        VedasConfig.from_pretrained(vedas_dirs["qwen2_vl"], num_replay_tokens=2)


def test_non_finite_gradient_norm_stops_training(vedas_dirs, tmp_path):
    """A finite loss with an inf gradient (here: the backward of `lm_head` scaled by inf from step 2 on) stops
    training at the next log, naming the gradient norm and the step, before any checkpoint of that step."""
    from test_trainer_guards import assert_finite_checkpoints, checkpoint_steps, make_trainer
    from vedas_trainer.synthetic import build_synthetic_dataset
    from vedas_trainer.trainer import NonFiniteLossError

    model, processor = load_vedas(vedas_dirs["qwen2_vl"])
    trainer = make_trainer(model, processor, build_synthetic_dataset(2, seed=0, split="train"), tmp_path)
    weight = model.lm_head.weight
    weight.register_hook(lambda grad: grad * float("inf") if trainer.state.global_step + 1 >= 2 else grad)
    with pytest.raises(NonFiniteLossError, match=r"global step 2: gradient norm \(grad_norm\) = (inf|nan)") as raised:
        trainer.train()
    assert raised.value.step == 2 and set(raised.value.components) == {"grad_norm"}
    assert checkpoint_steps(tmp_path) == [1]
    assert_finite_checkpoints(tmp_path)


def test_collator_forward_generate_and_evaluation_share_one_latent_block(vedas_dirs):
    """`config.latent_block_ids` is the layout's one definition: the collator's rows, `build_latent_layout`,
    generate's compact output and evaluation's answer column all follow it."""
    from vedas_trainer.collator import VedasCollator
    from vedas_trainer.evaluation import _answer_start
    from vedas_trainer.synthetic import build_synthetic_dataset

    model, processor = load_vedas(vedas_dirs["qwen2_vl"])
    cfg = model.config
    block = cfg.latent_block_ids(num_steps=3)
    assert block == [cfg.start_latent_token_id] + ([cfg.replay_token_id] * 4 + [cfg.latent_token_id]) * 3 + [
        cfg.end_latent_token_id]
    assert cfg.latent_block_ids(num_steps=2, num_replay_tokens=0, start=False) == [cfg.latent_token_id] * 2 + [
        cfg.end_latent_token_id]

    batch = VedasCollator(processor, cfg, stage=3, max_latent_stage=3)(build_synthetic_dataset(2, seed=0))
    start = int((batch["input_ids"][0] == cfg.start_latent_token_id).nonzero())
    for row in batch["input_ids"]:
        assert row[start : start + len(block)].tolist() == block

    inputs = make_inputs(processor, ["what colour ?"], [quadrant_image()])
    ids, _, _ = model.build_latent_layout(inputs["input_ids"], inputs["attention_mask"], num_latent_steps=3)
    assert ids[0, inputs["input_ids"].shape[1] :].tolist() == block[:-1]
    out = model.generate(**inputs, num_latent_steps=3, max_new_tokens=2, do_sample=False)
    compact = cfg.latent_block_ids(num_steps=3, num_replay_tokens=0)
    answer = _answer_start(model, inputs["input_ids"], steps=3)
    assert out[0, answer - len(compact) : answer].tolist() == compact


def test_a_field_set_after_the_config_was_built_is_checked_by_the_model(vedas_dirs):
    """The config checks its fields when built and loaded; one set on it later is checked once, when the model
    is built from it (not by each decoder layer)."""
    from vedas.configuration_vedas import VedasConfig
    from vedas.modeling_vedas import VedasForConditionalGeneration

    config = VedasConfig.from_pretrained(vedas_dirs["qwen2_vl"])
    config.max_depth = True
    with pytest.raises(ValueError, match=r"VedasConfig\.max_depth \(D\) must be an integer >= 1, got True"):
        VedasForConditionalGeneration(config)
