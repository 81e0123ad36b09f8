"""Pictures of what Vedas looks at, like the paper's figures 5 and 6.

    python examples/visualize.py CHECKPOINT --sample 3 [--out DIR]                     # the embedded task's test split
    python examples/visualize.py CHECKPOINT --sample 0 5 --data test.jsonl --format m3cot [--image-root DIR]

For one test sample it writes `sample_<N>.png`: one column per latent step with (top) the image, the replayed visual
tokens shaded by their replay weight and the dense W x W crop window drawn, and (bottom) the first routing layer's
router scores over the tokens of that step's forward (the prompt for step 1, then the replayed tokens and the latent),
selected tokens marked. On the embedded task a dashed yellow box marks the true cell of each step: the cell that the
CoT step replaced by that latent step names (pass the training run's `--max-latent-stage` when it is not T), and the
panel title says whether replay (R) and the crop window (W) hit it. `--data` is `synthetic` (the default; pass the training run's `--seed` and `--task-kwargs`) or a
local JSON/JSONL/parquet file or dataset name in `--format` (as for evaluate.py); `--sample` indexes its `--split`.
"""

import argparse
import json
import sys
from pathlib import Path

import torch


def trace_sample(model, processor, sample):
    from vedas_trainer.prompting import build_prompt

    prompt = build_prompt(processor, sample["question"], sample.get("choices"), num_images=len(sample["images"]))
    inputs = processor(text=[prompt], images=sample["images"], return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=16, do_sample=False, return_dict_in_generate=True,
                             output_latent_trace=True)
    answer = processor.batch_decode(out.sequences[:, inputs["input_ids"].shape[1]:], skip_special_tokens=True)[0]
    grid = inputs["image_grid_thw"][0].tolist()
    merge = model.config.vision_config.spatial_merge_size
    return out.latent_trace, (grid[1] // merge, grid[2] // merge), answer


def true_cells(sample, steps, max_latent_stage=None, latents_per_step=1):
    """Per latent step, the board cells its CoT step names (empty lists without a synthetic scene)."""
    from vedas_trainer.evaluation import step_target_cells

    if not sample.get("scene"):
        return [[] for _ in range(steps)]
    return step_target_cells(sample, steps, max_latent_stage, latents_per_step)


def _mark_true_cells(ax, sample, cells, image):
    """Dashed yellow boxes on the board cells in `cells` (board coordinates, not visual-token coordinates)."""
    import matplotlib.patches as patches

    board = int(sample["scene"]["grid_size"])
    size_h, size_w = image.height / board, image.width / board
    for row, col in cells:
        ax.add_patch(patches.Rectangle((col * size_w, row * size_h), size_w, size_h, fill=False,
                                       edgecolor="yellow", linestyle="--", linewidth=2))


def grounding_steps(sample, trace, grid_hw, max_latent_stage=None, latents_per_step=1):
    """{t: the step's grounding record} (replay_hit, window_hit, ...) of a synthetic sample; {} otherwise."""
    from vedas_trainer.evaluation import trace_grounding

    if not sample.get("scene") or not trace:
        return {}
    records = trace_grounding([sample], trace, [grid_hw], max_latent_stage, latents_per_step)
    return {step["t"]: step for step in records[0]["steps"]}


def _hit_label(step):
    """'R hit, W miss'-style summary of a step's grounding record, or '' when the step was not scored."""
    if step is None:
        return ""
    window = "" if step["window_hit"] is None else f", W {'hit' if step['window_hit'] else 'miss'}"
    return f"\nR {'hit' if step['replay_hit'] else 'miss'}{window}"


def draw(sample, trace, grid_hw, answer, path, targets=None, grounding=None):
    """One column per latent step; `targets` (per step, the true board cells) and `grounding` ({t: record}) mark
    the truth on the embedded task."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.patches as patches
    import matplotlib.pyplot as plt

    image = sample["images"][0]
    steps = max(len(trace), 1)
    fig, axes = plt.subplots(2, steps, figsize=(3.2 * steps, 6), squeeze=False)
    gh, gw = grid_hw
    cell_h, cell_w = image.height / gh, image.width / gw
    for t, step in enumerate(trace):
        ax = axes[0, t]
        ax.imshow(image)
        indices = step.get("replay_indices")
        if indices is not None:
            weights = step["replay_weights"][0]
            top = float(weights.max()) if weights.numel() else 1.0
            for index, weight in zip(indices[0].tolist(), weights.tolist()):
                if index < 0:
                    continue
                row, col = divmod(index, gw)
                ax.add_patch(patches.Rectangle((col * cell_w, row * cell_h), cell_w, cell_h, color="magenta",
                                               alpha=0.15 + 0.5 * weight / max(top, 1e-9)))
            window = step.get("crop_window", [None])[0]
            if window is not None:
                _, r0, r1, c0, c1 = window
                ax.add_patch(patches.Rectangle((c0 * cell_w, r0 * cell_h), (c1 - c0) * cell_w, (r1 - r0) * cell_h,
                                               fill=False, edgecolor="lime", linewidth=2))
        cells = targets[t] if targets else []
        if cells:
            _mark_true_cells(ax, sample, cells, image)
        ax.set_title(f"latent step {t + 1}{_hit_label((grounding or {}).get(t + 1))}", fontsize=9)
        ax.axis("off")
        ax = axes[1, t]
        scores = step.get("router_scores") or {}
        if scores:
            key = sorted(scores)[0]
            values, selected = scores[key]
            values, selected = values[0].float(), selected[0]
            ax.bar(range(len(values)), values.tolist(), color=["tab:red" if s else "tab:grey" for s in selected.tolist()])
            ax.set_title(f"router L{key[0]} (red: second pass)", fontsize=8)
            ax.set_ylim(0, 1)
        ax.set_xlabel("token of this step's forward", fontsize=8)
    legend = "magenta: replayed tokens, green: crop window" + (", yellow dashes: true cell" if targets else "")
    fig.suptitle(f"{sample['question'][:90]}\npredicted: {answer.strip()!r}   answer: {sample['answer']!r}\n{legend}",
                 fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def load_test_samples(sample_indices, n_test=300, seed=0, task_kwargs=None, data="synthetic", format=None,
                      split="test", image_root=None):
    """The samples to draw: the synthetic test split as training built it, or the first rows of a dataset."""
    needed = max(sample_indices) + 1
    if data == "synthetic":
        from vedas_trainer.synthetic import build_synthetic_dataset

        return build_synthetic_dataset(max(n_test, needed), seed=seed, split="test", **dict(task_kwargs or {}))
    from vedas_trainer.data import DataError
    from vedas_trainer.evaluation import load_samples

    samples = load_samples(data, n=needed, split=split, format=format, image_root=image_root)
    if len(samples) < needed:
        raise DataError(f"--sample {needed - 1} is out of range: {data!r} has {len(samples)} sample(s)")
    return samples


def visualize(checkpoint, sample_indices, out_dir, n_test=300, seed=0, task_kwargs=None, data="synthetic",
              format=None, split="test", image_root=None, max_latent_stage=None, latents_per_step=1):
    from vedas_trainer.evaluation import load_model_and_processor

    test = load_test_samples(sample_indices, n_test, seed, task_kwargs, data, format, split, image_root)
    model, processor = load_model_and_processor(checkpoint)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for index in sample_indices:
        sample = test[index]
        trace, grid_hw, answer = trace_sample(model, processor, sample)
        targets = true_cells(sample, len(trace), max_latent_stage, latents_per_step)
        grounding = grounding_steps(sample, trace, grid_hw, max_latent_stage, latents_per_step)
        paths.append(draw(sample, trace, grid_hw, answer, out_dir / f"sample_{index}.png", targets, grounding))
    return paths


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint")
    parser.add_argument("--sample", type=int, nargs="+", default=[0])
    parser.add_argument("--out", default=None, help="defaults to CHECKPOINT/../pictures")
    parser.add_argument("--n-test", type=int, default=300, help="size of the synthetic test split (as in training)")
    parser.add_argument("--seed", type=int, default=0, help="the training run's --seed_data")
    parser.add_argument("--task-kwargs", default="{}", help="the training run's --task_kwargs (JSON)")
    parser.add_argument("--data", default="synthetic", help="'synthetic' or a dataset file/dir/name")
    parser.add_argument("--format", default=None, help="dataset format (required unless synthetic), as in evaluate.py")
    parser.add_argument("--split", default="test")
    parser.add_argument("--image-root", default=None, help="folder that relative image paths resolve against")
    parser.add_argument("--max-latent-stage", type=int, default=None,
                        help="the training run's max_latent_stage, to find each step's true cell (default: T)")
    parser.add_argument("--latents-per-step", type=int, default=1, help="the training run's latents_per_step")
    args = parser.parse_args(argv)
    if args.data != "synthetic" and args.format is None:
        parser.error("--format is required when --data is not 'synthetic'")
    if min(args.sample) < 0:
        parser.error(f"--sample must be >= 0, got {min(args.sample)}")
    out = args.out or str(Path(args.checkpoint).resolve().parent / "pictures")
    from vedas_trainer.checkpoint import CheckpointError
    from vedas_trainer.data import DataError

    try:
        paths = visualize(args.checkpoint, args.sample, out, args.n_test, args.seed, json.loads(args.task_kwargs),
                          args.data, args.format, args.split, args.image_root, args.max_latent_stage,
                          args.latents_per_step)
    except (DataError, CheckpointError) as err:
        print(f"visualize.py: error: {err}", file=sys.stderr, flush=True)
        return 2
    for path in paths:
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
