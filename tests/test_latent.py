"""Latent reasoning with visual replay: cache equivalence, batch invariance, layout errors, gradients."""

import pytest
import torch

from conftest import (
    ALL_BACKBONES, image_args, load_vedas, make_inputs, perturb_vedas, quadrant_image, with_image_args,
)
from vedas_trainer.testing import eager_saliency


def expand_to_layout(model, sequences, prompt_length, num_replay):
    """Insert the R replay slots before each <|latent|> of generate's compact output (the training layout)."""
    cfg = model.config
    slots = model._replay_slots(num_replay)
    rows = []
    for row in sequences.tolist():
        out = []
        for token in row:
            if token == cfg.latent_token_id:
                out.extend([cfg.replay_token_id] * slots)
            out.append(token)
        rows.append(out)
    return torch.tensor(rows)


def teacher_forced(model, inputs, sequences, num_replay):
    layout = expand_to_layout(model, sequences, inputs["input_ids"].shape[1], num_replay)
    extra = layout.shape[1] - inputs["input_ids"].shape[1]
    mask = torch.cat([inputs["attention_mask"], torch.ones(layout.shape[0], extra, dtype=torch.long)], 1)
    images = image_args(model, inputs)
    types = torch.cat([images.pop("mm_token_type_ids"), torch.zeros(layout.shape[0], extra, dtype=torch.int)], 1)
    with torch.no_grad():
        out = model(input_ids=layout, attention_mask=mask, mm_token_type_ids=types, **images,
                    num_replay_tokens=num_replay, output_latent_trace=True)
    return layout, out


@pytest.fixture(scope="module", params=ALL_BACKBONES)
def model_and_processor(request, all_vedas_dirs):
    model, processor = load_vedas(all_vedas_dirs[request.param])
    return perturb_vedas(model), processor


@pytest.mark.parametrize("num_replay", [4, 0])
def test_cached_generation_equals_teacher_forced_forward(model_and_processor, num_replay):
    model, processor = model_and_processor
    inputs = make_inputs(processor, ["what colour is the arrow ?"], [quadrant_image()])
    out = model.generate(
        **inputs, num_latent_steps=3, num_replay_tokens=num_replay, max_new_tokens=4, do_sample=False,
        return_dict_in_generate=True, output_scores=True, output_latent_trace=True,
    )
    layout, forced = teacher_forced(model, inputs, out.sequences, num_replay)
    answer_start = layout.shape[1] - 4  # logits predicting the 4 generated tokens start one column earlier
    for i, score in enumerate(out.scores):
        torch.testing.assert_close(forced.logits[:, answer_start - 1 + i], score, atol=1e-4, rtol=1e-4)
    if num_replay:
        for step_gen, step_forced in zip(out.latent_trace, forced.latent_trace):
            assert torch.equal(step_gen["replay_indices"], step_forced["replay_indices"])
            torch.testing.assert_close(step_gen["replay_weights"], step_forced["replay_weights"])


def test_uncached_generation_matches_cached(model_and_processor):
    model, processor = model_and_processor
    inputs = make_inputs(processor, ["what colour ?"], [quadrant_image()])
    cached = model.generate(**inputs, num_latent_steps=2, max_new_tokens=4, do_sample=False)
    uncached = model.generate(**inputs, num_latent_steps=2, max_new_tokens=4, do_sample=False, use_cache=False)
    assert torch.equal(cached, uncached)


def test_padded_batch_equals_singles(model_and_processor):
    model, processor = model_and_processor
    questions = ["what colour is the arrow in the final cell ?", "which ?"]
    images = [quadrant_image((112, 84), seed=1), quadrant_image((56, 112), seed=2)]
    batch = model.generate(
        **make_inputs(processor, questions, images), num_latent_steps=2, max_new_tokens=4, do_sample=False,
        return_dict_in_generate=True, output_latent_trace=True,
    )
    for row, (question, image) in enumerate(zip(questions, images)):
        single = model.generate(
            **make_inputs(processor, [question], [image]), num_latent_steps=2, max_new_tokens=4, do_sample=False,
            return_dict_in_generate=True, output_latent_trace=True,
        )
        width = single.sequences.shape[1]
        assert batch.sequences[row, -width:].tolist() == single.sequences[0].tolist()
        for step_batch, step_single in zip(batch.latent_trace, single.latent_trace):
            assert step_batch["replay_indices"][row].tolist() == step_single["replay_indices"][0].tolist()
            assert step_batch["crop_window"][row] == step_single["crop_window"][0]


