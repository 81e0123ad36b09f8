"""Does a cell's visual token tell its arrow's direction? A linear probe on the embedded task's visual tokens.

For each checkpoint: the vision tower's merged tokens (one per 28-px cell) of ``--n_images`` synthetic boards, a
linear classifier for the cell's direction and one for its colour (trained on 3/4 of the cells, accuracy on the
other 1/4), and the share of the tokens' variance that lies between the classes' means. If the probe reads the
direction and explicit CoT does not, the language model is what fails to read it (docs/reproducibility.md,
diagnosis 2).

    python benchmarks/visual_probe.py RUN/checkpoint-400 RUN/checkpoint-1400 [--task '{"arrow_placement": "centred"}']
"""

import argparse
import json

import torch

from vedas_trainer.checkpoint import load_vedas
from vedas_trainer.synthetic import COLOURS, DIRECTIONS, make_sample


@torch.no_grad()
def cell_tokens(model, processor, n_images: int, task: dict) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(tokens (cells, hidden), direction index (cells,), colour index (cells,)) over ``n_images`` boards."""
    tokens, directions, colours = [], [], []
    for i in range(n_images):
        sample = make_sample(f"probe-{i}", **task)
        inputs = processor.image_processor(images=sample["images"], return_tensors="pt")
        features = model.model.get_image_features(inputs["pixel_values"], inputs["image_grid_thw"])
        features = getattr(features, "pooler_output", features)
        tokens.append(torch.cat(list(features)) if isinstance(features, (tuple, list)) else features)
        for row in sample["scene"]["cells"]:  # row-major, like the merged tokens
            for colour, direction in row:
                directions.append(list(DIRECTIONS).index(direction))
                colours.append(list(COLOURS).index(colour))
    return torch.cat(tokens).float(), torch.tensor(directions), torch.tensor(colours)


def probe_accuracy(x: torch.Tensor, y: torch.Tensor, classes: int, steps: int = 800) -> float:
    """Held-out accuracy of a linear classifier on standardised ``x`` (train on the first 3/4)."""
    torch.manual_seed(0)
    x = (x - x.mean(0)) / (x.std(0) + 1e-6)
    n = len(y) * 3 // 4
    linear = torch.nn.Linear(x.shape[1], classes)
    optimizer = torch.optim.Adam(linear.parameters(), lr=1e-2)
    for _ in range(steps):
        optimizer.zero_grad()
        torch.nn.functional.cross_entropy(linear(x[:n]), y[:n]).backward()
        optimizer.step()
    return (linear(x[n:]).argmax(-1) == y[n:]).float().mean().item()


def between_class_share(x: torch.Tensor, y: torch.Tensor) -> float:
    """Share of the tokens' total variance that lies between the class means (how loud the feature is)."""
    mean = x.mean(0)
    means = torch.stack([x[y == c].mean(0) for c in y.unique()])
    weights = torch.stack([(y == c).float().mean() for c in y.unique()])
    return ((weights[:, None] * (means - mean) ** 2).sum() / ((x - mean) ** 2).mean(0).sum()).item()


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("checkpoints", nargs="+")
    parser.add_argument("--n_images", type=int, default=600)
    parser.add_argument("--task", default="{}", help="make_sample keywords (JSON), as train.py's --task_kwargs")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    results = []
    for checkpoint in args.checkpoints:
        model, processor = load_vedas(checkpoint)
        model.eval()
        x, directions, colours = cell_tokens(model, processor, args.n_images, json.loads(args.task))
        with torch.enable_grad():
            result = {"checkpoint": checkpoint, "cells": len(directions),
                      "direction_probe_accuracy": probe_accuracy(x, directions, len(DIRECTIONS)),
                      "colour_probe_accuracy": probe_accuracy(x, colours, len(COLOURS)),
                      "direction_variance_share": between_class_share(x, directions),
                      "colour_variance_share": between_class_share(x, colours)}
        print(json.dumps(result))
        results.append(result)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
