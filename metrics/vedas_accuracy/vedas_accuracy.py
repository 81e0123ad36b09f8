"""Vedas accuracy: exact-match accuracy of answers extracted from raw generated text.

Load it from this directory (no Hub access needed, works with ``HF_HUB_OFFLINE=1``)::

    import evaluate
    metric = evaluate.load("/path/to/vedas/metrics/vedas_accuracy")
    metric.compute(predictions=["step 1 : ...\\n\\nanswer : red<|im_end|>"], references=["red"])
    # {'accuracy': 1.0, 'num_extracted': 1}

Why the rules are imported, not copied: ``evaluate.load`` copies this script alone into its module
cache and imports it from there, so a relative import of a sibling file is not an option for code
that lives in ``trainer/``. A plain (absolute) import of an installed package is supported:
evaluate checks that ``vedas_trainer`` is importable before running the script. The scoring rules
therefore live only in ``vedas_trainer/answers.py`` (``pip install -e <repo>`` provides it), and
every accuracy in the project -- training evaluation, benchmarks, this metric -- uses them.
"""

import datasets
import evaluate

from vedas_trainer.answers import extract_answer, normalize_answer

_DESCRIPTION = """
Accuracy of generated answers. Each prediction is the raw generated text (it may contain a chain
of thought, special tokens such as <|im_end|> or <|latent|>, and an "answer :" line). The answer is
extracted with `vedas_trainer.answers.extract_answer` and compared with the reference after
`normalize_answer` (case-, whitespace- and punctuation-insensitive). A prediction from which no
answer can be extracted counts as wrong.
"""

_KWARGS_DESCRIPTION = """
Args:
    predictions (list of str): raw generated texts.
    references (list of str): gold answers, an option letter ("B") or a short answer ("red").
    choices (list of (list of str or None), optional): the options of each example. With them, an
        answer given as option text ("green") is mapped to its letter before comparison.
Returns:
    accuracy (float): fraction of predictions whose extracted answer equals the reference
        (0.0 for no examples).
    num_extracted (int): number of predictions from which an answer could be extracted.
Examples:
    >>> metric = evaluate.load("metrics/vedas_accuracy")
    >>> metric.compute(predictions=["The answer is (B).", "answer : blue"], references=["B", "red"])
    {'accuracy': 0.5, 'num_extracted': 2}
"""

_CITATION = """
@article{han2026vedas,
  title={Visual Enhanced Depth Scaling for Multimodal Latent Reasoning},
  author={Han and Wang and others},
  journal={arXiv preprint arXiv:2604.10500},
  year={2026}
}
"""


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class VedasAccuracy(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features(
                {"predictions": datasets.Value("string"), "references": datasets.Value("string")}
            ),
        )

    def _compute(self, predictions, references, choices=None):
        if choices is None:
            choices = [None] * len(predictions)
        if len(choices) != len(predictions):
            raise ValueError(f"got {len(choices)} choice lists for {len(predictions)} predictions")
        extracted = [extract_answer(p, c) for p, c in zip(predictions, choices)]
        correct = sum(
            e is not None and normalize_answer(e) == normalize_answer(r) for e, r in zip(extracted, references)
        )
        return {
            "accuracy": correct / len(predictions) if predictions else 0.0,
            "num_extracted": sum(e is not None for e in extracted),
        }
