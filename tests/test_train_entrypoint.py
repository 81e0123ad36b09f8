"""`examples/train.py` as users start it: subprocesses from the repository root, on CPU.

* The embedded default in `--quick` mode end to end: it trains, writes the report, the results and a complete
  Hub-ready checkpoint that loads with `trust_remote_code` and that `examples/evaluate.py` runs on.
* A real 2-process data-parallel run (`accelerate launch --config_file examples/configs/multi_cpu_gloo.yaml`, i.e.
  MULTI_GPU through torchrun, gloo on CPU): world size 2, a stage boundary crossed, identical weights on both ranks,
  rank 0 the only writer.
* Resume at the train.py level: a run stopped mid-curriculum and resumed matches the uninterrupted one.
* The shipped DeepSpeed / Accelerate configs parse and say what they should (deepspeed itself is optional).

Each launch is run once per module (fixtures) and the tests read its outputs.
"""

import importlib.util
import json
import math
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModel

from vedas_trainer.checkpoint import check_checkpoint_folder
from vedas_trainer.testing import child_env, free_port


REPO = Path(__file__).resolve().parents[1]
TRAIN = REPO / "examples" / "train.py"
EVALUATE = REPO / "examples" / "evaluate.py"
CONFIGS = REPO / "examples" / "configs"
TIMEOUT = 600
# the files of a complete Vedas checkpoint folder (save_vedas_checkpoint)
CHECKPOINT_FILES = {
    "README.md", "chat_template.jinja", "config.json", "generation_config.json", "model.safetensors",
    "processor_config.json", "tokenizer.json", "tokenizer_config.json",
    "configuration_vedas.py", "modeling_vedas.py", "routing_vedas.py", "replay_vedas.py",
}
# what a Trainer checkpoint of a full (non-LoRA) run holds, besides one rng_state_{rank}.pth per process
TRAINER_CHECKPOINT_FILES = {
    "chat_template.jinja", "config.json", "generation_config.json", "model.safetensors", "optimizer.pt",
    "processor_config.json", "scheduler.pt", "tokenizer.json", "tokenizer_config.json", "trainer_state.json",
    "training_args.bin",
}
CHECKSUM_LINE = re.compile(r"rank (\d+) parameter checksum ([0-9.]+) sha256 ([0-9a-f]{64}) \(global step (\d+)\)")
START_LINE = re.compile(r"rank (\d+) of world size (\d+) \(local rank (\d+)")


def _train_module():
    """examples/train.py imported under a private name (for its `parameter_checksum`)."""
    spec = importlib.util.spec_from_file_location("vedas_example_train", TRAIN)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module




def _run(command, tmp_path, log_name):
    """Runs a command from the repository root; fails the test with the output's tail when it exits non-zero."""
    result = subprocess.run([str(c) for c in command], cwd=REPO, env=child_env(tmp_path),
                            capture_output=True, text=True, timeout=TIMEOUT)
    output = result.stdout + result.stderr
    (tmp_path / f"{log_name}.log").write_text(output)
    assert result.returncode == 0, f"{' '.join(map(str, command))} exited {result.returncode}:\n{output[-6000:]}"
    return output


def _train(out, tmp_path, *args, log_name="train"):
    return _run([sys.executable, TRAIN, "--quick", "--output_dir", out, *args], tmp_path, log_name)




def _trainer_checkpoints(out):
    return sorted((p for p in Path(out).glob("checkpoint-*") if p.name.split("-")[1].isdigit()),
                  key=lambda p: int(p.name.split("-")[1]))


def _training_logs(checkpoint):
    state = json.loads((Path(checkpoint) / "trainer_state.json").read_text())
    return state, [entry for entry in state["log_history"] if "loss" in entry]


def _checksums(output):
    return {int(rank): (float(total), digest, int(step)) for rank, total, digest, step in CHECKSUM_LINE.findall(output)}


# ---------------------------------------------------------------------------------------------- 1. end to end, quick


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("quick")
    out = tmp / "run"
    output = _train(out, tmp)
    return out, output, tmp


