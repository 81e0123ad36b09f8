"""Table-1 evaluation: accuracy, average AR steps and wall time per sample for No-CoT, explicit CoT and Vedas latent.

All three modes run on the same model and the same samples, one after the other in one process, so their times
compare (docs/design.md, "Measuring"):

* ``"nocot"``: T = 0. The prompt is followed by the answer prefix ``answer :``, i.e. it asks for the direct answer:
  every target the model is trained on ends with the line ``answer : X`` (the whole target of the No-CoT baseline,
  :func:`vedas_trainer.prompting.format_answer`), so the model continues with ``X`` and the end-of-turn token.
* ``"cot"``: T = 0 and the plain prompt; the model writes its rationale, then ``answer : X`` (larger token budget).
* ``"latent"``: T = ``config.num_latent_steps`` latent steps with visual replay, then the answer.

AR steps per sample = latent steps + generated tokens up to and including the first end-of-sequence token (all
generated tokens when the budget ran out first). Prompt tokens, the forced ``answer :`` prefix and the
``<|start_latent|>`` / ``<|end_latent|>`` markers are prefilled with the prompt or appended by ``generate`` without
a decoding step, so they do not count. Time per sample = wall time of the batched ``generate`` call / batch size.
Accuracy comes from the local ``evaluate`` metric ``metrics/vedas_accuracy`` (the single set of scoring rules in
:mod:`vedas_trainer.answers`).
"""

from __future__ import annotations

import json
import logging
import math
import time
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import torch
from tqdm.auto import tqdm

import vedas

from .answers import extract_answer, is_correct
from .prompting import ANSWER_PREFIX, build_prompt


logger = logging.getLogger(__name__)

MODES = ("nocot", "cot", "latent")
MODE_NAMES = {"nocot": "No-CoT", "cot": "CoT", "latent": "Vedas latent"}
# Token budgets per mode. An answer is "answer : X" plus an end token (a few tokens; short answers of real datasets
# are a few words); a rationale needs room (the synthetic CoT is ~50 tokens, the paper's CoT baselines 100-700).
DEFAULT_MAX_NEW_TOKENS = {"nocot": 16, "cot": 256, "latent": 32}
METRIC_PATH = Path(vedas.__file__).resolve().parent / "metrics" / "vedas_accuracy"


# ----------------------------------------------------------------------------------------------------- loading
def load_model_and_processor(path, dtype=None, device=None):
    """Load a Vedas checkpoint through the Auto classes (its own remote code) and a left-padding processor."""
    from transformers import AutoModel, AutoProcessor

    model = AutoModel.from_pretrained(path, trust_remote_code=True, dtype=dtype or "auto")
    if device is not None:
        model = model.to(device)
    # the checkpoint's auto_map makes AutoProcessor ask about remote code; the processor itself is a stock one
    processor = AutoProcessor.from_pretrained(path, trust_remote_code=True)
    processor.tokenizer.padding_side = "left"  # latent generation appends after the prompt: left padding required
    return model.eval(), processor


def load_metric(path=METRIC_PATH):
    """The local `vedas_accuracy` evaluate module (the metric hub cannot be reached)."""
    import evaluate

    if not Path(path).is_dir():
        raise FileNotFoundError(f"The vedas_accuracy metric is not at {str(path)!r}; install the repo with pip -e.")
    return evaluate.load(str(Path(path).resolve()))


def load_samples(data: str, n: int | None = None, split: str = "test", format: str | None = None, seed: int = 0,
                 task_kwargs: Mapping[str, Any] | None = None, **dataset_kwargs) -> list[dict]:
    """Evaluation samples in the unified schema: the embedded task (``data="synthetic"``) or a dataset file/name.

    For the embedded task the test split is built exactly as :func:`vedas_trainer.synthetic.build_splits` builds it
    (its first ``n`` samples), so pass the training run's ``seed`` and ``task_kwargs``.
    """
    if data == "synthetic":
        from .synthetic import build_synthetic_dataset

        dataset = build_synthetic_dataset(n or 200, seed=seed, split=split, **dict(task_kwargs or {}))
    else:
        from .data import load_vedas_dataset

        if format is None:
            raise ValueError("A dataset path or name needs format= (m3cot, scienceqa, gqa, onethinker or chat).")
        dataset = load_vedas_dataset(data, format, split=split, **dataset_kwargs)
        if n is not None:
            dataset = dataset.select(range(min(n, len(dataset))))
    return [dataset[i] for i in range(len(dataset))]


