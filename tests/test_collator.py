"""The curriculum collator (trainer/collator.py) and the shared prompt format (trainer/prompting.py)."""

import pytest
import torch
from torch.utils.data import DataLoader

from conftest import load_vedas, quadrant_image
from vedas.configuration_vedas import VedasConfig
from vedas_trainer.answers import extract_answer
from vedas_trainer.collator import VedasCollator
from vedas_trainer.prompting import build_messages, build_prompt, format_answer, format_cot

MAX_STAGE = 3


@pytest.fixture(scope="module")
def parts(vedas_dirs):
    from transformers import AutoProcessor

    folder = vedas_dirs["qwen2_vl"]
    processor = AutoProcessor.from_pretrained(folder, trust_remote_code=True)
    return processor, VedasConfig.from_pretrained(folder)


def make_samples():
    # different image sizes and question lengths -> different prompt lengths; 3, 1 and 4 steps (4 > MAX_STAGE merges)
    return [
        {"id": "a", "images": [quadrant_image((112, 84), seed=1)], "question": "what colour ?", "choices": None,
         "steps": ["start : red", "step 1 : blue", "step 2 : green"], "answer": "green"},
        {"id": "b", "images": [quadrant_image((56, 56), seed=2)], "question": "which arrow is it ?",
         "choices": ["yellow", "green"], "steps": ["start : yellow"], "answer": "B"},
        {"id": "c", "images": [quadrant_image((84, 84), seed=3)], "question": "what ?", "choices": None,
         "steps": ["s 1", "s 2", "s 3", "s 4"], "answer": "red"},
    ]


def expected_prompt_ids(processor, sample):
    """The prompt, written out independently of prompting.py, tokenised with the sample's image."""
    question = sample["question"]
    if sample["choices"]:
        question += " options : " + " , ".join(f"{l} {c}" for l, c in zip("AB", sample["choices"]))
    text = (f"<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>{question}<|im_end|>\n"
            f"<|im_start|>assistant\n")
    return processor(text=[text], images=sample["images"], return_tensors="pt")["input_ids"][0].tolist()


def expected_suffix(processor, config, target_text, slots):
    tok = processor.tokenizer
    block = []
    if slots:
        step = [config.replay_token_id] * config.replay_tokens_per_step + [config.latent_token_id]
        block = [config.start_latent_token_id] + step * slots + [config.end_latent_token_id]
    target = tok(target_text, add_special_tokens=False)["input_ids"] + [tok.convert_tokens_to_ids("<|im_end|>")]
    return block, target


# (stage, c) -> per sample: (latent slots T_row, target text)
CASES = {
    (0, 1): [(0, "start : red\n\nstep 1 : blue\n\nstep 2 : green\n\nanswer : green"),
             (0, "start : yellow\n\nanswer : B"), (0, "s 1\n\ns 2\n\ns 3\ns 4\n\nanswer : red")],
    (1, 1): [(1, "step 1 : blue\n\nstep 2 : green\n\nanswer : green"), (1, "answer : B"),
             (1, "s 2\n\ns 3\ns 4\n\nanswer : red")],
    (1, 2): [(2, "step 1 : blue\n\nstep 2 : green\n\nanswer : green"), (2, "answer : B"),
             (2, "s 2\n\ns 3\ns 4\n\nanswer : red")],
    (2, 2): [(4, "step 2 : green\n\nanswer : green"), (2, "answer : B"), (4, "s 3\ns 4\n\nanswer : red")],
    # final stage: everything latent, padded to max_latent_stage * c for every sample
    (MAX_STAGE, 1): [(3, "answer : green"), (3, "answer : B"), (3, "answer : red")],
    (MAX_STAGE, 2): [(6, "answer : green"), (6, "answer : B"), (6, "answer : red")],
    (MAX_STAGE + 2, 1): [(3, "answer : green"), (3, "answer : B"), (3, "answer : red")],
    (MAX_STAGE + 2, 2): [(6, "answer : green"), (6, "answer : B"), (6, "answer : red")],
}


