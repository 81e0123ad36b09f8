"""Train Vedas with the curriculum: `accelerate launch examples/train.py [options]`.

With no arguments it runs the embedded default on CPU: it builds a tiny Qwen2-VL base from scratch, converts it,
trains it on the built-in "follow the arrows" task (CoT warm-up, then the curriculum to full latent), evaluates
No-CoT / CoT / Vedas latent on the test split, and writes a Hub-ready checkpoint, a results report and a loss curve.

On a real base and dataset, for example (4 CoT warm-up epochs + 4 stages of 4 epochs = 20 epochs, which is also the
default of --num_train_epochs):

    accelerate launch --config_file examples/configs/deepspeed_zero2.yaml examples/train.py \
        --base_model /models/Qwen2-VL-7B-Instruct --dataset /data/m3cot/train.jsonl --dataset_format m3cot \
        --output_dir runs/vedas-m3cot --num_train_epochs 20 --cot_warmup_epochs 4 --epochs_per_stage 4 \
        --max_latent_stage 4 --learning_rate 4e-5 --per_device_train_batch_size 8 --bf16 --lora --recon_weight 0.2

or the same from a recipe file (any option as a key; later command-line options override it):

    accelerate launch examples/train.py examples/configs/recipe_m3cot.yaml [--learning_rate 2e-5 ...]

Rules checked before any model or data work (a bad value ends in one line on stderr and exit status 2):

* Curriculum: the run must reach ``max_latent_stage``, the stage `generate` and evaluation use. Without
  ``--num_train_epochs`` the run lasts exactly ``cot_warmup_epochs + max_latent_stage * epochs_per_stage`` epochs;
  an explicit ``--num_train_epochs`` below that is refused (more is fine: the extra epochs train the last stage).
  ``--max_steps`` that stops earlier gets a warning. ``report.json`` records the epochs run and the last stage.
* Evaluation: ``--eval_dataset`` (a file in ``--eval_dataset_format``, default ``--dataset_format``, or
  ``synthetic`` for the embedded task's test split) evaluates every epoch unless ``--eval_strategy`` says otherwise;
  ``eval_loss`` and the teacher-forced ``eval_answer_accuracy`` are measured on the final all-latent layout, so
  ``--load_best_model_at_end`` (with ``--save_strategy`` equal to ``--eval_strategy``) keeps the best latent model.
* CPU threads: ``accelerate launch`` without a config sets OMP_NUM_THREADS=1 for its workers. On CPU, train.py
  uses ``cores // local processes`` threads per process instead, unless the user chose a count: OMP_NUM_THREADS set
  in the environment ``accelerate launch`` (or ``torchrun``) was started from, ``--num_cpu_threads_per_process`` on
  its command line, or OMP_NUM_THREADS set for a plain ``python examples/train.py``. (accelerate passes the same
  OMP_NUM_THREADS to the worker in every case; the launcher's own command line and start-up environment tell them
  apart.)
"""

import hashlib
import json
import logging
import math
import os
import shutil
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from transformers import HfArgumentParser, TrainerCallback, set_seed

from vedas_trainer.checkpoint import (
    CheckpointError, convert_base, is_vedas_checkpoint, load_vedas, save_vedas_checkpoint,
)
from vedas_trainer.collator import VedasCollator
from vedas_trainer.distributed import (
    empty_tensors, full_parameter_checksum, gathered_state_dict, is_partitioned, outside_zero3_init, whole_copy,
)
from vedas_trainer.data import DataError
from vedas_trainer.hub import HubError, push_after_training, resolve_model_folder, training_push_target
from vedas_trainer.tiny_base import TinySizes, build_tiny_base, for_backbone
from vedas_trainer.trainer import (
    NonFiniteLossError, VedasTrainer, VedasTrainingArguments, answer_accuracy_metrics, lora_config_for,
    preprocess_logits_for_metrics,
)


logger = logging.getLogger("vedas.train")


# --keep_warmup_checkpoint: the kept checkpoint's name, outside `checkpoint-*`, which rotation and `last` go through
WARMUP_CHECKPOINT = "warmup-checkpoint"


@dataclass
class ModelArguments:
    base_model: str | None = field(
        default=None, metadata={"help": "Base Qwen2-VL/Qwen2.5-VL folder or a Vedas checkpoint. Default: a tiny base "
                                        "built from scratch (the embedded default)."}
    )
    backbone: str = field(default="qwen2_vl",
                          metadata={"help": "Tiny base backbone: qwen2_vl, qwen2_5_vl, qwen3_vl or chameleon."})
    vedas_overrides: str = field(default="{}", metadata={"help": "JSON dict of VedasConfig fields to set."})
    num_replay_tokens: int | None = field(default=None, metadata={"help": "K (default: 4 embedded, 32 otherwise)."})
    recon_weight: float | None = field(default=None, metadata={"help": "λ, the self-distillation weight."})
    lora: bool = field(default=False, metadata={"help": "Train LoRA adapters (+ the Vedas modules and new tokens)."})
    lora_r: int = 64
    lora_alpha: int = 16
    lora_dropout: float = 0.05
    lora_target_modules: str = "q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj"