# ----------------------------------------------------------------------------------------------------- one batch
def build_eval_prompt(processor, sample: Mapping[str, Any], mode: str) -> str:
    """The training prompt of `sample`; No-CoT also gets the answer prefix, so the model answers directly."""
    prompt = build_prompt(processor, sample["question"], sample.get("choices"), num_images=len(sample["images"]))
    if mode == "nocot":
        # "answer :" without the trailing space: the target tokenises as "answer", " :", " X"
        prompt += ANSWER_PREFIX.rstrip()
    return prompt


def eos_token_ids(model, processor) -> set[int]:
    eos = model.generation_config.eos_token_id
    if eos is None:
        eos = processor.tokenizer.eos_token_id
    return set(eos if isinstance(eos, (list, tuple)) else [eos])


def count_generated_tokens(new_tokens: torch.Tensor, eos_ids: Iterable[int]) -> list[int]:
    """Per row: generated tokens up to and including the first EOS (the row's length when there is none).

    Rows that finish early are padded by `generate` until the whole batch is done; that padding is not counted.
    """
    eos_ids = set(eos_ids)
    counts = []
    for row in new_tokens.tolist():
        ends = [i for i, token in enumerate(row) if token in eos_ids]
        counts.append(ends[0] + 1 if ends else len(row))
    return counts


def _answer_start(model, input_ids: torch.Tensor, steps: int) -> int:
    """Column where the answer starts in `generate`'s (compacted) output: after the prompt, and for T > 0 after
    `<|start_latent|>` (appended unless the prompt ends with it), T `<|latent|>` and `<|end_latent|>`."""
    if steps == 0:
        return input_ids.shape[1]
    cfg = model.config
    ends_with_start = bool((input_ids[:, -1] == cfg.start_latent_token_id).all())
    # the compact block generate returns: the layout without replay slots (K = 0)
    block = cfg.latent_block_ids(num_steps=steps, num_replay_tokens=0, start=not ends_with_start)
    return input_ids.shape[1] + len(block)


def generate_batch(model, processor, batch: Sequence[Mapping[str, Any]], mode: str, num_latent_steps: int,
                   max_new_tokens: int) -> tuple[list[str], list[int], float]:
    """Greedy batched generation for one mode. Returns (decoded generations, generated-token counts, seconds)."""
    prompts = [build_eval_prompt(processor, sample, mode) for sample in batch]
    images = [image for sample in batch for image in sample["images"]]
    inputs = processor(text=prompts, images=images or None, padding=True, return_tensors="pt").to(model.device)
    steps = num_latent_steps if mode == "latent" else 0
    kwargs = {"num_latent_steps": steps} if hasattr(model, "build_latent_layout") else {}
    if steps and not kwargs:
        raise ValueError(f"{type(model).__name__} is not a Vedas model: it cannot run the latent mode.")
    start = time.perf_counter()
    sequences = model.generate(**inputs, **kwargs, max_new_tokens=max_new_tokens, do_sample=False)
    seconds = time.perf_counter() - start
    answer_start = _answer_start(model, inputs["input_ids"], steps)
    if steps and not bool((sequences[:, answer_start - 1] == model.config.end_latent_token_id).all()):
        raise RuntimeError("generate() returned an unexpected latent layout: <|end_latent|> is not where expected.")
    new_tokens = sequences[:, answer_start:]
    counts = count_generated_tokens(new_tokens, eos_token_ids(model, processor))
    texts = [processor.tokenizer.decode(row[:count], skip_special_tokens=False)
             for row, count in zip(new_tokens.tolist(), counts)]
    if mode == "nocot":  # score what the model saw and wrote: the forced prefix and its continuation
        texts = [ANSWER_PREFIX.rstrip() + text for text in texts]
    return texts, counts, seconds