def test_generate_output_layout(model_and_processor):
    model, processor = model_and_processor
    cfg = model.config
    inputs = make_inputs(processor, ["what colour ?"], [quadrant_image()])
    out = model.generate(**inputs, num_latent_steps=3, max_new_tokens=3, do_sample=False)
    prompt = inputs["input_ids"].shape[1]
    assert out[0, prompt].item() == cfg.start_latent_token_id
    assert out[0, prompt + 1 : prompt + 4].tolist() == [cfg.latent_token_id] * 3
    assert out[0, prompt + 4].item() == cfg.end_latent_token_id
    assert cfg.replay_token_id not in out[0].tolist()


def test_malformed_layout_names_the_sample(model_and_processor):
    model, processor = model_and_processor
    cfg = model.config
    inputs = make_inputs(processor, ["what ?", "what ?"], [quadrant_image(), quadrant_image()])
    images = image_args(model, inputs)
    ids, mask, types = model.build_latent_layout(inputs["input_ids"], inputs["attention_mask"],
                                                 images.pop("mm_token_type_ids"), 2, 4)
    end = torch.full_like(ids[:, :1], cfg.end_latent_token_id)
    ids = torch.cat([ids, end], 1)
    ids[1, -3] = cfg.latent_token_id  # a replay slot replaced by a latent in sample 1
    with pytest.raises(ValueError, match="Sample 1"):
        model(input_ids=ids, attention_mask=torch.ones_like(ids), mm_token_type_ids=torch.cat([types, end * 0], 1),
              **images)


def training_batch(model, processor, steps=2, num_replay=4, images=None):
    """A latent-layout batch with a supervised answer, built the way the collator lays it out."""
    cfg = model.config
    images = images or [quadrant_image((112, 84), seed=5), quadrant_image((84, 84), seed=6)]
    inputs = make_inputs(processor, ["what colour ?", "which one is it ?"], images)
    image_inputs = image_args(model, inputs)
    ids, mask, types = model.build_latent_layout(
        inputs["input_ids"], inputs["attention_mask"], image_inputs.pop("mm_token_type_ids"), steps, num_replay
    )
    answer = processor.tokenizer(" answer : red", add_special_tokens=False)["input_ids"]
    tail = torch.tensor([cfg.end_latent_token_id] + answer)[None].expand(ids.shape[0], -1)
    ids = torch.cat([ids, tail], 1)
    labels = torch.full_like(ids, -100)
    labels[:, -len(answer) :] = ids[:, -len(answer) :]
    mask = torch.cat([mask, torch.ones_like(tail)], 1)
    types = torch.cat([types, torch.zeros_like(tail).int()], 1)
    crops = [[torch.from_numpy(__import__("numpy").array(im)).permute(2, 0, 1)] for im in images]
    return dict(input_ids=ids, attention_mask=mask, mm_token_type_ids=types, labels=labels, **image_inputs,
                crop_images=crops)


def test_gradients_reach_prompt_token_sr_and_visual_features(model_and_processor):
    model, processor = model_and_processor
    batch = training_batch(model, processor)
    model.train()
    captured = {}
    embed = model.model.get_input_embeddings()

    def keep(name, output):
        if name not in captured:
            output.retain_grad()
            captured[name] = output

    def image_embeddings(*args):  # the visual features V (Qwen: the merger outputs; Chameleon: the codes' embeddings)
        embeddings, deepstack = type(model)._image_embeddings(model, *args)
        keep("visual", embeddings)
        return embeddings, deepstack

    hook = embed.register_forward_hook(lambda module, args, output: keep("embeds", output))
    model._image_embeddings = image_embeddings
    try:
        model.zero_grad()
        out = model(**batch)
    finally:
        hook.remove()
        del model._image_embeddings
        model.eval()
    assert out.ce_loss is not None and out.recon_loss is not None and torch.isfinite(out.loss)
    torch.testing.assert_close(out.loss, out.ce_loss + model.config.recon_weight * out.recon_loss)
    out.loss.backward()
    # Coconut gradient: the answer's loss reaches the prompt's last token (<|start_latent|> -> z(1) -> ...)
    start = int((batch["input_ids"][0] == model.config.start_latent_token_id).nonzero())
    assert captured["embeds"].grad[:, start].abs().sum() > 0
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.token_sr.parameters())
    # replay weights carry gradient back to the visual features
    assert captured["visual"].grad.abs().sum() > 0


