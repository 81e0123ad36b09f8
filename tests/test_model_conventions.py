"""transformers' model conventions on the Vedas classes, the way `ModelTesterMixin` checks them on its own models:
every new parameter initialised on every loading path, 4-D attention masks, packed (padding-free) rows,
hidden states / attentions / `return_dict=False`, eager == SDPA, and `inputs_embeds`.

Routing is made active (non-zero e(d), a random router) wherever an equivalence is checked, so that a convention
that routing broke would show in the numbers.
"""

import json

import pytest
import torch
from transformers import AutoProcessor

from conftest import (
    ALL_BACKBONES, base_positions, image_args, load_vedas, make_inputs, perturb_vedas, quadrant_image, select_images,
    vision_tower,
)
from vedas.routing_vedas import DepthStepEmbedding, VedasCache
from vedas_trainer.checkpoint import BACKBONES as CLASSES


QUESTIONS = ["what colour is the arrow in the final cell ?", "which ?"]
TEXTS = ["the arrow moves left then down to the final cell", "red", "which colour is the start cell ?"]


@pytest.fixture(params=ALL_BACKBONES)
def backbone(request):
    return request.param


def classes(backbone):
    base_class, config_class, model_class = CLASSES[backbone]
    return base_class, config_class, model_class


def vedas_params(model):
    """name -> parameter of the Vedas modules (router, e(d), token_sr)."""
    keys = ("depth_router", "depth_step_embed", "token_sr")
    return {name: p for name, p in model.named_parameters() if any(key in name for key in keys)}


def check_vedas_init(model, gate):
    """e(d) == gate exactly; router and token_sr weights finite with std near initializer_range, biases zero."""
    std = model.config.text_config.initializer_range
    params = vedas_params(model)
    assert {n.split(".")[-2] for n in params} >= {"depth_router", "depth_step_embed", "0", "2"}
    for name, param in params.items():
        if "depth_step_embed" in name:
            assert torch.equal(param, torch.full_like(param, gate)), (name, param.min(), param.max())
        elif name.endswith("bias"):
            assert torch.equal(param, torch.zeros_like(param)), name
        else:
            assert torch.isfinite(param).all(), name
            assert 0.5 * std < float(param.detach().std()) < 2 * std, (name, float(param.detach().std()))


def text_batch(processor, texts, padding_side="left"):
    processor.tokenizer.padding_side = padding_side
    batch = processor.tokenizer(texts, return_tensors="pt", padding=True)
    processor.tokenizer.padding_side = "left"
    return batch


# ------------------------------------------------------------------------------------------------ initialisation
def test_new_parameters_are_initialised_on_every_loading_path(backbone, all_base_dirs, all_vedas_dirs, tmp_path):
    """From config, from a base checkpoint (Vedas keys missing), and with a resized e(d) (`max_depth` changed under
    `ignore_mismatched_sizes`): e(d) == depth_gate_init exactly, router and token_sr initialised; loaded values are
    never overwritten."""
    _, config_class, model_class = classes(backbone)
    config = config_class.from_pretrained(all_vedas_dirs[backbone], depth_gate_init=0.25)
    check_vedas_init(model_class(config), 0.25)

    from_base, info = model_class.from_pretrained(all_base_dirs[backbone], config=config, output_loading_info=True)
    assert info["missing_keys"] and all(any(k in key for k in ("depth_", "token_sr")) for key in info["missing_keys"])
    check_vedas_init(from_base, 0.25)

    deeper = config_class.from_pretrained(all_vedas_dirs[backbone], depth_gate_init=-0.5, max_depth=3)
    resized = model_class.from_pretrained(all_vedas_dirs[backbone], config=deeper, ignore_mismatched_sizes=True)
    saved, _ = load_vedas(all_vedas_dirs[backbone])
    for name, param in vedas_params(resized).items():
        if "depth_step_embed" in name:
            assert param.shape[0] == 3 and torch.equal(param, torch.full_like(param, -0.5)), name
        else:  # the router and token_sr load from the checkpoint unchanged
            assert torch.equal(param, vedas_params(saved)[name]), name

    trained = perturb_vedas(saved)  # a trained checkpoint keeps its e(d) whatever depth_gate_init says
    trained.save_pretrained(tmp_path)
    reloaded = model_class.from_pretrained(tmp_path, config=config_class.from_pretrained(tmp_path, depth_gate_init=3.0))
    for name, param in vedas_params(reloaded).items():
        assert torch.equal(param, vedas_params(trained)[name]), name


