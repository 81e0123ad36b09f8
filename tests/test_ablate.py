"""Retrained ablations (issue 12, item 3): examples/ablate.py end to end on the quick run (Markdown, JSON, PNG with
the interval columns; a second call reuses every run), the variants' train.py options as train.py parses them, the
statistics, and the no-curriculum switch."""

import importlib.util
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from vedas_trainer.ablation import (
    Variant, ablation_markdown, build_variants, paired_bootstrap, select_variants, summarize_runs,
)

REPO = Path(__file__).resolve().parents[1]
EXAMPLES = REPO / "examples"


def load_ablate(monkeypatch):
    """examples/ablate.py as a module, with examples/ on sys.path for its `import train` (as when run as a script)."""
    monkeypatch.syspath_prepend(str(EXAMPLES))
    spec = importlib.util.spec_from_file_location("vedas_example_ablate", EXAMPLES / "ablate.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def ablate(out, *options, timeout=420):
    command = [sys.executable, str(EXAMPLES / "ablate.py"), "--out", str(out), *options]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    start = time.time()
    result = subprocess.run(command, cwd=out.parent, env=env, capture_output=True, text=True, timeout=timeout)
    return result, time.time() - start


def test_quick_study_end_to_end_then_resumes(tmp_path):
    out = tmp_path / "study"
    result, _ = ablate(out, "--quick")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "ablation runs: 100%" in result.stderr  # the tqdm bar over runs
    table = (out / "ablation.md").read_text()
    header = [line for line in table.splitlines() if line.startswith("| Variant |")][0]
    for column in ("Accuracy (%)", "Δ vs full (pp)", "95% CI (pp)", "Replay hit (%)", "Window hit (%)"):
        assert column in header
    rows = {line.split("|")[1].strip(): line for line in table.splitlines() if line.startswith("| ") and "---" not in line}
    assert set(rows) == {"Variant", "full", "no_scfvr"}
    study = json.loads((out / "ablation.json").read_text())
    assert study["setup"]["seeds"] == [0, 1] and study["setup"]["num_test_samples"] == 32
    full, ablated = study["variants"]["full"], study["variants"]["no_scfvr"]
    assert full["seeds"] == [0, 1] and full["vs_full"] is None
    assert full["accuracy_mean"] == pytest.approx(np.mean(list(full["accuracy_per_seed"].values())))
    vs = ablated["vs_full"]
    assert vs["seeds"] == [0, 1] and vs["num_samples"] == 32 and vs["low"] <= vs["diff"] <= vs["high"]
    assert f"[{100 * vs['low']:+.1f}, {100 * vs['high']:+.1f}]" in rows["no_scfvr"]
    assert 0.0 <= full["replay_hit_rate"] <= 1.0 and ablated["replay_hit_rate"] is None  # K = 0 replays nothing
    assert (out / "ablation.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    records = {}
    for variant in ("full", "no_scfvr"):
        for seed in (0, 1):
            run = out / "runs" / variant / f"seed{seed}"
            records[run] = json.loads((run / "ablation_result.json").read_text())
            assert len(records[run]["correct"]) == 32 and records[run]["seed"] == seed
            assert sorted(p.name for p in run.iterdir() if p.is_dir()) == ["checkpoint-final"]  # cleaned up
    no_replay = json.loads((out / "runs/no_scfvr/seed0/checkpoint-final/config.json").read_text())
    assert no_replay["num_replay_tokens"] == 0 and no_replay["recon_weight"] == 0.0

    stamps = {run: (run / "ablation_result.json").stat().st_mtime_ns for run in records}
    again, _ = ablate(out, "--quick")
    assert again.returncode == 0, again.stderr[-3000:]
    assert "0 run(s) trained or evaluated now, 4 done earlier" in again.stdout
    assert all((run / "ablation_result.json").stat().st_mtime_ns == stamp for run, stamp in stamps.items())
    for run in records:  # trained once: one command line in the log
        assert sum(line.startswith("$ ") for line in (run / "train.log").read_text().splitlines()) == 1
    assert (out / "ablation.md").read_text() == table

    other, _ = ablate(out, "--quick", "--learning_rate", "1e-3")
    assert other.returncode != 0
    assert "was trained with other train.py options" in other.stderr.strip().splitlines()[-1]


def test_variants_reach_train_py_as_options(monkeypatch, tmp_path):
    """Each variant's options, parsed by train.py: later options win, so a variant overrides the shared ones."""
    module = load_ablate(monkeypatch)
    import train

    shared = ["--recon_weight", "0.5", "--vedas_overrides", '{"window_size": 1}', "--n_train", "8"]
    variants = build_variants(sweep_alpha=[0.5, 3])
    base = module.base_overrides_of(shared)
    assert base == {"window_size": 1, "recon_weight": 0.5}

    def parsed(name):
        options = module.run_options(shared, base, variants[name], 7, tmp_path / name)
        model_args, _, _, args, _, _ = train.parse_args(options)
        return model_args, args, json.loads(model_args.vedas_overrides)

    model_args, args, overrides = parsed("full")
    assert (model_args.recon_weight, overrides, args.seed, args.skip_curriculum) == (0.5, {"window_size": 1}, 7, False)
    assert args.output_dir == str(tmp_path / "full")
    model_args, _, overrides = parsed("no_scfvr")
    assert (model_args.num_replay_tokens, model_args.recon_weight) == (0, 0.0)
    assert parsed("no_distill")[0].recon_weight == 0.0 and parsed("no_distill")[0].num_replay_tokens is None
    assert parsed("no_curriculum")[1].skip_curriculum is True
    assert parsed("no_rds")[2] == {"window_size": 1, "routing_layers": []}
    assert parsed("alpha3")[2]["routing_topk"] == 3 and parsed("alpha0.5")[2]["routing_topk"] == 0.5
    assert parsed("sequential_positions")[2]["replay_positions"] == "sequential"
    assert parsed("soft_mix")[2]["replay_mode"] == "soft_mix" and parsed("K4")[0].num_replay_tokens == 4
    assert parsed("literal_eq11")[2]["depth_residual"] == "literal"


def test_select_variants():
    variants = build_variants()
    assert [v.name for v in select_variants("no_rds", variants)] == ["full", "no_rds"]  # full always, first
    assert [v.name for v in select_variants("sweeps", variants)] == ["full", "K1", "K4", "W1", "W3", "alpha0.125",
                                                                     "alpha0.5"]
    assert len(select_variants("all", variants)) == len(variants) == 14
    assert [v.name for v in select_variants("core,no_rds", variants)][:3] == ["full", "no_rds", "no_scfvr"]
    with pytest.raises(ValueError, match="unknown variant 'fast'"):
        select_variants("full,fast", variants)


@pytest.mark.parametrize("argv, message", [
    (["--seed", "3"], "--seed is set by ablate.py for every run; use --seeds"),
    (["--output_dir", "x"], "--output_dir is set by ablate.py for every run; use --out"),
    (["--variants", "nope"], "unknown variant 'nope'"),
    (["--seeds", "1", "1"], "--seeds must differ"),
    (["--vedas_overrides", '{"window_size": 0}', "--dry_run"], "variant full: --vedas_overrides: VedasConfig.window_size"),
])
def test_bad_arguments_end_in_one_line(argv, message, monkeypatch, tmp_path, capsys):
    module = load_ablate(monkeypatch)
    with pytest.raises(SystemExit) as exit_:
        module.main([*argv, "--out", str(tmp_path / "o")])
    text = exit_.value.code if isinstance(exit_.value.code, str) else capsys.readouterr().err.strip().splitlines()[-1]
    assert message in text and "\n" not in text.strip()


def test_a_distributed_launch_of_ablate_itself_is_refused(monkeypatch, capsys):
    module = load_ablate(monkeypatch)
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(SystemExit):
        module.main(["--dry_run"])
    assert "run ablate.py with plain python" in capsys.readouterr().err


def test_paired_bootstrap_known_differences():
    full = {0: [True] * 10 + [False] * 10, 1: [True] * 20}
    same = paired_bootstrap(full, full, n_boot=500)
    assert same["diff"] == same["low"] == same["high"] == 0.0
    # variant: one sample more right at seed 0, everything wrong at seed 1
    variant = {0: [True] * 11 + [False] * 9, 1: [False] * 20, 2: [True] * 20}
    result = paired_bootstrap(full, variant, n_boot=2000)
    assert result["seeds"] == [0, 1] and result["num_samples"] == 20  # seed 2 has no partner
    assert result["diff"] == pytest.approx((1 - 20) / 40)
    assert result["low"] <= result["diff"] <= result["high"] < 0
    # a constant per-sample difference has a zero-width interval; a mixed one a positive width
    assert paired_bootstrap({0: [False] * 5}, {0: [True] * 5}, n_boot=200)["low"] == 1.0
    mixed = paired_bootstrap({0: [False] * 50}, {0: [True, False] * 25}, n_boot=4000, seed=1)
    assert mixed["low"] < 0.5 < mixed["high"] and mixed["high"] - mixed["low"] == pytest.approx(0.28, abs=0.06)
    with pytest.raises(ValueError, match="same test samples"):
        paired_bootstrap({0: [True]}, {0: [True, False]})


def test_summary_and_table_rows():
    variants = [Variant("full", "all on"), Variant("no_rds", "no routing", {"routing_layers": []})]
    runs = {("full", 0): {"accuracy": 0.5, "correct": [True, False], "train_seconds": 10.0,
                          "grounding": {"replay_hit_rate": 0.4, "replay_chance": 0.2, "window_hit_rate": 0.6,
                                        "window_chance": 0.4}},
            ("full", 1): {"accuracy": 1.0, "correct": [True, True], "train_seconds": 12.0, "grounding": None},
            ("no_rds", 0): {"accuracy": 0.0, "correct": [False, False], "train_seconds": 9.0, "grounding": None}}
    table = summarize_runs(variants, runs, n_boot=200)
    assert table["full"]["accuracy_mean"] == 0.75 and table["full"]["accuracy_std"] == pytest.approx(0.5 ** 0.5 / 2)
    assert table["full"]["replay_hit_rate"] == 0.4 and table["full"]["train_seconds_mean"] == 11.0
    assert table["no_rds"]["vs_full"]["diff"] == -0.5 and table["no_rds"]["accuracy_std"] == 0.0
    setup = {"seeds": [0, 1], "num_test_samples": 2, "test_data": "synthetic", "train_options": "--quick",
             "level": 0.95, "n_boot": 200, "missing": ["no_rds/seed1"]}
    markdown = ablation_markdown(table, setup)
    assert "| full | all on | 2 | 75.0 ± 35.4 | — | — | 40.0 | 60.0 | 20.0 / 40.0 | 11 |" in markdown
    assert "| no_rds | no routing | 1 | 0.0 ± 0.0 | -50.0 | [" in markdown
    assert "Runs missing (failed or not run): no_rds/seed1." in markdown


def test_skip_curriculum_trains_every_latent_epoch_at_the_last_stage(vedas_dirs, tmp_path):
    from vedas_trainer.checkpoint import load_vedas
    from vedas_trainer.collator import VedasCollator
    from vedas_trainer.trainer import CurriculumCallback, VedasTrainer, VedasTrainingArguments

    model, processor = load_vedas(vedas_dirs["qwen2_vl"])
    stages = {}
    for skip in (False, True):
        args = VedasTrainingArguments(output_dir=str(tmp_path / str(skip)), cot_warmup_epochs=2, epochs_per_stage=1,
                                      max_latent_stage=3, skip_curriculum=skip, use_cpu=True, report_to="none")
        collator = VedasCollator(processor, model.config, **args.collator_kwargs())
        trainer = VedasTrainer(model=model, args=args, data_collator=collator)
        (callback,) = [cb for cb in trainer.callback_handler.callbacks if isinstance(cb, CurriculumCallback)]
        stages[skip] = [callback.stage_for_epoch(epoch) for epoch in range(6)]
    assert stages == {False: [0, 0, 1, 2, 3, 4], True: [0, 0, 3, 3, 3, 3]}


def test_dry_run_keeps_a_recipe_first_and_merges_its_overrides(monkeypatch, tmp_path, capsys):
    module = load_ablate(monkeypatch)
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("learning_rate: 0.001\nvedas_overrides:\n  window_size: 1\n")
    assert module.main([str(recipe), "--quick", "--variants", "no_rds", "--dry_run", "--out", str(tmp_path / "o")]) == 0
    commands = [line.split() for line in capsys.readouterr().out.splitlines() if "train.py" in line]
    assert len(commands) == 4  # full and no_rds x the quick seeds 0, 1
    for command in commands:
        assert command[2] == str(recipe) and command[3:6] == ["--quick", "--n_train", "64"]
    assert "'{\"routing_layers\": [], \"window_size\": 1}'" in " ".join(commands[2])
    assert not (tmp_path / "o").exists()  # nothing trained, nothing written
