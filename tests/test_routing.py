"""Routing depth scaling (RDS; docs/design.md, "Routing depth scaling"): identity at init, the layer against
hand-written references, exact KV caching, batch invariance, global mode, α forms, attention backends, gradients
and config errors.

Every test runs on both backbones. Layer-level references call the backbone's own decoder layer class
(`Qwen2VLDecoderLayer.forward` / `Qwen2_5_VLDecoderLayer.forward`) on the Vedas layer, which bypasses the routing
mixin but uses the same weights.
"""

import json
import math

import pytest
import torch
from transformers import AutoProcessor, Qwen2_5_VLForConditionalGeneration, Qwen2VLForConditionalGeneration

from conftest import BACKBONES, load_vedas, make_inputs, perturb_vedas, quadrant_image
from vedas.routing_vedas import VedasCache, VedasDecoderLayerMixin
from vedas_trainer.checkpoint import BACKBONES as CLASSES


QUESTIONS = ["what colour is the arrow in the final cell ?", "which ?", "where does the arrow go ?"]
IMAGES = [((112, 84), 1), ((56, 112), 2), ((84, 84), 3)]
CONTINUATION = " the answer is red . the arrow moves left then down to the final cell"


def images(n=len(IMAGES)):
    return [quadrant_image(size, seed=seed) for size, seed in IMAGES[:n]]


def routing_layers(model):
    return [layer for layer in model.model.language_model.layers if getattr(layer, "is_routing_layer", False)]


def backbone_layer_class(layer):
    """The backbone decoder layer class a Vedas layer derives from (first base after the mixin)."""
    mro = type(layer).__mro__
    return mro[mro.index(VedasDecoderLayerMixin) + 1]


def additive_mask(allowed, dtype):
    """(b, q, k) bool -> (b, 1, q, k) additive float mask."""
    mask = torch.zeros(allowed.shape, dtype=dtype)
    return mask.masked_fill(~allowed, torch.finfo(dtype).min)[:, None]


def causal_mask(valid, dtype):
    """Causal mask over a (b, l) validity: query i sees valid keys j <= i (a query also sees itself)."""
    length = valid.shape[1]
    allowed = torch.ones(length, length, dtype=torch.bool).tril()[None] & valid[:, None, :]
    allowed = allowed | torch.eye(length, dtype=torch.bool)[None]
    return additive_mask(allowed, dtype)


def capture_layers(model):
    """Forward hooks recording, per routing layer, its input hidden states, position embeddings and output."""
    records, handles = {}, []
    for layer in routing_layers(model):
        def hook(module, args, kwargs, output, idx=layer.layer_idx):
            hidden = args[0] if args else kwargs["hidden_states"]
            records[idx] = (hidden.detach(), tuple(t.detach() for t in kwargs["position_embeddings"]), output.detach())

        handles.append(layer.register_forward_hook(hook, with_kwargs=True))
    return records, handles


def selection_masks(out):
    """(layer, depth) -> (batch, l) bool selection, from `output_router_scores=True`."""
    return {key: selected for key, (scores, selected) in out.latent_trace[0]["router_scores"].items()}


@pytest.fixture(params=BACKBONES)
def backbone(request):
    return request.param


def load(vedas_dirs, backbone, perturb=True, **overrides):
    """`load_vedas` with config overrides; a `max_depth` other than the checkpoint's changes the shape of e(d), whose
    rows then start from `depth_gate_init` (`ignore_mismatched_sizes`)."""
    folder = vedas_dirs[backbone]
    if "max_depth" not in overrides:
        model, processor = load_vedas(folder, **overrides)
    else:
        model_type = json.loads((folder / "config.json").read_text())["model_type"]
        _, config_class, model_class = CLASSES["qwen2_vl" if model_type == "vedas" else "qwen2_5_vl"]
        config = config_class.from_pretrained(folder, **overrides)
        model = model_class.from_pretrained(folder, config=config, ignore_mismatched_sizes=True).eval()
        processor = AutoProcessor.from_pretrained(folder)
        processor.tokenizer.padding_side = "left"
    return (perturb_vedas(model) if perturb else model), processor


def forward(model, inputs, **kwargs):
    with torch.no_grad():
        return model(**inputs, **kwargs)