def test_base_checkpoint_loaded_into_vedas_with_gate_zero_computes_the_base(backbone, all_base_dirs, all_vedas_dirs):
    """`from_pretrained(<base checkpoint>, config=vedas_config)` with the default gate 0 gives the base's logits
    exactly, while the freshly initialised routers do select tokens."""
    base_class, config_class, model_class = classes(backbone)
    base = base_class.from_pretrained(all_base_dirs[backbone]).eval()
    config = config_class.from_pretrained(all_vedas_dirs[backbone])
    assert config.depth_gate_init == 0.0
    model = model_class.from_pretrained(all_base_dirs[backbone], config=config).eval()
    processor = AutoProcessor.from_pretrained(all_base_dirs[backbone])
    processor.tokenizer.padding_side = "left"
    if processor.chat_template is None:  # ChameleonProcessor does not load its own: the tokenizer's is the one
        processor.chat_template = processor.tokenizer.chat_template
    images = [quadrant_image((112, 84), seed=1), quadrant_image((56, 112), seed=2)]
    inputs = make_inputs(processor, QUESTIONS, images)
    inputs = {**inputs, **base_positions(model, inputs)}
    with torch.no_grad():
        expected = base(**inputs).logits
        out = model(**inputs)
    assert all(float(stats["selected"]) > 0 for stats in out.router_stats.values())
    vocab = len(processor.tokenizer)
    torch.testing.assert_close(out.logits[..., :vocab], expected[..., :vocab], rtol=0, atol=0)


def test_perturb_vedas_refuses_an_uninitialised_gate(all_vedas_dirs):
    """The test helper checks the real init instead of hiding it: e(d) away from depth_gate_init is an error."""
    model, _ = load_vedas(all_vedas_dirs["qwen2_vl"])
    with torch.no_grad():
        next(m for m in model.modules() if isinstance(m, DepthStepEmbedding)).weight.fill_(1e30)
    with pytest.raises(AssertionError, match="depth_gate_init=0.0"):
        perturb_vedas(model)


# -------------------------------------------------------------------------------------------- shared helpers
def routed_model(all_vedas_dirs, backbone, **overrides):
    """A converted checkpoint with routing made active (random router, e(d) around 0.5)."""
    model, processor = load_vedas(all_vedas_dirs[backbone], **overrides)
    return perturb_vedas(model), processor


def image_inputs(processor):
    images = [quadrant_image((112, 84), seed=1), quadrant_image((56, 112), seed=2)]
    return make_inputs(processor, QUESTIONS, images)


def latent_batch(model, inputs, steps=2, answer=(11, 12, 13)):
    """The prompts of `inputs` in the latent layout with T steps, then <|end_latent|> and a short answer."""
    cfg = model.config
    images = image_args(model, inputs)
    ids, mask, types = model.build_latent_layout(
        inputs["input_ids"], inputs["attention_mask"], images.pop("mm_token_type_ids"), steps, cfg.num_replay_tokens
    )
    tail = torch.tensor([[cfg.end_latent_token_id, *answer]]).expand(ids.shape[0], -1)
    return {
        "input_ids": torch.cat([ids, tail], 1), "attention_mask": torch.cat([mask, torch.ones_like(tail)], 1),
        "mm_token_type_ids": torch.cat([types, torch.zeros_like(tail).int()], 1), **images,
    }


def run(model, **inputs):
    with torch.no_grad():
        return model(**inputs)


