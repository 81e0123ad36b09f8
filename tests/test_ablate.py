"""Retrained ablations (issue 12, item 3): examples/ablate.py end to end on the quick run (Markdown, JSON, PNG with
the interval columns, the shared warm-ups; a second call reuses every run), the variants' train.py options as
train.py parses them, the statistics, the no-curriculum switch, and the shared CoT warm-up: the variants marked to
share it train the same stage 0 as full (the others do not), and at the train.py level a run continued in another
folder from the checkpoint that `--keep_warmup_checkpoint` keeps is the uninterrupted run."""

import argparse
import importlib.util
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from vedas_trainer.ablation import (
    Variant, ablation_markdown, build_variants, paired_bootstrap, select_variants, summarize_runs, warmup_summary,
)
from vedas_trainer.testing import child_env

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


def check_shared_warmups(out, study, table):
    """full kept its warm-up checkpoint (evaluated once per seed); no_scfvr continued it, in the latent phase only."""
    assert study["setup"]["shared_warmup"] is True and set(study["setup"]["warmup"]) == {"0", "1"}
    assert "## Shared CoT warm-up" in table
    for seed in (0, 1):
        full = out / "runs" / "full" / f"seed{seed}"
        record = json.loads((full / "warmup_result.json").read_text())
        assert record["global_steps"] == 8 and record["epochs"] == pytest.approx(1.0)  # quick: 64 / 8, one epoch
        assert len(record["cot"]["correct"]) == len(record["nocot"]["correct"]) == 32
        row = study["setup"]["warmup"][str(seed)]
        assert (row["cot_accuracy"], row["nocot_accuracy"]) == (record["cot"]["accuracy"], record["nocot"]["accuracy"])
        assert f"| {seed} | 8 | {100 * row['nocot_accuracy']:.1f} | {100 * row['cot_accuracy']:.1f} |" in table
        assert "--keep_warmup_checkpoint True" in (full / "train.log").read_text()
        log = (out / "runs" / "no_scfvr" / f"seed{seed}" / "train.log").read_text()
        assert f"--resume_from_checkpoint {full / 'warmup-checkpoint'}" in log
        assert "Curriculum: epoch 1 (global step 8) trains at stage 1." in log and "at stage 0" not in log


def test_quick_study_end_to_end_then_resumes(tmp_path):
    out = tmp_path / "study"
    result, _ = ablate(out, "--quick")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "ablation runs: 100%" in result.stderr  # the tqdm bar over runs
    table = (out / "ablation.md").read_text()
    header = [line for line in table.splitlines() if line.startswith("| Variant |")][0]
    for column in ("Accuracy (%)", "Δ vs full (pp)", "95% CI (pp)", "Replay hit (%)", "Window hit (%)"):
        assert column in header
    main = table.split("\n\n## ")[0]  # the variants' table, before the warm-up's section
    rows = {line.split("|")[1].strip(): line for line in main.splitlines() if line.startswith("| ") and "---" not in line}
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
    check_shared_warmups(out, study, table)
    records = {}
    for variant in ("full", "no_scfvr"):
        for seed in (0, 1):
            run = out / "runs" / variant / f"seed{seed}"
            records[run] = json.loads((run / "ablation_result.json").read_text())
            assert len(records[run]["correct"]) == 32 and records[run]["seed"] == seed
            kept = ["checkpoint-final"] + (["warmup-checkpoint"] if variant == "full" else [])
            assert sorted(p.name for p in run.iterdir() if p.is_dir()) == kept  # cleaned up
    no_replay = json.loads((out / "runs/no_scfvr/seed0/checkpoint-final/config.json").read_text())
    assert no_replay["num_replay_tokens"] == 0 and no_replay["recon_weight"] == 0.0

    results = [run / "ablation_result.json" for run in records] + list(out.glob("runs/full/seed*/warmup_result.json"))
    stamps = {result: result.stat().st_mtime_ns for result in results}
    again, _ = ablate(out, "--quick")
    assert again.returncode == 0, again.stderr[-3000:]
    assert "0 run(s) trained or evaluated now, 4 done earlier" in again.stdout
    assert len(stamps) == 6 and all(result.stat().st_mtime_ns == stamp for result, stamp in stamps.items())
    for run in records:  # trained once: one command line in the log
        assert sum(line.startswith("$ ") for line in (run / "train.log").read_text().splitlines()) == 1
    assert (out / "ablation.md").read_text() == table

    # --report_only reports the finished runs and trains or evaluates nothing, not even a run that has its
    # checkpoint but no record (which a plain call would evaluate)
    record = out / "runs/no_scfvr/seed1/ablation_result.json"
    saved = record.read_text()
    record.unlink()
    partial, _ = ablate(out, "--quick", "--report_only")
    assert partial.returncode == 0, partial.stderr[-3000:]
    assert "0 run(s) trained or evaluated now, 3 done earlier, 1 not run yet" in partial.stdout
    assert not record.exists()
    assert "Runs missing (failed or not run): no_scfvr/seed1." in (out / "ablation.md").read_text()
    assert json.loads((out / "ablation.json").read_text())["variants"]["no_scfvr"]["seeds"] == [0]
    record.write_text(saved)
    assert ablate(out, "--quick", "--report_only")[0].returncode == 0
    assert (out / "ablation.md").read_text() == table

    other, _ = ablate(out, "--quick", "--learning_rate", "1e-3")
    assert other.returncode != 0
    refusal = other.stderr.strip().splitlines()[-1]
    assert f"{out / 'runs' / 'full' / 'seed0'} was trained with other train.py options" in refusal
    straight, _ = ablate(out, "--quick", "--no_shared_warmup")
    assert straight.returncode != 0
    assert "was trained with other train.py options (with the shared CoT warm-up, this call without)" \
        in straight.stderr.splitlines()[-1]


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
    (["--keep_warmup_checkpoint", "True"], "--keep_warmup_checkpoint is set by ablate.py for every run"),
    (["--shared_warmup", "--uniform_prob", "0.5", "--dry_run"], "--shared_warmup: --uniform_prob > 0 trains latent"),
    (["--shared_warmup", "--cot_warmup_epochs", "0", "--dry_run"], "--shared_warmup: the runs have no CoT warm-up"),
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


