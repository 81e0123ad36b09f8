"""What one latent step costs, in counts that do not depend on the machine's load (issue 16).

    python benchmarks/bench_step_ops.py                      # mid model, T = 2 vs 6, K = 32
    python benchmarks/bench_step_ops.py --sizes tiny,mid --top 15

Timing a latent `generate` against the ideal loop (`bench_latent.py`) needs an idle machine; counting what it does
does not. For Vedas latent `generate` (RDS on and off) and the ideal loop (the plain base model: prefill, chunks of
K + 1 embeddings on its cache, decode), each run twice with T = `--low` and T = `--high` latent steps, the
difference divided by the extra steps gives, per latent step:

* ATen operator calls (every kernel dispatched, after autograd; `census.Census`);
* host syncs: operators that make the host wait for the device on an accelerator (`.item()`, `int()` / `bool()` of
  a tensor, `nonzero`, boolean indexing, ...);
* new tensor storages allocated, and their bytes;
* Python function calls (`sys.setprofile`), the interpreter work around the kernels.

It then lists the call sites (`file:function`) that add the most operators and syncs per step, against the ideal
loop's: what per-step work there is to remove.
"""

import argparse
import collections
import contextlib
import io
import os
import sys
import tempfile
import warnings
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")

import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_latent import ANSWER, QUESTION, REPLAY, bare_loop  # noqa: E402
from bench_prefill_memory import MEMORY_SIZES, build  # noqa: E402
from census import count_python_calls, run_census  # noqa: E402
from transformers.utils import logging as hf_logging  # noqa: E402

from vedas_trainer.testing import make_inputs, quadrant_image  # noqa: E402


def runners(base, vedas, vedas_off, inputs):
    """name -> fn(steps) for the three loops compared."""
    def latent(model):
        return lambda steps: model.generate(**inputs, num_latent_steps=steps, num_replay_tokens=REPLAY,
                                            do_sample=False, min_new_tokens=ANSWER, max_new_tokens=ANSWER)

    return {
        "Vedas latent": latent(vedas),
        "Vedas latent, RDS off": latent(vedas_off),
        "ideal latent (base loop)": lambda steps: bare_loop(base, inputs, steps, REPLAY + 1, ANSWER),
    }


def counts(fn, steps) -> dict:
    """Load-independent counters of one run of `fn(steps)`, and its per-site operator and sync counters."""
    census, _ = run_census(lambda: fn(steps))
    python_calls, _ = count_python_calls(lambda: fn(steps))
    syncs = collections.Counter()
    for (_, site), calls in census.syncs.items():
        syncs[site] += calls
    return {"ops": census.total_ops(), "syncs": census.total_syncs(), "allocations": census.allocations,
            "allocated MiB": sum(census.allocated.values()) / 2**20, "python calls": python_calls,
            "sites": census.ops_by_site(), "sync sites": syncs}


@torch.no_grad()
def measure(size_name, backbone, root, low, high):
    with contextlib.redirect_stderr(io.StringIO()):
        base, vedas_off, vedas, processor = build(backbone, MEMORY_SIZES[size_name], root)
    inputs = make_inputs(processor, [QUESTION], [quadrant_image((448, 448))])
    results = {}
    for name, fn in runners(base, vedas, vedas_off, inputs).items():
        fn(low)  # warm-up: lazily built state is not a step's
        a, b = counts(fn, low), counts(fn, high)
        span = high - low
        step = {key: (b[key] - a[key]) / span for key in a if not key.endswith("sites")}
        for key in ("sites", "sync sites"):
            step[key] = {site: (b[key][site] - a[key][site]) / span for site in set(a[key]) | set(b[key])}
        results[name] = {"per step": step, "run": a}
    return results


def report(size_name, results, low, top):
    ideal = results["ideal latent (base loop)"]["per step"]
    keys = ["ops", "syncs", "allocations", "allocated MiB", "python calls"]
    print(f"## {size_name}: per latent step (runs with T = {low} and more, difference / extra steps)\n")
    print("| loop | " + " | ".join(keys) + " | ops / ideal | python calls / ideal |")
    print("|---|" + "---:|" * (len(keys) + 2))
    for name, res in results.items():
        step = res["per step"]
        print(f"| {name} | " + " | ".join(f"{step[k]:.1f}" for k in keys)
              + f" | {step['ops'] / ideal['ops']:.2f} | {step['python calls'] / ideal['python calls']:.2f} |")
    print(f"\nWhole run at T = {low}: " + "; ".join(
        f"{name}: {res['run']['ops']} ops, {res['run']['syncs']} syncs" for name, res in results.items()) + "\n")
    ours = results["Vedas latent"]["per step"]
    for label, key in (("operators", "sites"), ("host syncs", "sync sites")):
        diff = {site: ours[key].get(site, 0.0) - ideal[key].get(site, 0.0) for site in set(ours[key]) | set(ideal[key])}
        ranked = sorted(diff.items(), key=lambda item: -abs(item[1]))[:top]
        print(f"Call sites adding the most {label} per latent step, Vedas latent minus ideal loop:\n")
        print("| call site | Vedas | ideal | difference |")
        print("|---|---:|---:|---:|")
        for site, extra in ranked:
            if extra:
                print(f"| {site} | {ours[key].get(site, 0.0):.1f} | {ideal[key].get(site, 0.0):.1f} | {extra:+.1f} |")
        print()


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", default="mid", help="comma-separated: " + ", ".join(MEMORY_SIZES))
    parser.add_argument("--backbone", default="qwen2_vl", choices=["qwen2_vl", "qwen2_5_vl", "qwen3_vl"])
    parser.add_argument("--low", type=int, default=2, help="latent steps of the shorter run")
    parser.add_argument("--high", type=int, default=6, help="latent steps of the longer run")
    parser.add_argument("--top", type=int, default=12, help="call sites listed")
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    hf_logging.set_verbosity_error()
    torch.manual_seed(0)
    print(f"# Operators, host syncs and Python calls per latent step ({args.backbone}, K = {REPLAY}, "
          f"torch {torch.__version__})\n")
    with tempfile.TemporaryDirectory(prefix="bench_step_ops_") as tmp:
        for size_name in [s.strip() for s in args.sizes.split(",") if s.strip()]:
            results = measure(size_name, args.backbone, Path(tmp) / size_name, args.low, args.high)
            report(size_name, results, args.low, args.top)


if __name__ == "__main__":
    main()