@dataclass
class DataArguments:
    dataset: str = field(default="synthetic", metadata={"help": "'synthetic', a hub name or a local json/jsonl/parquet."})
    dataset_format: str | None = field(
        default=None, metadata={"help": "m3cot, scienceqa, gqa, onethinker or chat (sharegpt); case-insensitive."})
    image_root: str | None = None
    eval_dataset: str | None = field(default=None, metadata={
        "help": "Evaluated during training (eval_loss, eval_answer_accuracy): a local file, a hub name, or "
                "'synthetic' (the embedded task's test split). Evaluates every epoch unless --eval_strategy is set."})
    eval_dataset_format: str | None = field(default=None, metadata={"help": "Default: --dataset_format."})
    skip_bad_rows: bool = False
    n_train: int = field(default=3200, metadata={"help": "Synthetic task: puzzles per epoch (new ones every epoch unless "
                                                         "--fixed_train_set)."})
    fixed_train_set: bool = field(default=False, metadata={
        "help": "Synthetic task: train on the same n_train puzzles every epoch instead of new ones each epoch."})
    n_test: int = 300
    task_kwargs: str = field(default="{}", metadata={"help": "JSON options of the synthetic task (make_sample keywords), "
                                                             "e.g. '{\"grid\": 4, \"mc_prob\": 0.0}'."})
    seed_data: int = 0


@dataclass
class RunArguments:
    quick: bool = field(default=False, metadata={"help": "A ~2 minute smoke run of the embedded default (CI)."})
    evaluate_after: bool = field(default=True, metadata={"help": "Evaluate No-CoT / CoT / latent after training."})
    keep_warmup_checkpoint: bool = field(default=False, metadata={
        "help": f"Save a checkpoint at the end of the CoT warm-up (whatever --save_strategy says) and keep it as "
                f"output_dir/{WARMUP_CHECKPOINT}, out of --save_total_limit's rotation: runs that differ from this "
                f"one only after the warm-up continue it with --resume_from_checkpoint (examples/ablate.py)."})


# M-RoPE: with Qwen2-VL's rope_theta 1e4 and mrope_section [6, 5, 5] at head_dim 32, the row and column sections
# rotate by at most 0.03 and 0.002 rad per cell, so the text cannot tell the cells of the image apart by position
# and learning to read "row r col c" depends on luck; rope_theta 10 with [4, 6, 6] gives rows 0.56-0.27 and
# columns 0.24-0.12 rad per cell (docs/reproducibility.md).
EMBEDDED_SIZES = TinySizes(
    hidden_size=128, intermediate_size=512, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
    mrope_section=[4, 6, 6], rope_theta=10.0, vision_depth=2, vision_embed_dim=128, vision_heads=4,
    vision_mlp_ratio=2,
)
EMBEDDED_VEDAS = {"num_replay_tokens": 2, "routing_topk": 0.25, "crop_resolution": 56, "window_size": 2,
                  "num_latent_steps": 4}
# 14 CoT warm-up epochs: with 10 the slower seeds were still at CE 0.09 when the curriculum began, and the latent
# model can only keep what the CoT warm-up learned (docs/reproducibility.md).
EMBEDDED_TRAINING = dict(
    epochs_per_stage=1, cot_warmup_epochs=14, max_latent_stage=4, learning_rate=2e-3, adam_beta2=0.98,
    weight_decay=0.05, warmup_steps=100, lr_scheduler_type="cosine_with_min_lr", lr_scheduler_kwargs={"min_lr_rate": 0.1},
    max_grad_norm=1.0, per_device_train_batch_size=32, logging_steps=10, save_strategy="epoch", save_total_limit=2,
    report_to="none", dataloader_num_workers=0, remove_unused_columns=False, use_cpu=not torch.cuda.is_available(),
)


class UsageError(ValueError):
    """An argument that cannot work, found before any model or data work."""


# what the entry point reports in one line (exit status 2) instead of a traceback
USER_ERRORS = (UsageError, DataError, CheckpointError, NonFiniteLossError, HubError)
RECIPE_SUFFIXES = (".yaml", ".yml", ".json")


def recipe_argv(path: str) -> list[str]:
    """A YAML or JSON recipe file as command-line tokens: ``key: value`` -> ``--key value`` (dicts as JSON, lists as
    several values, nulls left out), so a recipe parses exactly like the same options typed out."""
    import yaml

    file = Path(path)
    if not file.is_file():
        raise UsageError(f"recipe file not found: {path!r}")
    try:
        text = file.read_text(encoding="utf-8")
        recipe = json.loads(text) if file.suffix.lower() == ".json" else yaml.safe_load(text)
    except (UnicodeDecodeError, json.JSONDecodeError, yaml.YAMLError) as err:
        raise UsageError(f"cannot parse recipe {path!r}: {err}".replace("\n", " ")) from None
    if not isinstance(recipe, dict):
        raise UsageError(f"recipe {path!r} must map option names to values, got {type(recipe).__name__}")
    argv = []
    for key, value in recipe.items():
        if value is None:
            continue
        if isinstance(value, dict):
            argv += [f"--{key}", json.dumps(value)]
        elif isinstance(value, (list, tuple)):
            argv += [f"--{key}", *map(str, value)]
        else:
            argv += [f"--{key}", str(value)]
    return argv


def given_options(argv: list[str]) -> set[str]:
    """The option names on a command line (``--num-train-epochs=3`` -> ``num_train_epochs``)."""
    return {token[2:].split("=", 1)[0].replace("-", "_") for token in argv if token.startswith("--")}