def test_quick_run_writes_report_results_curve_and_checkpoints(quick_run):
    out, output, _ = quick_run
    for name in ("report.json", "results.json", "results.md", "loss_curve.png", "predictions.jsonl"):
        assert (out / name).is_file() and (out / name).stat().st_size > 0, name
    assert (out / "loss_curve.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    report = json.loads((out / "report.json").read_text())
    assert report["world_size"] == 1 and report["args"]["run"]["quick"] is True
    assert set(report["results"]) == {"nocot", "cot", "latent"}
    results = json.loads((out / "results.json").read_text())
    for mode in ("nocot", "cot", "latent"):
        assert results["modes"][mode]["num_samples"] == 16
        assert 0.0 <= results["modes"][mode]["accuracy"] <= 1.0
    assert results["modes"]["latent"]["latent_steps"] == results["num_latent_steps"] > 0
    assert "| Vedas latent |" in (out / "results.md").read_text()
    # quick: 256 samples, batch 8 -> 32 steps per epoch; 1 warm-up epoch + 2 stages of 1 epoch
    checkpoints = _trainer_checkpoints(out)
    assert [c.name for c in checkpoints] == ["checkpoint-64", "checkpoint-96"]  # save_total_limit 2
    state, _ = _training_logs(checkpoints[-1])
    assert state["global_step"] == state["max_steps"] == 96
    assert len(re.findall(r"rank \d+ parameter checksum", output)) == 1


def test_quick_run_loss_decreases_across_the_curriculum(quick_run):
    out, _, _ = quick_run
    _, logs = _training_logs(_trainer_checkpoints(out)[-1])
    assert [entry["step"] for entry in logs] == list(range(4, 97, 4))  # logging_steps 4 in quick mode
    assert {entry["stage"] for entry in logs} == {0, 1, 2}
    stages = [entry["stage"] for entry in logs]
    assert stages == sorted(stages), "the curriculum stage must never go back"
    for entry in logs:
        assert all(math.isfinite(entry[key]) for key in ("loss", "ce_loss", "grad_norm")), entry
        if entry["stage"] == 0:
            assert "recon_loss" not in entry  # explicit CoT: no latent step, no self-distillation
        else:
            assert math.isfinite(entry["recon_loss"]) and entry["recon_loss"] >= 0, entry
    first, last = logs[0]["ce_loss"], sum(entry["ce_loss"] for entry in logs[-3:]) / 3
    assert last < 0.75 * first, f"CE did not go down: first logged {first:.3f}, mean of the last three {last:.3f}"
    # within the warm-up (stage 0, CE only) the total loss itself must go down too
    warmup = [entry["loss"] for entry in logs if entry["stage"] == 0]
    assert warmup[-1] < 0.9 * warmup[0], warmup


def test_quick_run_total_loss_decreases(quick_run):
    # regression: with raw teacher features recon_loss followed the training vision tower's scale and diverged
    # (tens, grad_norm in the hundreds); the layer-normalised target keeps it bounded
    out, _, _ = quick_run
    _, logs = _training_logs(_trainer_checkpoints(out)[-1])
    first, last = logs[0]["loss"], sum(entry["loss"] for entry in logs[-3:]) / 3
    assert last < first, f"total loss: first logged {first:.3f}, mean of the last three {last:.3f}"
    recon = [entry["recon_loss"] for entry in logs if "recon_loss" in entry]
    assert recon and max(recon) < 5.0, f"recon_loss not bounded: {recon}"


def test_quick_run_final_checkpoint_is_complete_and_loads_with_remote_code(quick_run):
    out, output, _ = quick_run
    final = out / "checkpoint-final"
    assert check_checkpoint_folder(final) == []
    assert {p.name for p in final.iterdir()} == CHECKPOINT_FILES
    model, info = AutoModel.from_pretrained(final, trust_remote_code=True, output_loading_info=True)
    assert type(model).__name__ == "VedasForConditionalGeneration"
    assert type(model).__module__.startswith("transformers_modules."), "must be the checkpoint's remote code"
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    # the saved weights are the trained ones (the checksum train.py logged after training)
    ((total, digest, step),) = _checksums(output).values()
    assert step == 96
    assert _train_module().parameter_checksum(model)[1] == digest


def test_evaluate_cli_runs_on_the_final_checkpoint(quick_run):
    out, _, tmp = quick_run
    eval_dir = tmp / "eval"
    output = _run([sys.executable, EVALUATE, out / "checkpoint-final", "--data", "synthetic", "--n", "4",
                   "--modes", "latent", "--out", eval_dir], tmp, "evaluate")
    assert "| Vedas latent |" in output
    results = json.loads((eval_dir / "results.json").read_text())
    assert set(results["modes"]) == {"latent"}
    latent = results["modes"]["latent"]
    assert latent["num_samples"] == 4 and latent["latent_steps"] == results["num_latent_steps"] > 0
    predictions = [json.loads(line) for line in (eval_dir / "predictions.jsonl").read_text().splitlines()]
    # the same test split and, from the saved folder, the same latent predictions as train.py's own evaluation
    in_training = [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]
    in_training = [row for row in in_training if row["mode"] == "latent"][:4]
    assert [(p["id"], p["answer"]) for p in predictions] == [(p["id"], p["answer"]) for p in in_training]
    assert [p["prediction"] for p in predictions] == [p["prediction"] for p in in_training]


# ------------------------------------------------------------------------------------ 2. real 2-process CPU run


@pytest.fixture(scope="module")
def ddp_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("ddp")
    out = tmp / "run"
    # MULTI_GPU -> torchrun with 2 workers; no GPU visible -> gloo. (`--cpu --num_processes 2` would start ONE.)
    command = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", CONFIGS / "multi_cpu_gloo.yaml",
               "--main_process_port", free_port(), TRAIN, "--quick", "--evaluate_after", "false",
               "--output_dir", out]
    output = _run(command, tmp, "ddp")
    return out, output


