"""Train Vedas with the curriculum: `accelerate launch examples/train.py [options]`.

With no arguments it runs the embedded default on CPU: it builds a tiny Qwen2-VL base from scratch, converts it,
trains it on the built-in "follow the arrows" task (CoT warm-up, then the curriculum to full latent), evaluates
No-CoT / CoT / Vedas latent on the test split, and writes a Hub-ready checkpoint, a results report and a loss curve.

On a real base and dataset, for example:

    accelerate launch --config_file examples/configs/deepspeed_zero2.yaml examples/train.py \
        --base_model /models/Qwen2-VL-7B-Instruct --dataset /data/m3cot/train.jsonl --dataset_format m3cot \
        --output_dir runs/vedas-m3cot --num_train_epochs 16 --epochs_per_stage 4 --learning_rate 4e-5 \
        --per_device_train_batch_size 8 --bf16 --lora --recon_weight 0.2
"""

import hashlib
import json
import logging
import os
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from transformers import HfArgumentParser, TrainerCallback, set_seed

from vedas_trainer.checkpoint import convert_base, is_vedas_checkpoint, load_vedas, save_vedas_checkpoint
from vedas_trainer.collator import VedasCollator
from vedas_trainer.tiny_base import TinySizes, build_tiny_base
from vedas_trainer.trainer import VedasTrainer, VedasTrainingArguments, lora_config_for


logger = logging.getLogger("vedas.train")


@dataclass
class ModelArguments:
    base_model: str | None = field(
        default=None, metadata={"help": "Base Qwen2-VL/Qwen2.5-VL folder or a Vedas checkpoint. Default: a tiny base "
                                        "built from scratch (the embedded default)."}
    )
    backbone: str = field(default="qwen2_vl", metadata={"help": "Tiny base backbone: qwen2_vl or qwen2_5_vl."})
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
    dataset_format: str | None = field(default=None, metadata={"help": "m3cot, scienceqa, gqa or onethinker."})
    image_root: str | None = None
    eval_dataset: str | None = None
    skip_bad_rows: bool = False
    n_train: int = 3200
    n_test: int = 300
    task_kwargs: str = field(default="{}", metadata={"help": "JSON options of the synthetic task (make_sample keywords), "
                                                             "e.g. '{\"grid\": 4, \"mc_prob\": 0.0}'."})
    seed_data: int = 0


@dataclass
class RunArguments:
    quick: bool = field(default=False, metadata={"help": "A ~2 minute smoke run of the embedded default (CI)."})
    evaluate_after: bool = field(default=True, metadata={"help": "Evaluate No-CoT / CoT / latent after training."})


EMBEDDED_SIZES = TinySizes(
    hidden_size=128, intermediate_size=512, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
    mrope_section=[6, 5, 5], vision_depth=2, vision_embed_dim=128, vision_heads=4, vision_mlp_ratio=2,
)
EMBEDDED_VEDAS = {"num_replay_tokens": 2, "routing_topk": 0.25, "crop_resolution": 56, "window_size": 2,
                  "num_latent_steps": 4}
EMBEDDED_TRAINING = dict(
    epochs_per_stage=1, cot_warmup_epochs=12, max_latent_stage=4, learning_rate=2e-3, adam_beta2=0.98,
    weight_decay=0.05, warmup_steps=100, lr_scheduler_type="cosine_with_min_lr", lr_scheduler_kwargs={"min_lr_rate": 0.1},
    max_grad_norm=1.0, per_device_train_batch_size=32, logging_steps=10, save_strategy="epoch", save_total_limit=2,
    report_to="none", dataloader_num_workers=0, remove_unused_columns=False, use_cpu=not torch.cuda.is_available(),
)


def parse_args():
    parser = HfArgumentParser((ModelArguments, DataArguments, RunArguments, VedasTrainingArguments))
    argv = sys.argv[1:]
    if not any(a.startswith("--output_dir") for a in argv):
        argv += ["--output_dir", "outputs/vedas-embedded"]
    embedded = "--base_model" not in " ".join(argv)
    if embedded:  # embedded defaults, still overridable from the command line
        defaults = []
        for key, value in EMBEDDED_TRAINING.items():
            if f"--{key}" not in argv:
                defaults += [f"--{key}", json.dumps(value) if isinstance(value, dict) else str(value)]
        argv = defaults + argv
    model_args, data_args, run_args, training_args = parser.parse_args_into_dataclasses(argv)
    return model_args, data_args, run_args, training_args, embedded


def prepare_model(model_args, training_args, embedded, quick):
    """A Vedas model: converted from the given base (or a fresh tiny base) into output_dir/init."""
    out = Path(training_args.output_dir)
    overrides = dict(EMBEDDED_VEDAS) if embedded else {}
    overrides.update(json.loads(model_args.vedas_overrides))
    if model_args.num_replay_tokens is not None:
        overrides["num_replay_tokens"] = model_args.num_replay_tokens
    if model_args.recon_weight is not None:
        overrides["recon_weight"] = model_args.recon_weight
    base_dir = Path(out / "base" if embedded else model_args.base_model)
    init_dir = out / "init"
    # the main process builds and converts; the others wait, then load the same folder
    with training_args.main_process_first(desc="building and converting the base"):
        if training_args.process_index == 0 and not is_vedas_checkpoint(base_dir):
            if embedded:
                build_tiny_base(model_args.backbone, str(base_dir), seed=training_args.seed,
                                sizes=TinySizes() if quick else EMBEDDED_SIZES)
            convert_base(base_dir, init_dir, overrides=overrides, overwrite=True)
    model, processor = load_vedas(base_dir if is_vedas_checkpoint(base_dir) else init_dir)
    return model.train(), processor