# ----------------------------------------------------------------------------------------------------- one mode
def evaluate_mode(model, processor, samples: Sequence[Mapping[str, Any]], mode: str, metric, batch_size: int = 16,
                  max_new_tokens: int | None = None, num_latent_steps: int | None = None, warmup: bool = True,
                  progress: bool = True) -> dict:
    """Table-1 metrics of one mode. Returns the metrics and, under ``"predictions"``, one record per sample."""
    if mode not in MODES:
        raise ValueError(f"Unknown mode {mode!r}; expected one of {MODES}.")
    samples = list(samples)
    steps = (model.config.num_latent_steps if num_latent_steps is None else num_latent_steps) if mode == "latent" else 0
    budget = max_new_tokens or DEFAULT_MAX_NEW_TOKENS[mode]
    if warmup and samples:
        # untimed pass over the first batch's shapes: one-off costs (lazy init, kernel selection, allocator growth)
        # would otherwise land on whichever mode is timed first and skew the side-by-side comparison
        generate_batch(model, processor, samples[:batch_size], mode, steps, 2)
    texts, counts, seconds = [], [], []
    batches = range(0, len(samples), batch_size)
    for begin in tqdm(batches, desc=f"eval {MODE_NAMES[mode]}", unit="batch", disable=not progress):
        batch = samples[begin : begin + batch_size]
        batch_texts, batch_counts, batch_seconds = generate_batch(model, processor, batch, mode, steps, budget)
        texts += batch_texts
        counts += batch_counts
        seconds += [batch_seconds / len(batch)] * len(batch)
    choices = [sample.get("choices") for sample in samples]
    answers = [str(sample["answer"]) for sample in samples]
    scores = metric.compute(predictions=texts, references=answers, choices=choices) if samples else {}
    n = max(len(samples), 1)
    predictions = [
        {
            "id": sample.get("id"),
            "answer": answer,
            "prediction": text,
            "extracted": extract_answer(text, sample_choices),
            "correct": is_correct(text, answer, sample_choices),
            "latent_steps": steps,
            "generated_tokens": count,
            "ar_steps": steps + count,
            "seconds": sec,
        }
        for sample, text, answer, sample_choices, count, sec in zip(samples, texts, answers, choices, counts, seconds)
    ]
    return {
        "mode": mode,
        "accuracy": scores.get("accuracy", 0.0),
        "num_extracted": scores.get("num_extracted", 0),
        "num_samples": len(samples),
        "latent_steps": steps,
        "avg_generated_tokens": sum(counts) / n,
        "avg_ar_steps": sum(steps + c for c in counts) / n,
        "avg_seconds_per_sample": sum(seconds) / n,
        "max_new_tokens": budget,
        # rows that hit the budget without an end token: a CoT budget that is too small shows up here
        "num_truncated": sum(c == budget for c in counts),
        "predictions": predictions,
    }


# ----------------------------------------------------------------------------------------------------- all modes
def evaluate_checkpoint(model, processor, samples: Sequence[Mapping[str, Any]], modes: Sequence[str] = MODES,
                        batch_size: int = 16, max_new_tokens: int | Mapping[str, int] | None = None,
                        num_latent_steps: int | None = None, metric=None, warmup: bool = True,
                        progress: bool = True, grounding: bool | None = None,
                        max_latent_stage: int | None = None, latents_per_step: int = 1) -> dict:
    """Table-1 metrics of every mode in `modes`, on the same samples and model.

    Args:
        samples: unified-schema samples (``images``, ``question``, ``choices``, ``answer``, optional ``id``).
        max_new_tokens: one budget for every mode, or ``{mode: budget}``; defaults to :data:`DEFAULT_MAX_NEW_TOKENS`.
        num_latent_steps: T of the latent mode; defaults to ``model.config.num_latent_steps``.
        grounding: also measure replay grounding (:func:`replay_grounding`) in the latent mode; ``None``: when every
            sample carries a synthetic ``scene`` and the model replays (K > 0). ``max_latent_stage`` and
            ``latents_per_step`` (the training curriculum's; default T and 1) map latent steps to CoT steps.

    Returns:
        ``{"num_samples", "batch_size", "num_latent_steps", "num_replay_tokens", "modes": {mode: metrics},
        "ratios": {...}}``; each mode's metrics hold ``accuracy``, ``avg_ar_steps``, ``avg_seconds_per_sample``,
        ``avg_generated_tokens``, ``latent_steps``, ``num_truncated`` and the per-sample ``predictions``.
    """
    unknown = [mode for mode in modes if mode not in MODES]
    if unknown:
        raise ValueError(f"Unknown modes {unknown}; expected a subset of {MODES}.")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}.")
    metric = metric or load_metric()
    budgets = max_new_tokens if isinstance(max_new_tokens, Mapping) else {mode: max_new_tokens for mode in modes}
    samples = list(samples)
    tokenizer = processor.tokenizer
    padding_side, tokenizer.padding_side = tokenizer.padding_side, "left"
    try:
        results = {
            mode: evaluate_mode(model, processor, samples, mode, metric, batch_size, budgets.get(mode),
                                num_latent_steps, warmup, progress)
            for mode in modes
        }
    finally:
        tokenizer.padding_side = padding_side
    config = model.config
    if grounding is None:
        grounding = bool(samples) and all(s.get("scene") for s in samples) and bool(
            getattr(config, "num_replay_tokens", 0))
    extra = {}
    if grounding and "latent" in modes:
        extra["grounding"] = replay_grounding(model, processor, samples, batch_size, num_latent_steps,
                                              max_latent_stage, latents_per_step, progress)
    return {
        **extra,
        "num_samples": len(samples),
        "batch_size": batch_size,
        "num_latent_steps": results["latent"]["latent_steps"] if "latent" in results else num_latent_steps,
        "num_replay_tokens": getattr(config, "num_replay_tokens", None),
        "device": str(model.device),
        "modes": results,
        "ratios": time_ratios(results),
    }