def test_training_forward_with_gradient_checkpointing_matches(model_and_processor):
    model, processor = model_and_processor
    batch = training_batch(model, processor)
    batch.pop("crop_images")
    with torch.no_grad():
        reference = model(**batch).logits
    model.gradient_checkpointing_enable()
    model.train()
    try:
        out = model(**batch)
        out.loss.backward()
        torch.testing.assert_close(out.logits.detach(), reference, atol=1e-4, rtol=1e-4)
        assert model._text_model.layers[0].self_attn.q_proj.weight.grad is not None
    finally:
        model.gradient_checkpointing_disable()
        model.eval()
        model.zero_grad()


def test_replay_never_revisits_and_handles_exhaustion(model_and_processor):
    model, processor = model_and_processor
    # 56x56 image: 4 visual tokens on the Qwen backbones (K = 3), 64 VQ codes on Chameleon (K = 48); T = 3 steps of
    # K ask for 9 / 4 of them: step 2 takes what remains, step 3 nothing
    inputs = make_inputs(processor, ["what ?"], [quadrant_image((56, 56), seed=7)])
    visual = int((inputs["input_ids"] == model.config.image_token_id).sum())
    k = 3 * visual // 4
    with pytest.warns(UserWarning, match="exceeds the visual tokens"):
        model._warned.discard("few-visual")
        out = model.generate(**inputs, num_latent_steps=3, num_replay_tokens=k, max_new_tokens=2, do_sample=False,
                             return_dict_in_generate=True, output_latent_trace=True, output_scores=True)
    chosen = [i for step in out.latent_trace for i in step["replay_indices"][0].tolist() if i >= 0]
    assert sorted(chosen) == list(range(visual))  # every visual token once, none twice
    assert out.latent_trace[2]["replay_indices"][0].tolist() == [-1] * k
    assert all(torch.isfinite(s).all() for s in out.scores)
    assert all(torch.isfinite(step["replay_weights"]).all() for step in out.latent_trace)


