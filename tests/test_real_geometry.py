"""Opt-in: the smallest case of benchmarks/real_geometry.py (Qwen2-VL-2B's published shapes, cut to 2 decoder layers
and 2 vision blocks, a 151,936-row embedding, a 280 x 280 image): conversion equals the base, a latent training step
with crop re-encode has a finite loss and gradients, latent generation with the cache equals it without.

About 2 minutes and 4 GiB on 2 CPU cores. Run it with

    VEDAS_REAL_GEOMETRY=1 python -m pytest tests/test_real_geometry.py

and the whole table with `python benchmarks/real_geometry.py` (benchmarks/real_geometry.md holds its last output).
"""

import importlib.util
import os
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.skipif(
    os.environ.get("VEDAS_REAL_GEOMETRY") != "1",
    reason="real-geometry check (about 2 min, 4 GiB): run with VEDAS_REAL_GEOMETRY=1 python -m pytest "
           "tests/test_real_geometry.py",
)

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "real_geometry.py"


def load_benchmark():
    spec = importlib.util.spec_from_file_location("real_geometry", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def test_smallest_real_geometry_case(tmp_path):
    bench = load_benchmark()
    rows = []
    bench.run_model("qwen2-vl-2b", ["280x280"], tmp_path, rows, log=print)
    (row,) = rows
    assert row["failures"] == [], row["failures"]
    assert row["convert_diff"] == 0.0
    assert row["gen_same"] and row["score_diff"] <= 1e-3
    assert row["visual"] == 100  # 280 / 14 = 20 patches a side, merged 2 x 2
    assert row["recon"] is not None and row["recon"] > 0