@pytest.mark.parametrize("stage,c", list(CASES))
def test_exact_layout_and_labels(parts, stage, c):
    processor, config = parts
    samples = make_samples()
    collator = VedasCollator(processor, config, stage=stage, max_latent_stage=MAX_STAGE, latents_per_step=c)
    batch = collator(samples)
    ids, mask, labels = batch["input_ids"], batch["attention_mask"], batch["labels"]
    prompts = [expected_prompt_ids(processor, s) for s in samples]
    start = max(len(p) for p in prompts)  # prompts are left-padded to end in the same column
    assert len({len(p) for p in prompts}) == 3  # the alignment is really exercised
    for row, (sample, prompt, (slots, target_text)) in enumerate(zip(samples, prompts, CASES[stage, c])):
        block, target = expected_suffix(processor, config, target_text, slots)
        real = prompt + block + target
        first = start - len(prompt)
        assert ids[row, first : first + len(real)].tolist() == real, sample["id"]
        assert mask[row].tolist() == [0] * first + [1] * len(real) + [0] * (ids.shape[1] - first - len(real))
        # supervised exactly on the target and its closing <|im_end|>; prompt, markers, replay, latents, pad: -100
        expected_labels = [-100] * (first + len(prompt) + len(block)) + target
        expected_labels += [-100] * (ids.shape[1] - len(expected_labels))
        assert labels[row].tolist() == expected_labels, sample["id"]
        if slots:
            assert ids[row, start].item() == config.start_latent_token_id
        assert (ids[row] == config.latent_token_id).sum().item() == slots
        assert (ids[row] == config.replay_token_id).sum().item() == slots * config.replay_tokens_per_step
        assert extract_answer(processor.tokenizer.decode(target), sample["choices"]) == sample["answer"]
    special = torch.tensor([config.start_latent_token_id, config.latent_token_id, config.end_latent_token_id,
                            config.replay_token_id, config.image_token_id])
    assert not torch.isin(labels, special).any()
    assert torch.equal(batch["mm_token_type_ids"], (ids == config.image_token_id).to(batch["mm_token_type_ids"].dtype))
    # the images are the processor's, in sample order, and the crop sources are the original pixels
    reference = processor(text=["<|vision_start|><|image_pad|><|vision_end|>"] * 3,
                          images=[s["images"][0] for s in samples], return_tensors="pt", padding=True)
    assert torch.equal(batch["pixel_values"], reference["pixel_values"])
    assert torch.equal(batch["image_grid_thw"], reference["image_grid_thw"])
    for crops, sample in zip(batch["crop_images"], samples):
        (crop,) = crops
        w, h = sample["images"][0].size
        assert crop.dtype == torch.uint8 and crop.shape == (3, h, w)
        assert crop[:, 0, 0].tolist() == list(sample["images"][0].getpixel((0, 0)))


def test_modes_cot_and_nocot(parts):
    processor, config = parts
    samples = make_samples()[:2]
    cot = VedasCollator(processor, config, stage=2, mode="cot")(samples)
    plain = VedasCollator(processor, config, stage=0)(samples)
    assert torch.equal(cot["input_ids"], plain["input_ids"]) and torch.equal(cot["labels"], plain["labels"])
    nocot = VedasCollator(processor, config, stage=2, mode="nocot")(samples)
    for row, sample in enumerate(samples):
        supervised = nocot["labels"][row][nocot["labels"][row] != -100].tolist()
        _, target = expected_suffix(processor, config, format_answer(sample["answer"]), 0)
        assert supervised == target
    assert not torch.isin(nocot["input_ids"], torch.tensor([config.latent_token_id])).any()


def test_model_accepts_mixed_latent_rows(parts, vedas_dirs):
    """Rows with different T_row (c = 2, stage 2: 4, 2 and 4 slots) and prompt lengths run through the latent
    forward, with the self-distillation loss from the crop images."""
    processor, config = parts
    model, _ = load_vedas(vedas_dirs["qwen2_vl"])
    batch = VedasCollator(processor, config, stage=2, max_latent_stage=MAX_STAGE, latents_per_step=2)(make_samples())
    model.train()
    out = model(**batch)
    assert torch.isfinite(out.loss) and out.recon_loss is not None and out.ce_loss is not None
    assert out.logits.shape[:2] == batch["input_ids"].shape


def text_sample(i, steps=("a", "b", "c")):
    return {"id": f"t{i}", "images": [], "question": f"q {i}", "choices": None, "steps": list(steps), "answer": "x"}


