"""Replay grounding (issue 12, item 4): the synthetic task knows which cell each CoT step names, so a latent step's
replayed tokens and crop window can be scored against it. Hand-built traces give known hit rates; a real model's
trace goes through evaluate.py's report."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from vedas_trainer.evaluation import (
    grounding_to_markdown, load_model_and_processor, load_samples, replay_grounding, step_target_cells,
    summarize_grounding, trace_grounding,
)
from vedas_trainer.synthetic import TASK_PRESETS, build_synthetic_dataset, expand_task_kwargs, make_sample

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def sample_with_path(path, grid=3):
    """A synthetic sample whose scene path is replaced by `path` (the steps follow it, as make_sample writes them)."""
    sample = make_sample(0, grid=grid, n_moves=len(path) - 1)
    sample["scene"]["path"] = [list(cell) for cell in path]
    sample["steps"] = [f"step {i} : row {r + 1} col {c + 1}" for i, (r, c) in enumerate(path)]
    return sample


def test_target_cells_follow_the_path_and_the_merge():
    sample = sample_with_path([(0, 0), (1, 0), (1, 1), (2, 1)])
    assert step_target_cells(sample, 4) == [[(0, 0)], [(1, 0)], [(1, 1)], [(2, 1)]]
    # 4 steps merged into 2 chunks: latent step 1 stands for the first two cells, step 2 for the last two
    assert step_target_cells(sample, 2, max_latent_stage=2) == [[(0, 0), (1, 0)], [(1, 1), (2, 1)]]
    # c = 2 latent slots per step: steps 1-2 share the first cell; T beyond the path names nothing
    assert step_target_cells(sample, 6, max_latent_stage=4, latents_per_step=2)[:3] == [[(0, 0)], [(0, 0)], [(1, 0)]]
    short = sample_with_path([(2, 2), (1, 2), (0, 2)])
    assert step_target_cells(short, 4) == [[(2, 2)], [(1, 2)], [(0, 2)], []]


def test_target_cells_need_a_scene():
    with pytest.raises(ValueError, match="has no synthetic scene"):
        step_target_cells({"id": "m3cot-1", "steps": ["a"]}, 2)


def hand_trace():
    """Two samples on 3 x 3 boards, K = 2, two latent steps; sample a's path (0,0) -> (0,1), sample b's (2,2) -> (1,2)."""
    replay = [torch.tensor([[0, 5], [3, 4]]), torch.tensor([[1, -1], [8, 2]])]  # token i = cell divmod(i, 3)
    windows = [[(0, 0, 2, 0, 2), (0, 1, 3, 1, 3)], [(0, 1, 3, 1, 3), None]]
    return [{"replay_indices": r, "crop_window": w} for r, w in zip(replay, windows)]


def test_hand_built_trace_gives_the_expected_hit_rates():
    samples = [sample_with_path([(0, 0), (0, 1)]), sample_with_path([(2, 2), (1, 2)])]
    records = trace_grounding(samples, hand_trace(), [(3, 3), (3, 3)])
    hits = [[(s["replay_hit"], s["window_hit"]) for s in r["steps"]] for r in records]
    # a: step 1 replays cells (0,0) (1,2): hit; window rows 0-1 cols 0-1 holds (0,0): hit. step 2 replays (0,1)
    # (its second slot is empty): hit; window rows 1-2 cols 1-2 misses (0,1).
    # b: step 1 replays (1,0) (1,1): miss; window rows 1-2 cols 1-2 holds (2,2): hit. step 2 replays (2,2) (0,2):
    # miss, no window.
    assert hits == [[(True, True), (True, False)], [(False, True), (False, None)]]
    assert records[0]["steps"][1]["replayed_cells"] == [[0, 1]]
    summary = summarize_grounding(records)
    assert summary["num_steps"] == 4
    assert summary["replay_hit_rate"] == pytest.approx(0.5)
    assert summary["window_hit_rate"] == pytest.approx(2 / 3)  # the step without a window is not scored
    assert summary["replay_chance"] == pytest.approx(2 / 9)  # K / visual tokens for a one-token cell
    assert summary["window_chance"] == pytest.approx(4 / 9)  # a 2 x 2 window on a 3 x 3 grid
    assert summary["per_step"][1]["replay_hit_rate"] == pytest.approx(0.5)
    assert summary["per_step"][2]["window_hit_rate"] == pytest.approx(0.0)
    table = grounding_to_markdown(summary)
    assert "| all | 4 | 50.0 | 22.2 | 66.7 | 44.4 |" in table and "| 2 | 2 | 50.0 | 22.2 | 0.0 | 44.4 |" in table


def test_several_tokens_per_cell_and_no_replay():
    """A 6 x 6 token grid over a 3 x 3 board: each cell is 2 x 2 tokens, and any of them is a hit; K = 0 is unscored."""
    sample = sample_with_path([(1, 1), (1, 2)])
    trace = [{"replay_indices": torch.tensor([[15]]), "crop_window": [None]},  # token (2, 3): cell (1, 1)
             {"replay_indices": torch.tensor([[14]]), "crop_window": [None]}]  # token (2, 2): cell (1, 1), not (1, 2)
    steps = trace_grounding([sample], trace, [(6, 6)])[0]["steps"]
    assert [s["replay_hit"] for s in steps] == [True, False]
    assert steps[0]["replay_chance"] == pytest.approx(1 - 32 / 36)  # 1 token of 36, 4 of them in the cell
    no_replay = [{"router_scores": {}}, {"router_scores": {}}]
    assert trace_grounding([sample], no_replay, [(3, 3)])[0]["steps"] == []


def test_lookback_preset():
    assert expand_task_kwargs({"preset": "lookback", "mc_prob": 0.0}) == {**TASK_PRESETS["lookback"], "mc_prob": 0.0}
    assert expand_task_kwargs({"grid": 4}) == {"grid": 4}
    with pytest.raises(ValueError, match="unknown task preset 'huge'"):
        expand_task_kwargs({"preset": "huge"})
    data = build_synthetic_dataset(3, split="test", preset="lookback")
    assert all(len(row["steps"]) == 4 and row["scene"]["grid_size"] == 5 for row in data)
    assert data[0]["images"][0].size == (140, 140)


@pytest.fixture(scope="module")
def tiny_model(vedas_dirs):
    return load_model_and_processor(vedas_dirs["qwen2_vl"])


def test_replay_grounding_of_a_real_trace(tiny_model):
    """An untrained model's trace: every latent step with a named cell is scored, with K tokens replayed."""
    model, processor = tiny_model
    samples = load_samples("synthetic", n=3, task_kwargs={"n_moves": 1})  # 2 steps = T = 2
    result = replay_grounding(model, processor, samples, batch_size=2, progress=False)
    K = model.config.num_replay_tokens
    assert result["num_steps"] == 3 * 2 and len(result["samples"]) == 3
    for record, sample in zip(result["samples"], samples):
        assert [s["cells"] for s in record["steps"]] == [[c] for c in sample["scene"]["path"]]
        assert all(1 <= len(s["replayed_cells"]) <= K and s["window"] is not None for s in record["steps"])
    # the 3 x 3 board is 9 visual tokens: chance of K = 4 random tokens holding one cell is 4 / 9
    assert result["replay_chance"] == pytest.approx(4 / 9)
    assert 0.0 <= result["replay_hit_rate"] <= 1.0