def task_kwargs(data_args) -> dict:
    """Options of the synthetic task (`make_sample`'s defaults are the embedded task)."""
    return json.loads(data_args.task_kwargs)


def load_training_data(data_args, quick):
    if data_args.dataset == "synthetic":
        from vedas_trainer.synthetic import build_synthetic_dataset

        n = min(256, data_args.n_train) if quick else data_args.n_train  # --quick caps, a smaller --n_train wins
        return build_synthetic_dataset(n, seed=data_args.seed_data, split="train", **task_kwargs(data_args))
    from vedas_trainer.data import load_vedas_dataset

    return load_vedas_dataset(data_args.dataset, data_args.dataset_format, split="train",
                              image_root=data_args.image_root, skip_bad_rows=data_args.skip_bad_rows)


class WarmupEvalCallback(TrainerCallback):
    """Evaluates explicit CoT and No-CoT on the model as it stands at the end of the CoT warm-up (stage 0), before
    the curriculum turns the rationale into latents: that model is the CoT baseline of the same run."""

    def __init__(self, processor, samples, warmup_epochs):
        self.processor, self.samples, self.warmup_epochs = processor, samples, warmup_epochs
        self.results = None

    def on_epoch_end(self, args, state, control, model=None, **kwargs):
        if self.results is not None or round(state.epoch or 0) != self.warmup_epochs or not state.is_world_process_zero:
            return
        from vedas_trainer.evaluation import evaluate_checkpoint

        was_training = model.training
        model.eval()
        self.results = evaluate_checkpoint(model, self.processor, self.samples, modes=("nocot", "cot"), batch_size=32)
        model.train(was_training)
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


def main():
    started = time.time()
    model_args, data_args, run_args, args, embedded = parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    logger.info("rank %d of world size %d (local rank %d, device %s) started", args.process_index, args.world_size,
                args.local_process_index, args.device)
    quick = run_args.quick
    if quick:  # a couple of minutes: the test-size model, few samples, one epoch per stage, two stages
        args.cot_warmup_epochs, args.epochs_per_stage, args.max_latent_stage = 1, 1, 2
        args.per_device_train_batch_size, args.logging_steps = 8, 4
    set_seed(args.seed)
    model, processor = prepare_model(model_args, args, embedded, quick)
    train_dataset = load_training_data(data_args, quick)
    collator = VedasCollator(processor, model.config, **args.collator_kwargs())
    if model_args.lora:
        from peft import get_peft_model

        model = get_peft_model(model, lora_config_for(
            model, r=model_args.lora_r, alpha=model_args.lora_alpha, dropout=model_args.lora_dropout,
            target_modules=tuple(model_args.lora_target_modules.split(",")),
        ))
    warmup = args.epochs_per_stage if args.cot_warmup_epochs is None else args.cot_warmup_epochs
    total_epochs = warmup + args.max_latent_stage * args.epochs_per_stage
    epochs_given = any(a == "--num_train_epochs" or a.startswith("--num_train_epochs=") for a in sys.argv)
    if embedded or not epochs_given:  # by default: exactly through the last stage
        args.num_train_epochs = total_epochs
    test_samples = None
    if run_args.evaluate_after and data_args.dataset == "synthetic":
        from vedas_trainer.synthetic import build_synthetic_dataset

        test = build_synthetic_dataset(16 if quick else data_args.n_test, seed=data_args.seed_data, split="test",
                                       **task_kwargs(data_args))
        test_samples = [test[i] for i in range(len(test))]
    callbacks = [WarmupEvalCallback(processor, test_samples, warmup)] if test_samples and not model_args.lora else []
    # the curriculum callback is added by VedasTrainer from the arguments
    trainer = VedasTrainer(model=model, args=args, train_dataset=train_dataset, data_collator=collator,
                           callbacks=callbacks)
    trainer.train(resume_from_checkpoint=resume_checkpoint(args))
    # every rank logs its own weights' checksum: data-parallel replicas must end identical
    total, digest = parameter_checksum(trainer.model)
    logger.info("rank %d parameter checksum %.6f sha256 %s (global step %d)", args.process_index, total, digest,
                trainer.state.global_step)

    out = Path(args.output_dir)
    final_dir = out / "checkpoint-final"
    if trainer.is_world_process_zero():
        final = trainer.model.merge_and_unload() if model_args.lora else trainer.model
        results_md = None
        report = {"train_seconds": time.time() - started, "epochs": total_epochs, "world_size": args.world_size,
                  "args": {"model": asdict(model_args), "data": asdict(data_args), "run": asdict(run_args)}}
        if test_samples:
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
        curve = plot_losses(trainer.state.log_history, out / "loss_curve.png")
        setup = (f"{'Tiny ' + model_args.backbone + ' base built from scratch' if embedded else model_args.base_model}; "
                 f"{len(train_dataset)} training samples; {warmup} CoT warm-up epoch(s) then {args.max_latent_stage} "
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
        if args.push_to_hub and args.hub_model_id:
            from vedas_trainer.hub import push_checkpoint

            push_checkpoint(final_dir, args.hub_model_id, token=args.hub_token)


if __name__ == "__main__":
    main()
