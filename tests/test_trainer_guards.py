"""VedasTrainer's guards: a NaN or inf in the loss stops training with `NonFiniteLossError` naming the step and the
component (CE, recon, router), and no checkpoint is written after that step; Trainer checkpoints are written
atomically (a staging folder renamed when complete; leftovers of a killed save are cleared; rotation still runs).

The non-finite values are real: forward hooks on the model's own modules (`token_sr`, `lm_head`, a `depth_router`)
turn their outputs into NaN or inf at a chosen step, and the model computes its losses from them as usual. The
2-process case runs under `accelerate launch` with this file as the script (see the bottom).
"""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from vedas_trainer.checkpoint import load_vedas
from vedas_trainer.collator import VedasCollator
from vedas_trainer.synthetic import build_synthetic_dataset
from vedas_trainer.trainer import CHECKPOINT_STAGING_DIR, NonFiniteLossError, VedasTrainer, VedasTrainingArguments
from vedas_trainer.testing import free_port

REPO = Path(__file__).resolve().parents[1]
# 2 samples, batch 1, one epoch per stage: steps 1-2 at stage 0 (CE only), steps 3-4 at stage 1 (latent steps,
# hence recon_loss and the token_sr head)
STEPS = 4


def make_trainer(model, processor, dataset, output_dir, eval_dataset=None, **overrides):
    settings = dict(
        output_dir=str(output_dir), per_device_train_batch_size=1, max_steps=STEPS, epochs_per_stage=1,
        max_latent_stage=2, learning_rate=5e-3, lr_scheduler_type="constant", logging_steps=1, save_strategy="steps",
        save_steps=1, report_to=[], use_cpu=True, dataloader_num_workers=0, seed=0, disable_tqdm=True,
    )
    args = VedasTrainingArguments(**{**settings, **overrides})
    collator = VedasCollator(processor, model.config, **args.collator_kwargs())
    return VedasTrainer(model=model, args=args, train_dataset=dataset, eval_dataset=eval_dataset,
                        data_collator=collator)


def poison_at(trainer, module, step, value=float("nan")):
    """From optimizer step `step` on (1-based, as logged), `module`'s output is multiplied by `value`."""
    def hook(_module, _inputs, output):
        return output * value if trainer.state.global_step + 1 >= step else output
    return module.register_forward_hook(hook)


def checkpoint_steps(out):
    return sorted(int(p.name.split("-")[1]) for p in Path(out).glob("checkpoint-*") if p.name.split("-")[1].isdigit())


def assert_finite_checkpoints(out):
    for step in checkpoint_steps(out):
        weights = load_file(Path(out) / f"checkpoint-{step}" / "model.safetensors")
        assert all(torch.isfinite(value).all() for value in weights.values()), f"checkpoint-{step} has NaN weights"


@pytest.fixture(scope="module")
def dataset():
    return build_synthetic_dataset(2, seed=0, split="train")


# ------------------------------------------------------------------------------------------------ non-finite loss


@pytest.mark.parametrize("caught_at, overrides", [
    ("log", {"logging_steps": 1}),  # the log of step 3 comes first
    ("save", {"logging_steps": 100}),  # no log: the save of step 3 must refuse
])
def test_nan_recon_loss_stops_before_the_checkpoint(vedas_dirs, dataset, tmp_path, caught_at, overrides):
    model, processor = load_vedas(vedas_dirs["qwen2_vl"])
    trainer = make_trainer(model, processor, dataset, tmp_path, **overrides)
    # token_sr predicts the crop features: NaN there is a NaN self-distillation loss and nothing else
    poison_at(trainer, model.token_sr, step=1)  # only called from step 3, the first latent step
    with pytest.raises(NonFiniteLossError) as raised:
        trainer.train()
    error = raised.value
    assert error.step == 3 and set(error.components) == {"recon_loss"}, (error.step, error.components)
    assert math.isnan(error.components["recon_loss"])
    assert str(error).startswith("Non-finite training loss at global step 3: recon (recon_loss) = nan."), str(error)
    assert trainer.state.global_step == 3  # stopped at once: the step's log or save is the first host check
    assert checkpoint_steps(tmp_path) == [1, 2]  # nothing at or after the failing step
    assert not (tmp_path / CHECKPOINT_STAGING_DIR).exists()
    assert_finite_checkpoints(tmp_path)


def test_inf_logits_name_the_cross_entropy(vedas_dirs, dataset, tmp_path):
    model, processor = load_vedas(vedas_dirs["qwen2_vl"])
    trainer = make_trainer(model, processor, dataset, tmp_path, logging_steps=100)
    poison_at(trainer, model.lm_head, step=2, value=float("inf"))
    with pytest.raises(NonFiniteLossError, match=r"global step 2: CE \(ce_loss\) = (nan|inf)\.") as raised:
        trainer.train()
    assert set(raised.value.components) == {"ce_loss"}
    assert checkpoint_steps(tmp_path) == [1]
    assert_finite_checkpoints(tmp_path)


