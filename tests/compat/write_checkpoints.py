"""Write the compatibility job's checkpoints: for each backbone (Qwen2-VL, Qwen2.5-VL, Qwen3-VL, Chameleon) a tiny
base (`base-<backbone>`) and its Vedas conversion (`vedas-<backbone>`, with the test suite's settings for that
backbone), by this repository's code.

    python tests/compat/write_checkpoints.py OUT_DIR
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # tests/: the suite's conftest settings

from conftest import ALL_BACKBONES, BACKBONE_OVERRIDES  # noqa: E402
from vedas_trainer.checkpoint import convert_base  # noqa: E402
from vedas_trainer.tiny_base import build_tiny_base  # noqa: E402


def main(out: str) -> int:
    root = Path(out)
    for backbone in ALL_BACKBONES:
        build_tiny_base(backbone, str(root / f"base-{backbone}"), seed=0)
        convert_base(root / f"base-{backbone}", root / f"vedas-{backbone}", overrides=BACKBONE_OVERRIDES[backbone])
    import transformers

    print(f"Wrote {', '.join(ALL_BACKBONES)} checkpoints with transformers {transformers.__version__} to {root}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
