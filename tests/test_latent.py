"""Latent reasoning with visual replay: cache equivalence, batch invariance, layout errors, gradients."""

import pytest
import torch

from conftest import BACKBONES, load_vedas, make_inputs, perturb_vedas, quadrant_image


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
    types = torch.cat([inputs["mm_token_type_ids"], torch.zeros(layout.shape[0], extra, dtype=torch.int)], 1)
    with torch.no_grad():
        out = model(
            input_ids=layout, attention_mask=mask, mm_token_type_ids=types, pixel_values=inputs["pixel_values"],
            image_grid_thw=inputs["image_grid_thw"], num_replay_tokens=num_replay, output_latent_trace=True,
        )
    return layout, out


@pytest.fixture(scope="module", params=BACKBONES)
def model_and_processor(request, vedas_dirs):
    model, processor = load_vedas(vedas_dirs[request.param])
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
    ids, mask, types = model.build_latent_layout(inputs["input_ids"], inputs["attention_mask"],
                                                 inputs["mm_token_type_ids"], 2, 4)
    end = torch.full_like(ids[:, :1], cfg.end_latent_token_id)
    ids = torch.cat([ids, end], 1)
    ids[1, -3] = cfg.latent_token_id  # a replay slot replaced by a latent in sample 1
    with pytest.raises(ValueError, match="Sample 1"):
        model(input_ids=ids, attention_mask=torch.ones_like(ids), mm_token_type_ids=torch.cat([types, end * 0], 1),
              pixel_values=inputs["pixel_values"], image_grid_thw=inputs["image_grid_thw"])
