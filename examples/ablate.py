"""Retrained ablations: train and evaluate Vedas variants from the same base, data, budget and seeds.

    python examples/ablate.py --quick                                  # CI: full and no_scfvr x seeds 0, 1, tiny runs
    python examples/ablate.py --out runs/ablation                      # every variant x 3 seeds, embedded default
    python examples/ablate.py --variants core --out runs/abl-lookback --task_kwargs '{"preset": "lookback"}'
    python examples/ablate.py --variants full,no_rds,no_scfvr --out runs/abl-m3cot \\
        --launcher "accelerate launch --config_file examples/configs/multi_gpu_ddp.yaml" \\
        --test_data /data/m3cot/test.jsonl \\
        --base_model /models/Qwen2-VL-2B-Instruct --dataset /data/m3cot/train.jsonl --dataset_format m3cot --bf16

Every option that ablate.py does not define is a train.py option: it goes unchanged to every run (a train.py recipe
file may come first). Each run is `<launcher> examples/train.py <those options> --output_dir OUT/runs/VARIANT/seedS
--seed S` plus the variant's options, so a run trains exactly as train.py does under the same launcher (default: this
Python; `--launcher "accelerate launch ..."` for several processes or GPUs). Run ablate.py itself with plain python.

Shared CoT warm-up (`--shared_warmup`, the default for the embedded task; `--no_shared_warmup` turns it off): the CoT
warm-up (stage 0) runs no latent step, so a variant that changes only the latent phase trains the same model there
as full. Each seed's `full` run keeps its checkpoint at the end of the warm-up (`train.py --keep_warmup_checkpoint`:
OUT/runs/full/seedS/warmup-checkpoint), evaluated here in the CoT and No-CoT modes on the test samples, and those
variants continue from it (`--resume_from_checkpoint`: weights, optimizer, the learning-rate schedule of the whole
run, RNG), training the latent phase only, exactly as if they had trained the warm-up themselves. The RDS variants
(no_rds, literal_eq11, alpha*) change stage 0 too, since routing depth scaling runs in every forward pass: they are
trained from scratch. Refused with `--uniform_prob` > 0 (latent samples during the warm-up),
`--load_best_model_at_end`, `--deepspeed` / `--fsdp`, or without a warm-up.

Variants (`--variants`, comma-separated names or the groups all, core, sweeps; `full` is always run):

    full                  the shared options
    no_rds                routing_layers = []                     (no routing depth scaling)
    no_scfvr              num_replay_tokens = 0, recon_weight = 0 (no visual replay, λ = 0)
    no_distill            recon_weight = 0                        (replay kept, no self-distillation)
    no_curriculum         --skip_curriculum True                  (every step latent from the first latent epoch)
    sequential_positions  replay_positions = "sequential"
    soft_mix              replay_mode = "soft_mix"
    literal_eq11          depth_residual = "literal"              (Eq. 11 as printed, every token scaled by 1 + e(d))
    K<k>, W<w>, alpha<a>  num_replay_tokens, window_size, routing_topk swept over --sweep_k / --sweep_window /
                          --sweep_alpha

Each finished run is evaluated here in the latent mode on the test samples (the synthetic test split as train.py
builds it, or `--test_data`), with replay grounding on synthetic data, and its record written to
`OUT/runs/VARIANT/seedS/ablation_result.json`. A run whose record exists is not trained again (resume: run the same
command); a run that has `checkpoint-final` but no record is only evaluated; a run with intermediate checkpoints only
continues with `--resume_from_checkpoint last`. Records made with other options (or with / without the shared
warm-up) are refused, so an output folder holds one study. The study is written to OUT/ablation.md, ablation.json
and ablation.png: mean and std of the accuracy over seeds, the paired difference against full with a 95% bootstrap
interval over test samples, the grounding, and the CoT and No-CoT accuracy of each seed's warm-up.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
RESULT = "ablation_result.json"
WARMUP_RESULT = "warmup_result.json"  # beside full's record: the CoT / No-CoT evaluation of its warm-up checkpoint
# how a run's fingerprint names the warm-up checkpoint it resumes from (the output folder may move)
SHARED_WARMUP = "<the seed's shared warm-up>"
QUICK_VARIANTS, QUICK_SEEDS, QUICK_N_TRAIN, QUICK_N_TEST = "full,no_scfvr", [0, 1], 64, 32
# train.py options that ablate.py sets per run
RESERVED = {"output_dir": "--out", "seed": "--seeds", "evaluate_after": None, "resume_from_checkpoint": None,
            "keep_warmup_checkpoint": None}


def _values(kind):
    def parse(text):
        try:
            values = [kind(v) for v in text.split(",") if v.strip()]
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected comma-separated {kind.__name__}s, got {text!r}") from None
        if not values or min(values) <= 0:
            raise argparse.ArgumentTypeError(f"expected positive values, got {text!r}")
        return values
    return parse


def parse_cli(argv=None):
    """(ablate.py's options, the train.py options passed through)."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                     allow_abbrev=False)
    parser.add_argument("--variants", default=None, help="names or groups (all, core, sweeps); default all")
    parser.add_argument("--seeds", type=int, nargs="+", default=None, help="training seeds (default 0 1 2)")
    parser.add_argument("--out", default="runs/ablation", help="output folder of the study")
    parser.add_argument("--quick", action="store_true", help="CI: full and no_scfvr, seeds 0 1, train.py --quick "
                                                             f"with {QUICK_N_TRAIN} training samples")
    parser.add_argument("--launcher", default="python", help="command that runs train.py (default: this Python)")
    shared = parser.add_mutually_exclusive_group()
    shared.add_argument("--shared_warmup", action="store_true", default=None,
                        help="train the CoT warm-up once per seed and start every variant's latent phase from its "
                             "checkpoint (default for the embedded task, without --base_model)")
    shared.add_argument("--no_shared_warmup", dest="shared_warmup", action="store_false",
                        help="train every run from scratch")
    parser.add_argument("--sweep_k", type=_values(int), default=[1, 4], help="K values (default 1,4)")
    parser.add_argument("--sweep_window", type=_values(int), default=[1, 3], help="W values (default 1,3)")
    parser.add_argument("--sweep_alpha", type=_values(float), default=[0.125, 0.5], help="α values (default .125,.5)")
    parser.add_argument("--test_data", default=None, help="test file or dataset name (default: the synthetic split)")
    parser.add_argument("--test_format", default=None, help="its format (default: train.py's --dataset_format)")
    parser.add_argument("--test_split", default="test")
    parser.add_argument("--n_test", type=int, default=None,
                        help=f"test samples (default: train.py's --n_test for synthetic data, {QUICK_N_TEST} with "
                             "--quick, all rows of --test_data)")
    parser.add_argument("--eval_batch_size", type=int, default=32)
    parser.add_argument("--bootstrap", type=int, default=10000, help="bootstrap resamples of the test samples")
    parser.add_argument("--keep_checkpoints", action="store_true",
                        help="keep each run's intermediate checkpoints and converted base (default: keep only "
                             "checkpoint-final)")
    parser.add_argument("--verbose", action="store_true", help="show train.py's output (default: each run's train.log)")
    parser.add_argument("--dry_run", action="store_true", help="check every run's options, print the commands, stop")
    parser.add_argument("--report_only", action="store_true",
                        help="write the reports from the runs finished so far, training and evaluating nothing (a "
                             "study over several sittings; safe while another ablate.py trains into --out)")
    args, passthrough = parser.parse_known_args(argv)
    if "WORLD_SIZE" in os.environ or "LOCAL_RANK" in os.environ:
        parser.error("run ablate.py with plain python; give the launcher of the runs as --launcher \"accelerate "
                     "launch ...\"")
    import train

    for name in train.given_options(passthrough):
        if name in RESERVED:
            hint = f"; use {RESERVED[name]}" if RESERVED[name] else ""
            parser.error(f"--{name} is set by ablate.py for every run{hint}")
    if args.n_test is not None and args.n_test < 1 or args.eval_batch_size < 1 or args.bootstrap < 100:
        parser.error("--n_test and --eval_batch_size must be >= 1, --bootstrap >= 100")
    if args.quick:
        args.variants = args.variants or QUICK_VARIANTS
        args.seeds = args.seeds or QUICK_SEEDS
        recipe = passthrough[:1] if passthrough and not passthrough[0].startswith("-") else []  # stays first
        passthrough = recipe + ["--quick"] + ([] if "n_train" in train.given_options(passthrough)
                                              else ["--n_train", str(QUICK_N_TRAIN)]) + passthrough[len(recipe):]
    args.variants, args.seeds = args.variants or "all", args.seeds or [0, 1, 2]
    if len(set(args.seeds)) != len(args.seeds):
        parser.error(f"--seeds must differ, got {args.seeds}")
    return parser, args, passthrough


# ----------------------------------------------------------------------------------------------------- the runs
def run_options(passthrough, base_overrides, variant, seed, run_dir, start=None) -> list[str]:
    """train.py's options for one run: the shared ones, then the variant's (later options win in train.py), and
    the warm-up checkpoint `start` it continues from, if any."""
    merged = {**base_overrides, **variant.overrides}
    options = list(passthrough)
    for key in ("num_replay_tokens", "recon_weight"):  # train.py's own flags win over --vedas_overrides
        if key in merged:
            options += [f"--{key}", json.dumps(merged.pop(key))]
    options += ["--vedas_overrides", json.dumps(merged, sort_keys=True), *variant.train_options,
                "--seed", str(seed), "--evaluate_after", "False"]
    if start is not None:
        options += ["--resume_from_checkpoint", str(start)]
    return options + ["--output_dir", str(run_dir)]


class Layout:
    """Where the runs of a study go, OUT/runs/VARIANT/seedS, and their train.py options. With `shared`, full keeps
    its warm-up checkpoint and the variants that share the warm-up continue from their seed's."""

    def __init__(self, out: Path, passthrough, base_overrides, shared: bool = False):
        self.out, self.passthrough, self.base, self.shared = out, passthrough, base_overrides, shared

    def run_dir(self, variant, seed) -> Path:
        return self.out / "runs" / variant.name / f"seed{seed}"

    def warmup_checkpoint(self, seed) -> Path:
        import train

        return self.out / "runs" / "full" / f"seed{seed}" / train.WARMUP_CHECKPOINT

    def continues_warmup(self, variant) -> bool:
        return self.shared and variant.shares_warmup and variant.name != "full"

    def options(self, variant, seed) -> list[str]:
        options = run_options(self.passthrough, self.base, variant, seed, self.run_dir(variant, seed),
                              self.warmup_checkpoint(seed) if self.continues_warmup(variant) else None)
        if self.shared and variant.name == "full":
            options[-2:-2] = ["--keep_warmup_checkpoint", "True"]  # before --output_dir, the last option
        return options


def check_runs(plan, run_options_of) -> dict:
    """Every run's options parsed and checked by train.py's own checks before any training (one-line errors);
    returns (variant, seed) -> (training arguments, data arguments, whether it is the embedded default)."""
    import train

    checked = {}
    for variant, seed in plan:
        options = run_options_of(variant, seed)
        try:
            model_args, data_args, run_args, args, embedded, given = train.parse_args(options)
            if run_args.quick:  # as train.py does before its checks: the curriculum of the runs
                train.apply_quick(args)
            train.validate_arguments(model_args, data_args, args, given)
        except train.USER_ERRORS as err:
            raise SystemExit(f"ablate.py: error: variant {variant.name}: {err}") from None
        checked[(variant.name, seed)] = (args, data_args, embedded)
    return checked


def shared_warmup_problem(training_args) -> str | None:
    """Why the variants of a seed cannot share full's CoT warm-up (None when they can): the warm-up must exist and
    train the same model for every variant that continues it."""
    import train

    if train.curriculum_epochs(training_args)[0] < 1:
        return "the runs have no CoT warm-up (--cot_warmup_epochs 0)"
    if training_args.uniform_prob > 0:
        return "--uniform_prob > 0 trains latent stages during the warm-up, where the variants differ"
    if training_args.load_best_model_at_end:
        return "--load_best_model_at_end would pick among evaluations of the shared warm-up's model"
    if training_args.deepspeed or training_args.fsdp:  # their own checkpoint formats: continuing one is untested
        return "it is untested under DeepSpeed and FSDP"
    return None


def choose_shared_warmup(parser, args, checked) -> bool:
    """--shared_warmup / --no_shared_warmup, else on for the embedded default when nothing rules it out (a real
    base may run under a DeepSpeed or FSDP launcher config, which ablate.py cannot see)."""
    training_args, _, embedded = checked[("full", args.seeds[0])]
    problem = shared_warmup_problem(training_args)
    if args.shared_warmup and problem:
        parser.error(f"--shared_warmup: {problem}")
    return args.shared_warmup if args.shared_warmup is not None else embedded and problem is None


def base_overrides_of(passthrough) -> dict:
    """The VedasConfig overrides the shared options set (--vedas_overrides, --num_replay_tokens, --recon_weight)."""
    import train

    try:
        model_args = train.parse_args(passthrough)[0]
    except train.USER_ERRORS as err:
        raise SystemExit(f"ablate.py: error: {err}") from None
    overrides = train.check_json_option("--vedas_overrides", model_args.vedas_overrides)
    for key in ("num_replay_tokens", "recon_weight"):
        if getattr(model_args, key) is not None:
            overrides[key] = getattr(model_args, key)
    return overrides


def train_run(launcher, options, run_dir: Path, verbose: bool) -> tuple[bool, float, str]:
    """Runs train.py once; returns (success, seconds, the last error line)."""
    run_dir.mkdir(parents=True, exist_ok=True)
    if not (run_dir / "report.json").is_file() and any(run_dir.glob("checkpoint-[0-9]*")):
        options = options + ["--resume_from_checkpoint", "last"]  # an interrupted run continues
    command = ([sys.executable] if launcher == "python" else shlex.split(launcher)) + [str(HERE / "train.py")]
    start = time.time()
    with open(run_dir / "train.log", "a") as log:
        log.write(f"$ {shlex.join(command + options)}\n")
        log.flush()
        stream = None if verbose else log
        code = subprocess.run(command + options, stdout=stream, stderr=subprocess.STDOUT if stream else None).returncode
    seconds = time.time() - start
    if code == 0 and (run_dir / "checkpoint-final").is_dir():
        return True, seconds, ""
    lines = (run_dir / "train.log").read_text(errors="replace").splitlines()
    errors = [line for line in lines if "error" in line.lower()]
    return False, seconds, (errors or lines or ["no output"])[-1].strip()


def clean_run(run_dir: Path) -> None:
    """Keeps checkpoint-final, the logs and the report; drops intermediate checkpoints and the converted base."""
    for path in run_dir.iterdir():
        if path.is_dir() and (re.fullmatch(r"checkpoint-\d+", path.name) or path.name in ("base", "init")):
            shutil.rmtree(path)


def fingerprint(options) -> list[str]:
    """A run's train.py options without its output folder, the warm-up checkpoint it starts from named by its role:
    what must match for a record to be reused."""
    kept = []
    for i, option in enumerate(options):
        previous = options[i - 1] if i else None
        if "--output_dir" not in (option, previous):
            kept.append(SHARED_WARMUP if previous == "--resume_from_checkpoint" else option)
    return kept


def check_previous(plan, options_of, run_dir_of) -> None:
    """Refuses an output folder whose runs were made with other train.py options (before any training)."""
    for variant, seed in plan:
        stamp = run_dir_of(variant, seed) / "ablation_run.json"
        if not stamp.is_file():
            continue
        before, now = json.loads(stamp.read_text())["train_options"], fingerprint(options_of(variant, seed))
        if before != now:
            hint = ""
            shared = [any(mark in options for mark in (SHARED_WARMUP, "--keep_warmup_checkpoint"))
                      for options in (before, now)]
            if shared[0] != shared[1]:
                hint = " (with the shared CoT warm-up, this call without)" if shared[0] else \
                    " (without the shared CoT warm-up, this call with)"
            raise SystemExit(f"ablate.py: error: {stamp.parent} was trained with other train.py options{hint} (see "
                             f"{stamp.name}); use another --out or remove that run")


# ----------------------------------------------------------------------------------------------------- evaluation
def load_test(args, data_args, quick):
    """(test samples, their description): the synthetic test split as train.py builds it, or --test_data."""
    from vedas_trainer.evaluation import load_samples

    if args.test_data is None:
        if data_args.dataset != "synthetic":
            raise SystemExit("ablate.py: error: a --dataset other than synthetic needs --test_data (and "
                             "--test_format when it differs from --dataset_format)")
        n = args.n_test or (QUICK_N_TEST if quick else data_args.n_test)
        kwargs = json.loads(data_args.task_kwargs)
        spec = {"data": "synthetic", "split": "test", "n": n, "seed": data_args.seed_data, "task_kwargs": kwargs}
        return load_samples("synthetic", n=n, seed=data_args.seed_data, task_kwargs=kwargs), spec
    fmt = args.test_format or data_args.dataset_format
    if fmt is None:
        raise SystemExit("ablate.py: error: --test_data needs --test_format (or train.py's --dataset_format)")
    from vedas_trainer.data import DataError, resolve_format

    spec = {"data": args.test_data, "format": resolve_format(fmt), "split": args.test_split, "n": args.n_test}
    try:
        samples = load_samples(args.test_data, n=args.n_test, split=args.test_split, format=spec["format"],
                               image_root=data_args.image_root)
    except (DataError, OSError, ValueError) as err:
        raise SystemExit(f"ablate.py: error: --test_data: {err}") from None
    return samples, spec


def evaluate_run(run_dir: Path, samples, training_args, batch_size: int) -> dict:
    """The latent mode on the test samples (with replay grounding on synthetic data): the run's record."""
    import torch

    from vedas_trainer.evaluation import evaluate_checkpoint, load_model_and_processor

    report = json.loads((run_dir / "report.json").read_text())
    model, processor = load_model_and_processor(run_dir / "checkpoint-final",
                                                device="cuda" if torch.cuda.is_available() else None)
    start = time.time()
    results = evaluate_checkpoint(model, processor, samples, modes=("latent",), batch_size=batch_size,
                                  progress=False, max_latent_stage=report.get("max_latent_stage"),
                                  latents_per_step=training_args.latents_per_step)
    latent = results["modes"]["latent"]
    grounding = results.get("grounding")
    return {
        "accuracy": latent["accuracy"], "num_samples": latent["num_samples"],
        "ids": [p["id"] for p in latent["predictions"]], "correct": [bool(p["correct"]) for p in latent["predictions"]],
        "avg_ar_steps": latent["avg_ar_steps"], "latent_steps": latent["latent_steps"],
        "grounding": None if grounding is None else {k: v for k, v in grounding.items() if k != "samples"},
        "eval_seconds": time.time() - start, "train_seconds": report.get("wall_seconds"),
        "global_steps": report.get("global_steps"), "last_stage": report.get("last_stage"),
    }


def evaluate_warmup(checkpoint: Path, samples, batch_size: int) -> dict:
    """The warm-up model in the CoT and No-CoT modes on the test samples: its accuracy and per-sample correctness."""
    import logging

    import torch

    from vedas_trainer.checkpoint import load_vedas
    from vedas_trainer.evaluation import evaluate_checkpoint

    quiet = logging.getLogger("vedas_trainer.checkpoint")
    level = quiet.level
    quiet.setLevel(logging.ERROR)  # it would warn that a Trainer checkpoint has no remote-code files: not needed here
    try:
        model, processor = load_vedas(checkpoint)
    finally:
        quiet.setLevel(level)
    if torch.cuda.is_available():
        model = model.to("cuda")
    start = time.time()
    results = evaluate_checkpoint(model, processor, samples, modes=("nocot", "cot"), batch_size=batch_size,
                                  progress=False)
    record = {"eval_seconds": time.time() - start}
    for mode, metrics in results["modes"].items():
        record[mode] = {"accuracy": metrics["accuracy"], "num_samples": metrics["num_samples"],
                        "avg_ar_steps": metrics["avg_ar_steps"],
                        "correct": [bool(p["correct"]) for p in metrics["predictions"]]}
    return record


# ----------------------------------------------------------------------------------------------------- the study
def finished_record(path: Path, test_spec) -> dict | None:
    """A run's (or a warm-up's) record when it exists and was evaluated on the same test samples."""
    if not path.is_file():
        return None
    record = json.loads(path.read_text())
    return record if record.get("test") == test_spec else None


def one_warmup(run_dir: Path, seed, samples, test_spec, batch_size: int):
    """The CoT and No-CoT evaluation of full's warm-up checkpoint in `run_dir`, reused when done on the same test
    samples; None when the run kept no warm-up checkpoint. Returns (record or None, whether reused)."""
    import train

    result, checkpoint = run_dir / WARMUP_RESULT, run_dir / train.WARMUP_CHECKPOINT
    record = finished_record(result, test_spec)
    if record is not None:
        return record, True
    if not checkpoint.is_dir():
        return None, False
    state = json.loads((checkpoint / "trainer_state.json").read_text())
    record = {"seed": seed, "checkpoint": checkpoint.name, "test": test_spec, "global_steps": state["global_step"],
              "epochs": state["epoch"], **evaluate_warmup(checkpoint, samples, batch_size)}
    result.write_text(json.dumps(record, indent=1) + "\n")
    return record, False


def one_run(variant, seed, options, run_dir, args, samples, test_spec, training_args):
    """A run's record: reused when present with the same options and test samples, else trained and evaluated.
    Returns (record or None, whether it was reused, the error line)."""
    result = run_dir / RESULT
    record = finished_record(result, test_spec)
    if record is not None:
        return record, True, ""
    if not ((run_dir / "checkpoint-final").is_dir() and (run_dir / "report.json").is_file()):
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "ablation_run.json").write_text(json.dumps({"train_options": fingerprint(options)}, indent=1))
        ok, _, message = train_run(args.launcher, options, run_dir, args.verbose)
        if not ok:
            return None, False, message
    record = {"variant": variant.name, "seed": seed, "train_options": fingerprint(options), "test": test_spec,
              **evaluate_run(run_dir, samples, training_args, args.eval_batch_size)}
    result.write_text(json.dumps(record, indent=1) + "\n")
    if not args.keep_checkpoints:
        clean_run(run_dir)
    return record, False, ""