def test_nan_router_is_named(vedas_dirs, dataset, tmp_path):
    model, processor = load_vedas(vedas_dirs["qwen2_vl"])
    trainer = make_trainer(model, processor, dataset, tmp_path, logging_steps=100)
    layer = model.config.routing_layers[0]
    router = model.model.language_model.layers[layer].depth_router
    poison_at(trainer, router, step=2)
    with pytest.raises(NonFiniteLossError) as raised:
        trainer.train()
    # the router's scores gate the second pass, so the NaN reaches the hidden states and the CE as well
    assert raised.value.step == 2 and "router" in raised.value.components, raised.value.components
    assert "router (router/* scores, thresholds or counts) = nan" in str(raised.value)
    assert checkpoint_steps(tmp_path) == [1]
    assert_finite_checkpoints(tmp_path)


def test_nan_in_the_last_step_stops_before_the_caller_saves(vedas_dirs, dataset, tmp_path):
    # no log and no save after step 4: the check at the end of train() raises, so train.py never reaches its
    # final save_vedas_checkpoint
    model, processor = load_vedas(vedas_dirs["qwen2_vl"])
    trainer = make_trainer(model, processor, dataset, tmp_path, logging_steps=100, save_steps=3)
    poison_at(trainer, model.token_sr, step=4)
    with pytest.raises(NonFiniteLossError, match="global step 4"):
        trainer.train()
    assert trainer.state.global_step == STEPS
    assert checkpoint_steps(tmp_path) == [3]
    assert_finite_checkpoints(tmp_path)


# ------------------------------------------------------------------------------------------- atomic checkpoints


def test_checkpoint_save_clears_what_a_killed_save_left_and_rotates(vedas_dirs, dataset, tmp_path):
    # what a run killed mid-save leaves: a partial checkpoint in the staging folder
    partial = tmp_path / CHECKPOINT_STAGING_DIR / "checkpoint-2"
    partial.mkdir(parents=True)
    (partial / "rng_state_1.pth").write_bytes(b"")
    model, processor = load_vedas(vedas_dirs["qwen2_vl"])
    trainer = make_trainer(model, processor, dataset, tmp_path, max_steps=2, save_total_limit=1)
    trainer.train()  # finite losses: the guard lets training finish
    assert trainer.state.global_step == 2
    assert checkpoint_steps(tmp_path) == [2]  # rotation runs on the published folders
    assert not (tmp_path / CHECKPOINT_STAGING_DIR).exists()
    state = json.loads((tmp_path / "checkpoint-2" / "trainer_state.json").read_text())
    assert state["global_step"] == 2
    assert not (tmp_path / "checkpoint-2" / "rng_state_1.pth").exists()  # one process: rng_state.pth
    assert (tmp_path / "checkpoint-2" / "rng_state.pth").is_file()


def test_best_model_checkpoint_points_at_the_published_folder(vedas_dirs, dataset, tmp_path):
    # the Trainer records the best checkpoint under the folder it wrote to, i.e. the staging folder
    model, processor = load_vedas(vedas_dirs["qwen2_vl"])
    trainer = make_trainer(model, processor, dataset, tmp_path, eval_dataset=dataset, max_steps=2, logging_steps=100,
                           eval_strategy="steps", eval_steps=1, metric_for_best_model="loss", greater_is_better=False,
                           load_best_model_at_end=True, save_total_limit=1)
    trainer.train()
    best = Path(trainer.state.best_model_checkpoint)
    assert best.parent == tmp_path and best.is_dir(), best
    saved = json.loads((best / "trainer_state.json").read_text())
    assert Path(saved["best_model_checkpoint"]) == best


# ----------------------------------------------------------------------------------------- 2 processes (gloo)




@pytest.mark.skipif(sys.platform == "win32", reason="torchrun workers with gloo")
def test_nan_on_one_rank_stops_every_rank_before_the_checkpoint(vedas_dirs, tmp_path):
    """Only rank 1's recon loss is NaN at step 3. The gradient all-reduce spreads it to rank 0's weights while rank
    0's own losses are finite: rank 0 (the writer) must refuse to save too, and both ranks must stop (a rank that
    stopped alone would leave the other waiting in the next collective)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("ACCELERATE_", "TORCHELASTIC_"))
           and k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")}
    env.update(OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    command = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
               str(REPO / "examples" / "configs" / "multi_cpu_gloo.yaml"), "--main_process_port", str(free_port()),
               __file__, str(vedas_dirs["qwen2_vl"]), str(tmp_path / "run")]
    result = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    output = result.stdout + result.stderr
    assert result.returncode != 0, output[-3000:]
    expected = "NonFiniteLossError: Non-finite training loss at global step 3: recon (recon_loss) = nan on process 1."
    assert output.count(expected) == 2, output[-6000:]  # raised on both ranks, naming the rank that saw it
    assert checkpoint_steps(tmp_path / "run") == [1, 2]
    assert_finite_checkpoints(tmp_path / "run")


def _ddp_worker(model_dir, out):
    """Run by the test above in each of 2 processes."""
    model, processor = load_vedas(model_dir)
    # 4 samples over 2 processes, batch 1: 2 steps per epoch, steps 3-4 at stage 1
    trainer = make_trainer(model, processor, build_synthetic_dataset(4, seed=0, split="train"), out,
                           logging_steps=100)
    if trainer.args.process_index == 1:
        poison_at(trainer, model.token_sr, step=1)
    trainer.train()


if __name__ == "__main__":
    _ddp_worker(*sys.argv[1:3])