def test_evaluate_script_reports_grounding_on_synthetic_data(vedas_dirs, tmp_path):
    out = tmp_path / "eval"
    command = [sys.executable, str(EXAMPLES / "evaluate.py"), str(vedas_dirs["qwen2_vl"]), "--data", "synthetic",
               "--n", "4", "--modes", "latent", "--max-new-tokens", "3", "--out", str(out), "--no-progress",
               "--task-kwargs", '{"n_moves": 1}']
    result = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    saved = json.loads((out / "results.json").read_text())
    assert saved["grounding"]["num_steps"] == 8 and "samples" not in saved["grounding"]
    assert "### Replay grounding" in (out / "results.md").read_text() and "| all | 8 |" in result.stdout
    lines = (out / "grounding.jsonl").read_text().splitlines()
    assert len(lines) == 4 and len(json.loads(lines[0])["steps"]) == 2
    bad = subprocess.run(command[:-1] + ['{"preset": "huge"}', "--overwrite"], capture_output=True, text=True,
                         timeout=120)
    assert bad.returncode == 2 and "--task-kwargs: unknown task preset 'huge'" in bad.stderr.strip().splitlines()[-1]


def test_visualize_marks_the_true_cell(monkeypatch, tmp_path):
    """The picture of a step carries the true cell (yellow dashes) and its grounding; without a scene it has neither."""
    import importlib.util

    import numpy as np
    from PIL import Image

    spec = importlib.util.spec_from_file_location("vedas_example_visualize", EXAMPLES / "visualize.py")
    visualize = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(visualize)
    sample = sample_with_path([(0, 0), (0, 1)])
    trace = [dict(step, replay_weights=torch.tensor([[0.6, 0.4]])) for step in hand_trace()]
    targets = visualize.true_cells(sample, 2)
    grounding = visualize.grounding_steps(sample, trace, (3, 3))
    assert targets == [[(0, 0)], [(0, 1)]]
    assert visualize._hit_label(grounding[1]) == "\nR hit, W hit" and visualize._hit_label(grounding[2]) == "\nR hit, W miss"

    def yellow_pixels(path):
        pixels = np.asarray(Image.open(path).convert("RGB")).astype(int)
        return int(((pixels[..., 0] > 230) & (pixels[..., 1] > 230) & (pixels[..., 2] < 40)).sum())

    marked = visualize.draw(sample, trace, (3, 3), "answer : red", tmp_path / "marked.png", targets, grounding)
    plain = visualize.draw(sample, trace, (3, 3), "answer : red", tmp_path / "plain.png")
    assert yellow_pixels(marked) > 100 and yellow_pixels(plain) < yellow_pixels(marked) / 4
    assert visualize.true_cells({"id": "x", "images": []}, 2) == [[], []]