def parse_args(argv: list[str] | None = None):
    """(model, data, run, training arguments, embedded, the option names the user gave)."""
    parser = HfArgumentParser((ModelArguments, DataArguments, RunArguments, VedasTrainingArguments))
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and not argv[0].startswith("-") and argv[0].lower().endswith(RECIPE_SUFFIXES):
        argv = recipe_argv(argv[0]) + argv[1:]
    given = given_options(argv)
    if "output_dir" not in given:
        argv += ["--output_dir", "outputs/vedas-embedded"]
    embedded = "base_model" not in given
    if embedded:  # embedded defaults, still overridable from the command line
        defaults = []
        for key, value in EMBEDDED_TRAINING.items():
            if key not in given:
                defaults += [f"--{key}", json.dumps(value) if isinstance(value, dict) else str(value)]
        argv = defaults + argv
    try:
        model_args, data_args, run_args, training_args = parser.parse_args_into_dataclasses(argv)
    except ValueError as err:  # TrainingArguments' own checks, unknown options
        raise UsageError(str(err)) from None
    return model_args, data_args, run_args, training_args, embedded, given


def curriculum_epochs(args) -> tuple[int, int]:
    """(CoT warm-up epochs, epochs needed to train every stage up to max_latent_stage)."""
    warmup = args.epochs_per_stage if args.cot_warmup_epochs is None else args.cot_warmup_epochs
    return warmup, warmup + args.max_latent_stage * args.epochs_per_stage