def test_ddp_world_size_is_really_two(ddp_run):
    out, output = ddp_run
    starts = sorted((int(rank), int(world), int(local)) for rank, world, local in START_LINE.findall(output))
    assert starts == [(0, 2, 0), (1, 2, 1)], f"expected one start line per rank of 2:\n{starts}"
    assert json.loads((out / "report.json").read_text())["world_size"] == 2
    # the data is sharded: 256 samples / (8 per process x 2 processes) = 16 steps per epoch, 3 epochs
    checkpoints = _trainer_checkpoints(out)
    state, _ = _training_logs(checkpoints[-1])
    assert state["global_step"] == state["max_steps"] == 48
    for checkpoint in checkpoints:  # each process saved its own RNG state, and there are two processes
        assert sorted(p.name for p in checkpoint.glob("rng_state*")) == ["rng_state_0.pth", "rng_state_1.pth"]


def test_ddp_crosses_stage_boundaries_on_every_rank(ddp_run):
    out, output = ddp_run
    _, logs = _training_logs(_trainer_checkpoints(out)[-1])
    assert [(entry["step"], entry["stage"]) for entry in logs if entry["step"] in (16, 20, 32, 36)] == [
        (16, 0), (20, 1), (32, 1), (36, 2)]
    assert all(math.isfinite(entry["ce_loss"]) for entry in logs)
    # every rank's collator switched (the callback logs on each process)
    for stage, step in ((1, 16), (2, 32)):
        line = f"trains at stage {stage}."
        assert output.count(f"(global step {step}) {line}") == 2, f"stage {stage} not logged by both ranks"


def test_ddp_every_rank_destroys_its_process_group(ddp_run):
    """A gloo rank that exits with its process group alive can abort in the interpreter's teardown (SIGABRT,
    "terminate called without an active exception"); the launcher then kills rank 0 while it writes its outputs.
    Each rank destroys its group after the last collective, rank 1 before rank 0 has finished."""
    _, output = ddp_run
    assert sorted(re.findall(r"rank (\d) destroyed its process group", output)) == ["0", "1"]
    assert "terminate called" not in output


def test_ddp_parameters_end_identical_on_both_ranks(ddp_run):
    out, output = ddp_run
    checksums = _checksums(output)
    assert sorted(checksums) == [0, 1], checksums
    (total0, digest0, step0), (total1, digest1, step1) = checksums[0], checksums[1]
    assert step0 == step1 == 48
    assert digest0 == digest1 and total0 == total1, checksums
    # the weights rank 0 saved are those weights, and they load through the checkpoint's remote code
    final = out / "checkpoint-final"
    assert check_checkpoint_folder(final) == []
    model, info = AutoModel.from_pretrained(final, trust_remote_code=True, output_loading_info=True)
    assert type(model).__module__.startswith("transformers_modules.")
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    assert _train_module().parameter_checksum(model)[1] == digest0


def test_ddp_only_rank_zero_writes(ddp_run):
    out, output = ddp_run
    assert {p.name for p in out.iterdir()} == {
        "base", "init", "checkpoint-32", "checkpoint-48", "checkpoint-final", "loss_curve.png", "report.json"}
    assert {p.name for p in (out / "checkpoint-final").iterdir()} == CHECKPOINT_FILES
    for checkpoint in _trainer_checkpoints(out):
        assert {p.name for p in checkpoint.iterdir()} == TRAINER_CHECKPOINT_FILES | {"rng_state_0.pth",
                                                                                     "rng_state_1.pth"}
    leftovers = [p for p in out.rglob("*") if p.name.startswith(("tmp", ".")) or p.suffix in (".tmp", ".lock")]
    assert not leftovers, leftovers
    # the base was built and converted once, and the final save / report happened once
    assert output.count("Converted ") == 1
    assert len(re.findall(r"vedas\.train: Checkpoint: ", output)) == 1
    assert output.count("Total wall time") == 1