def run_study(plan, layout, args, samples, test_spec, checked):
    """Every run of the plan, with a progress bar (full first, which keeps the warm-up the others may continue);
    returns ({(variant, seed): record}, {seed: warm-up record}, reused count, failures). With `--report_only`, only
    the finished records (the others count as failures: not run yet)."""
    from tqdm.auto import tqdm

    runs, warmups, reused, failed = {}, {}, 0, []
    bar = tqdm(plan, desc="ablation runs", unit="run")
    for variant, seed in bar:
        bar.set_postfix_str(f"{variant.name} seed {seed}")
        run_dir = layout.run_dir(variant, seed)
        if args.report_only:
            record = finished_record(run_dir / RESULT, test_spec)
            if record is None:
                failed.append(f"{variant.name}/seed{seed}")
                continue
            runs[(variant.name, seed)], reused = record, reused + 1
            warmup = finished_record(run_dir / WARMUP_RESULT, test_spec) if variant.name == "full" else None
            if warmup is not None:
                warmups[seed] = warmup
            continue
        if layout.continues_warmup(variant) and not layout.warmup_checkpoint(seed).is_dir():
            failed.append(f"{variant.name}/seed{seed}")
            tqdm.write(f"ablate.py: {variant.name} seed {seed} not run: no warm-up checkpoint "
                       f"{layout.warmup_checkpoint(seed)} (did full seed {seed} fail?)")
            continue
        record, was_reused, message = one_run(variant, seed, layout.options(variant, seed), run_dir, args, samples,
                                              test_spec, checked[(variant.name, seed)][0])
        if record is None:
            failed.append(f"{variant.name}/seed{seed}")
            tqdm.write(f"ablate.py: {variant.name} seed {seed} failed: {message} (log: {run_dir / 'train.log'})")
            continue
        reused += was_reused
        runs[(variant.name, seed)] = record
        bar.write(f"{variant.name} seed {seed}: latent accuracy {100 * record['accuracy']:.1f}%"
                  + (" (done earlier)" if was_reused else ""))
        if layout.shared and variant.name == "full":
            warmup, _ = one_warmup(run_dir, seed, samples, test_spec, args.eval_batch_size)
            if warmup is not None:
                warmups[seed] = warmup
                bar.write(f"full seed {seed}, end of the CoT warm-up: CoT {100 * warmup['cot']['accuracy']:.1f}%, "
                          f"No-CoT {100 * warmup['nocot']['accuracy']:.1f}%")
    return runs, warmups, reused, failed


