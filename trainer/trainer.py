"""`VedasTrainer`: the transformers `Trainer` with the Vedas loss, its logs and the latent curriculum.

* Loss: the model computes it (`ce_loss + recon_weight * recon_loss`, DESIGN.md 1.3); the trainer logs both terms,
  the curriculum stage and the router statistics (`router/L{layer}/{selected,score,threshold}`), averaged over the
  steps since the last log exactly like the Trainer averages `loss`.
* Curriculum: :class:`CurriculumCallback` sets the collator's stage from `state.epoch` at every epoch start. The
  epoch is part of the Trainer state, so every data-parallel rank computes the same stage, and a run resumed from a
  checkpoint (mid-epoch included) continues at the stage it was killed in.
* LoRA: :func:`lora_config_for` targets the language model only and keeps the new Vedas modules and the latent
  special-token embedding rows trainable.
"""

from __future__ import annotations

import functools
import logging
import math
import re
from dataclasses import dataclass, field
from typing import Any, Sequence

import torch
from peft import LoraConfig
from transformers import PreTrainedModel, Trainer, TrainerCallback, TrainingArguments

from .collator import VedasCollator

__all__ = [
    "CurriculumCallback",
    "VEDAS_MODULES",
    "VedasTrainer",
    "VedasTrainingArguments",
    "lora_config_for",
]

logger = logging.getLogger(__name__)

# the modules Vedas adds to the backbone; fully trained (not LoRA-adapted) under PEFT
VEDAS_MODULES = ("depth_router", "depth_step_embed", "token_sr")
LORA_TARGET_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
# tolerance when turning the float `state.epoch` into an epoch index (it is `epoch + step / steps_in_epoch`)
_EPOCH_EPS = 1e-9


@dataclass
class VedasTrainingArguments(TrainingArguments):
    """`TrainingArguments` plus the curriculum settings (DESIGN.md 1.3 / 1.4)."""

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
    ):
        if epochs_per_stage < 1:
            raise ValueError(f"epochs_per_stage must be >= 1, got {epochs_per_stage}")
        if warmup_epochs is not None and warmup_epochs < 0:
            raise ValueError(f"warmup_epochs must be >= 0, got {warmup_epochs}")
        self.collator = collator
        self.epochs_per_stage = int(epochs_per_stage)
        self.warmup_epochs = self.epochs_per_stage if warmup_epochs is None else int(warmup_epochs)
        self.reset_optimizer = reset_optimizer
        self._logged_stage = None

    def stage_for_epoch(self, epoch: int) -> int:
        if epoch < self.warmup_epochs:
            return 0
        return 1 + (epoch - self.warmup_epochs) // self.epochs_per_stage

    def _effective(self, stage: int) -> int:
        return min(stage, getattr(self.collator, "max_latent_stage", stage))

    def _apply(self, state) -> int:
        epoch = epoch_index(state.epoch)
        stage = self.stage_for_epoch(epoch)
        self.collator.set_epoch(epoch)
        self.collator.set_stage(stage)
        if stage != self._logged_stage:
            logger.info("Curriculum: epoch %d (global step %d) trains at stage %d.", epoch, state.global_step, stage)
            self._logged_stage = stage
        return epoch

    def on_train_begin(self, args, state, control, **kwargs):
        # before anything reads the collator (e.g. eval_on_start), also after a resume
        self._apply(state)

    def on_epoch_begin(self, args, state, control, optimizer=None, **kwargs):
        epoch = self._apply(state)
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
    every checkpoint). Trainer checkpoints store the weights under their module names (see `_save`).
    """

    # Vedas' loss is a mean per batch: let the Trainer divide it by the gradient accumulation steps
    loss_is_scaled_for_ga = False

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
                    warmup_epochs=self.args.cot_warmup_epochs,
                )
            )
        self._metric_sums: dict[str, torch.Tensor] = {}
        self._metric_counts: dict[str, int] = {}

    # ------------------------------------------------------------------ loss and metrics
    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        outputs = model(**inputs)
        loss = outputs["loss"]
        if loss is None:
            raise ValueError("The model returned no loss: the batch needs labels (build it with VedasCollator).")
        if model.training:  # evaluation batches must not leak into the training logs
            self._accumulate_metrics(outputs)
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

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        if "loss" in logs:  # a training log (evaluation logs carry eval_* keys only)
            logs.update(self._drain_metrics())
            stage = getattr(self.data_collator, "stage", None)
            if stage is not None:
                logs["stage"] = stage
        super().log(logs, start_time)

    def train(self, *args, **kwargs):
        self._metric_sums, self._metric_counts = {}, {}
        return super().train(*args, **kwargs)

    # ------------------------------------------------------------------ checkpoints
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
    """A `LoraConfig` for a Vedas model, with the authors' defaults (DESIGN.md 1.4).

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
