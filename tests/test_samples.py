"""One set of sample rules (trainer/samples.py): the data adapters and the collator refuse the same bad sample with
the same DataError, field and reason; only the location differs (the source row for an adapter, the sample id for
the collator)."""

import pytest
from PIL import Image
from transformers import AutoProcessor

from vedas.configuration_vedas import VedasConfig
from vedas_trainer.collator import VedasCollator
from vedas_trainer.data import adapt_m3cot, adapt_onethinker
from vedas_trainer.samples import EMPTY_RATIONALE, DataError

ROW = 7


def good_sample(**overrides):
    sample = {"id": "s-1", "images": [Image.new("RGB", (56, 56), (255, 0, 0))], "question": "Which colour?",
              "choices": ["red", "blue"], "steps": ["Look.", "Red."], "answer": "A"}
    sample.update(overrides)
    return sample


def as_m3cot_row(sample):
    """The same sample as an M3CoT row: steps as a rationale text, one image."""
    return {"id": sample["id"], "question": sample["question"], "choices": sample["choices"],
            "answer": sample["answer"], "rationale": "\n\n".join(sample["steps"]), "image": sample["images"][0]}


# name -> (overrides, adapter, field, reason). A OneThinker row has the sample's own fields, so the sample itself is
# the row; OneThinker also takes an option's text as the answer, so the letter-only cases go through M3CoT.
CASES = {
    "empty_rationale": ({"steps": ["", "  \n "]}, adapt_onethinker, "steps", EMPTY_RATIONALE),
    "steps_as_one_string": ({"steps": "Look. Red."}, adapt_onethinker, "steps",
                            "expected a list of step strings, got str"),
    "step_not_text": ({"steps": ["Look.", 7]}, adapt_onethinker, "steps[1]", "expected a string, got int 7"),
    "answer_out_of_range": ({"answer": "C"}, adapt_onethinker, "answer",
                            "answer 'C' is out of range for 2 choices (A-B)"),
    "answer_not_a_letter": ({"answer": "purple"}, adapt_m3cot, "answer", "answer 'purple' is not an option letter (A-B)"),
    "answer_missing": ({"answer": None}, adapt_onethinker, "answer", "missing required field"),
    "one_choice": ({"choices": ["red"]}, adapt_onethinker, "choices", "expected 2 to 26 options, got 1"),
    "choices_as_string": ({"choices": "red, blue"}, adapt_onethinker, "choices",
                          "expected a list of option texts, got str"),
    "choice_not_text": ({"choices": ["red", 3]}, adapt_onethinker, "choices[1]", "expected a string, got int 3"),
    "blank_choice": ({"choices": ["red", " "]}, adapt_onethinker, "choices[1]", "empty string"),
    "empty_question": ({"question": " \t"}, adapt_onethinker, "question", "empty string"),
    "question_not_unicode": ({"question": "bad \udcff"}, adapt_onethinker, "question",
                             "not valid Unicode: unpaired surrogate '\\udcff' at character 4"),
    "images_as_string": ({"images": "a.png"}, adapt_onethinker, "images", "expected a list of images, got str"),
    "broken_image": ({"images": [Image.new("RGB", (0, 5))]}, adapt_onethinker, "images[0]",
                     "cannot convert the given PIL image (RGB, (0, 5)): empty image of size (0, 5)"),
}


@pytest.fixture(scope="module")
def collator(vedas_dirs):
    folder = vedas_dirs["qwen2_vl"]
    processor = AutoProcessor.from_pretrained(folder, trust_remote_code=True)
    return VedasCollator(processor, VedasConfig.from_pretrained(folder), stage=1, max_latent_stage=2)


@pytest.mark.parametrize("case", sorted(CASES))
def test_adapter_and_collator_give_the_same_error(collator, case):
    overrides, adapter, field, reason = CASES[case]
    sample = good_sample(**overrides)
    row = sample if adapter is adapt_onethinker else as_m3cot_row(sample)
    with pytest.raises(DataError) as from_adapter:
        adapter(row, ROW)
    with pytest.raises(DataError) as from_collator:
        collator([good_sample(id="before"), sample])
    for err in (from_adapter.value, from_collator.value):
        assert (err.field, err.reason) == (field, reason), str(err)
    assert str(from_adapter.value) == f"row {ROW} (id 's-1'), field '{field}': {reason}"
    assert str(from_collator.value) == f"id 's-1', field '{field}': {reason}"


def test_a_bad_id_is_named_by_its_position(collator):
    with pytest.raises(DataError) as from_adapter:
        adapt_onethinker(good_sample(id=2.5), ROW)
    with pytest.raises(DataError) as from_collator:
        collator([good_sample(), good_sample(id=2.5)])
    reason = "expected a string or integer id, got float 2.5"
    assert str(from_adapter.value) == f"row {ROW}, field 'id': {reason}"
    assert str(from_collator.value) == f"id '<batch position 1>', field 'id': {reason}"


def test_both_paths_give_the_same_sample(collator):
    """What passes is canonicalised the same way: stripped texts and steps, blank steps dropped, a lower-case
    option letter upper-cased."""
    sample = good_sample(question=" Which colour? ", choices=[" red", "blue "], steps=[" Look.", "", "Red. "],
                         answer="a ")
    adapted = adapt_onethinker(sample, ROW)
    checked = collator._checked_sample(sample, 0)
    for key in ("question", "choices", "steps", "answer"):
        assert adapted[key] == checked[key], key
    assert (checked["question"], checked["choices"], checked["steps"], checked["answer"]) == (
        "Which colour?", ["red", "blue"], ["Look.", "Red."], "A")


def test_missing_image_differs_by_design(collator):
    """A data row needs an image (every latent step replays visual tokens); a hand-made sample without one is a
    text-only row, which the model accepts (its replay slots are masked)."""
    with pytest.raises(DataError, match=r"^row 7 \(id 's-1'\), field 'image': missing image$"):
        adapt_onethinker(good_sample(images=None), ROW)
    assert collator([good_sample(images=None)])["pixel_values"] is None