def test_markdown_states_the_shared_warmup_and_its_accuracy_per_seed():
    records = {seed: {"global_steps": 1400, "cot": {"accuracy": cot, "num_samples": 4},
                      "nocot": {"accuracy": nocot, "num_samples": 4}}
               for seed, cot, nocot in ((0, 0.75, 0.25), (1, 0.5, 0.25))}
    summary = warmup_summary(records)
    assert summary[1] == {"global_steps": 1400, "nocot_accuracy": 0.25, "cot_accuracy": 0.5, "num_samples": 4}
    variants = [Variant("full", "all on"), Variant("no_rds", "no routing", {"routing_layers": []}, shares_warmup=False)]
    runs = {("full", 0): {"accuracy": 1.0, "correct": [True]}, ("no_rds", 0): {"accuracy": 0.0, "correct": [False]}}
    table = summarize_runs(variants, runs, n_boot=100)
    assert table["full"]["shares_warmup"] and not table["no_rds"]["shares_warmup"]
    setup = {"seeds": [0, 1], "num_test_samples": 4, "test_data": "synthetic", "train_options": "", "level": 0.95,
             "n_boot": 100, "shared_warmup": True, "warmup": summary}
    markdown = ablation_markdown(table, setup)
    assert "a variant that changes only the latent phase continues the shared CoT warm-up of its seed" in markdown
    assert "## Shared CoT warm-up" in markdown and "Their Train s / run is the latent phase only" in markdown
    assert "Trained from scratch, since routing depth scaling runs in every forward pass, stage 0 included: no_rds." \
        in markdown
    assert "| 0 | 1400 | 25.0 | 75.0 |" in markdown and "| 1 | 1400 | 25.0 | 50.0 |" in markdown
    straight = ablation_markdown(table, {**setup, "shared_warmup": False, "warmup": {}})
    assert "trained from scratch" in straight and "Shared CoT warm-up" not in straight


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


