"""Write a tiny Qwen2-VL / Qwen2.5-VL / Qwen3-VL / Chameleon *base* checkpoint, built offline from config (no download).

    python examples/make_tiny_base.py --backbone qwen2_vl --out tiny-qwen2-vl

The folder holds a plain transformers model (saved with the backbone's own ``save_pretrained``) and the real
``Qwen2VLProcessor`` / ``Qwen2_5_VLProcessor`` / ``Qwen3VLProcessor`` / ``ChameleonProcessor`` with a small BPE
tokenizer trained with ``tokenizers`` (for Chameleon it also holds the VQ code tokens and the image markers). Convert it with ``examples/convert_base.py``. Sizes live in ``vedas_trainer.tiny_base.TinySizes``.
"""

from __future__ import annotations

import argparse
import sys

from vedas_trainer.tiny_base import BACKBONES, build_tiny_base


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backbone", choices=BACKBONES, required=True, help="base architecture to build")
    parser.add_argument("--out", required=True, help="output folder (created if missing)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random weight initialisation")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    model, _ = build_tiny_base(args.backbone, args.out, seed=args.seed)
    params = sum(p.numel() for p in model.parameters())
    print(f"Wrote a tiny {args.backbone} base ({params:,} parameters) to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