# ------------------------------------------------------------------------- hidden states, attentions, tuples
@pytest.mark.filterwarnings("ignore:Every token of some sequence is supervised")
def test_hidden_states_attentions_and_tuple_output(backbone, all_vedas_dirs):
    """One hidden state per layer plus the embeddings, the last one giving the logits; one attention map per layer
    (no second-pass maps); eager == SDPA; `return_dict=False` gives the dict's tuple."""
    model, processor = routed_model(all_vedas_dirs, backbone, attn_implementation="eager")
    sdpa, _ = routed_model(all_vedas_dirs, backbone, attn_implementation="sdpa")
    inputs = image_inputs(processor)
    batch, length = inputs["input_ids"].shape
    layers = model.config.text_config.num_hidden_layers
    out = run(model, **inputs, output_hidden_states=True, output_attentions=True)
    assert all(float(stats["selected"]) > 0 for stats in out.router_stats.values())
    assert len(out.hidden_states) == layers + 1
    assert all(h.shape == (batch, length, model.config.text_config.hidden_size) for h in out.hidden_states)
    embeds = model._embed(inputs["input_ids"], inputs["pixel_values"], inputs.get("image_grid_thw"))
    torch.testing.assert_close(out.hidden_states[0], embeds, rtol=0, atol=0)
    torch.testing.assert_close(model._lm_logits(out.hidden_states[-1]), out.logits, rtol=0, atol=0)
    heads = model.config.text_config.num_attention_heads
    assert len(out.attentions) == layers
    assert all(a.shape == (batch, heads, length, length) for a in out.attentions)
    valid = inputs["attention_mask"].bool()
    for attn in out.attentions:
        torch.testing.assert_close(attn.sum(-1)[valid[:, None].expand(-1, heads, -1)], torch.ones(valid.sum() * heads))

    fast = run(sdpa, **inputs)
    torch.testing.assert_close(fast.logits[valid], out.logits[valid], rtol=1e-5, atol=1e-5)
    as_tuple = run(model, **inputs, return_dict=False)
    assert isinstance(as_tuple, tuple) and torch.equal(as_tuple[0], out.logits)
    labels = inputs["input_ids"].masked_fill(~valid, -100)
    loss_tuple = run(model, **inputs, labels=labels, return_dict=False)
    assert torch.equal(loss_tuple[0], run(model, **inputs, labels=labels).loss)