def latent_counts(batch, config):
    return (batch["input_ids"] == config.latent_token_id).sum(-1).tolist()


def test_uniform_prob_is_deterministic(parts):
    processor, config = parts
    samples = [text_sample(i) for i in range(24)]
    make = lambda: VedasCollator(processor, config, stage=1, max_latent_stage=MAX_STAGE, uniform_prob=1.0, seed=7)
    first, second = make(), make()
    stages = [first.sample_stage(s) for s in samples]
    assert stages == [second.sample_stage(s) for s in samples]  # fresh collator, same seed and epoch
    assert set(stages) == set(range(MAX_STAGE + 1))  # uniform over [0, max_latent_stage]
    # the stage of a sample does not depend on its batch or position
    expected = [first.num_latent_slots(stage, 3)[1] for stage in stages[:8]]
    assert latent_counts(first(samples[:8]), config) == expected
    assert latent_counts(second(samples[7::-1]), config) == expected[::-1]
    first.set_epoch(1)
    assert [first.sample_stage(s) for s in samples] != stages  # a new draw per epoch
    second.set_epoch(1)
    assert [first.sample_stage(s) for s in samples] == [second.sample_stage(s) for s in samples]
    other_seed = VedasCollator(processor, config, stage=1, max_latent_stage=MAX_STAGE, uniform_prob=1.0, seed=8)
    assert [other_seed.sample_stage(s) for s in samples] != stages
    # uniform_prob = 0.3: most samples keep the current stage
    mixed = VedasCollator(processor, config, stage=1, max_latent_stage=MAX_STAGE, uniform_prob=0.3, seed=7)
    kept = sum(mixed.sample_stage(s) == 1 for s in samples)
    assert len(samples) // 2 < kept < len(samples)


def test_stage_reaches_dataloader_workers(parts):
    """set_stage in the main process reaches a persistent worker (the stage lives in shared memory)."""
    processor, config = parts
    collator = VedasCollator(processor, config, stage=0, max_latent_stage=MAX_STAGE)
    loader = DataLoader([text_sample(i) for i in range(2)], batch_size=2, collate_fn=collator, num_workers=1,
                        persistent_workers=True)
    seen = []
    for stage in (0, 2):
        collator.set_stage(stage)
        seen += [latent_counts(batch, config) for batch in loader]
    assert seen == [[0, 0], [2, 2]]


def test_errors_name_the_sample(parts):
    processor, config = parts
    empty = {**text_sample(0), "id": "row-17", "steps": []}
    for mode in ("latent", "cot"):
        with pytest.raises(ValueError, match="row-17.*empty steps"):
            VedasCollator(processor, config, stage=1, mode=mode)([text_sample(1), empty])
    VedasCollator(processor, config, mode="nocot")([empty])  # the No-CoT baseline needs no steps
    long = make_samples()[0]
    with pytest.raises(ValueError, match="'a'.*longer than max_length=20"):
        VedasCollator(processor, config, max_length=20)([long])
    # a target that does not fit is cut at the end, the prompt and the latent block are kept
    prompt_length = len(expected_prompt_ids(processor, long))
    batch = VedasCollator(processor, config, stage=1, max_length=prompt_length + 10)([long])
    assert batch["attention_mask"].sum().item() == prompt_length + 10
    with pytest.raises(ValueError, match="mode"):
        VedasCollator(processor, config, mode="latents")


def test_prompt_builder(parts):
    processor, _ = parts
    messages = build_messages("what colour ?", ["yellow", "green", "blue"], num_images=2)
    assert messages == [{"role": "user", "content": [
        {"type": "image"}, {"type": "image"},
        {"type": "text", "text": "what colour ? options : A yellow , B green , C blue"}]}]
    assert build_prompt(processor, "what ?", num_images=0) == "<|im_start|>user\nwhat ?<|im_end|>\n<|im_start|>assistant\n"
    assert format_answer("B") == "answer : B"
    assert format_cot(["s 1", "s 2"], "red") == "s 1\n\ns 2\n\nanswer : red"
    assert format_cot([], "red") == "answer : red"
    assert extract_answer(format_cot(["green is option B"], "B"), ["yellow", "green"]) == "B"