def test_the_variants_that_share_the_warmup_train_the_same_stage_0(vedas_dirs, tmp_path):
    """What the shared warm-up rests on, for every variant: three CoT warm-up steps from the same weights give full's
    losses and weights bit for bit when the variant is marked to share the warm-up, and others when it is not
    (routing depth scaling runs in every forward pass, stage 0 included)."""
    from vedas_trainer.checkpoint import load_vedas
    from vedas_trainer.collator import VedasCollator
    from vedas_trainer.synthetic import build_synthetic_dataset
    from vedas_trainer.trainer import VedasTrainer, VedasTrainingArguments

    dataset = build_synthetic_dataset(3, seed=0, split="train")
    shared = {"routing_topk": 0.25}  # the embedded default's α (the test checkpoint routes a fixed 6 tokens)

    def stage_0(variant):
        model, processor = load_vedas(vedas_dirs["qwen2_vl"], **{**shared, **variant.overrides})
        options = dict(zip(variant.train_options[::2], variant.train_options[1::2]))
        args = VedasTrainingArguments(
            output_dir=str(tmp_path / variant.name), per_device_train_batch_size=1, max_steps=3, cot_warmup_epochs=1,
            epochs_per_stage=1, max_latent_stage=2, skip_curriculum=options.get("--skip_curriculum") == "True",
            learning_rate=5e-3, lr_scheduler_type="constant", logging_steps=1, save_strategy="no", report_to=[],
            use_cpu=True, dataloader_num_workers=0, seed=0, disable_tqdm=True)
        collator = VedasCollator(processor, model.config, **args.collator_kwargs())
        trainer = VedasTrainer(model=model, args=args, train_dataset=dataset, data_collator=collator)
        trainer.train()
        logs = [entry for entry in trainer.state.log_history if "loss" in entry]
        assert [entry["stage"] for entry in logs] == [0, 0, 0]
        return [entry["loss"] for entry in logs], {name: p.detach() for name, p in model.named_parameters()}

    variants = build_variants()
    reference_losses, reference = stage_0(variants.pop("full"))
    shares = {}
    for name, variant in variants.items():
        losses, weights = stage_0(variant)
        shares[name] = losses == reference_losses and all(
            torch.equal(value, reference[key]) for key, value in weights.items() if key in reference)
    assert shares == {name: variant.shares_warmup for name, variant in variants.items()}
    assert not shares["no_rds"] and shares["no_scfvr"]  # both kinds are there


def test_dry_run_keeps_a_recipe_first_and_merges_its_overrides(monkeypatch, tmp_path, capsys):
    module = load_ablate(monkeypatch)
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("learning_rate: 0.001\nvedas_overrides:\n  window_size: 1\n")
    out = tmp_path / "o"
    argv = [str(recipe), "--quick", "--variants", "no_rds,no_scfvr", "--dry_run", "--out", str(out)]
    assert module.main(argv) == 0
    printed = capsys.readouterr().out.splitlines()
    assert printed[0].startswith("# shared CoT warm-up: full keeps its checkpoint at the end of the warm-up")
    commands = [line.split() for line in printed[1:]]
    assert len(commands) == 6  # full, no_rds and no_scfvr x the quick seeds 0, 1
    for command in commands:
        assert command[2] == str(recipe) and command[3:6] == ["--quick", "--n_train", "64"]
    for command in commands[:2]:  # full keeps its warm-up checkpoint
        assert command[-4:-2] == ["--keep_warmup_checkpoint", "True"] and "--resume_from_checkpoint" not in command
    for command in commands[2:4]:  # no_rds changes stage 0 too: from scratch
        assert "--resume_from_checkpoint" not in command and "--keep_warmup_checkpoint" not in command
        assert "'{\"routing_layers\": [], \"window_size\": 1}'" in " ".join(command)
    for seed, command in zip((0, 1), commands[4:]):  # no_scfvr continues its seed's warm-up
        start = command.index("--resume_from_checkpoint")
        assert command[start + 1] == str(out / "runs" / "full" / f"seed{seed}" / "warmup-checkpoint")
    assert not out.exists()  # nothing trained, nothing written

    assert module.main([*argv, "--no_shared_warmup"]) == 0
    commands = [line for line in capsys.readouterr().out.splitlines()]
    assert len(commands) == 6 and not any("warmup" in command for command in commands)


def test_shared_warmup_is_the_default_of_the_embedded_task_only(monkeypatch):
    """A real base may run under a DeepSpeed or FSDP launcher config (invisible to ablate.py), where continuing a
    checkpoint in another folder is untested: there the shared warm-up is asked for."""
    module = load_ablate(monkeypatch)
    import train

    parser = module.parse_cli(["--dry_run"])[0]

    def choose(flag, embedded, *options):
        checked = {("full", 0): (train.parse_args(list(options))[3], None, embedded)}
        return module.choose_shared_warmup(parser, argparse.Namespace(shared_warmup=flag, seeds=[0]), checked)

    assert choose(None, True) is True and choose(None, False) is False
    assert choose(True, False) is True and choose(False, True) is False
    assert choose(None, True, "--uniform_prob", "0.3") is False  # ruled out: the default falls back
    with pytest.raises(SystemExit):
        choose(True, True, "--uniform_prob", "0.3")