def time_ratios(results: Mapping[str, Mapping]) -> dict:
    """Side-by-side latency ratios of one run (docs/design.md, "Measuring"): latent vs No-CoT, CoT vs latent."""
    def ratio(a, b):
        if a in results and b in results and results[b]["avg_seconds_per_sample"] > 0:
            return results[a]["avg_seconds_per_sample"] / results[b]["avg_seconds_per_sample"]
        return None

    return {"latent_vs_nocot_time": ratio("latent", "nocot"), "cot_vs_latent_time": ratio("cot", "latent")}


# ----------------------------------------------------------------------------------------------------- grounding
def step_target_cells(sample: Mapping[str, Any], num_latent_steps: int, max_latent_stage: int | None = None,
                      latents_per_step: int = 1) -> list[list[tuple[int, int]]]:
    """Per latent step t = 1..T, the board cells (row, col), 0-based, that the CoT step it replaced names.

    The curriculum merges the rationale into at most ``max_latent_stage`` chunks (:func:`vedas_trainer.data.
    merge_steps`; default T) and replaces chunk k by ``latents_per_step`` latent slots, so latent step t stands for
    chunk (t - 1) // c. A synthetic step names one cell of the path (``start`` is path[0], ``step i`` is path[i]);
    a merged chunk names all of its steps' cells. A latent step past the sample's last chunk names none ([])."""
    from .data import merge_steps

    scene = sample.get("scene") if isinstance(sample, Mapping) else None
    if not scene or not scene.get("path"):
        raise ValueError(f"sample {sample.get('id')!r} has no synthetic scene: grounding needs the embedded task")
    path, steps = [tuple(cell) for cell in scene["path"]], list(sample["steps"])
    if len(steps) != len(path):
        raise ValueError(f"sample {sample.get('id')!r}: {len(steps)} steps but a path of {len(path)} cells")
    chunks = merge_steps(steps, max_latent_stage or num_latent_steps)
    bounds, begin = [], 0
    for chunk in chunks:  # synthetic steps are single lines; merged ones are joined with "\n"
        size = chunk.count("\n") + 1
        bounds.append(path[begin : begin + size])
        begin += size
    return [list(bounds[(t - 1) // latents_per_step]) if (t - 1) // latents_per_step < len(bounds) else []
            for t in range(1, num_latent_steps + 1)]


def _token_cell(index: int, grid_hw: tuple[int, int], board: int) -> tuple[int, int]:
    """The board cell that holds the centre of visual token `index` of a (G_h, G_w) merged grid."""
    gh, gw = grid_hw
    row, col = divmod(int(index), gw)
    return int((row + 0.5) * board / gh), int((col + 0.5) * board / gw)


def _replay_chance(num_tokens: int, num_target: int, k: int) -> float:
    """P(K tokens drawn uniformly without replacement among N include one of the m target tokens): K / N for m = 1."""
    k = min(k, num_tokens)
    return 1.0 - math.comb(num_tokens - num_target, k) / math.comb(num_tokens, k)


def _step_grounding(trace_step: Mapping[str, Any], row: int, cells, grid_hw, board: int) -> dict:
    """One sample's hits at one latent step: replayed tokens and crop window against the named cells."""
    gh, gw = grid_hw
    tokens = [i for i in range(gh * gw) if _token_cell(i, grid_hw, board) in set(cells)]
    indices = [int(i) for i in trace_step["replay_indices"][row].tolist() if int(i) >= 0]
    window = trace_step.get("crop_window", [None] * (row + 1))[row]
    record = {"cells": [list(c) for c in cells], "replayed_cells": [list(_token_cell(i, grid_hw, board))
                                                                    for i in indices],
              "replay_hit": any(i in tokens for i in indices),
              "replay_chance": _replay_chance(gh * gw, len(tokens), int(trace_step["replay_indices"].shape[1])),
              "window": None, "window_hit": None, "window_chance": None}
    if window is not None:
        _, r0, r1, c0, c1 = (int(v) for v in window)
        record.update(window=[r0, r1, c0, c1], window_chance=(r1 - r0) * (c1 - c0) / (gh * gw),
                      window_hit=any(r0 <= i // gw < r1 and c0 <= i % gw < c1 for i in tokens))
    return record


def trace_grounding(samples: Sequence[Mapping[str, Any]], trace: Sequence[Mapping[str, Any]],
                    grids_hw: Sequence[tuple[int, int]], max_latent_stage: int | None = None,
                    latents_per_step: int = 1) -> list[dict]:
    """Per sample, per latent step: does replay (and the crop window) hold the cell the replaced CoT step names?

    `trace` is `generate(..., return_dict_in_generate=True, output_latent_trace=True).latent_trace` for `samples`
    (one row each, one image each); `grids_hw` each sample's merged grid (G_h, G_w). Steps without replay (K = 0)
    or without a named cell are left out. Returns ``[{"id", "steps": [{"t", "cells", "replay_hit", ...}]}]``."""
    records = []
    for row, (sample, grid_hw) in enumerate(zip(samples, grids_hw)):
        targets = step_target_cells(sample, len(trace), max_latent_stage, latents_per_step)
        board = int(sample["scene"]["grid_size"])
        steps = []
        for t, (trace_step, cells) in enumerate(zip(trace, targets), start=1):
            if cells and trace_step.get("replay_indices") is not None and trace_step["replay_indices"].shape[1]:
                steps.append({"t": t, **_step_grounding(trace_step, row, cells, grid_hw, board)})
        records.append({"id": sample.get("id"), "steps": steps})
    return records


def _rate(values) -> float | None:
    values = [float(v) for v in values if v is not None]
    return sum(values) / len(values) if values else None


def summarize_grounding(records: Sequence[Mapping[str, Any]]) -> dict:
    """Hit rates and chance levels over all (sample, step) pairs, and per latent step t."""
    steps = [step for record in records for step in record["steps"]]

    def summary(chosen):
        return {"num_steps": len(chosen), "replay_hit_rate": _rate(s["replay_hit"] for s in chosen),
                "replay_chance": _rate(s["replay_chance"] for s in chosen),
                "window_hit_rate": _rate(s["window_hit"] for s in chosen),
                "window_chance": _rate(s["window_chance"] for s in chosen)}

    per_step = {t: summary([s for s in steps if s["t"] == t]) for t in sorted({s["t"] for s in steps})}
    return {**summary(steps), "per_step": per_step}


def replay_grounding(model, processor, samples: Sequence[Mapping[str, Any]], batch_size: int = 16,
                     num_latent_steps: int | None = None, max_latent_stage: int | None = None,
                     latents_per_step: int = 1, progress: bool = True) -> dict:
    """Replay grounding on synthetic samples: one latent generation per batch (answer budget 1 token) with the
    latent trace. Returns :func:`summarize_grounding`'s summary plus ``"samples"`` (per sample, per step)."""
    steps = model.config.num_latent_steps if num_latent_steps is None else num_latent_steps
    merge = model.config.vision_config.spatial_merge_size
    tokenizer = processor.tokenizer
    padding_side, tokenizer.padding_side = tokenizer.padding_side, "left"
    records = []
    try:
        for begin in tqdm(range(0, len(samples), batch_size), desc="replay grounding", unit="batch",
                          disable=not progress):
            batch = list(samples[begin : begin + batch_size])
            if any(len(sample["images"]) != 1 for sample in batch):
                raise ValueError("replay grounding needs one image per sample (the embedded task)")
            prompts = [build_eval_prompt(processor, sample, "latent") for sample in batch]
            inputs = processor(text=prompts, images=[s["images"][0] for s in batch], padding=True,
                               return_tensors="pt").to(model.device)
            with torch.no_grad():
                out = model.generate(**inputs, num_latent_steps=steps, max_new_tokens=1, do_sample=False,
                                     return_dict_in_generate=True, output_latent_trace=True)
            grids = [(int(h) // merge, int(w) // merge) for _, h, w in inputs["image_grid_thw"].tolist()]
            records += trace_grounding(batch, out.latent_trace or [], grids, max_latent_stage, latents_per_step)
    finally:
        tokenizer.padding_side = padding_side
    return {**summarize_grounding(records), "num_latent_steps": steps, "samples": records}


def grounding_to_markdown(grounding: Mapping[str, Any]) -> str:
    """The grounding table: hit rates of replay and of the crop window, with their chance levels, per step."""
    def pct(value):
        return "n/a" if value is None else f"{100 * value:.1f}"

    lines = ["| Latent step | Steps scored | Replay hit (%) | Chance (%) | Window hit (%) | Chance (%) |",
             "|---|---|---|---|---|---|"]
    rows = [(str(t), s) for t, s in grounding["per_step"].items()] + [("all", grounding)]
    for name, s in rows:
        lines.append(f"| {name} | {s['num_steps']} | {pct(s['replay_hit_rate'])} | {pct(s['replay_chance'])} | "
                     f"{pct(s['window_hit_rate'])} | {pct(s['window_chance'])} |")
    return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------------------------------- reports
def results_to_markdown(results: Mapping[str, Any], title: str | None = None) -> str:
    """The Table-1 style markdown table of `evaluate_checkpoint`'s results."""
    lines = [f"## {title}", ""] if title else []
    lines += [
        f"{results['num_samples']} test samples, batch size {results['batch_size']}, "
        f"T = {results['num_latent_steps']}, K = {results['num_replay_tokens']}, device {results.get('device')}.",
        "",
        "| Mode | Accuracy (%) | AR steps | Latent steps | Generated tokens | Time / sample (s) | Truncated |",
        "|---|---|---|---|---|---|---|",
    ]
    for mode, m in results["modes"].items():
        lines.append(
            f"| {MODE_NAMES[mode]} | {100 * m['accuracy']:.1f} | {m['avg_ar_steps']:.1f} | {m['latent_steps']} | "
            f"{m['avg_generated_tokens']:.1f} | {m['avg_seconds_per_sample']:.4f} | {m['num_truncated']} |"
        )
    ratios = {k: v for k, v in results.get("ratios", {}).items() if v is not None}
    if ratios:
        lines += ["", "Time ratios (same run): " + ", ".join(f"{k} = {v:.2f}" for k, v in ratios.items())]
    if results.get("grounding"):
        lines += ["", "### Replay grounding (latent mode)", "",
                  "Does a latent step replay the cell that the CoT step it replaced names? Chance: K tokens drawn at "
                  "random (K / visual tokens for a one-token cell); for the crop window, the share of the grid it "
                  "covers.", "", grounding_to_markdown(results["grounding"]).rstrip("\n")]
    return "\n".join(lines) + "\n"


def save_results(results: Mapping[str, Any], out_dir, title: str | None = None) -> dict[str, Path]:
    """Write ``results.json`` (metrics), ``results.md`` (table) and ``predictions.jsonl`` (per sample) to `out_dir`."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    summary = {**results, "modes": {mode: {k: v for k, v in m.items() if k != "predictions"}
                                    for mode, m in results["modes"].items()}}
    paths = {"json": out_dir / "results.json", "markdown": out_dir / "results.md",
             "predictions": out_dir / "predictions.jsonl"}
    if results.get("grounding"):  # per-sample steps to grounding.jsonl, the summary stays in results.json
        summary["grounding"] = {k: v for k, v in results["grounding"].items() if k != "samples"}
        paths["grounding"] = out_dir / "grounding.jsonl"
        paths["grounding"].write_text("".join(json.dumps(r) + "\n" for r in results["grounding"]["samples"]))
    paths["json"].write_text(json.dumps(summary, indent=2) + "\n")
    paths["markdown"].write_text(results_to_markdown(results, title))
    with paths["predictions"].open("w") as f:
        for mode, m in results["modes"].items():
            for record in m.get("predictions", []):
                f.write(json.dumps({"mode": mode, **record}) + "\n")
    return paths


__all__ = [
    "MODES",
    "DEFAULT_MAX_NEW_TOKENS",
    "load_model_and_processor",
    "load_metric",
    "load_samples",
    "build_eval_prompt",
    "count_generated_tokens",
    "evaluate_mode",
    "evaluate_checkpoint",
    "results_to_markdown",
    "save_results",
    "step_target_cells",
    "trace_grounding",
    "summarize_grounding",
    "replay_grounding",
    "grounding_to_markdown",
]
