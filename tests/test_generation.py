"""`generate` with latent steps (T > 0) and active routing (non-zero e(d)): beam search, `num_return_sequences`,
sampling, streamers, stopping criteria, a `<|latent|>` generated in the answer, sequences fed back, and the
one-line refusals (assisted decoding, static cache / compile, out-of-range T and K) that come before any work."""

import re

import pytest
import torch
from transformers import (
    CompileConfig,
    LogitsProcessor,
    LogitsProcessorList,
    StaticCache,
    StoppingCriteria,
    StoppingCriteriaList,
    TextIteratorStreamer,
)

from conftest import (
    ALL_BACKBONES, answer_log_probs, load_vedas, make_inputs, no_eos, perturb_vedas, quadrant_image, two_prompts,
    with_image_args,
)


@pytest.fixture(scope="module", params=ALL_BACKBONES)
def model_and_processor(request, all_vedas_dirs):
    model, processor = load_vedas(all_vedas_dirs[request.param])
    return perturb_vedas(model), processor


@pytest.fixture(scope="module")
def qwen2(all_vedas_dirs):
    model, processor = load_vedas(all_vedas_dirs["qwen2_vl"])
    return perturb_vedas(model), processor


class ForceTokens(LogitsProcessor):
    """Forces `tokens[n]` as the n-th generated token (1-based, counted over the calls of one generate)."""

    def __init__(self, tokens: dict):
        self.tokens, self.calls = tokens, 0

    def __call__(self, input_ids, scores):
        self.calls += 1
        if self.calls in self.tokens:
            scores = torch.full_like(scores, float("-inf"))
            scores[:, self.tokens[self.calls]] = 0.0
        return scores


class ForwardCounter:
    """Counts forwards of the text model and the vision tower: a refusal must come before any of them."""

    def __init__(self, model):
        self.calls = 0
        self.hooks = [m.register_forward_pre_hook(self.count) for m in (model.model.language_model, model.model.visual)]

    def count(self, module, args):
        self.calls += 1

    def remove(self):
        for hook in self.hooks:
            hook.remove()


def refused_before_any_work(model, inputs, match, **kwargs):
    counter = ForwardCounter(model)
    try:
        with pytest.raises(ValueError, match=match) as error:
            model.generate(**inputs, max_new_tokens=2, **kwargs)
    finally:
        counter.remove()
    assert counter.calls == 0
    assert "\n" not in str(error.value)
    return str(error.value)


# ----------------------------------------------------------------------------------------- beams and copies
def test_num_return_sequences_repeat_the_greedy_answer(model_and_processor):
    """Sampling restricted to the best token is greedy: its 3 returned sequences per prompt equal the greedy one."""
    model, processor = model_and_processor
    inputs = two_prompts(processor)
    greedy = model.generate(**inputs, num_latent_steps=2, max_new_tokens=4, do_sample=False)
    copies = model.generate(**inputs, num_latent_steps=2, max_new_tokens=4, do_sample=True, top_k=1,
                            num_return_sequences=3)
    assert copies.shape == (6, greedy.shape[1])
    assert torch.equal(copies, greedy.repeat_interleave(3, 0))
    one_beam = model.generate(**inputs, num_latent_steps=2, max_new_tokens=4, num_beams=1, do_sample=False)
    assert torch.equal(one_beam, greedy)