def test_soft_mix_inserts_one_token_per_step(all_vedas_dirs):
    model, processor = load_vedas(all_vedas_dirs["qwen2_vl"], replay_mode="soft_mix")
    perturb_vedas(model)
    inputs = make_inputs(processor, ["what colour ?"], [quadrant_image()])
    ids, _, _ = model.build_latent_layout(inputs["input_ids"], inputs["attention_mask"], None, 2, 4)
    assert (ids == model.config.replay_token_id).sum().item() == 2
    out = model.generate(**inputs, num_latent_steps=2, max_new_tokens=3, do_sample=False,
                         return_dict_in_generate=True, output_scores=True)
    layout, forced = teacher_forced(model, inputs, out.sequences, 4)
    torch.testing.assert_close(forced.logits[:, -4], out.scores[0], atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("backbone", ALL_BACKBONES)
def test_no_latent_steps_is_the_base_model(backbone, all_base_dirs, all_vedas_dirs):
    from vedas_trainer.checkpoint import load_base

    base, _ = load_base(all_base_dirs[backbone])
    model, processor = load_vedas(all_vedas_dirs[backbone], num_replay_tokens=0)
    inputs = make_inputs(processor, ["what colour is it ?", "why ?"], [quadrant_image(), quadrant_image((56, 84))])
    ours = model.generate(**inputs, num_latent_steps=0, max_new_tokens=6, do_sample=False)
    theirs = base.eval().generate(**inputs, max_new_tokens=6, do_sample=False)
    assert torch.equal(ours, theirs)


def test_prompt_without_image_skips_replay_with_a_warning(model_and_processor):
    model, processor = model_and_processor
    inputs = make_inputs(processor, ["what colour ?"], [[]])
    model._warned.discard("no-image")
    with pytest.warns(UserWarning, match="without visual replay"):
        out = model.generate(**inputs, num_latent_steps=2, max_new_tokens=2, do_sample=False)
    assert (out == model.config.latent_token_id).sum().item() == 2


@pytest.mark.parametrize("backbone", ALL_BACKBONES)
def test_saliency_is_the_last_query_attention_over_visual_tokens(backbone, all_vedas_dirs):
    """Step 1 replays the top-K visual tokens of the <|start_latent|> row of attention, averaged over layers and
    heads, weighted by the softmax of those scores: checked against eager attention maps of the backbone (on
    Qwen3-VL they include its per-head q/k norms and the DeepStack features added after the first layers)."""
    model, processor = load_vedas(all_vedas_dirs[backbone], attn_implementation="eager")
    inputs = make_inputs(processor, ["what colour is the arrow ?"], [quadrant_image((112, 112), seed=9)])
    out = model.generate(**inputs, num_latent_steps=1, num_replay_tokens=4, max_new_tokens=1, do_sample=False,
                         return_dict_in_generate=True, output_latent_trace=True)
    saliency = eager_saliency(model, with_image_args(model, inputs))
    top = saliency.topk(4)
    assert out.latent_trace[0]["replay_indices"][0].tolist() == top.indices.tolist()
    torch.testing.assert_close(out.latent_trace[0]["replay_weights"][0], top.values.softmax(-1), atol=1e-5, rtol=1e-4)


@pytest.fixture(scope="module")
def qwen2(vedas_dirs):
    return load_vedas(vedas_dirs["qwen2_vl"])


@pytest.mark.parametrize("num_replay, replay_mode", [(0, "tokens"), (1, "tokens"), (3, "tokens"), (3, "soft_mix")])
def test_the_latent_block_columns_have_one_source(qwen2, num_replay, replay_mode, monkeypatch):
    """`LatentBlock` is the one place that says where each step's replay slots, its latent and `<|end_latent|>`
    sit: the token ids (`latent_block_ids`), the parsed layout (`_LatentLayout`), its check (`_check_block_tokens`),
    `expand_latent_sequences` and the lockstep padding (`_pad_for_steps`) must all agree with it."""
    from vedas import modeling_vedas

    model, processor = qwen2
    cfg = model.config
    monkeypatch.setattr(cfg, "replay_mode", replay_mode)
    block = cfg.latent_block(num_replay)
    token = {"start": cfg.start_latent_token_id, "replay": cfg.replay_token_id, "latent": cfg.latent_token_id,
             "end": cfg.end_latent_token_id}
    prompt = processor.tokenizer("what is it ?", add_special_tokens=False)["input_ids"]
    pad = cfg.text_config.pad_token_id or 0
    rows = []
    for steps in (3, 1):  # the arithmetic's columns hold the ids' tokens, each column exactly once
        where = {0: "start", block.end_offset(steps): "end"}
        for t in range(1, steps + 1):
            where.update({offset: "replay" for offset in block.replay_offsets(t)})
            where[block.latent_offset(t)] = "latent"
        ids = cfg.latent_block_ids(num_steps=steps, num_replay_tokens=num_replay)
        assert sorted(where) == list(range(len(ids))) and [token[where[o]] for o in range(len(ids))] == ids
        rows.append(prompt + ids)
    width = max(map(len, rows))
    input_ids = torch.tensor([row + [pad] * (width - len(row)) for row in rows])
    layout = model._parse_latent_layout(input_ids, num_replay)  # runs _check_block_tokens too
    start = len(prompt)
    assert layout.start == start and layout.steps.tolist() == [3, 1]
    for t in (1, 2, 3):
        assert input_ids[0, layout.latent_column(t)] == cfg.latent_token_id
        assert all(input_ids[0, c] == cfg.replay_token_id for c in layout.replay_columns(t))
    assert layout.end_column(layout.steps).tolist() == [start + block.end_offset(3), start + block.end_offset(1)]
    # generate's compact form expands to the same ids
    compact = torch.tensor([prompt + cfg.latent_block_ids(num_steps=3, num_replay_tokens=0)])
    assert model.expand_latent_sequences(compact, num_replay_tokens=num_replay)[0][0].tolist() == rows[0]
    if block.slots:  # a step whose latent and last replay slot trade places is refused
        swapped = input_ids.clone()
        column = layout.latent_column(2)
        swapped[0, column - 1], swapped[0, column] = cfg.latent_token_id, cfg.replay_token_id
        with pytest.raises(ValueError, match="Sample 0 .* malformed latent layout"):
            model._parse_latent_layout(swapped, num_replay)
    # lockstep padding past the parsed block: room for two more steps and their <|end_latent|>
    monkeypatch.setattr(modeling_vedas, "_agree_across_ranks", lambda module, values: [5])
    padded, *_ = modeling_vedas._pad_for_steps(model, layout, input_ids, torch.ones_like(input_ids), None, None)
    assert padded.shape[1] == layout.end_column(5) + 1 > layout.latent_column(5)


def _training_gradients(model, batch, checkpointing=None):
    """Every parameter's gradient and the losses after one training forward and backward, with gradient
    checkpointing when `checkpointing` is `{"use_reentrant": ...}`; and the tokens each decoder layer ran in the
    forward and in the backward (its recomputation), counted by a forward hook on every layer."""
    model.zero_grad()
    model.train()
    tokens = {"forward": 0, "backward": 0}
    phase = ["forward"]

    def count(module, args, kwargs):
        tokens[phase[0]] += args[0].shape[1] if args else kwargs["hidden_states"].shape[1]

    layers = model._text_model.layers
    hooks = [layer.register_forward_pre_hook(count, with_kwargs=True) for layer in layers]
    if checkpointing is not None:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=checkpointing)
    try:
        out = model(**batch)
        phase[0] = "backward"
        out.loss.backward()
    finally:
        for hook in hooks:
            hook.remove()
        if checkpointing is not None:
            model.gradient_checkpointing_disable()
        model.eval()
    grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    per_layer = {key: value / len(layers) for key, value in tokens.items()}
    return grads, (out.ce_loss.detach(), out.recon_loss.detach()), per_layer


