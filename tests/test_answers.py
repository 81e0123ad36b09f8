"""Answer extraction rules (trainer/answers.py) and the local evaluate metric that reuses them."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from vedas_trainer.answers import extract_answer, is_correct, normalize_answer

METRIC_DIR = Path(__file__).resolve().parents[1] / "metrics" / "vedas_accuracy"
CHOICES = ["red", "green", "blue", "yellow"]

# (text, choices, expected)
CASES = [
    # The synthetic task's own formats.
    ("answer : red", None, "red"),
    ("answer : B", CHOICES, "B"),
    (
        "start : row 2 col 3 , yellow arrow up\n\nstep 1 : row 1 col 3 , red arrow down\n\nanswer : red",
        None,
        "red",
    ),
    # Letters in their usual dress.
    ("The answer is (B).", None, "B"),
    ("The answer is (B).", CHOICES, "B"),
    ("B", CHOICES, "B"),
    ("b)", CHOICES, "B"),
    ("b", None, "B"),
    ("Answer: B. green", CHOICES, "B"),
    ("Answer: B. green", None, "B"),
    ("  ANSWER:   c  ", CHOICES, "C"),
    ("**Answer:** [D]", CHOICES, "D"),
    ("answer = (a)", CHOICES, "A"),
    ("B green", CHOICES, "B"),
    # The last answer wins; a truncated trailing marker is ignored.
    ("answer : red\n\nwait , step 2 : row 1 col 1 , blue arrow up\n\nanswer : blue", None, "blue"),
    ("answer : B ... no . Final answer: C", CHOICES, "C"),
    ("answer : green\nanswer :", None, "green"),
    # Special tokens are stripped, and end the answer line.
    ("<|latent|><|latent|><|end_latent|>answer : yellow<|im_end|>", None, "yellow"),
    ("answer : yellow<|endoftext|><|endoftext|>garbage", None, "yellow"),
    ("<|im_start|>assistant\nanswer : C<|im_end|>\n", CHOICES, "C"),
    # Option text instead of the letter, with choices.
    ("answer : green", CHOICES, "B"),
    ("Green.", CHOICES, "B"),
    ("The arrow in the final cell is BLUE", CHOICES, "C"),
    ("answer : a red", CHOICES, "A"),  # the article "a", and "red" is option A
    ("answer : a yellow", CHOICES, "D"),  # the article, not the letter A
    ("I pick option c", CHOICES, "C"),
    # Case, whitespace and punctuation.
    ("Answer :   Red  !", None, "red"),
    ("answer: the red one", None, "red one"),
    ("answer : 3.5", None, "3.5"),
    ("answer : A red arrow", None, "red arrow"),
    # Nothing usable.
    ("", None, None),
    (None, None, None),
    ("   \n\n ", None, None),
    ("<|im_end|><|endoftext|>", None, None),
    ("answer : E", CHOICES, None),  # not one of four options
    ("answer : red or green", CHOICES, None),  # two options named: ambiguous
    ("answer : purple", CHOICES, None),
]


@pytest.mark.parametrize("text,choices,expected", CASES)
def test_extract_answer(text, choices, expected):
    assert extract_answer(text, choices) == expected


def test_enough_adversarial_cases():
    assert len(CASES) >= 20


@pytest.mark.parametrize(
    "raw,expected",
    [
        ("  Red. ", "red"),
        ("(B)", "b"),
        ("The  Blue", "blue"),
        ("a", "a"),
        ("3.50", "3.50"),
        ("<|im_end|>green", "green"),
        (None, ""),
    ],
)
def test_normalize_answer(raw, expected):
    assert normalize_answer(raw) == expected


def test_is_correct():
    assert is_correct("answer : Green<|im_end|>", "green")
    assert is_correct("answer : green", "B", CHOICES)
    assert not is_correct("answer : green", "B")  # without choices the text cannot become a letter
    assert not is_correct("", "red")


METRIC_SCRIPT = """
import json, sys
import evaluate
metric = evaluate.load(sys.argv[1])
predictions = [
    "start : row 1 col 1 , red arrow right\\n\\nanswer : red<|im_end|>",  # right
    "The answer is (B).",  # right
    "answer : blue",  # wrong
    "",  # nothing extracted
    "answer : green",  # right only once choices map it to B
]
references = ["red", "B", "red", "red", "B"]
choices = [None, ["red", "green"], None, None, ["red", "green"]]
print(json.dumps([
    metric.compute(predictions=predictions, references=references),
    metric.compute(predictions=predictions, references=references, choices=choices),
]))
"""


def test_metric_from_local_path_offline(tmp_path):
    pytest.importorskip("evaluate")
    # A fresh process, so that HF_HUB_OFFLINE is set before evaluate/huggingface_hub read it, and
    # a fresh module cache, so that the loader really copies and imports the script.
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_MODULES_CACHE": str(tmp_path / "modules")}
    result = subprocess.run(
        [sys.executable, "-c", METRIC_SCRIPT, str(METRIC_DIR)],
        env=env, cwd=tmp_path, capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 0, result.stderr
    plain, with_choices = json.loads(result.stdout.strip().splitlines()[-1])
    assert plain == {"accuracy": pytest.approx(2 / 5), "num_extracted": 4}
    assert with_choices == {"accuracy": pytest.approx(3 / 5), "num_extracted": 4}
