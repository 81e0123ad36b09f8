"""Save a PNG gallery of the embedded "follow the arrows" task, to eyeball images and their text.

    python examples/task_gallery.py --out /tmp/gallery --n 8

Writes ``DIR/task_gallery.png``: each panel shows one sample's image with its question, CoT steps
and answer. Extra options are passed to ``make_sample`` (``--grid``, ``--distractor-prob``, ...).
"""

from __future__ import annotations

import argparse
import math
import textwrap
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # headless: no display on CI or training machines
import matplotlib.pyplot as plt  # noqa: E402

from vedas_trainer.synthetic import make_sample  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True, help="output directory")
    parser.add_argument("--n", type=int, default=8, help="number of samples")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--grid", type=int, default=3)
    parser.add_argument("--distractor-prob", type=float, default=0.05)
    args = parser.parse_args()

    cols = min(4, args.n)
    rows = math.ceil(args.n / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 6.2 * rows), squeeze=False)
    for i, ax in enumerate(axes.flat):
        ax.axis("off")
        if i >= args.n:
            continue
        sample = make_sample(args.seed * 100_003 + i, grid=args.grid, distractor_prob=args.distractor_prob)
        # Nearest-neighbour keeps the 28 px cells crisp: what the model sees, not a blurred version.
        ax.imshow(sample["images"][0], interpolation="nearest")
        text = "\n".join(
            [textwrap.fill(sample["question"], 46), ""]
            + [textwrap.fill(step, 46) for step in sample["steps"]]
            + ["", f"answer : {sample['answer']}"]
        )
        ax.set_title(sample["id"], fontsize=9)
        ax.text(0.0, -0.04, text, transform=ax.transAxes, va="top", ha="left", fontsize=7, family="monospace")
    fig.tight_layout()
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / "task_gallery.png"
    fig.savefig(path, dpi=110)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