def stage_of_epoch(args, epoch: int) -> int:
    warmup, _ = curriculum_epochs(args)
    return 0 if epoch < warmup else min(1 + (epoch - warmup) // args.epochs_per_stage, args.max_latent_stage)


def check_curriculum(args, given: set[str]) -> None:
    """Sets num_train_epochs to the curriculum's length unless given; refuses a given one that cannot reach
    max_latent_stage (the stage that `generate` and evaluation use by default)."""
    warmup, needed = curriculum_epochs(args)
    if "num_train_epochs" not in given:
        args.num_train_epochs = needed
        return
    if args.num_train_epochs < needed:
        last = stage_of_epoch(args, max(math.ceil(args.num_train_epochs) - 1, 0))
        raise UsageError(
            f"--num_train_epochs {args.num_train_epochs:g} ends at curriculum stage {last}, but max_latent_stage is "
            f"{args.max_latent_stage}: the curriculum needs {needed} epochs ({warmup} CoT warm-up + "
            f"{args.max_latent_stage} stages x {args.epochs_per_stage}). Pass --num_train_epochs {needed} (or leave "
            f"it out), or a smaller --max_latent_stage / --epochs_per_stage / --cot_warmup_epochs.")


def check_data_source(flag: str, value: str) -> None:
    """A local data file must exist (a hub name or dataset folder is checked when it is loaded)."""
    path = Path(value).expanduser()
    if path.suffix.lower() in (".json", ".jsonl", ".parquet"):
        if path.is_dir():
            raise UsageError(f"{flag} {value!r} is a directory, not a data file")
        if not path.is_file():
            raise UsageError(f"{flag}: no such data file: {value!r}")


def check_json_option(flag: str, value: str) -> dict:
    try:
        parsed = json.loads(value)
    except json.JSONDecodeError as err:
        raise UsageError(f"{flag} is not valid JSON: {err} in {value!r}") from None
    if not isinstance(parsed, dict):
        raise UsageError(f"{flag} must be a JSON object, got {value!r}")
    return parsed


def check_data_arguments(data_args, args) -> None:
    from vedas_trainer.data import resolve_format

    def resolved(flag, name):
        try:
            return resolve_format(name)
        except ValueError as err:
            raise UsageError(f"{flag}: {err}") from None

    if data_args.dataset != "synthetic":
        if data_args.dataset_format is None:
            raise UsageError(f"--dataset {data_args.dataset!r} needs --dataset_format (m3cot, scienceqa, gqa, "
                             f"onethinker or chat)")
        data_args.dataset_format = resolved("--dataset_format", data_args.dataset_format)
        check_data_source("--dataset", data_args.dataset)
    evaluation = data_args.eval_dataset
    if evaluation is not None and evaluation != "synthetic":
        fmt = data_args.eval_dataset_format or data_args.dataset_format
        if fmt is None:
            raise UsageError(f"--eval_dataset {evaluation!r} needs --eval_dataset_format (or --dataset_format)")
        data_args.eval_dataset_format = resolved("--eval_dataset_format", fmt)
        check_data_source("--eval_dataset", evaluation)
    if evaluation is None and (args.eval_strategy != "no" or args.load_best_model_at_end):
        raise UsageError(f"--eval_strategy {args.eval_strategy.value} / --load_best_model_at_end need --eval_dataset")
    if data_args.image_root is not None and not Path(data_args.image_root).expanduser().is_dir():
        raise UsageError(f"--image_root: no such folder: {data_args.image_root!r}")
    check_json_option("--task_kwargs", data_args.task_kwargs)
    if data_args.n_train < 1 or data_args.n_test < 1:
        raise UsageError(f"--n_train and --n_test must be >= 1, got {data_args.n_train} and {data_args.n_test}")


def check_model_arguments(model_args) -> None:
    base = model_args.base_model
    if base is not None and not Path(base).expanduser().exists() and (
            base.startswith(("/", "./", "../", "~")) or "\\" in base):
        raise UsageError(f"--base_model: no such folder: {base!r}")
    overrides = check_json_option("--vedas_overrides", model_args.vedas_overrides)
    from vedas_trainer.checkpoint import check_overrides, vedas_config_class

    try:
        config_class = vedas_config_class(model_args.backbone, base)  # the backbone's own (its crop unit)
    except ValueError as err:
        raise UsageError(f"--backbone: {err}") from None
    try:  # unknown fields and out-of-range values, before a conversion writes anything
        check_overrides(overrides)
        config_class(**overrides)
    except (TypeError, ValueError) as err:
        raise UsageError(f"--vedas_overrides: {err}") from None


def validate_arguments(model_args, data_args, args, given: set[str]) -> None:
    """Every check that needs no model and no data rows, before anything is built, converted or loaded."""
    check_model_arguments(model_args)
    check_data_arguments(data_args, args)
    check_curriculum(args, given)
    value = args.resume_from_checkpoint
    if value is not None and value.lower() not in ("true", "last") and not Path(value).is_dir():
        raise UsageError(f"--resume_from_checkpoint: no such checkpoint folder: {value!r}")
    if data_args.eval_dataset is not None and args.eval_strategy == "no":
        from transformers.trainer_utils import IntervalStrategy

        args.eval_strategy = IntervalStrategy.EPOCH
        logger.info("--eval_dataset without --eval_strategy: evaluating at the end of every epoch.")


def _launcher_process():
    """(command line, start-up environment) of the `accelerate launch` or `torchrun` process above this one, or
    None. psutil reads a process's environment as it was at its start, before any launcher changed its own."""
    import psutil

    for parent in psutil.Process().parents():
        try:
            cmdline = parent.cmdline()
            head = cmdline[:4]
            names = [os.path.basename(token) for token in head]
            if ("accelerate" in names and "launch" in head) or "accelerate.commands.launch" in head \
                    or "torchrun" in names or "torch.distributed.run" in head:
                return cmdline, parent.environ()
        except (psutil.Error, OSError):
            return None
    return None


def configure_cpu_threads() -> str:
    """On CPU: torch threads per process = usable cores // local processes, unless the user chose a count (see the
    module docstring). Returns the reason, for the log."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    local = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    value = os.environ.get("OMP_NUM_THREADS")
    if value is not None:
        launcher = _launcher_process()
        if launcher is None:
            return f"OMP_NUM_THREADS={value} set by the user"
        cmdline, environ = launcher
        if any(token.lstrip("-").replace("-", "_").startswith("num_cpu_threads_per_process") for token in cmdline):
            return f"--num_cpu_threads_per_process {value} given to the launcher"
        if "OMP_NUM_THREADS" in environ:
            return f"OMP_NUM_THREADS={value} set by the user"
    threads = max(1, cores // max(local, 1))
    torch.set_num_threads(threads)
    os.environ["OMP_NUM_THREADS"] = str(threads)  # for worker processes this one starts
    chosen = "" if value is None else f", replacing the launcher's default OMP_NUM_THREADS={value}"
    return f"{cores} cores // {local} local process(es){chosen}"


def prepare_model(model_args, training_args, embedded, quick):
    """A Vedas model: converted from the given base (or a fresh tiny base) into output_dir/init."""
    out = Path(training_args.output_dir)
    overrides = for_backbone(model_args.backbone, EMBEDDED_VEDAS) if embedded else {}
    overrides.update(json.loads(model_args.vedas_overrides))
    if model_args.num_replay_tokens is not None:
        overrides["num_replay_tokens"] = model_args.num_replay_tokens
    if model_args.recon_weight is not None:
        overrides["recon_weight"] = model_args.recon_weight
    base_dir = Path(out / "base" if embedded else resolve_model_folder(model_args.base_model))  # folder or Hub id
    init_dir = out / "init"
    # the main process builds and converts; the others wait, then load the same folder. All of it whole, outside
    # ZeRO-3's init (which would build empty slices): the Trainer partitions the model when it prepares DeepSpeed.
    with training_args.main_process_first(desc="building and converting the base"), outside_zero3_init():
        if training_args.process_index == 0 and not is_vedas_checkpoint(base_dir):
            if embedded:
                build_tiny_base(model_args.backbone, str(base_dir), seed=training_args.seed,
                                sizes=TinySizes() if quick else EMBEDDED_SIZES)
            convert_base(base_dir, init_dir, overrides=overrides, overwrite=True)
    with outside_zero3_init():
        model, processor = load_vedas(base_dir if is_vedas_checkpoint(base_dir) else init_dir)
    return model.train(), processor


def task_kwargs(data_args) -> dict:
    """Options of the synthetic task (`make_sample`'s defaults are the embedded task)."""
    return json.loads(data_args.task_kwargs)


def load_training_data(data_args, quick):
    if data_args.dataset == "synthetic":
        from vedas_trainer.synthetic import FreshSyntheticDataset, build_synthetic_dataset, scene_hash

        n = min(256, data_args.n_train) if quick else data_args.n_train  # --quick caps, a smaller --n_train wins
        if data_args.fixed_train_set:
            return build_synthetic_dataset(n, seed=data_args.seed_data, split="train", **task_kwargs(data_args))
        # new puzzles every epoch, none of them a test puzzle (the test split evaluate_after and --eval_dataset use)
        test = build_synthetic_dataset(16 if quick else data_args.n_test, seed=data_args.seed_data, split="test",
                                       **task_kwargs(data_args))
        exclude = {scene_hash(test[i]) for i in range(len(test))}
        return FreshSyntheticDataset(n, seed=data_args.seed_data, split="train", exclude=exclude,
                                     **task_kwargs(data_args))
    from vedas_trainer.data import load_vedas_dataset

    return load_vedas_dataset(data_args.dataset, data_args.dataset_format, split="train",
                              image_root=data_args.image_root, skip_bad_rows=data_args.skip_bad_rows)


def load_eval_data(data_args, quick):
    """The --eval_dataset: the embedded task's test split ('synthetic') or a dataset file/name, or None."""
    if data_args.eval_dataset is None:
        return None
    if data_args.eval_dataset == "synthetic":
        from vedas_trainer.synthetic import build_synthetic_dataset

        return build_synthetic_dataset(16 if quick else data_args.n_test, seed=data_args.seed_data, split="test",
                                       **task_kwargs(data_args))
    from vedas_trainer.data import load_vedas_dataset

    return load_vedas_dataset(data_args.eval_dataset, data_args.eval_dataset_format, split="test",
                              image_root=data_args.image_root, skip_bad_rows=data_args.skip_bad_rows)


def warn_if_steps_stop_early(args, train_dataset) -> None:
    """--max_steps that ends before the last curriculum stage: a warning (short smoke runs are legitimate)."""
    if args.max_steps <= 0:
        return
    batches = math.ceil(len(train_dataset) / (args.per_device_train_batch_size * args.world_size))
    steps_per_epoch = max(batches // args.gradient_accumulation_steps, 1)
    _, needed = curriculum_epochs(args)
    last_epoch = math.ceil(args.max_steps / steps_per_epoch) - 1
    if last_epoch < needed - 1:
        logger.warning("--max_steps %d stops in epoch %d, at curriculum stage %d of %d (max_latent_stage): the last "
                       "stages are never trained.", args.max_steps, last_epoch, stage_of_epoch(args, last_epoch),
                       args.max_latent_stage)


def backbone_of(config) -> str:
    """The backbone's model type (qwen2_vl, qwen2_5_vl, qwen3_vl) of a Vedas config, from the transformers class it
    extends."""
    for cls in type(config).__mro__[1:]:
        model_type = getattr(cls, "model_type", "")
        if model_type and model_type != getattr(config, "model_type", None):
            return model_type
    return config.model_type


class KeepWarmupCheckpointCallback(TrainerCallback):
    """`--keep_warmup_checkpoint`: a checkpoint at the end of the last CoT warm-up epoch, kept as
    `output_dir/warmup-checkpoint`. Its learning-rate schedule is the whole run's, so a run resumed from it trains
    the rest of the curriculum exactly as this run does."""

    def __init__(self, warmup_epochs):
        self.warmup_epochs, self.step = warmup_epochs, None

    def on_epoch_end(self, args, state, control, **kwargs):
        if round(state.epoch or 0) == self.warmup_epochs:
            control.should_save = True  # the Trainer saves after the epoch-end callbacks
            self.step = state.global_step

    def on_save(self, args, state, control, **kwargs):
        if state.global_step == self.step and args.should_save:  # the writer process, after the complete save
            keep_checkpoint(Path(args.output_dir) / f"checkpoint-{self.step}",
                            Path(args.output_dir) / WARMUP_CHECKPOINT)
            logger.info("Kept the end of the CoT warm-up (global step %d) as %s", self.step, WARMUP_CHECKPOINT)


def keep_checkpoint(source: Path, target: Path) -> None:
    """`target`: a copy of the checkpoint folder `source` made of hard links (no extra disk; rotating `source` away
    leaves it intact), written under a temporary name and renamed, so it is complete or absent."""
    def link(src, dst):
        try:
            os.link(src, dst)
        except OSError:  # a filesystem without hard links
            shutil.copy2(src, dst)

    staging = target.with_name(f"{target.name}.tmp")
    shutil.rmtree(staging, ignore_errors=True)
    shutil.copytree(source, staging, copy_function=link)
    if target.exists():
        shutil.rmtree(target)
    os.replace(staging, target)


class WarmupEvalCallback(TrainerCallback):
    """Evaluates explicit CoT and No-CoT on the model as it stands at the end of the CoT warm-up (stage 0), before
    the curriculum turns the rationale into latents: that model is the CoT baseline of the same run."""

    def __init__(self, processor, samples, warmup_epochs):
        self.processor, self.samples, self.warmup_epochs = processor, samples, warmup_epochs
        self.results = None

    def on_epoch_end(self, args, state, control, model=None, **kwargs):
        # under ZeRO-3 every rank runs the same evaluation (each module gathers its weights from all ranks)
        collective = is_partitioned(model)
        if self.results is not None or round(state.epoch or 0) != self.warmup_epochs or not (
                state.is_world_process_zero or collective):
            return
        from vedas_trainer.evaluation import evaluate_checkpoint

        was_training = model.training
        model.eval()
        results = evaluate_checkpoint(model, self.processor, self.samples, modes=("nocot", "cot"), batch_size=32)
        model.train(was_training)
        if not state.is_world_process_zero:
            return
        if all("scene" in sample for sample in self.samples):  # the synthetic task: which part of CoT fails
            from vedas_trainer.synthetic import cot_step_reading

            texts = [record["prediction"] for record in results["modes"]["cot"]["predictions"]]
            results["modes"]["cot"]["step_reading"] = cot_step_reading(self.samples, texts)
            logger.info("End of CoT warm-up, CoT steps: %s", results["modes"]["cot"]["step_reading"])
        self.results = results
        logger.info("End of CoT warm-up: %s", {m: r["accuracy"] for m, r in self.results["modes"].items()})


def latent_ablations(model, processor, samples):
    """Inference-time ablations of the trained model: latent mode without replay (K = 0) and without RDS (e = 0)."""
    from vedas_trainer.evaluation import evaluate_checkpoint

    rows = {}
    replay = model.config.num_replay_tokens
    model.config.num_replay_tokens = 0
    try:
        rows["Vedas latent, replay off (K = 0)"] = evaluate_checkpoint(
            model, processor, samples, modes=("latent",), batch_size=32)["modes"]["latent"]
    finally:
        model.config.num_replay_tokens = replay
    gates = {n: p.detach().clone() for n, p in model.named_parameters() if "depth_step_embed" in n}
    try:
        with torch.no_grad():
            for name, param in model.named_parameters():
                if name in gates:
                    param.zero_()
        rows["Vedas latent, RDS off (e = 0)"] = evaluate_checkpoint(
            model, processor, samples, modes=("latent",), batch_size=32)["modes"]["latent"]
    finally:
        with torch.no_grad():
            for name, param in model.named_parameters():
                if name in gates:
                    param.copy_(gates[name])
    return rows


def table1_markdown(warmup_results, final_results, ablations) -> str:
    """The run's Table 1: No-CoT and CoT from the end of the warm-up, Vedas latent (and ablations) at the end."""
    lines = ["| Model / mode | Accuracy (%) | AR steps | Time / sample (ms) |", "|---|---|---|---|"]

    def row(name, metrics):
        lines.append(f"| {name} | {100 * metrics['accuracy']:.1f} | {metrics['avg_ar_steps']:.1f} | "
                     f"{1000 * metrics['avg_seconds_per_sample']:.1f} |")

    if warmup_results:
        row("No-CoT (warm-up model, answer forced at once)", warmup_results["modes"]["nocot"])
        row("Explicit CoT (warm-up model)", warmup_results["modes"]["cot"])
    names = {"nocot": "No-CoT (final model)", "cot": "Explicit CoT (final model)", "latent": "Vedas latent (final)"}
    for mode, metrics in final_results["modes"].items():
        row(names[mode], metrics)
    for name, metrics in ablations.items():
        row(name, metrics)
    return "\n".join(lines) + "\n"


def plot_losses(log_history, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in log_history if "loss" in r]
    if not rows:
        return None
    fig, ax = plt.subplots(figsize=(7, 4))
    steps = [r["step"] for r in rows]
    for key in ("loss", "ce_loss", "recon_loss"):
        values = [r.get(key) for r in rows]
        if any(v is not None for v in values):
            ax.plot(steps, [v if v is not None else float("nan") for v in values], label=key)
    previous = None
    for r in rows:  # the trainer logs `stage` with every training log: mark where it changes
        if previous is not None and r.get("stage", previous) != previous:
            ax.axvline(r["step"], color="grey", lw=0.5)
        previous = r.get("stage", previous)
    ax.set_xlabel("step")
    ax.set_yscale("log")
    ax.legend()
    ax.set_title("Vedas training")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def resume_checkpoint(args) -> str | None:
    """`--resume_from_checkpoint PATH`, or `True` / `last` for the newest complete checkpoint in output_dir."""
    value = args.resume_from_checkpoint
    if value is None or value.lower() not in ("true", "last"):
        return value
    from transformers.trainer_utils import get_last_checkpoint

    last = get_last_checkpoint(args.output_dir) if os.path.isdir(args.output_dir) else None
    if last is None:
        raise FileNotFoundError(f"--resume_from_checkpoint {value}: no checkpoint-N folder in {args.output_dir!r}.")
    logger.info("Resuming from %s", last)
    return last


def parameter_checksum(model) -> tuple[float, str]:
    """(sum of |p|, sha256 of the raw bytes) over all parameters in name order: data-parallel ranks must agree."""
    digest, total = hashlib.sha256(), 0.0
    for name, param in sorted(model.named_parameters()):
        data = param.detach().cpu().contiguous().reshape(-1)
        digest.update(name.encode())
        digest.update(data.view(torch.uint8).numpy().tobytes())
        total += data.double().abs().sum().item()
    return total, digest.hexdigest()


def apply_quick(args) -> None:
    """--quick, a couple of minutes: one epoch per stage, two stages, batch 8 (the test-size model and the few
    samples are chosen where they are built)."""
    args.cot_warmup_epochs, args.epochs_per_stage, args.max_latent_stage = 1, 1, 2
    args.per_device_train_batch_size, args.logging_steps = 8, 4


def setup_run(argv=None):
    """Parses and checks every argument, then loads the data: all before any model is built or converted."""
    model_args, data_args, run_args, args, embedded, given = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    logger.info("rank %d of world size %d (local rank %d, device %s) started", args.process_index, args.world_size,
                args.local_process_index, args.device)
    if args.device.type == "cpu":
        reason = configure_cpu_threads()
        logger.info("CPU threads per process: %d (%s)", torch.get_num_threads(), reason)
    if run_args.quick:
        apply_quick(args)
    validate_arguments(model_args, data_args, args, given)
    if run_args.keep_warmup_checkpoint and curriculum_epochs(args)[0] < 1:
        raise UsageError("--keep_warmup_checkpoint needs a CoT warm-up (--cot_warmup_epochs >= 1)")
    set_seed(args.seed)
    train_dataset = load_training_data(data_args, run_args.quick)
    eval_dataset = load_eval_data(data_args, run_args.quick)
    warn_if_steps_stop_early(args, train_dataset)
    return model_args, data_args, run_args, args, embedded, train_dataset, eval_dataset


def build_trainer(model_args, args, model, processor, train_dataset, eval_dataset, callbacks):
    collator = VedasCollator(processor, model.config, **args.collator_kwargs())
    if model_args.lora:
        from peft import get_peft_model

        with outside_zero3_init():  # whole until the Trainer partitions it (PEFT's own ZeRO-3 path is CUDA-only)
            model = get_peft_model(model, lora_config_for(
                model, r=model_args.lora_r, alpha=model_args.lora_alpha, dropout=model_args.lora_dropout,
                target_modules=tuple(model_args.lora_target_modules.split(",")),
            ))
    metrics = {} if eval_dataset is None else {
        "eval_dataset": eval_dataset, "compute_metrics": answer_accuracy_metrics(processor.tokenizer),
        "preprocess_logits_for_metrics": preprocess_logits_for_metrics}
    # the curriculum callback is added by VedasTrainer from the arguments
    return VedasTrainer(model=model, args=args, train_dataset=train_dataset, data_collator=collator,
                        callbacks=callbacks, **metrics)


def training_record(trainer, args, model_config) -> dict:
    """What the run did: epochs planned and run, the last curriculum stage, parameters, evaluations."""
    epochs_run = trainer.state.epoch or 0.0
    last_stage = trainer.data_collator.stage
    if last_stage < args.max_latent_stage:
        logger.warning("Training ended at curriculum stage %d of %d (max_latent_stage) after %.2f epochs.",
                       last_stage, args.max_latent_stage, epochs_run)
    record = {
        "backbone": backbone_of(model_config), "epochs": args.num_train_epochs, "epochs_run": epochs_run,
        "global_steps": trainer.state.global_step, "last_stage": last_stage,
        "max_latent_stage": args.max_latent_stage, "curriculum_complete": last_stage >= args.max_latent_stage,
        "parameters": getattr(trainer, "parameter_summary", None),
    }
    evaluations = [entry for entry in trainer.state.log_history if "eval_loss" in entry]
    if evaluations:
        record["evaluations"] = evaluations
        record["best_model_checkpoint"] = trainer.state.best_model_checkpoint
    return record


def main(argv=None):
    started = time.time()
    model_args, data_args, run_args, args, embedded, train_dataset, eval_dataset = setup_run(argv)
    quick = run_args.quick
    push_repo = training_push_target(args)  # checked before any work; the Trainer's own pushes are turned off
    model, processor = prepare_model(model_args, args, embedded, quick)
    warmup, _ = curriculum_epochs(args)
    test_samples = None
    if run_args.evaluate_after and data_args.dataset == "synthetic":
        from vedas_trainer.synthetic import build_synthetic_dataset

        test = build_synthetic_dataset(16 if quick else data_args.n_test, seed=data_args.seed_data, split="test",
                                       **task_kwargs(data_args))
        test_samples = [test[i] for i in range(len(test))]
    callbacks = [WarmupEvalCallback(processor, test_samples, warmup)] if test_samples and not model_args.lora else []
    keep = [KeepWarmupCheckpointCallback(warmup)] if run_args.keep_warmup_checkpoint else []
    trainer = build_trainer(model_args, args, model, processor, train_dataset, eval_dataset, callbacks + keep)
    trainer.train(resume_from_checkpoint=resume_checkpoint(args))
    # every rank logs the checksum of the full weights (gathered under ZeRO-3): data-parallel replicas must agree
    total, digest, values = full_parameter_checksum(trainer.model)
    logger.info("rank %d parameter checksum %.6f sha256 %s (global step %d)", args.process_index, total, digest,
                trainer.state.global_step)
    logger.info("rank %d checksummed %d parameter values", args.process_index, values)
    try:
        final = final_model(trainer, model_args)  # every rank takes part (ZeRO-3 gathers); whole on the main process
        if trainer.is_world_process_zero():
            record = training_record(trainer, args, model.config)
            with outside_zero3_init():  # the whole model generates alone (no `synced_gpus` waiting for other ranks)
                final_dir = write_outputs(trainer, final, processor, model_args, data_args, run_args, args, embedded,
                                          test_samples, callbacks, record, started, len(train_dataset))
            if push_repo:  # a push that cannot happen (offline, no network) prints why and the command to push later
                push_after_training(final_dir, push_repo, token=args.hub_token, private=bool(args.hub_private_repo))
    finally:
        # after the last collective every rank destroys its process group: a gloo process that exits with the group
        # alive can abort in the interpreter's teardown ("terminate called without an active exception", SIGABRT),
        # and the launcher then kills the main process in the middle of writing its outputs
        trainer.accelerator.end_training()
        if args.world_size > 1:
            logger.info("rank %d destroyed its process group", args.process_index)


def final_model(trainer, model_args):
    """The trained model, whole, for the main process to evaluate and save (LoRA merged). Under ZeRO-3 a whole copy
    built from the gathered weights (every rank must call this; the other ranks get None), refused if any weight
    came back empty."""
    if not is_partitioned(trainer.model):
        return trainer.model.merge_and_unload() if model_args.lora else trainer.model
    state_dict = gathered_state_dict(trainer)
    if not trainer.is_world_process_zero():
        return None
    empty = empty_tensors(state_dict)
    if empty:
        raise RuntimeError(f"the gathered final weights have {len(empty)} empty tensors, e.g. {empty[:3]}")
    final = whole_copy(trainer.accelerator.unwrap_model(trainer.model), state_dict)
    return final.merge_and_unload() if model_args.lora else final


def write_outputs(trainer, final, processor, model_args, data_args, run_args, args, embedded, test_samples,
                  callbacks, record, started, n_train):
    """Rank 0: the final evaluation, Table 1, the loss curve, `checkpoint-final`, pictures and `report.json`."""
    out = Path(args.output_dir)
    final_dir = out / "checkpoint-final"
    results_md = None
    report = {"train_seconds": time.time() - started, **record, "world_size": args.world_size,
              "args": {"model": asdict(model_args), "data": asdict(data_args), "run": asdict(run_args)}}
    if test_samples:
        results_md = final_table(final, processor, test_samples, callbacks, out, report)
    curve = plot_losses(trainer.state.log_history, out / "loss_curve.png")
    warmup, _ = curriculum_epochs(args)
    setup = (f"{'Tiny ' + model_args.backbone + ' base built from scratch' if embedded else model_args.base_model}; "
             f"{n_train} training samples; {warmup} CoT warm-up epoch(s) then {args.max_latent_stage} "
             f"latent stages of {args.epochs_per_stage} epoch(s); lr {args.learning_rate}, batch "
             f"{args.per_device_train_batch_size} x {args.world_size} process(es).")
    save_vedas_checkpoint(final, processor, final_dir, card_context={
        "setup": setup, "results": results_md, "base_model": model_args.base_model})
    if test_samples:  # a few pictures of what the latent steps replay (like the paper's figures 5-6)
        from visualize import visualize  # examples/visualize.py, next to this script

        report["pictures"] = [str(p) for p in visualize(
            final_dir, [0, 1, 2], out / "pictures", n_test=len(test_samples), seed=data_args.seed_data,
            task_kwargs=task_kwargs(data_args))]
    report["wall_seconds"] = time.time() - started
    (out / "report.json").write_text(json.dumps(report, indent=2, default=str))
    logger.info("Checkpoint: %s; loss curve: %s", final_dir, curve)
    if results_md:
        print(results_md)
    print(f"Total wall time: {report['wall_seconds']:.0f} s")
    return final_dir


def final_table(final, processor, test_samples, callbacks, out, report) -> str:
    """Table 1 of the embedded run (final modes, inference ablations, the warm-up model's CoT) into `report`."""
    from vedas_trainer.evaluation import evaluate_checkpoint, save_results

    final.eval()
    results = evaluate_checkpoint(final, processor, test_samples, batch_size=32)
    save_results(results, out, title="Vedas embedded default")
    ablations = latent_ablations(final, processor, test_samples)
    warmup_results = callbacks[0].results if callbacks else None
    results_md = table1_markdown(warmup_results, results, ablations)
    (out / "table1.md").write_text(results_md)

    def strip(metrics):
        return {k: v for k, v in metrics.items() if k != "predictions"}

    report["results"] = {mode: strip(metrics) for mode, metrics in results["modes"].items()}
    report["ablations"] = {name: strip(metrics) for name, metrics in ablations.items()}
    if warmup_results:
        report["warmup_results"] = {m: strip(r) for m, r in warmup_results["modes"].items()}
    return results_md


def run(argv=None) -> int:
    """The entry point: the project's own errors (bad arguments, data rows, checkpoints, a non-finite loss) end in
    one line on stderr and exit status 2, not a traceback (under `accelerate launch -q`, accelerate adds none)."""
    try:
        main(argv)
    except USER_ERRORS as err:
        world = int(os.environ.get("WORLD_SIZE", "1"))
        rank = f"[rank {os.environ.get('RANK', '0')}] " if world > 1 else ""
        print(f"train.py: error: {rank}{err}", file=sys.stderr, flush=True)
        error_file = os.environ.get("TORCHELASTIC_ERROR_FILE")
        if error_file:  # torchrun's failure summary then shows this message instead of "To enable traceback see"
            try:
                with open(error_file, "w") as file:
                    json.dump({"message": {"message": f"{type(err).__name__}: {err}",
                                           "extraInfo": {"timestamp": str(int(time.time()))}}}, file)
            except OSError:
                pass
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(run())