def test_beam_search_matches_uncached_and_teacher_forced_scores(model_and_processor):
    """Beam search on the prefilled (expanded) cache returns what the uncached loop returns (which recomputes the
    latent forward on the expanded rows and images), and each beam's score is the sum of its tokens' log-probs."""
    model, processor = model_and_processor
    inputs = two_prompts(processor)
    args = dict(num_latent_steps=2, max_new_tokens=3, num_beams=3, num_return_sequences=2, do_sample=False,
                length_penalty=0.0, return_dict_in_generate=True, output_scores=True, **no_eos(model))
    cached = model.generate(**inputs, **args)
    uncached = model.generate(**inputs, use_cache=False, **args)
    assert cached.sequences.shape[0] == 4
    assert torch.equal(cached.sequences, uncached.sequences)
    torch.testing.assert_close(cached.sequences_scores, uncached.sequences_scores, atol=1e-4, rtol=1e-4)
    forced = answer_log_probs(model, with_image_args(model, inputs), cached.sequences, 3)
    torch.testing.assert_close(cached.sequences_scores, forced.sum(-1), atol=1e-4, rtol=1e-4)
    # the best beam is at least as likely as the greedy answer
    greedy = model.generate(**inputs, num_latent_steps=2, max_new_tokens=3, do_sample=False, **no_eos(model))
    greedy_score = answer_log_probs(model, with_image_args(model, inputs), greedy, 3).sum(-1)
    assert bool((cached.sequences_scores[::2] >= greedy_score - 1e-4).all())


def test_beam_sampling_is_seeded_and_shaped(qwen2):
    model, processor = qwen2
    inputs = two_prompts(processor)
    args = dict(num_latent_steps=2, max_new_tokens=4, num_beams=2, do_sample=True, num_return_sequences=2,
                **no_eos(model))
    torch.manual_seed(3)
    first = model.generate(**inputs, **args)
    torch.manual_seed(3)
    second = model.generate(**inputs, **args)
    prompt = inputs["input_ids"].shape[1]
    assert first.shape == (4, prompt + 1 + 2 + 1 + 4)
    assert torch.equal(first, second)
    latent = model.config.latent_token_id
    assert bool((first[:, prompt + 1 : prompt + 3] == latent).all())


# ------------------------------------------------------------------------------ the README's decoding claims
def test_sampling_is_seeded_and_equal_without_cache(qwen2):
    model, processor = qwen2
    inputs = two_prompts(processor)
    args = dict(num_latent_steps=2, max_new_tokens=5, do_sample=True, temperature=1.5, top_k=0, **no_eos(model))
    runs = []
    for use_cache in (True, True, False):
        torch.manual_seed(11)
        runs.append(model.generate(**inputs, use_cache=use_cache, **args))
    assert torch.equal(runs[0], runs[1]) and torch.equal(runs[0], runs[2])
    torch.manual_seed(12)
    other = model.generate(**inputs, **args)
    assert not torch.equal(other, runs[0])  # the seed matters: this is sampling, not greedy


def test_streamer_receives_the_answer(qwen2):
    model, processor = qwen2
    tokenizer = processor.tokenizer
    inputs = make_inputs(processor, ["what colour ?"], [quadrant_image()])
    streamer = TextIteratorStreamer(tokenizer, skip_prompt=True, timeout=1)
    forced = LogitsProcessorList([ForceTokens({2: tokenizer.convert_tokens_to_ids("Z")})])  # some readable text
    out = model.generate(**inputs, num_latent_steps=2, max_new_tokens=5, do_sample=False, streamer=streamer,
                         logits_processor=forced, **no_eos(model))
    answer = out[0, inputs["input_ids"].shape[1] + 4 :]
    assert answer.shape[0] == 5
    text = "".join(streamer)
    assert "Z" in text and text == tokenizer.decode(answer)


class StopAfter(StoppingCriteria):
    """Stops every row once `count` tokens follow `<|end_latent|>`."""

    def __init__(self, end_latent_id, count):
        self.end_latent_id, self.count = end_latent_id, count

    def __call__(self, input_ids, scores, **kwargs):
        end = (input_ids == self.end_latent_id).int().argmax(-1)
        return input_ids.shape[1] - 1 - end >= self.count