def chance_level(data_args, test_spec) -> float | None:
    """Chance accuracy of the embedded task (1 / colours); None for other data."""
    if test_spec["data"] != "synthetic":
        return None
    from vedas_trainer.synthetic import expand_task_kwargs

    return 1.0 / expand_task_kwargs(json.loads(data_args.task_kwargs)).get("n_colours", 4)


def print_plan(plan, layout, launcher) -> None:
    """--dry_run: every train.py command of the study, in order."""
    command = ([sys.executable] if launcher == "python" else shlex.split(launcher)) + [str(HERE / "train.py")]
    if layout.shared:
        print("# shared CoT warm-up: full keeps its checkpoint at the end of the warm-up (--keep_warmup_checkpoint), "
              "the variants that change only the latent phase continue it (--resume_from_checkpoint), the RDS "
              "variants train from scratch")
    for variant, seed in plan:
        print(shlex.join(command + layout.options(variant, seed)))


def main(argv=None) -> int:
    parser, args, passthrough = parse_cli(argv)
    from vedas_trainer.ablation import build_variants, select_variants, summarize_runs, warmup_summary, write_reports

    try:
        chosen = select_variants(args.variants, build_variants(args.sweep_k, args.sweep_window, args.sweep_alpha))
    except ValueError as err:
        parser.error(str(err))
    out = Path(args.out)
    layout = Layout(out, passthrough, base_overrides_of(passthrough))
    plan = [(variant, seed) for variant in chosen for seed in args.seeds]
    # checked without the warm-up options, which ablate.py sets (train.py's checks want the checkpoint to exist)
    checked = check_runs(plan, layout.options)
    layout.shared = choose_shared_warmup(parser, args, checked)
    check_previous(plan, layout.options, layout.run_dir)
    if args.dry_run:
        print_plan(plan, layout, args.launcher)
        return 0
    data_args = checked[("full", args.seeds[0])][1]
    samples, test_spec = load_test(args, data_args, args.quick)
    started = time.time()
    runs, warmups, reused, failed = run_study(plan, layout, args, samples, test_spec, checked)
    table = summarize_runs(chosen, runs, args.bootstrap)
    setup = {"seeds": args.seeds, "variants": [v.name for v in chosen], "train_options": shlex.join(passthrough),
             "launcher": args.launcher, "test_data": test_spec["data"], "test": test_spec,
             "num_test_samples": len(samples), "n_boot": args.bootstrap, "level": 0.95, "quick": args.quick,
             "shared_warmup": layout.shared, "warmup": warmup_summary(warmups), "missing": failed,
             "runs_reused": reused, "wall_seconds": time.time() - started}
    paths = write_reports(out, table, setup, chance_level(data_args, test_spec))
    print(paths["markdown"].read_text())
    print("Wrote " + ", ".join(str(p) for p in paths.values()) + f" ({len(runs) - reused} run(s) trained or "
          f"evaluated now, {reused} done earlier, {len(failed)} {'not run yet' if args.report_only else 'failed'}; "
          f"{time.time() - started:.0f} s)")
    return 1 if failed and not args.report_only else 0


if __name__ == "__main__":
    sys.exit(main())