@pytest.mark.parametrize("reentrant", [False, True])
def test_gradient_checkpointing_keeps_the_cache_and_the_gradients(model_and_processor, reentrant):
    """Under gradient checkpointing the latent forward still runs each column once (KV reuse: T + 1 passes over
    new columns only, not T + 1 prefixes), the backward recomputes each column once more, and every parameter's
    gradient equals the one without checkpointing, on a batch with replay, routing and L_recon (crop images)."""
    model, processor = model_and_processor
    batch = training_batch(model, processor, steps=3)
    width = batch["input_ids"].shape[1]
    reference, ref_losses, ref_tokens = _training_gradients(model, batch)
    assert ref_tokens == {"forward": width, "backward": 0}
    for part in ("self_attn.q_proj", "self_attn.k_proj", "depth_router", "depth_step_embed", "token_sr"):
        assert any(part in n and reference[n].abs().sum() > 0 for n in reference), part
    grads, losses, tokens = _training_gradients(model, batch, checkpointing={"use_reentrant": reentrant})
    assert tokens == {"forward": width, "backward": width}  # no prefix recomputed, whatever T
    torch.testing.assert_close(losses, ref_losses, atol=1e-5, rtol=1e-5)
    assert sorted(grads) == sorted(reference), set(reference) ^ set(grads)
    far = {}  # relative to each gradient's scale
    for name, expected in reference.items():
        error = float((grads[name] - expected).abs().max() / expected.abs().max().clamp(min=1e-12))
        if error > 1e-4:
            far[name] = error
    assert not far, far