# ------------------------------------------------------------------------------------------------------- 3. resume


@pytest.fixture(scope="module")
def resume_runs(tmp_path_factory):
    """64 samples, batch 8: 8 steps per epoch, stage 0 / 1 / 2 over steps 1-8 / 9-16 / 17-24. The stopped run
    ends at step 12 (epoch 1.5, mid-stage 1); the resumed run continues it in the same folder to step 24."""
    tmp = tmp_path_factory.mktemp("resume")
    common = ["--evaluate_after", "false", "--n_train", "64", "--save_strategy", "steps", "--save_steps", "4",
              "--save_total_limit", "100", "--seed", "7"]
    full, stopped = tmp / "full", tmp / "stopped"
    full_output = _train(full, tmp, *common, log_name="full")
    stop_output = _train(stopped, tmp, *common, "--max_steps", "12", log_name="stop")
    stop_state, _ = _training_logs(stopped / "checkpoint-12")
    resume_output = _train(stopped, tmp, *common, "--resume_from_checkpoint", stopped / "checkpoint-12",
                           log_name="resume")
    return full, stopped, stop_state, {"full": full_output, "stop": stop_output, "resume": resume_output}


def test_resume_mid_curriculum_matches_the_uninterrupted_run(resume_runs):
    full, resumed, stop_state, outputs = resume_runs
    assert stop_state["global_step"] == 12 and stop_state["epoch"] == pytest.approx(1.5)
    assert stop_state["log_history"][-1]["stage"] == 1
    # the resumed run restarts in stage 1 at step 12, not in stage 0, and moves on to stage 2 at step 16
    assert "Curriculum: epoch 1 (global step 12) trains at stage 1." in outputs["resume"]
    assert "Curriculum: epoch 2 (global step 16) trains at stage 2." in outputs["resume"]
    assert "trains at stage 0" not in outputs["resume"]

    full_state, full_logs = _training_logs(full / "checkpoint-24")
    resumed_state, resumed_logs = _training_logs(resumed / "checkpoint-24")
    assert resumed_state["global_step"] == full_state["global_step"] == 24
    assert resumed_state["epoch"] == full_state["epoch"] == pytest.approx(3.0)
    assert resumed_logs[-1]["stage"] == full_logs[-1]["stage"] == 2
    assert [entry["step"] for entry in resumed_logs] == [entry["step"] for entry in full_logs] == list(range(4, 25, 4))
    # same batches in the same order after the resume: the losses logged at the same steps agree
    for before, after in zip(full_logs, resumed_logs):
        assert after["stage"] == before["stage"], (before, after)
        for key in ("loss", "ce_loss", "recon_loss"):
            if key in before:
                assert after[key] == pytest.approx(before[key], rel=1e-4, abs=1e-5), (key, before, after)

    # and the weights end the same
    full_weights = load_file(full / "checkpoint-24" / "model.safetensors")
    resumed_weights = load_file(resumed / "checkpoint-24" / "model.safetensors")
    assert full_weights.keys() == resumed_weights.keys()
    for name, value in full_weights.items():
        torch.testing.assert_close(resumed_weights[name], value, rtol=1e-4, atol=1e-5, msg=name)
    ((full_total, _, full_step),) = _checksums(outputs["full"]).values()
    ((resumed_total, _, resumed_step),) = _checksums(outputs["resume"]).values()
    assert full_step == resumed_step == 24
    assert resumed_total == pytest.approx(full_total, rel=1e-6)


# -------------------------------------------------------------------------------------------- 4. DeepSpeed configs

HAS_DEEPSPEED = importlib.util.find_spec("deepspeed") is not None