# ------------------------------------------------------------------------------------------------ identity at init
def test_identity_at_init_equals_base_model(backbone, base_dirs, vedas_dirs):
    """depth_gate_init = 0: the converted model's logits equal the base model's (routing does select tokens)."""
    base_class = Qwen2VLForConditionalGeneration if backbone == "qwen2_vl" else Qwen2_5_VLForConditionalGeneration
    base = base_class.from_pretrained(base_dirs[backbone]).eval()
    base_processor = AutoProcessor.from_pretrained(base_dirs[backbone])
    base_processor.tokenizer.padding_side = "left"
    model, processor = load(vedas_dirs, backbone, perturb=False)
    assert model.config.depth_gate_init == 0.0
    with torch.no_grad():  # a non-trivial router: the selection changes, the output must not
        for layer in routing_layers(model):
            layer.depth_router.weight.normal_(0.0, 1.0, generator=torch.Generator().manual_seed(layer.layer_idx))
    inputs = make_inputs(processor, QUESTIONS[:2], images(2))
    base_inputs = make_inputs(base_processor, QUESTIONS[:2], images(2))
    assert torch.equal(inputs["input_ids"], base_inputs["input_ids"])
    out = forward(model, inputs, output_router_scores=True)
    expected = forward(base, base_inputs).logits
    assert all(stats["selected"] > 0 for stats in out.router_stats.values())
    vocab = len(base_processor.tokenizer)
    valid = inputs["attention_mask"].bool()
    torch.testing.assert_close(out.logits[..., :vocab][valid], expected[..., :vocab][valid], atol=1e-5, rtol=1e-5)


def test_full_selection_with_unit_gate_applies_the_layer_twice(backbone, vedas_dirs):
    """e = 1, s = 1 and α >= every token: out = H0 + (f(H0) - H0) = f(H0), the backbone layer applied twice."""
    model, processor = load(vedas_dirs, backbone, perturb=False, routing_topk=1000)
    with torch.no_grad():
        for layer in routing_layers(model):
            layer.depth_router.weight.zero_()
            layer.depth_router.bias.fill_(100.0)  # sigmoid(100) == 1.0 in float32
            layer.depth_step_embed.weight.fill_(1.0)
    inputs = make_inputs(processor, QUESTIONS[:1], images(1))
    records, handles = capture_layers(model)
    out = forward(model, inputs)
    for handle in handles:
        handle.remove()
    length = inputs["input_ids"].shape[1]
    assert set(records) == set(model.config.routing_layers)
    assert all(float(stats["selected"]) == length for stats in out.router_stats.values())
    for layer in routing_layers(model):
        hidden, position_embeddings, output = records[layer.layer_idx]
        mask = causal_mask(torch.ones(1, length, dtype=torch.bool), hidden.dtype)
        layer_class = backbone_layer_class(layer)
        with torch.no_grad():
            once = layer_class.forward(layer, hidden, attention_mask=mask, position_embeddings=position_embeddings)
            twice = layer_class.forward(layer, once, attention_mask=mask, position_embeddings=position_embeddings)
        assert (twice - once).abs().max() > 1e-3  # the second pass matters
        torch.testing.assert_close(output, twice, atol=1e-5, rtol=1e-5)


# ---------------------------------------------------------------------------------------------- cache equivalence
def sequence_with_continuation(processor, n=2):
    """A left-padded image+text batch followed by a shared text continuation; labels supervise the continuation."""
    inputs = make_inputs(processor, QUESTIONS[:n], images(n))
    extra = processor.tokenizer(CONTINUATION, add_special_tokens=False, return_tensors="pt")["input_ids"]
    extra = extra.expand(n, -1)
    prompt_length = inputs["input_ids"].shape[1]
    full = dict(inputs)
    full["input_ids"] = torch.cat([inputs["input_ids"], extra], 1)
    full["attention_mask"] = torch.cat([inputs["attention_mask"], torch.ones_like(extra)], 1)
    full["mm_token_type_ids"] = torch.cat([inputs["mm_token_type_ids"], torch.zeros_like(extra).int()], 1)
    labels = torch.full_like(full["input_ids"], -100)
    labels[:, prompt_length:] = extra
    return full, labels, prompt_length