class InPlaceSpy:
    """Stands in for `_can_update_in_place` in `routing_vedas` (`_route`) and `modeling_vedas` (`_write_embeds`):
    records `(module, wrote in place, autograd recording)` per call; with `allow = False` every write goes out of
    place, as before the in-place paths existed (the reference)."""

    def __init__(self, monkeypatch):
        from vedas import modeling_vedas, routing_vedas

        self.original, self.allow, self.calls = routing_vedas._can_update_in_place, True, []
        for module in (routing_vedas, modeling_vedas):
            monkeypatch.setattr(module, "_can_update_in_place", lambda t, name=module.__name__: self.check(name, t))

    def check(self, module, tensor):
        in_place = self.allow and self.original(tensor)
        self.calls.append((module.rsplit(".", 1)[-1], in_place, torch.is_grad_enabled() or tensor.requires_grad))
        return in_place

    def in_place(self) -> set:
        """The modules that wrote in place; fails if one did while autograd was recording."""
        assert not [call for call in self.calls if call[1] and call[2]], "an in-place write under autograd"
        return {module for module, in_place, _ in self.calls if in_place}


@pytest.mark.parametrize("checkpointing", [None, {"use_reentrant": True}, {"use_reentrant": False}])
def test_in_place_writes_never_run_under_autograd(model_and_processor, checkpointing, monkeypatch):
    """A training step with replay, routing and L_recon gives the losses and every gradient of the same step with
    every write out of place. Only the no-grad forward of a reentrant checkpoint (`_checkpoint_with_cache`, whose
    backward recomputes the layer with grad) adds the routed update in place; the embeddings never are."""
    model, processor = model_and_processor
    batch = training_batch(model, processor)
    spy = InPlaceSpy(monkeypatch)
    spy.allow = False
    reference, ref_losses, _ = _training_gradients(model, batch, checkpointing)
    spy.allow, spy.calls = True, []
    grads, losses, _ = _training_gradients(model, batch, checkpointing)
    reentrant = checkpointing is not None and checkpointing["use_reentrant"]
    assert spy.in_place() == ({"routing_vedas"} if reentrant else set())
    assert {module for module, *_ in spy.calls} == {"routing_vedas", "modeling_vedas"}
    torch.testing.assert_close(losses, ref_losses, atol=0, rtol=0)
    assert sorted(grads) == sorted(reference)
    for name, expected in reference.items():
        torch.testing.assert_close(grads[name], expected, atol=1e-7, rtol=1e-6, msg=name)


def test_no_grad_latent_forward_writes_in_place_but_not_into_the_callers_embeddings(model_and_processor, monkeypatch):
    """Without autograd the routed update and the steps' z(t) and B(t) are written in place, with the logits and
    trace of the out-of-place writes; `inputs_embeds` passed by the caller is copied first, never written."""
    model, processor = model_and_processor
    batch = training_batch(model, processor)
    batch.pop("crop_images")
    spy = InPlaceSpy(monkeypatch)
    with torch.no_grad():
        spy.allow = False
        reference = model(**batch, output_latent_trace=True)
        spy.allow, spy.calls = True, []
        out = model(**batch, output_latent_trace=True)
    assert spy.in_place() == {"routing_vedas", "modeling_vedas"}
    assert torch.equal(out.logits, reference.logits)
    for ours, theirs in zip(out.latent_trace, reference.latent_trace):
        assert torch.equal(ours["replay_indices"], theirs["replay_indices"])
        assert torch.equal(ours["replay_weights"], theirs["replay_weights"])
    # a prompt without an image: the embeddings are the caller's tensor itself (no merger outputs scattered in)
    inputs = make_inputs(processor, ["what colour ?"], [[]])
    ids, mask = model._append_latent_block(inputs["input_ids"], inputs["attention_mask"], None, 2, 4)[:2]
    with torch.no_grad():
        embeds = model.model.get_input_embeddings()(ids)
        kept = embeds.clone()
        given = model(input_ids=ids, attention_mask=mask, inputs_embeds=embeds).logits
        expected = model(input_ids=ids, attention_mask=mask).logits
    assert torch.equal(embeds, kept)
    assert torch.equal(given, expected)
