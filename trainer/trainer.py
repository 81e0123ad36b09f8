"""`VedasTrainer`: the transformers `Trainer` with the Vedas loss, its logs and the latent curriculum.

* Loss: the model computes it (`ce_loss + recon_weight * recon_loss`, docs/design.md, "Losses"); the trainer logs
  both terms, the curriculum stage and the router statistics (`router/L{layer}/{selected,score,threshold}`),
  averaged over the steps since the last log exactly like the Trainer averages `loss`.
* Curriculum: :class:`CurriculumCallback` sets the collator's stage from `state.epoch` at every epoch start. The
  epoch is part of the Trainer state, so every data-parallel rank computes the same stage, and a run resumed from a
  checkpoint (mid-epoch included) continues at the stage it was killed in.
* LoRA: :func:`lora_config_for` targets the language model only and keeps the new Vedas modules and the latent
  special-token embedding rows trainable.
* Checkpoints are atomic: a `checkpoint-N` folder appears complete or not at all, so a run killed mid-save resumes
  from the previous checkpoint (`get_last_checkpoint`) instead of a half-written one.
* A NaN or inf in the loss stops training with a :class:`NonFiniteLossError` naming the step and the component
  (CE, recon, router), before any checkpoint is written from the weights it corrupted.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import math
import os
import re
import shutil
from dataclasses import dataclass, field
from typing import Any, Sequence

import torch
from peft import LoraConfig
from transformers import PreTrainedModel, Trainer, TrainerCallback, TrainingArguments
from transformers.trainer import TRAINER_STATE_NAME
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, rotate_checkpoints

from vedas.modeling_vedas import VEDAS_MODULES

from .collator import VedasCollator

__all__ = [
    "CHECKPOINT_STAGING_DIR",
    "CurriculumCallback",
    "NonFiniteLossError",
    "VEDAS_MODULES",
    "VedasTrainer",
    "VedasTrainingArguments",
    "answer_accuracy_metrics",
    "format_parameter_summary",
    "lora_config_for",
    "parameter_summary",
    "preprocess_logits_for_metrics",
]

logger = logging.getLogger(__name__)

# the backbone projections LoRA adapts; VEDAS_MODULES (the modules Vedas adds) are trained in full under PEFT
LORA_TARGET_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
# tolerance when turning the float `state.epoch` into an epoch index (it is `epoch + step / steps_in_epoch`)
_EPOCH_EPS = 1e-9
# Trainer checkpoints are written to `<output_dir>/_tmp-checkpoints/checkpoint-N` and renamed to
# `<output_dir>/checkpoint-N` once complete. The leading underscore keeps it out of `push_to_hub` uploads of the
# output folder (ignore pattern "_*"), and neither `get_last_checkpoint` nor checkpoint rotation looks inside it.
CHECKPOINT_STAGING_DIR = "_tmp-checkpoints"
# the loss components the non-finite guard watches, in the order of its device-side buffers
_GUARDED = ("ce_loss", "recon_loss", "router", "loss", "grad_norm")
_GUARDED_LABELS = {
    "ce_loss": "CE (ce_loss)",
    "recon_loss": "recon (recon_loss)",
    "router": "router (router/* scores, thresholds or counts)",
    "loss": "total (loss)",
    "grad_norm": "gradient norm (grad_norm)",
}


class NonFiniteLossError(FloatingPointError):
    """Training stopped because a loss component became NaN or infinite.

    `step` is the first global step (1-based, as in the logs and checkpoint names) whose batch gave a non-finite
    value, `components` maps each offending component (`ce_loss`, `recon_loss`, `router`, `loss`) to that value.
    """

    def __init__(self, message: str, step: int, components: dict[str, float]):
        super().__init__(message)
        self.step = step
        self.components = components


@dataclass
class VedasTrainingArguments(TrainingArguments):
    """`TrainingArguments` plus the curriculum settings (docs/design.md, "Curriculum")."""

    epochs_per_stage: int = field(default=4, metadata={"help": "Epochs per curriculum stage (the paper: 4)."})
    cot_warmup_epochs: int | None = field(
        default=None, metadata={"help": "Epochs of stage 0 (explicit CoT); defaults to epochs_per_stage."}
    )
    max_latent_stage: int = field(
        default=4, metadata={"help": "Last curriculum stage; CoTs are merged to this many steps (the paper: 4)."}
    )
    latents_per_step: int = field(default=1, metadata={"help": "c, latent slots per replaced step (the paper: 1)."})
    uniform_prob: float = field(
        default=0.0, metadata={"help": "Per-sample probability of training at a uniformly drawn stage."}
    )
    reset_optimizer_at_stage: bool = field(
        default=False, metadata={"help": "Clear the optimizer state (Adam moments) whenever the stage changes."}
    )
    skip_curriculum: bool = field(
        default=False, metadata={"help": "After the CoT warm-up, train every epoch at max_latent_stage (all steps "
                                         "latent) instead of one more step per stage: the no-curriculum ablation."}
    )
    # the collator consumes the raw sample columns (images, question, steps, ...), which are not forward() arguments
    remove_unused_columns: bool = field(
        default=False, metadata={"help": "Must stay False for Vedas: the collator needs the raw sample columns."}
    )

    def __post_init__(self):
        super().__post_init__()
        if self.epochs_per_stage < 1:
            raise ValueError(f"epochs_per_stage must be >= 1, got {self.epochs_per_stage}")

    def collator_kwargs(self) -> dict[str, Any]:
        """The curriculum settings as `VedasCollator` keyword arguments."""
        return {
            "max_latent_stage": self.max_latent_stage,
            "latents_per_step": self.latents_per_step,
            "uniform_prob": self.uniform_prob,
            "seed": self.seed,
        }


def epoch_index(epoch: float | None) -> int:
    """The 0-based epoch a `state.epoch` value falls in (`1.5` -> 1, `2.0` at the start of epoch 2 -> 2)."""
    return 0 if epoch is None else int(math.floor(epoch + _EPOCH_EPS))


class CurriculumCallback(TrainerCallback):
    """Advances the collator's stage every `epochs_per_stage` epochs: stage = epoch // epochs_per_stage.

    `warmup_epochs` (defaults to `epochs_per_stage`) sets how long stage 0 (explicit CoT) lasts; later stages last
    `epochs_per_stage` epochs each: stage = 1 + (epoch - warmup_epochs) // epochs_per_stage after the warm-up.

    The stage is derived from `state.epoch` at each epoch begin, before that epoch's DataLoader iterator is created,
    never from a counter kept here. `state.epoch` is identical on every rank and restored by
    `resume_from_checkpoint` (a mid-epoch checkpoint stores e.g. 1.5), so all ranks and resumed runs agree.

    With `reset_optimizer=True` the optimizer state is cleared when an epoch that starts a new stage begins (only
    at a real boundary: a run resumed mid-stage keeps the moments it saved, as the uninterrupted run did). Stages
    past `collator.max_latent_stage` build the same batches as the last one, so they do not reset.
    """

    def __init__(
        self,
        collator: VedasCollator,
        epochs_per_stage: int,
        reset_optimizer: bool = False,
        warmup_epochs: int | None = None,
        skip_curriculum: bool = False,
    ):
        if epochs_per_stage < 1:
            raise ValueError(f"epochs_per_stage must be >= 1, got {epochs_per_stage}")
        if warmup_epochs is not None and warmup_epochs < 0:
            raise ValueError(f"warmup_epochs must be >= 0, got {warmup_epochs}")
        self.collator = collator
        self.epochs_per_stage = int(epochs_per_stage)
        self.warmup_epochs = self.epochs_per_stage if warmup_epochs is None else int(warmup_epochs)
        self.reset_optimizer = reset_optimizer
        self.skip_curriculum = skip_curriculum  # every epoch after the warm-up at the last stage
        self._logged_stage = None

    def stage_for_epoch(self, epoch: int) -> int:
        if epoch < self.warmup_epochs:
            return 0
        if self.skip_curriculum:
            return getattr(self.collator, "max_latent_stage", 1)
        return 1 + (epoch - self.warmup_epochs) // self.epochs_per_stage

    def _effective(self, stage: int) -> int:
        return min(stage, getattr(self.collator, "max_latent_stage", stage))

    def _apply(self, state, train_dataloader=None) -> int:
        epoch = epoch_index(state.epoch)
        stage = self.stage_for_epoch(epoch)
        self.collator.set_epoch(epoch)
        self.collator.set_stage(stage)
        # a dataset that draws new samples every epoch (`vedas_trainer.synthetic.FreshSyntheticDataset`) follows the
        # same epoch on every rank and after a resume (accelerate forwards `set_epoch` to it only in some layouts)
        dataset = getattr(train_dataloader, "dataset", None)
        if hasattr(dataset, "set_epoch"):
            dataset.set_epoch(epoch)
        if stage != self._logged_stage:
            logger.info("Curriculum: epoch %d (global step %d) trains at stage %d.", epoch, state.global_step, stage)
            self._logged_stage = stage
        return epoch

    def on_train_begin(self, args, state, control, train_dataloader=None, **kwargs):
        # before anything reads the collator (e.g. eval_on_start), also after a resume
        self._apply(state, train_dataloader)

    def on_epoch_begin(self, args, state, control, optimizer=None, train_dataloader=None, **kwargs):
        epoch = self._apply(state, train_dataloader)
        at_epoch_start = state.epoch is None or abs(state.epoch - epoch) < _EPOCH_EPS
        stage_starts = epoch > 0 and self._effective(self.stage_for_epoch(epoch)) != self._effective(
            self.stage_for_epoch(epoch - 1)
        )
        if self.reset_optimizer and at_epoch_start and stage_starts and optimizer is not None:
            reset_optimizer_state(optimizer)
            logger.info("Curriculum: optimizer state reset for stage %d.", self.stage_for_epoch(epoch))


def reset_optimizer_state(optimizer) -> None:
    """Drop the per-parameter state (Adam moments, step counts); torch optimizers re-create it lazily. Works
    through Accelerate's (and DeepSpeed's) wrappers, which keep the torch optimizer in `.optimizer`."""
    inner = optimizer
    while not isinstance(getattr(inner, "state", None), dict) and hasattr(inner, "optimizer"):
        inner = inner.optimizer
    state = getattr(inner, "state", None)
    if not isinstance(state, dict):
        logger.warning("Cannot reset the state of optimizer %s: it has no per-parameter state dict.", type(inner))
        return
    state.clear()


class VedasTrainer(Trainer):
    """`Trainer` for Vedas models.

    The loss is the model's (`loss = ce_loss + recon_weight * recon_loss`). It is a per-batch mean that does not
    use `num_items_in_batch`, so the Trainer scales it for gradient accumulation itself.

    Logged at every logging step (means since the previous log, reduced over processes): `ce_loss`, `recon_loss`
    (when some batch computed it), `stage` and, per routing layer, `router/L{layer}/selected`, `.../score`,
    `.../threshold` (`router/L{layer}/D{depth}/...` for depth > 0). The sums stay on the device between logs, so
    this adds no host sync per step.

    When `args` is a `VedasTrainingArguments` and the data collator a `VedasCollator`, a `CurriculumCallback` is
    added unless one is already given, and the collator's processor is the default `processing_class` (saved with
    every checkpoint). Trainer checkpoints store the weights under their module names (see `_save`) and are written
    atomically (see `_save_checkpoint`).

    A non-finite `ce_loss`, `recon_loss`, router statistic or total loss raises :class:`NonFiniteLossError` at the
    next log, checkpoint save or the end of training, whichever comes first, naming the step it happened at; no
    checkpoint is written after that step (see `_track_non_finite`).
    """

    # Vedas' loss is a mean per batch: let the Trainer divide it by the gradient accumulation steps
    loss_is_scaled_for_ga = False
    # while `_save_checkpoint` runs: the folder the Trainer's checkpoint writes are redirected to
    _staging_run_dir: str | None = None

    def __init__(self, *args, **kwargs):
        collator = kwargs.get("data_collator")
        if kwargs.get("processing_class") is None and isinstance(collator, VedasCollator):
            # checkpoints then carry the whole processor (image processor and chat template), not only the tokenizer
            kwargs["processing_class"] = collator.processor
        super().__init__(*args, **kwargs)
        # the model's forward takes **kwargs but ignores num_items_in_batch; the Trainer must not assume otherwise
        # (it would skip the accumulation scaling and multiply the loss by the world size)
        self.model_accepts_loss_kwargs = False
        if self.args.remove_unused_columns:
            logger.info("VedasTrainer: remove_unused_columns=True would drop the sample columns; setting it False.")
            self.args.remove_unused_columns = False
        has_curriculum = any(isinstance(cb, CurriculumCallback) for cb in self.callback_handler.callbacks)
        if (
            isinstance(self.args, VedasTrainingArguments)
            and isinstance(self.data_collator, VedasCollator)
            and not has_curriculum
        ):
            self.add_callback(
                CurriculumCallback(
                    self.data_collator, self.args.epochs_per_stage, reset_optimizer=self.args.reset_optimizer_at_stage,
                    warmup_epochs=self.args.cot_warmup_epochs, skip_curriculum=self.args.skip_curriculum,
                )
            )
        self._metric_sums: dict[str, torch.Tensor] = {}
        self._metric_counts: dict[str, int] = {}
        self._nonfinite_step: torch.Tensor | None = None
        self._nonfinite_value: torch.Tensor | None = None
        self._push_pending = False

    # ------------------------------------------------------------------ loss and metrics
    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        outputs = model(**inputs)
        loss = outputs["loss"]
        if loss is None:
            raise ValueError("The model returned no loss: the batch needs labels (build it with VedasCollator).")
        if model.training:  # evaluation batches must not leak into the training logs
            self._accumulate_metrics(outputs)
            self._track_non_finite(outputs, loss)
        if return_outputs:
            # prediction_step treats every other output as logits; keep tensors it can concatenate
            return loss, {"loss": loss, "logits": outputs["logits"]}
        return loss

    def _accumulate_metrics(self, outputs) -> None:
        values = {"ce_loss": outputs.get("ce_loss"), "recon_loss": outputs.get("recon_loss")}
        for (layer, depth), stats in sorted((outputs.get("router_stats") or {}).items()):
            prefix = f"router/L{layer}" if depth == 0 else f"router/L{layer}/D{depth}"
            for name, value in stats.items():
                values[f"{prefix}/{name}"] = value
        for name, value in values.items():
            # every rank registers the same names (recon_loss always), so the cross-process reduce lines up
            if name not in self._metric_sums:
                self._metric_sums[name] = torch.zeros((), dtype=torch.float32, device=self.args.device)
                self._metric_counts[name] = 0
            if value is None:
                continue
            self._metric_sums[name] += value.detach().float().to(self._metric_sums[name].device)
            self._metric_counts[name] += 1

    def _drain_metrics(self) -> dict[str, float]:
        """Means since the last log, summed over processes; resets the accumulators."""
        if not self._metric_sums:
            return {}
        names = sorted(self._metric_sums)
        sums = torch.stack([self._metric_sums[name] for name in names])
        counts = torch.tensor([self._metric_counts[name] for name in names], dtype=torch.float32, device=sums.device)
        totals = torch.stack([sums, counts])
        if self.accelerator.num_processes > 1:
            totals = self.accelerator.reduce(totals, reduction="sum")
        totals = totals.tolist()  # the only host sync, once per log
        self._metric_sums, self._metric_counts = {}, {}
        return {name: s / c for name, s, c in zip(names, totals[0], totals[1]) if c > 0}

    # ------------------------------------------------------------------ non-finite loss guard
    def _reset_non_finite(self) -> None:
        self._nonfinite_step = torch.full((len(_GUARDED),), -1, dtype=torch.long, device=self.args.device)
        self._nonfinite_value = torch.zeros(len(_GUARDED), dtype=torch.float32, device=self.args.device)

    def _track_non_finite(self, outputs, loss) -> None:
        """Remembers, per component, the first step whose loss was NaN or inf, and the value.

        This runs at every training step, so it stays on the device: `isfinite` and `where` are queued behind the
        loss like any other kernel and nothing here waits for the device. The host reads the result only where the
        Trainer synchronises anyway: at a log, before a checkpoint save and at the end of training
        (`_raise_if_non_finite`). An `.item()` per step would stop at the very step but add a device stall to every
        step of every healthy run (the Trainer's `logging_nan_inf_filter`, on by default, does read the total loss
        every step, only to replace a non-finite one by the running mean, which hides it from the logs). The price
        of waiting: the steps up to the next log or save still run on the corrupted weights, which costs compute but
        writes nothing, since the check comes before any checkpoint is written.
        """
        if self._nonfinite_step is None:
            self._reset_non_finite()
        device = self._nonfinite_value.device
        router = [value for stats in (outputs.get("router_stats") or {}).values() for value in stats.values()]
        zero = torch.zeros((), dtype=torch.float32, device=device)
        current = torch.stack([
            outputs.get("ce_loss").detach().float().to(device) if outputs.get("ce_loss") is not None else zero,
            outputs.get("recon_loss").detach().float().to(device) if outputs.get("recon_loss") is not None else zero,
            # one number for all router statistics: their sum is non-finite when any of them is (they are means
            # of bounded quantities, so the sum cannot overflow by itself)
            torch.stack([v.detach().float().to(device) for v in router]).sum() if router else zero,
            loss.detach().float().to(device),
            zero,  # grad_norm: recorded after the backward pass, in _maybe_log_save_evaluate
        ])
        first = ~torch.isfinite(current) & (self._nonfinite_step < 0)
        # the batch belongs to the optimizer step after the last completed one (1-based, as logged)
        self._nonfinite_step = torch.where(first, self.state.global_step + 1, self._nonfinite_step)
        self._nonfinite_value = torch.where(first, current, self._nonfinite_value)

    def _maybe_log_save_evaluate(self, tr_loss, grad_norm, *args, **kwargs):
        """The Trainer's log / save / evaluate after each optimizer step, after recording a non-finite gradient
        norm (a finite loss can still give inf or NaN gradients, e.g. an overflow in the backward pass)."""
        if grad_norm is not None and self._nonfinite_step is not None:
            index = _GUARDED.index("grad_norm")
            norm = torch.as_tensor(grad_norm, dtype=torch.float32).to(self._nonfinite_value.device)
            first = ~torch.isfinite(norm) & (self._nonfinite_step[index] < 0)
            # the step whose update used these gradients (global_step was just incremented)
            self._nonfinite_step[index] = torch.where(first, self.state.global_step, self._nonfinite_step[index])
            self._nonfinite_value[index] = torch.where(first, norm, self._nonfinite_value[index])
        return super()._maybe_log_save_evaluate(tr_loss, grad_norm, *args, **kwargs)

    def _raise_if_non_finite(self) -> None:
        """Raises `NonFiniteLossError` if a loss component was non-finite on any process since training started.

        Every process must call this at the same point (it gathers across processes): a NaN in one rank's batch
        reaches every rank's weights through the gradient all-reduce, so every rank must stop, and none may save.
        """
        if self._nonfinite_step is None:
            return
        steps, values = self._nonfinite_step[None], self._nonfinite_value[None]
        if self.accelerator.num_processes > 1:
            steps, values = self.accelerator.gather(steps), self.accelerator.gather(values)
        steps, values = steps.tolist(), values.tolist()  # the host sync, at a point that syncs anyway
        flagged = [(step, rank, name, value)
                   for rank, (rank_steps, rank_values) in enumerate(zip(steps, values))
                   for name, step, value in zip(_GUARDED, rank_steps, rank_values) if step >= 0]
        if not flagged:
            return
        step = min(entry[0] for entry in flagged)
        found: dict[str, float] = {}
        ranks: dict[str, list[int]] = {}
        for at, rank, name, value in flagged:
            if at == step:
                found.setdefault(name, value)
                ranks.setdefault(name, []).append(rank)
        if len(found) > 1:  # the total and the gradients follow from the components: named only when alone
            found.pop("loss", None)
            if len(found) > 1:
                found.pop("grad_norm", None)
        where = "" if self.accelerator.num_processes == 1 else " on process {}"
        details = ", ".join(
            f"{_GUARDED_LABELS[name]} = {found[name]}" + where.format(", ".join(map(str, ranks[name])))
            for name in _GUARDED if name in found
        )
        raise NonFiniteLossError(
            f"Non-finite training loss at global step {step}: {details}. Training stopped before writing any "
            f"checkpoint from the weights this step updated (the last checkpoint in {self.args.output_dir} precedes "
            f"it). Resume from that checkpoint with a lower learning rate, stronger clipping, or look at the batch "
            f"of step {step}.",
            step=step,
            components=found,
        )

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        if "loss" in logs:  # a training log (evaluation logs carry eval_* keys only)
            self._raise_if_non_finite()
            logs.update(self._drain_metrics())
            stage = getattr(self.data_collator, "stage", None)
            if stage is not None:
                logs["stage"] = stage
        super().log(logs, start_time)

    def train(self, *args, **kwargs):
        self._metric_sums, self._metric_counts = {}, {}
        self._reset_non_finite()
        self.parameter_summary = parameter_summary(self.model)
        if self.is_world_process_zero():
            logger.info("Parameters: %s", format_parameter_summary(self.parameter_summary))
        result = super().train(*args, **kwargs)
        # a non-finite loss after the last log and save must still stop the caller from saving the final model
        self._raise_if_non_finite()
        return result

    # ------------------------------------------------------------------ evaluation
    @contextlib.contextmanager
    def _final_layout(self):
        """Evaluation batches use the final curriculum layout (every step latent, no uniform draws), whatever the
        training stage: `eval_loss` then measures the same task all run long, and `load_best_model_at_end` picks
        the best latent model, not the end of the CoT warm-up."""
        collator = self.data_collator
        if not isinstance(collator, VedasCollator):
            yield
            return
        stage, uniform = collator.stage, collator.uniform_prob
        collator.set_stage(collator.max_latent_stage)
        collator.uniform_prob = 0.0
        try:
            yield
        finally:
            collator.set_stage(stage)
            collator.uniform_prob = uniform

    def evaluate(self, *args, **kwargs):
        with self._final_layout():
            return super().evaluate(*args, **kwargs)

    # ------------------------------------------------------------------ checkpoints
    def _save_checkpoint(self, model, trial) -> None:
        """Writes the Trainer checkpoint atomically: complete as `checkpoint-N`, or not there at all.

        The Trainer writes `checkpoint-N` in place, file after file and from several processes (each one its RNG
        state), so a run killed mid-save leaves a partial `checkpoint-N` that `get_last_checkpoint` and
        `resume_from_checkpoint=True` then pick as the latest. Here every process writes into
        `<output_dir>/_tmp-checkpoints/checkpoint-N` (the Trainer's own `_save_checkpoint`, with its output folder
        redirected), all processes wait for each other, and the writer process alone renames the folder to
        `<output_dir>/checkpoint-N` (a rename is atomic) and rotates checkpoints. (Earlier transformers releases
        staged checkpoints in `tmp-checkpoint-N`, where every process renamed without waiting for the others,
        huggingface/transformers#27925, and the asynchronous Hub push read the staged folder after its rename,
        #29399: here only the writer renames, after a barrier, and the push starts from the final folder.)

        This protects against the process dying (SIGKILL, OOM killer, preemption), not against a power loss: the
        files are not fsync'ed. Multi-node runs without a shared filesystem should set `save_on_each_node`.
        """
        self._raise_if_non_finite()  # never write a checkpoint from weights a non-finite loss has updated
        run_dir = self._get_output_dir(trial=trial)
        name = f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}"
        staging = os.path.join(run_dir, CHECKPOINT_STAGING_DIR)
        if self.args.should_save and os.path.lexists(staging):
            shutil.rmtree(staging)  # what a save killed earlier left behind
        self.accelerator.wait_for_everyone()  # no process writes into the staging folder before it is cleared
        self._staging_run_dir, self._push_pending = staging, False
        try:
            super()._save_checkpoint(model, trial)
        finally:
            self._staging_run_dir = None
        self.accelerator.wait_for_everyone()  # every process's files are written
        staged, final = os.path.join(staging, name), os.path.join(run_dir, name)
        best = self.state.best_model_checkpoint
        best_was_staged = best is not None and os.path.dirname(os.path.normpath(best)) == os.path.normpath(staging)
        if best_was_staged:  # the Trainer recorded the best checkpoint under the folder it wrote to
            self.state.best_model_checkpoint = os.path.join(run_dir, os.path.basename(os.path.normpath(best)))
        if self.args.should_save:
            if best_was_staged:
                self.state.save_to_json(os.path.join(staged, TRAINER_STATE_NAME))
            if os.path.lexists(final):
                # e.g. a run restarted from an earlier checkpoint in the same folder: move the old one out of the way
                # first (a kill between the two renames leaves older complete checkpoints as the latest)
                os.replace(final, os.path.join(staging, f"replaced-{name}"))
            os.replace(staged, final)
            shutil.rmtree(staging, ignore_errors=True)
            # the Trainer's rotation ran on the staging folder (one checkpoint, nothing to delete): rotate here
            rotate_checkpoints(
                output_dir=run_dir,
                save_total_limit=self.args.save_total_limit,
                best_model_checkpoint=self.state.best_model_checkpoint,
                use_mtime=True,
            )
        if self._push_pending:
            self._push_pending = False
            super()._push_from_checkpoint(final)

    def _get_output_dir(self, trial) -> str:
        # redirects the Trainer's checkpoint writes to the staging folder while `_save_checkpoint` runs
        if self._staging_run_dir is not None:
            return self._staging_run_dir
        return super()._get_output_dir(trial)

    def _push_from_checkpoint(self, checkpoint_folder: str) -> None:
        if self._staging_run_dir is not None:  # the upload runs in the background: start it from the final folder
            self._push_pending = True
            return
        super()._push_from_checkpoint(checkpoint_folder)

    def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
        # `save_pretrained` writes Qwen2-VL's legacy key layout (`visual.*`, `model.layers.*`) by default, but
        # `resume_from_checkpoint` loads the raw state dict without the checkpoint key renames
        # (huggingface/transformers#43701): a resumed run would silently restart from the initial weights. Trainer
        # checkpoints therefore keep the module names (`from_pretrained` loads both layouts); Hub folders written by
        # `save_vedas_checkpoint` keep the original layout.
        model = self.accelerator.unwrap_model(self.model, keep_torch_compile=False)
        if not isinstance(model, PreTrainedModel) or getattr(model, "_hf_peft_config_loaded", False):
            return super()._save(output_dir, state_dict=state_dict)  # PEFT adapters have their own key names
        model.save_pretrained = functools.partial(model.save_pretrained, save_original_format=False)
        try:
            super()._save(output_dir, state_dict=state_dict)
        finally:
            del model.save_pretrained  # back to the class method


# ---------------------------------------------------------------------------------------------------------------- PEFT


def special_token_ids(model) -> list[int]:
    """The ids of the four Vedas special tokens (`<|start_latent|>`, `<|latent|>`, `<|end_latent|>`, `<|replay|>`)."""
    ids = model.config.special_token_ids()
    if any(value is None for value in ids.values()):
        raise ValueError(f"The model has no Vedas special-token ids ({ids}); convert the base checkpoint first.")
    return sorted(set(ids.values()))


def lora_config_for(
    model,
    r: int = 64,
    alpha: int = 16,
    dropout: float = 0.05,
    target_modules: Sequence[str] = LORA_TARGET_MODULES,
    **kwargs,
) -> LoraConfig:
    """A `LoraConfig` for a Vedas model, with the authors' defaults (docs/design.md, "Paper settings and defaults").

    * LoRA on `target_modules` of the language model only: the vision tower stays frozen (Qwen2.5-VL's vision MLP
      also has `gate_proj`/`up_proj`/`down_proj`, hence the regex on `language_model`).
    * `modules_to_save`: the router, the step embeddings e(d) and `token_sr` are trained in full. They are new, so a
      low-rank update of a random (or zero) init would be the wrong parametrisation; the authors' release froze the
      router by accident.
    * `trainable_token_indices`: the four special-token rows of the input embeddings are trained (the other rows
      stay frozen); their output rows are never supervised (labels are -100 on them).

    Extra keyword arguments go to `LoraConfig`.
    """
    names = "|".join(re.escape(name) for name in target_modules)
    return LoraConfig(
        r=r,
        lora_alpha=alpha,
        lora_dropout=dropout,
        target_modules=rf".*language_model.*\.({names})",
        modules_to_save=list(VEDAS_MODULES),
        trainable_token_indices=special_token_ids(model),
        task_type=kwargs.pop("task_type", "CAUSAL_LM"),
        **kwargs,
    )


# ---------------------------------------------------------------------------------------------------------- summaries


def parameter_summary(model) -> dict[str, int]:
    """Parameter counts of a (PEFT-wrapped or plain) Vedas model: `total`, `trainable`, and `vedas_total` /
    `vedas_trainable` for the Vedas modules (router, e(d), `token_sr`, PEFT's copies of them included). Shared
    (tied) parameters count once, as `named_parameters` lists them."""
    counts = dict.fromkeys(("total", "trainable", "vedas_total", "vedas_trainable"), 0)
    for name, param in model.named_parameters():
        n = getattr(param, "ds_numel", None) or param.numel()  # ZeRO-3 holds a slice: its full size
        vedas = any(f".{module}." in f".{name}." for module in VEDAS_MODULES)
        counts["total"] += n
        counts["vedas_total"] += n * vedas
        if param.requires_grad:
            counts["trainable"] += n
            counts["vedas_trainable"] += n * vedas
    return counts


def format_parameter_summary(counts: dict[str, int]) -> str:
    """`trainable 1,234 of 5,678 (21.73%); Vedas modules 100 trainable (8.10% of trainable)`."""
    share = 100 * counts["trainable"] / max(counts["total"], 1)
    vedas_share = 100 * counts["vedas_trainable"] / max(counts["trainable"], 1)
    return (f"trainable {counts['trainable']:,} of {counts['total']:,} ({share:.2f}%); Vedas modules (router, e(d), "
            f"token_sr) {counts['vedas_trainable']:,} trainable of {counts['vedas_total']:,} "
            f"({vedas_share:.2f}% of the trainable parameters)")


def preprocess_logits_for_metrics(logits, labels):
    """Keeps the arg-max token per position, so evaluation does not gather the full (B, L, V) logits."""
    if isinstance(logits, (tuple, list)):
        logits = logits[0]
    return logits.argmax(-1)


def answer_accuracy_metrics(tokenizer):
    """`compute_metrics` for teacher-forced evaluation batches (use with :func:`preprocess_logits_for_metrics`):

    * `token_accuracy`: arg-max next-token accuracy over every supervised token;
    * `answer_accuracy`: the share of rows whose answer tokens (the supervised tokens after the last `" :"` of the
      final `answer : X` line) are all predicted right, the end-of-turn token included.

    Cheap (no generation), so it can run at every evaluation; the generated Table-1 accuracy comes from
    `vedas_trainer.evaluation`.
    """
    import numpy as np

    colon = tokenizer.encode(" :", add_special_tokens=False)
    marker = colon[-1] if colon else None

    def compute(eval_prediction) -> dict[str, float]:
        predictions, labels = np.asarray(eval_prediction.predictions), np.asarray(eval_prediction.label_ids)
        predictions, labels = predictions[:, :-1], labels[:, 1:]  # the logits at t predict the token at t + 1
        supervised = labels != -100
        right = (predictions == labels) & supervised
        answers = []
        for row_labels, row_supervised, row_right in zip(labels, supervised, right):
            marks = np.flatnonzero(row_labels == marker)
            if not row_supervised.any() or marks.size == 0:
                continue
            span = row_supervised & (np.arange(len(row_labels)) > marks[-1])
            answers.append(bool(row_right[span].all()) if span.any() else False)
        return {"token_accuracy": float(right.sum() / max(supervised.sum(), 1)),
                "answer_accuracy": float(np.mean(answers)) if answers else 0.0}

    return compute