def test_latent_forward_hidden_states_and_attentions(all_vedas_dirs):
    """A latent batch returns them over the whole sequence: the cached passes joined equal the uncached forward
    (one pass over everything), and the last hidden state gives the logits."""
    model, processor = routed_model(all_vedas_dirs, "qwen2_vl", attn_implementation="eager")
    batch = latent_batch(model, image_inputs(processor))
    length = batch["input_ids"].shape[1]
    cached = run(model, **batch, use_cache=True, output_hidden_states=True, output_attentions=True)
    single = run(model, **batch, use_cache=False, output_hidden_states=True, output_attentions=True)
    layers = model.config.text_config.num_hidden_layers
    assert len(cached.hidden_states) == len(single.hidden_states) == layers + 1
    assert len(cached.attentions) == len(single.attentions) == layers
    assert cached.attentions[0].shape[2:] == (length, length)
    valid = batch["attention_mask"].bool()  # padding columns are not computed alike by the two paths
    for got, expected in zip(cached.hidden_states, single.hidden_states):
        torch.testing.assert_close(got[valid], expected[valid], rtol=1e-4, atol=1e-5)
    for got, expected in zip(cached.attentions, single.attentions):
        torch.testing.assert_close(got.transpose(1, 2)[valid], expected.transpose(1, 2)[valid], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(model._lm_logits(cached.hidden_states[-1]), cached.logits, rtol=0, atol=0)
    assert torch.equal(run(model, **batch, return_dict=False)[0], cached.logits)


# ------------------------------------------------------------------------------------------------ inputs_embeds
def test_inputs_embeds_equal_input_ids(backbone, all_vedas_dirs):
    """Plain forward: inputs_embeds alone (text) or with input_ids (images) give the input_ids logits. A latent
    batch takes them with its input_ids, and refuses them alone, saying why."""
    model, processor = routed_model(all_vedas_dirs, backbone)
    table = model.get_input_embeddings()
    text = text_batch(processor, TEXTS)
    expected = run(model, **text).logits
    got = run(model, inputs_embeds=table(text["input_ids"]), attention_mask=text["attention_mask"]).logits
    torch.testing.assert_close(got, expected, rtol=0, atol=0)

    inputs = image_inputs(processor)
    with_ids = run(model, **inputs, inputs_embeds=table(inputs["input_ids"])).logits
    torch.testing.assert_close(with_ids, run(model, **inputs).logits, rtol=0, atol=0)

    batch = latent_batch(model, inputs)
    expected = run(model, **batch).logits
    torch.testing.assert_close(run(model, **batch, inputs_embeds=table(batch["input_ids"])).logits, expected,
                               rtol=0, atol=0)
    embeds = table(batch.pop("input_ids"))
    with pytest.raises(ValueError, match="needs input_ids"):
        run(model, **batch, inputs_embeds=embeds)


# --------------------------------------------------------------------------------------------------- 4-D masks
def four_d(attention_mask, kind):
    """The causal 4-D mask of a 2-D padding mask, as transformers builds it: bool (True attends) or additive."""
    length = attention_mask.shape[1]
    allowed = torch.ones(length, length, dtype=torch.bool).tril()[None] & attention_mask.bool()[:, None, :]
    if kind == "bool":
        return allowed[:, None]
    return torch.zeros(allowed.shape).masked_fill(~allowed, torch.finfo(torch.float32).min)[:, None]


@pytest.mark.parametrize("kind", ["bool", "float"])
def test_four_d_mask_equals_two_d_mask(backbone, all_vedas_dirs, kind):
    """A 4-D mask equivalent to the 2-D padding mask gives the same logits on every real token (left padding,
    images, routing active); masks routing cannot honour, and 4-D masks on latent batches, are refused."""
    model, processor = routed_model(all_vedas_dirs, backbone)
    inputs = image_inputs(processor)
    valid = inputs["attention_mask"].bool()
    assert not bool(valid.all())
    expected = run(model, **inputs)
    got = run(model, **{**inputs, "attention_mask": four_d(inputs["attention_mask"], kind)})
    torch.testing.assert_close(got.logits[valid], expected.logits[valid], rtol=1e-5, atol=1e-5)
    for key, stats in expected.router_stats.items():
        assert float(got.router_stats[key]["selected"]) == float(stats["selected"])

    # on a cache: the last tokens continue the prompt, with the 4-D rows of those queries over all keys
    split, full_mask = valid.shape[1] - 2, four_d(inputs["attention_mask"], kind)
    types = image_args(model, inputs)["mm_token_type_ids"]
    outputs = {}
    for name, (first, second) in {"2-D": (inputs["attention_mask"][:, :split], inputs["attention_mask"]),
                                  "4-D": (full_mask[:, :, :split, :split], full_mask[:, :, split:])}.items():
        cache = VedasCache(config=model.config.text_config)
        prefix = {**inputs, "input_ids": inputs["input_ids"][:, :split], "attention_mask": first,
                  "mm_token_type_ids": types[:, :split]}
        run(model, **prefix, past_key_values=cache, use_cache=True)
        outputs[name] = run(model, input_ids=inputs["input_ids"][:, split:], attention_mask=second,
                            mm_token_type_ids=types, past_key_values=cache, use_cache=True).logits
    torch.testing.assert_close(outputs["4-D"], outputs["2-D"], rtol=1e-5, atol=1e-5)

    bidirectional = inputs["attention_mask"].bool()[:, None, None, :].expand(-1, 1, valid.shape[1], -1)
    vision_calls = []  # refused before any work: the vision tower never runs (it does for a mask it takes)
    handle = vision_tower(model).register_forward_hook(lambda *args: vision_calls.append(1))
    try:
        with pytest.raises(ValueError, match="not causal attention over padding and packed sequences"):
            run(model, **{**inputs, "attention_mask": bidirectional})
        refused = len(vision_calls)
        run(model, **inputs)
    finally:
        handle.remove()
    assert refused == 0 and vision_calls
    batch = latent_batch(model, inputs)
    with pytest.raises(ValueError, match="latent-layout batch takes a 2-D"):
        run(model, **{**batch, "attention_mask": four_d(batch["attention_mask"], kind)})


# ------------------------------------------------------------------------------------------------- packed rows
@pytest.mark.filterwarnings("ignore:Every token of some sequence is supervised")  # the one-token sequence
@pytest.mark.parametrize("settings", ["default", "rearranged", "global"])
def test_packed_rows_equal_each_sequence_alone(backbone, all_vedas_dirs, settings):
    """DataCollatorWithFlattening's layout (one row, position_ids restarting, no attention mask) gives each
    sequence's logits alone, with routing active (causal and global selection, original and rearranged
    second-pass positions); so do 4-row positions and a block-diagonal 4-D mask."""
    if backbone == "qwen2_5_vl" and settings != "default":
        pytest.skip("the routing variants are backbone-independent")
    overrides = {"default": {}, "rearranged": {"routing_positions": "rearranged"}, "global": {"routing": "global"}}
    model, processor = routed_model(all_vedas_dirs, backbone, **overrides[settings])
    sequences = [processor.tokenizer(text, return_tensors="pt")["input_ids"] for text in TEXTS]
    labels = [ids.clone().index_fill_(1, torch.arange(ids.shape[1] // 2), -100) for ids in sequences]
    alone = [run(model, input_ids=ids, labels=lab).logits[0] for ids, lab in zip(sequences, labels)]
    expected = torch.cat(alone)
    packed_ids = torch.cat(sequences, 1)
    positions = torch.cat([torch.arange(ids.shape[1]) for ids in sequences])[None]
    out = run(model, input_ids=packed_ids, position_ids=positions, labels=torch.cat(labels, 1))
    assert all(float(stats["selected"]) > 0 for stats in out.router_stats.values())
    torch.testing.assert_close(out.logits[0], expected, rtol=1e-5, atol=1e-5)

    rows4 = torch.cat([positions[None], positions[None].expand(3, -1, -1)])
    out4 = run(model, input_ids=packed_ids, position_ids=rows4, labels=torch.cat(labels, 1))
    torch.testing.assert_close(out4.logits[0], expected, rtol=1e-5, atol=1e-5)
    segment = torch.cat([torch.full((ids.shape[1],), i) for i, ids in enumerate(sequences)])
    block = (segment[:, None] == segment[None]) & torch.ones(len(segment), len(segment), dtype=torch.bool).tril()
    out_mask = run(model, input_ids=packed_ids, position_ids=positions, attention_mask=block[None, None],
                   labels=torch.cat(labels, 1))
    torch.testing.assert_close(out_mask.logits[0], expected, rtol=1e-5, atol=1e-5)


# --------------------------------------------------------------------------------------------- routing prompt
def test_fully_supervised_rows_are_routed(backbone, all_vedas_dirs):
    """labels == input_ids (every token supervised): the whole row is the routing prompt, as without labels,
    instead of an empty prompt that selects nothing; a warning says so once."""
    model, processor = routed_model(all_vedas_dirs, backbone)
    text = text_batch(processor, TEXTS)
    labels = text["input_ids"].masked_fill(~text["attention_mask"].bool(), -100)
    model._warned.discard("all-supervised")
    with pytest.warns(UserWarning, match="no routing prompt"):
        out = run(model, **text, labels=labels)
    assert all(float(stats["selected"]) > 0 for stats in out.router_stats.values())
    torch.testing.assert_close(out.logits, run(model, **text).logits, rtol=0, atol=0)


def test_row_without_latent_block_routes_like_alone(backbone, all_vedas_dirs):
    """In a latent batch, a row with no latent block (stage 0 drawn by `uniform_prob`) ends its routing prompt where
    its supervision starts and routes over that whole prompt, as when it runs alone (with or without a cache)."""
    model, processor = routed_model(all_vedas_dirs, backbone)
    inputs = image_inputs(processor)
    types = image_args(model, inputs)["mm_token_type_ids"]
    latent = latent_batch(model, {"input_ids": inputs["input_ids"][:1], "attention_mask": inputs["attention_mask"][:1],
                                  "mm_token_type_ids": types[:1], **select_images(inputs, slice(0, 1))})
    keep = inputs["attention_mask"][1].bool()  # the second prompt without its padding, then a supervised answer
    answer = processor.tokenizer(" the arrow moves left then down", return_tensors="pt")["input_ids"]
    prompt = inputs["input_ids"][1:, keep]
    plain = {
        "input_ids": torch.cat([prompt, answer], 1),
        "mm_token_type_ids": torch.cat([types[1:, keep], torch.zeros_like(answer).int()], 1),
        "labels": torch.cat([torch.full_like(prompt, -100), answer], 1),
    }
    alone = run(model, **plain, **select_images(inputs, slice(1, 2)))
    pad = latent["input_ids"].shape[1] - plain["input_ids"].shape[1]

    def stack(latent_row, plain_row, value):  # the latent row, then the plain row left-padded to its width
        return torch.cat([latent_row, torch.cat([torch.full((1, pad), value, dtype=plain_row.dtype), plain_row], 1)])

    mixed = {
        "input_ids": stack(latent["input_ids"], plain["input_ids"], 0),
        "attention_mask": stack(latent["attention_mask"], torch.ones_like(plain["input_ids"]), 0),
        "mm_token_type_ids": stack(latent["mm_token_type_ids"], plain["mm_token_type_ids"], 0),
        "labels": stack(torch.full_like(latent["input_ids"], -100), plain["labels"], -100),
        **select_images(inputs, slice(0, 2)),
    }
    for use_cache in (True, False):
        got = run(model, **mixed, use_cache=use_cache)
        torch.testing.assert_close(got.logits[1, pad:], alone.logits[0], rtol=1e-5, atol=1e-5)
