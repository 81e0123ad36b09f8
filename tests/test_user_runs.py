"""`examples/train.py` on the user's own data and settings: arguments checked before any work, one-line errors,
recipe files, evaluation during training, CPU threads under `accelerate launch`, curriculum arithmetic, the report.

In-process runs go through `run(argv)` (fast, for errors found before any model work); real launches are
subprocesses from the repository root, as users start them.
"""

import json
import os
import re
import subprocess
import sys
from dataclasses import asdict
from pathlib import Path

import pytest
import torch
import yaml

from test_train_entrypoint import CONFIGS, REPO, TIMEOUT, TRAIN, _run, _train_module
from vedas_trainer.testing import child_env, free_port


RECIPE = CONFIGS / "recipe_m3cot.yaml"
# the command line the shipped recipe stands for
RECIPE_COMMAND_LINE = [
    "--base_model", "/models/Qwen2-VL-2B-Instruct", "--dataset", "/data/m3cot/train.jsonl", "--dataset_format", "m3cot",
    "--image_root", "/data/m3cot/images", "--eval_dataset", "/data/m3cot/dev.jsonl", "--output_dir", "runs/m3cot",
    "--bf16", "--learning_rate", "4e-5", "--per_device_train_batch_size", "8", "--cot_warmup_epochs", "4",
    "--epochs_per_stage", "4", "--max_latent_stage", "4", "--num_train_epochs", "20", "--recon_weight", "0.2",
    "--lora", "--lora_r", "64", "--lora_alpha", "16", "--lora_dropout", "0.05", "--eval_strategy", "epoch",
    "--save_strategy", "epoch", "--load_best_model_at_end", "--save_total_limit", "2", "--report_to", "none",
    "--vedas_overrides", '{"num_replay_tokens": 32}',
]


@pytest.fixture(scope="module")
def train():
    return _train_module()


def _as_dicts(parsed):
    *dataclasses, embedded, given = parsed
    return [d.to_dict() if hasattr(d, "to_dict") else asdict(d) for d in dataclasses], embedded, given


# ------------------------------------------------------------------------------------------------- recipe files


def test_recipe_file_parses_like_the_command_line(train, tmp_path):
    cpu = ["--use_cpu", "true"]  # bf16 needs it on a machine without a GPU; also shows that later options apply
    from_yaml = _as_dicts(train.parse_args([str(RECIPE), *cpu]))
    from_cli = _as_dicts(train.parse_args(RECIPE_COMMAND_LINE + cpu))
    assert from_yaml == from_cli
    (model, data, _, training), embedded, given = from_yaml
    assert not embedded and "num_train_epochs" in given
    assert (data["dataset_format"], model["lora_r"], training["learning_rate"], training["num_train_epochs"]) == (
        "m3cot", 64, 4e-5, 20)
    recipe_json = tmp_path / "recipe.json"
    recipe_json.write_text(json.dumps(yaml.safe_load(RECIPE.read_text())))
    assert _as_dicts(train.parse_args([str(recipe_json), *cpu])) == from_cli
    # an option after the file overrides the recipe
    (_, _, _, training), _, _ = _as_dicts(train.parse_args([str(RECIPE), *cpu, "--learning_rate", "1e-5"]))
    assert training["learning_rate"] == 1e-5


