"""The one prompt and target format, shared by training, evaluation and the benchmarks.

The authors' release formatted training and test prompts differently (docs/design.md, "Departures from the paper
and from the authors' release"); here every path builds its prompt with :func:`build_prompt` and its target with
:func:`format_cot` / :func:`format_answer`, so a model is always evaluated on exactly the text it was trained on.

Prompt: the chat template of the processor over one user turn (the images first, then the question with its
options) plus the generation prompt::

    <|im_start|>user
    <|vision_start|><|image_pad|>...<|vision_end|>what colour ... ? options : A yellow , B green<|im_end|>
    <|im_start|>assistant

Target: the CoT steps separated by blank lines, a blank line, then ``answer : X`` (``X`` is the option letter or the
short answer). :func:`vedas_trainer.answers.extract_answer` reads the text after the last ``answer`` marker, so it
recovers ``X`` from a CoT target, a latent target (remaining steps, then the answer) or a bare ``answer : X``.

This module uses the standard library only (the synthetic task imports it for its vocabulary).
"""

from __future__ import annotations

from typing import Any, Sequence

__all__ = ["ANSWER_PREFIX", "LETTERS", "build_messages", "build_prompt", "format_answer", "format_choices", "format_cot"]

ANSWER_PREFIX = "answer : "
STEP_SEPARATOR = "\n\n"
# option letters, in order: the one definition that prompts, data adapters, the collator and scoring use
LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"


def format_choices(choices: Sequence[str]) -> str:
    """``options : A yellow , B green , C blue`` (the embedded task's style: punctuation as separate words)."""
    if len(choices) > len(LETTERS):
        raise ValueError(f"at most {len(LETTERS)} choices can be lettered, got {len(choices)}")
    return "options : " + " , ".join(f"{LETTERS[i]} {choice}" for i, choice in enumerate(choices))


def build_messages(question: str, choices: Sequence[str] | None = None, num_images: int = 1) -> list[dict[str, Any]]:
    """One user turn in the processor's chat format: ``num_images`` image placeholders, then the question text
    (with `` options : A ...`` appended when there are choices)."""
    if num_images < 0:
        raise ValueError(f"num_images must be >= 0, got {num_images}")
    text = question.strip()
    if choices:
        text = f"{text} {format_choices(choices)}"
    content = [{"type": "image"} for _ in range(num_images)] + [{"type": "text", "text": text}]
    return [{"role": "user", "content": content}]


def build_prompt(processor, question: str, choices: Sequence[str] | None = None, num_images: int = 1) -> str:
    """The prompt string (chat template with the generation prompt); tokenise it with the processor together with
    the sample's images, whose ``<|image_pad|>`` placeholders the processor expands."""
    return processor.apply_chat_template(
        build_messages(question, choices, num_images), add_generation_prompt=True, tokenize=False
    )


def format_answer(answer: str) -> str:
    """``answer : X``: the final line of every target and the whole target of the No-CoT baseline."""
    return f"{ANSWER_PREFIX}{str(answer).strip()}"


def format_cot(steps: Sequence[str], answer: str) -> str:
    """The explicit CoT target: steps joined by blank lines, a blank line, then ``answer : X``. With no steps (every
    step replaced by latents) it is just ``answer : X``."""
    steps = [step.strip() for step in steps]
    return STEP_SEPARATOR.join([*steps, format_answer(answer)])
