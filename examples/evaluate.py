"""Table-1 evaluation of a Vedas checkpoint: No-CoT vs explicit CoT vs Vedas latent on the same test split.

    python examples/evaluate.py CHECKPOINT --data synthetic --n 200
    python examples/evaluate.py CHECKPOINT --data m3cot_test.jsonl --format m3cot --split test --out eval/m3cot

For each mode it reports accuracy (the local ``metrics/vedas_accuracy`` evaluate module), the average AR steps
(latent steps + generated tokens up to and including the end token) and the average wall time per sample (batched
generation time / batch size). Writes ``results.json``, ``results.md`` and ``predictions.jsonl`` to ``--out``.
For ``--data synthetic`` pass the training run's ``--seed`` and ``--task-kwargs`` to get its test split
(``'{"preset": "lookback"}'`` names a preset of ``vedas_trainer.synthetic.TASK_PRESETS``).

On synthetic data the latent mode also reports replay grounding: for every latent step, whether the replayed visual
tokens (and the dense crop window) hold the cell that the CoT step it replaced names, beside the chance level (K /
visual tokens; the window's share of the grid), per step and overall, in ``results.md`` / ``results.json`` and per
sample in ``grounding.jsonl``. Latent step t stands for CoT chunk (t - 1) // c of the rationale merged into
``--max-latent-stage`` chunks: pass the training run's ``--max_latent_stage`` and ``--latents_per_step`` (defaults: T
and 1, the embedded default's curriculum).

The default ``--out`` is unique per checkpoint and data: ``<run folder>/eval/<checkpoint name>-<data>-<split>-n<N>``
next to a local checkpoint (``runs/m3cot/checkpoint-final`` -> ``runs/m3cot/eval/checkpoint-final-test-test-n200``
for ``--data test.jsonl``), ``eval_results/<owner>--<name>/<data>-<split>-n<N>`` for a Hub id. Existing results are
never overwritten without ``--overwrite``. Bad arguments, data rows and checkpoints end in one line on stderr and exit
status 2.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import sys


# `python examples/x.py` puts examples/ first on sys.path, where this file shadows the Hugging Face `evaluate`
# library. Run as a script: drop examples/ from the path before anything imports `evaluate`. Imported by accident as
# `evaluate` (another script in examples/ doing `import evaluate`): hand the importer the real library instead.
_HERE = os.path.dirname(os.path.abspath(__file__))
_WITHOUT_HERE = [p for p in sys.path if os.path.abspath(p or os.curdir) != _HERE]
if __name__ == "__main__":
    sys.path[:] = _WITHOUT_HERE
elif __name__ == "evaluate":
    _saved_path, sys.path[:] = list(sys.path), _WITHOUT_HERE
    del sys.modules[__name__]
    try:
        sys.modules[__name__] = importlib.import_module("evaluate")  # the import statement returns this entry
    finally:
        sys.path[:] = _saved_path


def format_name(value: str) -> str:
    """--format, case-insensitively (`M3CoT`), with the adapters' aliases."""
    from vedas_trainer.data import resolve_format

    try:
        return resolve_format(value)
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from None


def default_out(checkpoint: str, data: str, split: str, n: int) -> str:
    """`<run folder>/eval/<checkpoint name>-<data>-<split>-n<N>` (a Hub id: `eval_results/<owner>--<name>/...`)."""
    data_name = "synthetic" if data == "synthetic" else os.path.splitext(os.path.basename(os.path.normpath(data)))[0]
    run = f"{data_name}-{split}-n{n}"
    path = os.path.normpath(checkpoint)
    if os.path.isdir(path):
        return os.path.join(os.path.dirname(os.path.abspath(path)), "eval", f"{os.path.basename(path)}-{run}")
    return os.path.join("eval_results", checkpoint.replace("/", "--"), run)