def test_stopping_criteria_and_stop_strings_end_generation(qwen2):
    model, processor = qwen2
    tokenizer = processor.tokenizer
    inputs = make_inputs(processor, ["what colour ?"], [quadrant_image()])
    args = dict(num_latent_steps=2, do_sample=False, **no_eos(model))
    full = model.generate(**inputs, max_new_tokens=8, **args)
    start = inputs["input_ids"].shape[1] + 4
    stopped = model.generate(**inputs, max_new_tokens=8, **args,
                             stopping_criteria=StoppingCriteriaList([StopAfter(model.config.end_latent_token_id, 3)]))
    assert torch.equal(stopped, full[:, : start + 3])
    # a stop string: the answer's 3rd token is forced to "Z"
    forced = LogitsProcessorList([ForceTokens({3: tokenizer.convert_tokens_to_ids("Z")})])
    with_z = model.generate(**inputs, max_new_tokens=8, logits_processor=forced, **args)
    assert tokenizer.decode(with_z[0, start + 2]) == "Z" and "Z" not in tokenizer.decode(with_z[0, start : start + 2])
    forced = LogitsProcessorList([ForceTokens({3: tokenizer.convert_tokens_to_ids("Z")})])
    by_string = model.generate(**inputs, max_new_tokens=8, logits_processor=forced, stop_strings=["Z"],
                               tokenizer=tokenizer, **args)
    assert torch.equal(by_string, with_z[:, : start + 3])


# ------------------------------------------------------------------------- a <|latent|> in the answer phase
@pytest.mark.parametrize("steps", [2, 0])
def test_generated_latent_token_is_decoded_as_an_ordinary_token(qwen2, steps):
    model, processor = qwen2
    cfg = model.config
    inputs = two_prompts(processor)
    outs = {}
    for use_cache in (True, False):
        outs[use_cache] = model.generate(
            **inputs, num_latent_steps=steps, max_new_tokens=4, do_sample=False, use_cache=use_cache,
            logits_processor=LogitsProcessorList([ForceTokens({2: cfg.latent_token_id, 3: cfg.replay_token_id})]),
            return_dict_in_generate=True, output_logits=True, **no_eos(model),
        )
    assert torch.equal(outs[True].sequences, outs[False].sequences)
    assert outs[True].sequences[:, -3].tolist() == [cfg.latent_token_id] * 2
    assert outs[True].sequences[:, -2].tolist() == [cfg.replay_token_id] * 2  # kept: not a replay slot
    for cached, uncached in zip(outs[True].logits, outs[False].logits, strict=True):
        torch.testing.assert_close(cached, uncached, atol=1e-4, rtol=1e-4)


# --------------------------------------------------------------------------------- sequences fed back in
def test_returned_sequences_can_be_fed_back(qwen2):
    """generate's output fed back continues it: the latent block is recomputed (not appended again) and decoding
    goes on after the answer, exactly as one longer run; forward takes it once the replay slots are expanded."""
    model, processor = qwen2
    inputs = two_prompts(processor)
    args = dict(do_sample=False, **no_eos(model))
    first = model.generate(**inputs, num_latent_steps=2, max_new_tokens=3, **args)
    longer = model.generate(**inputs, num_latent_steps=2, max_new_tokens=6, **args)
    fed = dict(inputs, input_ids=first, attention_mask=torch.cat(
        [inputs["attention_mask"], torch.ones_like(first[:, inputs["input_ids"].shape[1] :])], 1))
    fed.pop("mm_token_type_ids")  # derived from the image tokens when missing
    for use_cache in (True, False):
        again = model.generate(**fed, max_new_tokens=3, use_cache=use_cache, **args)
        assert torch.equal(again, longer)
    with pytest.raises(ValueError, match="latent block of \\[2, 2\\] steps per row but num_latent_steps=3"):
        model.generate(**fed, num_latent_steps=3, max_new_tokens=1)
    # forward: the compact block is refused with what to do; expanded, it gives generate's scores
    tail = fed["attention_mask"][:, inputs["input_ids"].shape[1] :]
    types = torch.cat([inputs["mm_token_type_ids"], torch.zeros_like(tail)], 1)
    image_args = dict(pixel_values=inputs["pixel_values"], image_grid_thw=inputs["image_grid_thw"])
    with pytest.raises(ValueError, match="expand it with model.expand_latent_sequences"):
        model(input_ids=first, attention_mask=fed["attention_mask"], mm_token_type_ids=types, **image_args)
    scored = model.generate(**inputs, num_latent_steps=2, max_new_tokens=3, return_dict_in_generate=True,
                            output_logits=True, **args)
    ids, mask, types = model.expand_latent_sequences(first, fed["attention_mask"], types)
    assert ids.shape[1] == first.shape[1] + 2 * model.config.num_replay_tokens
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=mask, mm_token_type_ids=types, **image_args).logits
    for i, step_logits in enumerate(scored.logits):
        torch.testing.assert_close(logits[:, -4 + i], step_logits, atol=1e-4, rtol=1e-4)
    assert torch.equal(model.compact_latent_sequences(ids), first)