@pytest.mark.parametrize("routing_positions,max_depth", [("original", 1), ("rearranged", 2)])
def test_one_shot_equals_chunked_equals_token_by_token(backbone, vedas_dirs, routing_positions, max_depth):
    model, processor = load(vedas_dirs, backbone, routing_positions=routing_positions, max_depth=max_depth)
    full, labels, prompt_length = sequence_with_continuation(processor)
    length = full["input_ids"].shape[1]
    # one shot: the labels mark the routing prompt (everything before the first supervised token)
    one_shot = forward(model, full, labels=labels, output_router_scores=True)
    positions, _ = model.model.get_rope_index(
        full["input_ids"], mm_token_type_ids=full["mm_token_type_ids"], image_grid_thw=full["image_grid_thw"],
        attention_mask=full["attention_mask"],
    )
    later = torch.stack([m[:, prompt_length:] for m in selection_masks(one_shot).values()])
    assert later.any() and not later.all()  # later tokens are compared with the prompt's threshold both ways

    def run(boundaries):
        cache = VedasCache(config=model.config.text_config)
        logits, begin = [], 0
        for end in boundaries:
            chunk = {
                "input_ids": full["input_ids"][:, begin:end], "attention_mask": full["attention_mask"][:, :end],
                "mm_token_type_ids": full["mm_token_type_ids"][:, begin:end], "position_ids": positions[:, :, begin:end],
            }
            if begin == 0:
                chunk.update(pixel_values=full["pixel_values"], image_grid_thw=full["image_grid_thw"])
            out = forward(model, chunk, past_key_values=cache, use_cache=True)
            logits.append(out.logits)
            begin = end
        return torch.cat(logits, 1)

    extra = length - prompt_length
    chunked = run([prompt_length, prompt_length + extra // 3, prompt_length + 2 * extra // 3, length])
    stepwise = run([prompt_length, *range(prompt_length + 1, length + 1)])
    valid = full["attention_mask"].bool()
    torch.testing.assert_close(chunked[valid], one_shot.logits[valid], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(stepwise[valid], one_shot.logits[valid], atol=1e-4, rtol=1e-4)


def test_cache_batch_operations_move_the_routing_state(backbone, vedas_dirs):
    """generate's beam search reorders the cache (and may repeat or select rows): the routing keys, thresholds and
    counters must follow the batch rows like the main keys do."""
    model, processor = load(vedas_dirs, backbone)
    full, _, prompt_length = sequence_with_continuation(processor)
    positions, _ = model.model.get_rope_index(
        full["input_ids"], mm_token_type_ids=full["mm_token_type_ids"], image_grid_thw=full["image_grid_thw"],
        attention_mask=full["attention_mask"],
    )
    prompt = {key: value if key in ("pixel_values", "image_grid_thw") else value[:, :prompt_length]
              for key, value in full.items()}

    def continue_after(operation, rows):
        cache = VedasCache(config=model.config.text_config)
        forward(model, prompt, past_key_values=cache, use_cache=True)
        assert cache.routing_kv and cache.routing_thresholds
        operation(cache)
        rest = {"input_ids": full["input_ids"][rows, prompt_length:], "attention_mask": full["attention_mask"][rows],
                "mm_token_type_ids": full["mm_token_type_ids"][rows, prompt_length:],
                "position_ids": positions[:, rows, prompt_length:]}
        return forward(model, rest, past_key_values=cache, use_cache=True).logits

    reference = continue_after(lambda cache: None, torch.tensor([0, 1]))
    swap = torch.tensor([1, 0])
    torch.testing.assert_close(continue_after(lambda c: c.reorder_cache(swap), swap), reference[swap],
                               atol=1e-5, rtol=1e-5)
    repeat = torch.tensor([0, 0, 1, 1])
    torch.testing.assert_close(continue_after(lambda c: c.batch_repeat_interleave(2), repeat), reference[repeat],
                               atol=1e-5, rtol=1e-5)
    keep = torch.tensor([1])
    torch.testing.assert_close(continue_after(lambda c: c.batch_select_indices(keep), keep), reference[keep],
                               atol=1e-5, rtol=1e-5)


# ----------------------------------------------------------------------------------------------- batch invariance
def test_left_padded_batch_equals_each_prompt_alone(backbone, vedas_dirs):
    model, processor = load(vedas_dirs, backbone)
    batch_inputs = make_inputs(processor, QUESTIONS, images())
    lengths = batch_inputs["attention_mask"].sum(-1)
    assert len(set(lengths.tolist())) == len(QUESTIONS)
    batch = forward(model, batch_inputs, output_router_scores=True)
    batch_selection = selection_masks(batch)
    for row, (question, image) in enumerate(zip(QUESTIONS, images())):
        single = forward(model, make_inputs(processor, [question], [image]), output_router_scores=True)
        n = int(lengths[row])
        torch.testing.assert_close(batch.logits[row, -n:], single.logits[0], atol=1e-4, rtol=1e-4)
        for key, selected in selection_masks(single).items():
            assert torch.equal(batch_selection[key][row, -n:], selected[0])
            assert not batch_selection[key][row, :-n].any()


# ---------------------------------------------------------------------------------------------------- global mode
def test_global_mode_matches_the_formula(backbone, vedas_dirs):
    """Top-α over the valid tokens of the whole sequence, a causal second pass among them, gated write-back."""
    alpha = 5
    model, processor = load(vedas_dirs, backbone, routing="global", routing_topk=alpha)
    inputs, labels, _ = sequence_with_continuation(processor)  # labels mark a prompt, which global mode ignores
    valid = inputs["attention_mask"].bool()
    records, handles = capture_layers(model)
    forward(model, inputs, labels=labels)
    for handle in handles:
        handle.remove()
    for layer in routing_layers(model):
        hidden, (cos, sin), output = records[layer.layer_idx]
        layer_class = backbone_layer_class(layer)
        with torch.no_grad():
            h0 = layer_class.forward(layer, hidden, attention_mask=causal_mask(valid, hidden.dtype),
                                     position_embeddings=(cos, sin))
            scores = torch.sigmoid(h0 @ layer.depth_router.weight[0] + layer.depth_router.bias[0])
            expected = h0.clone()
            for row in range(hidden.shape[0]):
                columns = valid[row].nonzero().squeeze(1)
                chosen = columns[scores[row, columns].topk(alpha).indices].sort().values
                h_sel = h0[row, chosen][None]
                f_sel = layer_class.forward(
                    layer, h_sel, attention_mask=causal_mask(torch.ones(1, alpha, dtype=torch.bool), h0.dtype),
                    position_embeddings=(cos[row, chosen][None], sin[row, chosen][None]),
                )[0]
                gate = scores[row, chosen, None] * layer.depth_step_embed.weight[0]
                expected[row, chosen] = h0[row, chosen] + gate * (f_sel - h0[row, chosen])
        assert (expected - h0)[valid].abs().max() > 1e-3
        torch.testing.assert_close(output[valid], expected[valid], atol=1e-5, rtol=1e-5)


def test_global_mode_refuses_a_filled_cache_and_generates_without_one(backbone, vedas_dirs):
    model, processor = load(vedas_dirs, backbone, routing="global")
    inputs = make_inputs(processor, QUESTIONS[:1], images(1))
    out = forward(model, inputs, use_cache=True)
    step = {"input_ids": inputs["input_ids"][:, -1:], "attention_mask": torch.ones(1, inputs["input_ids"].shape[1] + 1,
            dtype=torch.long), "mm_token_type_ids": inputs["mm_token_type_ids"][:, -1:]}
    with pytest.raises(ValueError, match="routing='global'.*use_cache=False"):
        forward(model, step, past_key_values=out.past_key_values, use_cache=True)
    generated = model.generate(**inputs, num_latent_steps=0, max_new_tokens=3, do_sample=False)
    ids = inputs["input_ids"]  # greedy by hand: a full recompute per token
    for _ in range(3):
        full = {**inputs, "input_ids": ids, "attention_mask": torch.ones_like(ids),
                "mm_token_type_ids": torch.cat([inputs["mm_token_type_ids"],
                                                torch.zeros(1, ids.shape[1] - inputs["input_ids"].shape[1]).int()], 1)}
        ids = torch.cat([ids, forward(model, full).logits[:, -1].argmax(-1, keepdim=True)], 1)
    assert generated.tolist() == ids.tolist()


def test_global_equals_causal_when_the_whole_sequence_is_the_prompt(backbone, vedas_dirs):
    inputs = None
    logits = []
    for mode in ("causal", "global"):
        model, processor = load(vedas_dirs, backbone, routing=mode)
        inputs = inputs or make_inputs(processor, QUESTIONS[:2], images(2))
        logits.append(forward(model, inputs).logits)
    valid = inputs["attention_mask"].bool()
    torch.testing.assert_close(logits[0][valid], logits[1][valid], atol=1e-5, rtol=1e-5)


# ------------------------------------------------------------------------------------------------------- α forms
def expected_alpha(form, topk, layer_idx, num_layers, prompt_length):
    if form == "count":
        return topk
    if form == "fraction":
        return math.ceil(topk * prompt_length)
    if form == "cosine":
        alpha_s, alpha_e = topk
        return round(alpha_e + (alpha_s - alpha_e) / 2 * (1 + math.cos(math.pi * layer_idx / num_layers)))
    return prompt_length  # α larger than the sequence: every valid token


@pytest.mark.parametrize("form,topk", [("count", 6), ("fraction", 0.3), ("cosine", [12, 4]), ("all", 1000)])
@pytest.mark.parametrize("routing", ["causal", "global"])
def test_alpha_forms_give_the_expected_counts(backbone, vedas_dirs, form, topk, routing):
    model, processor = load(vedas_dirs, backbone, routing_topk=topk, routing_layers=[0, 1, 2, 3], routing=routing)
    num_layers = model.config.text_config.num_hidden_layers
    inputs = make_inputs(processor, QUESTIONS[:2], images(2))
    out = forward(model, inputs, output_router_scores=True)
    lengths = inputs["attention_mask"].sum(-1)
    selections = selection_masks(out)
    assert sorted(selections) == [(layer, 0) for layer in range(num_layers)]
    counts = set()
    for (layer, _), selected in selections.items():
        expected = [min(expected_alpha(form, topk, layer, num_layers, int(n)), int(n)) for n in lengths]
        assert selected.sum(-1).tolist() == expected, (layer, form)
        assert float(out.router_stats[(layer, 0)]["selected"]) == sum(expected) / len(expected)
        assert not selected[~inputs["attention_mask"].bool()].any()
        counts.add(tuple(expected))
        if form == "all":
            assert torch.equal(selected, inputs["attention_mask"].bool())
    if form == "cosine":
        assert len(counts) == num_layers  # 12, 11, 8, 5: the schedule decays over the layers


@pytest.mark.parametrize("routing", ["causal", "global"])
def test_padding_is_never_selected_even_with_saturated_scores(backbone, vedas_dirs, routing):
    """All scores are 1.0 (ties everywhere): exactly α valid tokens of the prompt, never a pad position."""
    model, processor = load(vedas_dirs, backbone, routing=routing, routing_topk=6)
    with torch.no_grad():
        for layer in routing_layers(model):
            layer.depth_router.weight.zero_()
            layer.depth_router.bias.fill_(100.0)
    inputs = make_inputs(processor, QUESTIONS[:2], images(2))
    pad = ~inputs["attention_mask"].bool()
    assert pad.any()
    out = forward(model, inputs, output_router_scores=True)
    for selected in selection_masks(out).values():
        assert not selected[pad].any()
        assert selected.sum(-1).tolist() == [6, 6]


# ------------------------------------------------------------------------------------------------- sdpa and eager
def test_sdpa_and_eager_agree(backbone, vedas_dirs):
    logits = []
    for implementation in ("sdpa", "eager"):
        model, processor = load(vedas_dirs, backbone, attn_implementation=implementation)
        assert model.config.text_config._attn_implementation == implementation
        inputs = make_inputs(processor, QUESTIONS[:2], images(2))
        logits.append(forward(model, inputs).logits)
    valid = inputs["attention_mask"].bool()
    torch.testing.assert_close(logits[0][valid], logits[1][valid], atol=1e-4, rtol=1e-4)


# ------------------------------------------------------------------------------------------------ training signal
def supervised_batch(processor):
    full, labels, _ = sequence_with_continuation(processor)
    return full, labels


def test_gradient_reaches_step_embedding_at_init(backbone, vedas_dirs):
    """With e = 0 the output does not depend on the router (its gradient is exactly 0) but e gets a gradient."""
    model, processor = load(vedas_dirs, backbone, perturb=False)
    model.train()
    inputs, labels = supervised_batch(processor)
    model(**inputs, labels=labels).loss.backward()
    for layer in routing_layers(model):
        assert layer.depth_step_embed.weight.grad.abs().sum() > 0
        assert layer.depth_router.weight.grad.abs().sum() == 0


def test_one_optimizer_step_moves_router_and_step_embedding(backbone, vedas_dirs):
    model, processor = load(vedas_dirs, backbone, perturb=False)
    with torch.no_grad():  # e small but nonzero: the router now receives a gradient through s
        for layer in routing_layers(model):
            layer.depth_step_embed.weight.fill_(0.01)
    model.train()
    names = [n for n, _ in model.named_parameters() if "depth_router" in n or "depth_step_embed" in n]
    assert len(names) == 3 * len(model.config.routing_layers)
    before = {n: p.detach().clone() for n, p in model.named_parameters() if n in names}
    optimizer = torch.optim.SGD(model.parameters(), lr=1.0)
    inputs, labels = supervised_batch(processor)
    model(**inputs, labels=labels).loss.backward()
    optimizer.step()
    params = dict(model.named_parameters())
    for name in names:
        assert not torch.equal(params[name], before[name]), name


def test_backward_through_two_depth_steps(backbone, vedas_dirs):
    model, processor = load(vedas_dirs, backbone, max_depth=2)
    model.train()
    inputs, labels = supervised_batch(processor)
    out = model(**inputs, labels=labels)
    assert sorted(out.router_stats) == [(layer, depth) for layer in model.config.routing_layers for depth in (0, 1)]
    out.loss.backward()
    for layer in routing_layers(model):
        grad = layer.depth_step_embed.weight.grad
        assert grad.shape[0] == 2 and torch.isfinite(grad).all()
        assert (grad.abs().sum(-1) > 0).all()  # both depth steps get a gradient
        assert layer.depth_router.weight.grad.abs().sum() > 0


def test_generate_records_no_router_statistics_but_forward_does(backbone, vedas_dirs, monkeypatch):
    """Nothing reads the router statistics in `generate`: its forwards (latent phase and decoding) skip them while
    routing runs as before; a forward records them, also after a `generate` that failed."""
    model, processor = load(vedas_dirs, backbone)
    states, build = [], type(model)._routing_state

    def recorded_state(self, *args, **kwargs):
        states.append(build(self, *args, **kwargs))
        return states[-1]

    monkeypatch.setattr(type(model), "_routing_state", recorded_state)
    inputs = make_inputs(processor, QUESTIONS[:1], images(1))
    model.generate(**inputs, num_latent_steps=2, max_new_tokens=3, do_sample=False)
    assert len(states) > 3 and any(False in state.attention_calls for state in states)  # second passes ran
    assert not any(state.record_stats or state.router_stats for state in states)
    with pytest.raises(ValueError, match="num_latent_steps"):
        model.generate(**inputs, num_latent_steps=-1, max_new_tokens=1)
    states.clear()
    out = forward(model, inputs)
    assert len(states) == 1 and states[0].record_stats
    expected = [(layer, depth) for layer in model.config.routing_layers for depth in range(model.config.max_depth)]
    assert sorted(out.router_stats) == expected


# ---------------------------------------------------------------------------------------------------- bad configs
BAD_CONFIGS = [
    ({"routing_layers": [0, 7]}, r"routing_layers.*\[7\].*outside"),
    ({"routing_layers": [-1]}, r"routing_layers.*outside"),
    ({"routing_topk": 0}, r"routing_topk.*>= 1"),
    ({"routing_topk": 1.5}, r"routing_topk.*fraction.*\(0, 1\]"),
    ({"routing_topk": [1]}, r"routing_topk.*cosine schedule.*\[α_s, α_e\]"),
    ({"max_depth": 0}, r"max_depth.*>= 1"),
    ({"routing": "sideways"}, r"routing='sideways' is not one of"),
    ({"routing_positions": "shuffled"}, r"routing_positions='shuffled' is not one of"),
]


@pytest.mark.parametrize("override,message", BAD_CONFIGS)
def test_bad_configs_raise_clear_errors(backbone, vedas_dirs, override, message):
    folder = vedas_dirs[backbone]
    settings = json.loads((folder / "config.json").read_text())
    _, config_class, _ = CLASSES["qwen2_vl" if settings.pop("model_type") == "vedas" else "qwen2_5_vl"]
    with pytest.raises(ValueError, match=message):
        config_class(**{**settings, **override})
    # or as from_pretrained overrides (set after the config's own checks ran): the model refuses to build
    with pytest.raises(ValueError, match=message):
        load_vedas(folder, **override)