def check_synthetic_options(parser, args) -> None:
    """--task-kwargs (a JSON object, a known preset) and the curriculum that maps latent steps to CoT steps."""
    if not isinstance(args.task_kwargs, dict):
        parser.error(f"--task-kwargs must be a JSON object, got {args.task_kwargs!r}")
    from vedas_trainer.synthetic import expand_task_kwargs

    try:
        expand_task_kwargs(args.task_kwargs)
    except ValueError as err:
        parser.error(f"--task-kwargs: {err}")
    if args.latents_per_step < 1 or (args.max_latent_stage is not None and args.max_latent_stage < 1):
        parser.error("--max-latent-stage and --latents-per-step must be >= 1")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    from vedas_trainer.evaluation import DEFAULT_MAX_NEW_TOKENS, MODES

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint", help="Vedas checkpoint folder or Hub repo id")
    parser.add_argument("--data", required=True, help="'synthetic' (the embedded task) or a dataset file/dir/name")
    parser.add_argument("--format", type=format_name,
                        help="dataset format: m3cot, scienceqa, gqa, onethinker or chat (required unless synthetic)")
    parser.add_argument("--split", default="test")
    parser.add_argument("--n", type=int, default=200, help="number of samples (the first n of the split)")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--modes", default=",".join(MODES), help=f"comma-separated subset of {','.join(MODES)}")
    parser.add_argument("--out", default=None,
                        help="output folder (default: <run folder>/eval/<checkpoint name>-<data>-<split>-n<N>)")
    parser.add_argument("--overwrite", action="store_true", help="replace results already in the output folder")
    parser.add_argument("--num-latent-steps", type=int, default=None, help="T of the latent mode (default: config)")
    parser.add_argument("--max-new-tokens", type=int, default=None,
                        help=f"budget of the answer modes (default: nocot {DEFAULT_MAX_NEW_TOKENS['nocot']}, "
                             f"latent {DEFAULT_MAX_NEW_TOKENS['latent']})")
    parser.add_argument("--max-cot-tokens", type=int, default=DEFAULT_MAX_NEW_TOKENS["cot"],
                        help="budget of the explicit CoT mode")
    parser.add_argument("--seed", type=int, default=0, help="seed of the synthetic splits")
    parser.add_argument("--task-kwargs", type=json.loads, default={},
                        help='synthetic task settings as JSON, e.g. \'{"grid": 5}\'')
    parser.add_argument("--image-root", default=None, help="folder that relative image paths resolve against")
    parser.add_argument("--skip-bad-rows", action="store_true", help="drop invalid dataset rows instead of failing")
    parser.add_argument("--no-progress", action="store_true", help="disable the progress bars")
    parser.add_argument("--no-grounding", action="store_true", help="skip the replay grounding of synthetic data")
    parser.add_argument("--max-latent-stage", type=int, default=None,
                        help="the training run's max_latent_stage, for grounding (default: T)")
    parser.add_argument("--latents-per-step", type=int, default=1,
                        help="the training run's latents_per_step c, for grounding (default 1)")
    args = parser.parse_args(argv)
    args.modes = [mode.strip() for mode in args.modes.split(",") if mode.strip()]
    unknown = [mode for mode in args.modes if mode not in MODES]
    if unknown or not args.modes:
        parser.error(f"--modes must be a comma-separated subset of {','.join(MODES)}, got {unknown or 'nothing'}")
    if args.data != "synthetic" and args.format is None:
        parser.error("--format is required when --data is not 'synthetic'")
    if args.n < 1 or args.batch_size < 1:
        parser.error("--n and --batch-size must be >= 1")
    check_synthetic_options(parser, args)
    if args.data != "synthetic" and os.path.splitext(args.data)[1].lower() in (".json", ".jsonl", ".parquet") \
            and not os.path.isfile(args.data):
        parser.error(f"--data: no such data file: {args.data!r}")
    local = args.checkpoint.startswith(("/", ".", "~")) or args.checkpoint.count("/") != 1  # not "owner/name"
    if local and not os.path.isdir(args.checkpoint):
        parser.error(f"no such checkpoint folder: {args.checkpoint!r}")
    if args.image_root is not None and not os.path.isdir(args.image_root):
        parser.error(f"--image-root: no such folder: {args.image_root!r}")
    args.out = args.out or default_out(args.checkpoint, args.data, args.split, args.n)
    if os.path.exists(os.path.join(args.out, "results.json")) and not args.overwrite:
        parser.error(f"{args.out!r} already holds results.json; pass --overwrite to replace it, or another --out")
    return args


def main(argv: list[str] | None = None) -> int:
    """Runs the evaluation; the project's own errors (a bad data row, a broken checkpoint) end in one line on stderr
    and exit status 2, like argparse's."""
    from vedas_trainer.checkpoint import CheckpointError
    from vedas_trainer.data import DataError

    args = parse_args(argv)
    try:
        return evaluate(args)
    except (DataError, CheckpointError) as err:
        print(f"evaluate.py: error: {err}", file=sys.stderr, flush=True)
        return 2


def evaluate(args: argparse.Namespace) -> int:
    from vedas_trainer.evaluation import evaluate_checkpoint, load_model_and_processor, load_samples, save_results

    dataset_kwargs = {"image_root": args.image_root, "skip_bad_rows": args.skip_bad_rows} if args.format else {}
    samples = load_samples(args.data, n=args.n, split=args.split, format=args.format, seed=args.seed,
                           task_kwargs=args.task_kwargs, **dataset_kwargs)
    model, processor = load_model_and_processor(args.checkpoint)
    budgets = {"nocot": args.max_new_tokens, "cot": args.max_cot_tokens, "latent": args.max_new_tokens}
    results = evaluate_checkpoint(
        model, processor, samples, modes=args.modes, batch_size=args.batch_size, max_new_tokens=budgets,
        num_latent_steps=args.num_latent_steps, progress=not args.no_progress,
        grounding=False if args.no_grounding else None, max_latent_stage=args.max_latent_stage,
        latents_per_step=args.latents_per_step,
    )
    results.update(checkpoint=str(args.checkpoint), data=str(args.data), format=args.format, split=args.split)
    out = args.out
    title = f"{os.path.basename(os.path.normpath(args.checkpoint))} on {args.data} ({args.split})"
    paths = save_results(results, out, title=title)
    print(paths["markdown"].read_text())
    print("Wrote " + ", ".join(str(path) for path in paths.values()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