@pytest.mark.parametrize("name, stage", [("ds_zero2.json", 2), ("ds_zero3.json", 3)])
def test_deepspeed_json_structure(name, stage):
    config = json.loads((CONFIGS / name).read_text())
    zero = config["zero_optimization"]
    assert zero["stage"] == stage
    assert zero["offload_optimizer"]["device"] == "none"  # the paper: no offload
    if stage == 3:
        assert zero["offload_param"]["device"] == "none"
        assert zero["stage3_gather_16bit_weights_on_model_save"] is True  # a full model.safetensors on save
    assert config["bf16"]["enabled"] == "auto"  # filled from --bf16 by the Trainer
    assert "fp16" not in config or config["fp16"].get("enabled") in (False, "auto")
    # batch sizes and clipping come from TrainingArguments, so they cannot disagree with the command line
    for key in ("train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps",
                "gradient_clipping"):
        assert config[key] == "auto", key
    # accelerate's config reader (it does not need deepspeed) sees the same thing
    from accelerate.utils.deepspeed import HfDeepSpeedConfig

    parsed = HfDeepSpeedConfig(str(CONFIGS / name))
    assert parsed.get_value("zero_optimization.stage") == stage
    assert parsed.is_zero2() == (stage == 2) and parsed.is_zero3() == (stage == 3)
    assert not parsed.is_offload()


@pytest.mark.parametrize("name, distributed_type, num_processes", [
    ("single_process.yaml", "NO", 1),
    ("multi_cpu_gloo.yaml", "MULTI_GPU", 2),
    ("multi_gpu_ddp.yaml", "MULTI_GPU", 8),
    ("deepspeed_zero2.yaml", "DEEPSPEED", 8),
    ("deepspeed_zero3.yaml", "DEEPSPEED", 8),
])
def test_accelerate_yaml_configs_parse(name, distributed_type, num_processes):
    from accelerate.commands.config.config_args import load_config_from_file

    config = load_config_from_file(str(CONFIGS / name))
    assert config.distributed_type.value == distributed_type
    assert config.num_processes == num_processes and config.num_machines == 1
    if name == "multi_cpu_gloo.yaml":  # `use_cpu: true` would route 2 processes through mpirun and start one
        assert config.use_cpu is False and config.mixed_precision == "no"
    if distributed_type == "DEEPSPEED":
        ds_file = config.deepspeed_config["deepspeed_config_file"]
        assert (REPO / ds_file).is_file(), f"{name} names {ds_file}, relative to the repository root"
        stage = json.loads((REPO / ds_file).read_text())["zero_optimization"]["stage"]
        assert stage == (2 if "zero2" in name else 3)


@pytest.mark.skipif(not HAS_DEEPSPEED, reason="deepspeed is not installed (optional: pip install vedas[deepspeed])")
def test_trainer_accepts_the_zero2_config(tmp_path):
    from vedas_trainer.trainer import VedasTrainingArguments

    args = VedasTrainingArguments(output_dir=str(tmp_path), deepspeed=str(CONFIGS / "ds_zero2.json"),
                                  per_device_train_batch_size=8, gradient_accumulation_steps=2, max_grad_norm=1.0,
                                  report_to="none")
    ds = args.hf_deepspeed_config
    assert ds.is_zero2() and not ds.is_offload()
    assert ds.get_value("train_micro_batch_size_per_gpu") == 8
    assert ds.get_value("gradient_accumulation_steps") == 2
    assert ds.get_value("gradient_clipping") == 1.0
    assert ds.get_value("bf16.enabled") is False  # "auto" follows --bf16 (not given here)
    assert args.deepspeed_plugin is not None and args.deepspeed_plugin.zero_stage == 2


def test_quick_run_writes_pictures(quick_run):
    out, _, _ = quick_run
    pictures = sorted((out / "pictures").glob("sample_*.png"))
    assert [p.name for p in pictures] == ["sample_0.png", "sample_1.png", "sample_2.png"]
    assert all(p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" for p in pictures)


def test_resume_true_or_last_picks_the_newest_complete_checkpoint(tmp_path):
    from types import SimpleNamespace

    train = _train_module()
    for step in (4, 12, 8):
        (tmp_path / f"checkpoint-{step}").mkdir()
    (tmp_path / "_tmp-checkpoints" / "checkpoint-16").mkdir(parents=True)  # a killed save: never picked
    for value in ("True", "last"):
        args = SimpleNamespace(resume_from_checkpoint=value, output_dir=str(tmp_path))
        assert train.resume_checkpoint(args) == str(tmp_path / "checkpoint-12")
    explicit = SimpleNamespace(resume_from_checkpoint=str(tmp_path / "checkpoint-4"), output_dir=str(tmp_path))
    assert train.resume_checkpoint(explicit) == str(tmp_path / "checkpoint-4")
    assert train.resume_checkpoint(SimpleNamespace(resume_from_checkpoint=None, output_dir=str(tmp_path))) is None
    empty = SimpleNamespace(resume_from_checkpoint="last", output_dir=str(tmp_path / "nothing"))
    with pytest.raises(FileNotFoundError, match="no checkpoint-N folder"):
        train.resume_checkpoint(empty)