@pytest.mark.parametrize("content, message", [
    ("- a\n- b\n", "must map option names to values, got list"),
    ("lr: [1, 2\n", "cannot parse recipe"),
    ("no_such_option: 3\n", "no_such_option"),
])
def test_bad_recipe_is_one_line(train, tmp_path, capsys, monkeypatch, content, message):
    monkeypatch.setenv("OMP_NUM_THREADS", str(torch.get_num_threads()))
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(content)
    assert train.run([str(recipe)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("train.py: error: ") and message in err and "\n" not in err and "Traceback" not in err


# ------------------------------------------------------------------------------ arguments checked before any work


def _m3cot_rows(folder, n=2):
    from PIL import Image

    Image.new("RGB", (56, 56), (255, 0, 0)).save(folder / "a.png")
    rows = [{"id": f"m3-{i}", "question": "Colour?", "choices": ["red", "blue"], "answer": "A",
             "rationale": "Look.\n\nRed.", "image": "a.png"} for i in range(n)]
    path = folder / "rows.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


BAD_ARGUMENTS = {
    "format_typo": (["--dataset_format", "m3kot"], "--dataset_format: unknown format 'm3kot'"),
    "missing_file": (["--dataset", "nope.jsonl"], "--dataset: no such data file: 'nope.jsonl'"),
    "image_root": (["--image_root", "no-such-folder"], "--image_root: no such folder: 'no-such-folder'"),
    "eval_without_data": (["--eval_strategy", "steps"], "--eval_strategy steps / --load_best_model_at_end need "
                                                        "--eval_dataset"),
    "short_curriculum": (["--num_train_epochs", "4", "--cot_warmup_epochs", "2", "--epochs_per_stage", "1",
                          "--max_latent_stage", "3"],
                         "--num_train_epochs 4 ends at curriculum stage 2, but max_latent_stage is 3: the curriculum "
                         "needs 5 epochs (2 CoT warm-up + 3 stages x 1)"),
    "override_typo": (["--vedas_overrides", '{"num_latent_step": 3}'], "unknown VedasConfig field 'num_latent_step'"),
    "rows_of_another_format": (["--dataset_format", "GQA"],
                               "row 0 (id 'm3-0'), field 'choices': the gqa format does not read this field"),
}


@pytest.mark.parametrize("case", sorted(BAD_ARGUMENTS))
def test_bad_arguments_fail_in_one_line_before_the_base_is_converted(train, base_dirs, tmp_path, capsys, monkeypatch,
                                                                      case):
    monkeypatch.setenv("OMP_NUM_THREADS", str(torch.get_num_threads()))  # leave this process's threads alone
    monkeypatch.chdir(tmp_path)
    rows = _m3cot_rows(tmp_path)
    out = tmp_path / "run"
    argv = ["--base_model", str(base_dirs["qwen2_5_vl"]), "--output_dir", str(out), "--dataset", str(rows),
            "--dataset_format", "M3CoT", "--report_to", "none", "--use_cpu", "true"]
    extra, message = BAD_ARGUMENTS[case]
    assert train.run(argv + extra) == 2
    err = capsys.readouterr().err.strip()
    last = err.splitlines()[-1]  # datasets may have drawn a progress bar before
    assert last.startswith("train.py: error: ") and message in last and "Traceback" not in err, err
    assert not (out / "init").exists()  # no conversion was written


def test_data_error_is_one_line_from_a_real_process(tmp_path):
    """`python examples/train.py`: the DataError's line on stderr, exit status 2, no traceback. (`accelerate launch
    -q` is checked by the thread test below; without -q accelerate adds its own CalledProcessError traceback.)"""
    rows = _m3cot_rows(tmp_path)
    command = [sys.executable, TRAIN, "--dataset", rows, "--dataset_format", "gqa", "--output_dir", tmp_path / "run",
               "--use_cpu", "true"]
    result = subprocess.run([str(c) for c in command], cwd=REPO, env=child_env(tmp_path),
                            capture_output=True, text=True, timeout=TIMEOUT)
    assert result.returncode == 2, result.stderr[-3000:]
    assert "train.py: error: row 0 (id 'm3-0'), field 'choices': the gqa format does not read" in result.stderr
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    assert not (tmp_path / "run" / "init").exists()


# ---------------------------------------------------------------------------------------------------- CPU threads


THREADS_LINE = re.compile(r"CPU threads per process: (\d+) \((.*)\)")


def _threads_under_accelerate(tmp_path, launch_options=("--num_processes", "1"), omp=None):
    """torch.get_num_threads() that train.py logs under a plain `accelerate launch` (1 process, no config file).
    The run stops at argument checking, right after the threads are set."""
    env = {**child_env(tmp_path), "HF_HOME": str(tmp_path / "hf_home")}
    env.pop("OMP_NUM_THREADS")
    if omp is not None:
        env["OMP_NUM_THREADS"] = str(omp)
    command = [sys.executable, "-m", "accelerate.commands.launch", "-q", *launch_options,
               TRAIN, "--use_cpu", "true", "--dataset", "missing.jsonl", "--dataset_format", "m3cot"]
    result = subprocess.run([str(c) for c in command], cwd=REPO, env=env, capture_output=True, text=True,
                            timeout=TIMEOUT)
    # the child's one-line error; with -q and one process, no traceback from accelerate either
    assert result.returncode == 1 and "train.py: error: " in result.stderr
    assert "--dataset: no such data file: 'missing.jsonl'" in result.stderr, result.stderr[-3000:]
    if "--config_file" not in launch_options:
        assert "Traceback" not in result.stderr, result.stderr[-3000:]
    found = THREADS_LINE.findall(result.stderr)
    assert len(set(found)) == 1, found  # every process alike
    return int(found[0][0]), found[0][1], result.stderr


def test_accelerate_launch_uses_the_cores_unless_the_user_chose(tmp_path):
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    threads, reason, _ = _threads_under_accelerate(tmp_path)
    assert threads == cores // 1 and reason.startswith(f"{cores} cores // 1 local process"), reason
    threads, reason, _ = _threads_under_accelerate(
        tmp_path, ["--num_processes", "1", "--num_cpu_threads_per_process", "1"])
    assert (threads, reason) == (1, "--num_cpu_threads_per_process 1 given to the launcher")
    threads, reason, _ = _threads_under_accelerate(tmp_path, omp=1)
    assert (threads, reason) == (1, "OMP_NUM_THREADS=1 set by the user")
    # two processes through torchrun: the cores are shared, and torchrun's failure summary names the error
    two = ["--config_file", CONFIGS / "multi_cpu_gloo.yaml", "--main_process_port", free_port()]
    threads, reason, stderr = _threads_under_accelerate(tmp_path, two)
    assert threads == max(cores // 2, 1) and reason.startswith(f"{cores} cores // 2 local process"), reason
    assert "traceback : UsageError: --dataset: no such data file: 'missing.jsonl'" in stderr


# ----------------------------------------------------------------------------- evaluation during a tiny real run


@pytest.fixture(scope="module")
def eval_run(base_dirs, tmp_path_factory):
    """A Qwen2.5-VL base, 32 synthetic samples (4 steps per epoch, 12 steps), evaluated and saved every 4 steps."""
    tmp = tmp_path_factory.mktemp("eval_run")
    out = tmp / "run"
    output = _run([sys.executable, TRAIN, "--quick", "--base_model", base_dirs["qwen2_5_vl"], "--output_dir", out,
                   "--n_train", "32", "--eval_dataset", "synthetic", "--eval_strategy", "steps", "--eval_steps", "4",
                   "--save_strategy", "steps", "--save_steps", "4", "--load_best_model_at_end",
                   "--evaluate_after", "false", "--report_to", "none", "--use_cpu", "true"], tmp, "eval_run")
    return out, output, json.loads((out / "report.json").read_text())


def test_eval_dataset_is_evaluated_and_the_best_checkpoint_kept(eval_run):
    out, output, report = eval_run
    evaluations = report["evaluations"]
    assert [entry["step"] for entry in evaluations] == [4, 8, 12]
    for entry in evaluations:
        assert entry["eval_loss"] > 0 and 0.0 <= entry["eval_answer_accuracy"] <= 1.0
    best = min(evaluations, key=lambda entry: entry["eval_loss"])["step"]
    assert report["best_model_checkpoint"] == str(out / f"checkpoint-{best}")
    assert "Loading best model from" in output or best == 12


def test_report_records_backbone_curriculum_and_parameters(eval_run):
    _, output, report = eval_run
    assert report["backbone"] == "qwen2_5_vl"  # the base's, not the --backbone default (qwen2_vl)
    assert (report["epochs"], report["epochs_run"], report["global_steps"]) == (3, 3.0, 12)
    assert (report["last_stage"], report["max_latent_stage"], report["curriculum_complete"]) == (2, 2, True)
    counts = report["parameters"]
    assert counts["trainable"] == counts["total"] > counts["vedas_trainable"] == counts["vedas_total"] > 0
    assert f"Parameters: trainable {counts['trainable']:,} of {counts['total']:,}" in output


# ------------------------------------------------------------------------------------------------- evaluate.py


def _evaluate_module():
    import importlib.util

    spec = importlib.util.spec_from_file_location("vedas_example_evaluate", REPO / "examples" / "evaluate.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _evaluate(argv, capsys):
    try:
        code = _evaluate_module().main([str(a) for a in argv])
    except SystemExit as exit_:
        code = exit_.code
    return code, capsys.readouterr().err


def test_evaluate_default_output_is_per_checkpoint_and_never_overwritten(vedas_dirs, tmp_path, capsys):
    import shutil

    runs = [tmp_path / name / "checkpoint-final" for name in ("run-a", "run-b")]
    for checkpoint in runs:
        shutil.copytree(vedas_dirs["qwen2_vl"], checkpoint)
    argv = ["--data", "synthetic", "--n", "2", "--modes", "nocot", "--batch-size", "2", "--no-progress"]
    for checkpoint in runs:
        assert _evaluate([checkpoint, *argv], capsys)[0] == 0
    outputs = [run.parent / "eval" / "checkpoint-final-synthetic-test-n2" / "results.json" for run in runs]
    assert all(path.is_file() for path in outputs)
    assert json.loads(outputs[0].read_text())["checkpoint"] == str(runs[0])
    before = outputs[0].read_bytes()
    code, err = _evaluate([runs[0], *argv], capsys)
    assert code == 2 and "already holds results.json; pass --overwrite" in err and outputs[0].read_bytes() == before
    assert _evaluate([runs[0], *argv, "--overwrite"], capsys)[0] == 0


def test_evaluate_arguments_and_data_errors_are_one_line(vedas_dirs, tmp_path, capsys):
    module = _evaluate_module()
    rows = _m3cot_rows(tmp_path)
    args = module.parse_args([str(vedas_dirs["qwen2_vl"]), "--data", str(rows), "--format", "M3CoT"])
    assert args.format == "m3cot"
    for argv, message in (
        ([vedas_dirs["qwen2_vl"], "--data", rows, "--format", "m3kot"], "unknown format 'm3kot'"),
        ([vedas_dirs["qwen2_vl"], "--data", tmp_path / "nope.jsonl", "--format", "m3cot"], "no such data file"),
        ([tmp_path / "no-checkpoint", "--data", "synthetic"], "no such checkpoint folder"),
    ):
        code, err = _evaluate(argv, capsys)
        assert code == 2 and message in err, err
    result = subprocess.run([sys.executable, REPO / "examples" / "evaluate.py", vedas_dirs["qwen2_vl"], "--data", rows,
                             "--format", "gqa", "--out", tmp_path / "out"], cwd=REPO, env=child_env(tmp_path),
                            capture_output=True, text=True, timeout=TIMEOUT)
    assert result.returncode == 2, result.stderr[-3000:]
    assert "evaluate.py: error: row 0 (id 'm3-0'), field 'choices': the gqa format does not read" in result.stderr
    assert "Traceback" not in result.stderr


# ------------------------------------------------------------------------------------------------ visualize.py


def test_visualize_draws_samples_of_a_local_dataset(vedas_dirs, tmp_path, capsys):
    import importlib.util

    from PIL import Image

    from vedas_trainer.testing import quadrant_image

    for i in range(2):
        quadrant_image((112, 84), seed=i).save(tmp_path / f"q{i}.png")
    rows = [{"id": f"m3-{i}", "question": f"Which colour is at the top left? ({i})", "choices": ["red", "blue"],
             "answer": "A", "rationale": "Look at the top left.\n\nIt is red.", "image": f"q{i}.png"} for i in range(2)]
    data = tmp_path / "test.jsonl"
    data.write_text("".join(json.dumps(row) + "\n" for row in rows))
    spec = importlib.util.spec_from_file_location("vedas_example_visualize", REPO / "examples" / "visualize.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    out = tmp_path / "pictures"
    argv = [vedas_dirs["qwen2_vl"], "--data", data, "--format", "M3CoT", "--sample", "1", "--out", out]
    assert module.main([str(a) for a in argv]) == 0
    picture = out / "sample_1.png"
    assert capsys.readouterr().out.split() == [str(picture)]
    assert Image.open(picture).format == "PNG" and Image.open(picture).width > 200
    # an index past the file, a missing --format: one line, status 2
    assert module.main([str(a) for a in argv[:-4] + ["--sample", "5"]]) == 2
    assert "visualize.py: error: --sample 5 is out of range" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_:
        module.main([str(vedas_dirs["qwen2_vl"]), "--data", str(data)])
    assert exit_.value.code == 2 and "--format is required" in capsys.readouterr().err