# ------------------------------------------------------------------------------- the shared warm-up, train.py level
TRAIN = EXAMPLES / "train.py"
# train.py --quick on 64 puzzles at batch 8: 8 steps per epoch; the warm-up is epoch 0 (steps 1-8), stages 1 and 2
# are steps 9-16 and 17-24; a checkpoint every epoch, the last two kept
COMMON = ["--quick", "--n_train", "64", "--evaluate_after", "False", "--seed", "3"]


def train_py(tmp, name, *options):
    result = subprocess.run([sys.executable, str(TRAIN), *COMMON, *map(str, options), "--output_dir", str(tmp / name)],
                            cwd=REPO, env=child_env(tmp), capture_output=True, text=True, timeout=600)
    output = result.stdout + result.stderr
    assert result.returncode == 0, f"{name}: train.py exited {result.returncode}:\n{output[-5000:]}"
    return output


@pytest.fixture(scope="module")
def warmup_runs(tmp_path_factory):
    """A run that keeps its warm-up checkpoint, and the same options continued from that checkpoint in another
    folder (as ablate.py runs a variant that shares full's warm-up)."""
    tmp = tmp_path_factory.mktemp("shared_warmup")
    outputs = {"full": train_py(tmp, "full", "--keep_warmup_checkpoint", "True")}
    outputs["continued"] = train_py(tmp, "continued", "--resume_from_checkpoint", tmp / "full" / "warmup-checkpoint")
    return tmp, outputs


def trainer_logs(checkpoint):
    return [entry for entry in json.loads((checkpoint / "trainer_state.json").read_text())["log_history"]
            if "loss" in entry]


def test_the_warmup_checkpoint_is_kept_out_of_rotation(warmup_runs):
    tmp, outputs = warmup_runs
    full = tmp / "full"
    assert sorted(p.name for p in full.iterdir() if p.is_dir() and "checkpoint" in p.name) == [
        "checkpoint-16", "checkpoint-24", "checkpoint-final", "warmup-checkpoint"]  # checkpoint-8 rotated away
    assert "Kept the end of the CoT warm-up (global step 8) as warmup-checkpoint" in outputs["full"]
    state = json.loads((full / "warmup-checkpoint" / "trainer_state.json").read_text())
    assert state["global_step"] == 8 and state["epoch"] == pytest.approx(1.0) and state["max_steps"] == 24
    assert trainer_logs(full / "warmup-checkpoint") == trainer_logs(full / "checkpoint-24")[:2]  # steps 4 and 8
    assert {p.name for p in (full / "warmup-checkpoint").iterdir()} >= {
        "model.safetensors", "optimizer.pt", "scheduler.pt", "rng_state.pth", "trainer_state.json"}


def test_a_run_continued_from_the_warmup_checkpoint_is_the_uninterrupted_run(warmup_runs):
    tmp, outputs = warmup_runs
    assert "Curriculum: epoch 1 (global step 8) trains at stage 1." in outputs["continued"]
    assert "trains at stage 0" not in outputs["continued"]
    full, continued = tmp / "full" / "checkpoint-24", tmp / "continued" / "checkpoint-24"
    # bit-equal on one thread: the same steps, stages, learning rates (the cosine of the whole run) and losses (the
    # logs of steps 1-8 come from the warm-up checkpoint), and the same weights
    assert [entry["step"] for entry in trainer_logs(continued)] == list(range(4, 25, 4))
    assert trainer_logs(continued) == trainer_logs(full)
    start = load_file(tmp / "full" / "warmup-checkpoint" / "model.safetensors")
    weights, reference = load_file(continued / "model.safetensors"), load_file(full / "model.safetensors")
    assert weights.keys() == reference.keys()
    assert [name for name, value in reference.items() if not torch.equal(weights[name], value)] == []
    # not a vacuous equality: the latent phase moved the weights, token_sr (which only self-distillation trains)
    # included
    moved = [name for name, value in reference.items() if not torch.equal(value, start[name])]
    assert len(moved) > len(reference) // 2 and any("token_sr" in name for name in moved)