# ------------------------------------------------------------------------------------------------ refusals
@pytest.mark.parametrize("setting", ["prompt_lookup_num_tokens", "assistant_model"])
def test_assisted_decoding_is_refused_before_any_work(qwen2, setting):
    model, processor = qwen2
    inputs = make_inputs(processor, ["what colour ?"], [quadrant_image()])
    value = 3 if setting == "prompt_lookup_num_tokens" else model
    message = refused_before_any_work(model, inputs, "cannot be cropped", num_latent_steps=2, **{setting: value})
    assert message.startswith(f"{setting}=")


@pytest.mark.parametrize("request_kind", ["cache_implementation", "static_cache", "compile_config"])
def test_static_cache_and_compile_are_refused_before_any_work(qwen2, request_kind):
    model, processor = qwen2
    inputs = make_inputs(processor, ["what colour ?"], [quadrant_image()])
    asked = {
        "cache_implementation": ({"cache_implementation": "static"}, "cache_implementation='static' is not supported"),
        "static_cache": ({"past_key_values": StaticCache(config=model.config.text_config, max_cache_len=64)},
                         "past_key_values=StaticCache is not supported"),
        "compile_config": ({"compile_config": CompileConfig()}, "compile_config is not supported"),
    }[request_kind]
    for steps in (2, 0):
        refused_before_any_work(model, inputs, asked[1], num_latent_steps=steps, **asked[0])


@pytest.mark.parametrize("name", ["num_latent_steps", "num_replay_tokens"])
@pytest.mark.parametrize("value", [-1, 10_000, 2.5, "4", True])
def test_step_and_replay_counts_are_validated(qwen2, name, value):
    model, processor = qwen2
    inputs = make_inputs(processor, ["what colour ?"], [quadrant_image()])
    expected = re.escape(f"{name} must be an integer in [0, ") + r"\d+" + re.escape(f"], got {value!r}.")
    message = refused_before_any_work(model, inputs, expected, **{name: value})
    assert repr(value) in message


@pytest.mark.parametrize("backbone", ALL_BACKBONES)
def test_beams_without_latent_steps_are_the_base_models(backbone, all_base_dirs, all_vedas_dirs):
    """At T = 0 an unconverted-equivalent Vedas model is its base: beam search over a batch with images, whose
    `pixel_values` must be repeated per sample (not per patch row) for the beams, gives the base model's beams."""
    from vedas_trainer.checkpoint import load_base

    base, _ = load_base(all_base_dirs[backbone])
    model, processor = load_vedas(all_vedas_dirs[backbone], num_replay_tokens=0)
    inputs = two_prompts(processor)
    args = dict(max_new_tokens=4, num_beams=2, num_return_sequences=2, do_sample=False)
    ours = model.generate(**inputs, num_latent_steps=0, **args)
    theirs = base.eval().generate(**inputs, **args)
    assert ours.shape[0] == 4 and torch.equal(ours, theirs)  # (scores differ: the 4 new rows join the softmax)


def test_config_step_count_out_of_range_is_named(qwen2):
    model, processor = qwen2
    inputs = make_inputs(processor, ["what colour ?"], [quadrant_image()])
    saved, model.config.num_latent_steps = model.config.num_latent_steps, 100  # valid config, too many to run
    try:
        expected = re.escape("config.num_latent_steps must be an integer in [0, 64], got 100")
        refused_before_any_work(model, inputs, expected)
    finally:
        model.config.num_latent_steps = saved
