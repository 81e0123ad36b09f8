"""How latent generation scales with the prompt length, T and K (issue 16): a Markdown table and a PNG plot.

    python benchmarks/bench_scaling.py --out benchmarks/scaling          # the full grid on the mid model
    python benchmarks/bench_scaling.py --size tiny --prompts 256,512 --steps 1,2 --replays 8,16 \
        --repeats 2 --inner 1 --cot-tokens 8 --out /tmp/scaling-smoke  # a smoke run

On the mid model (hidden 512, 8 layers; `bench_latent.py`'s), three sweeps, each case timed like `bench_latent.py`
(every variant of the case in every round, interleaved, `--inner` calls each; ratios taken within a round, then the
median and IQR over rounds):

* prompt length 256 ... 4,096 tokens (one image; text filler up to the length), T = 4, K = 32;
* T = 1 ... 8 at a 1,024-token prompt, K = 32;
* K = 8 ... 64 at a 1,024-token prompt, T = 4.

Per case: latent / No-CoT (4 answer tokens each) and CoT (`--cot-tokens` answer tokens) / latent, and the cost of one
latent step, `(latent(T) - latent(T = 1)) / (T - 1)` per round: it runs K + 1 new tokens on the cache, so it should
grow with K + 1 and barely with the prompt (only the attention over the cached prompt grows with it). The images are
large enough that K x T never exceeds the visual tokens (where it would, the last steps replay fewer tokens).

Timings need an idle machine (see `bench_latent.py`); the output prints torch's threads and the load.
"""

import argparse
import contextlib
import io
import json
import math
import os
import sys
import tempfile
import time
import warnings
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")

import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_latent import ANSWER, SIZES, machine_state, ratio_stats, spread_stats, time_variants  # noqa: E402
from transformers.utils import logging as hf_logging  # noqa: E402

from vedas_trainer.checkpoint import convert_base, load_vedas  # noqa: E402
from vedas_trainer.testing import make_inputs, perturb_vedas, quadrant_image  # noqa: E402
from vedas_trainer.tiny_base import build_tiny_base  # noqa: E402

FILLER = "which colour is the cell above the arrow in row 3 column 4 of the picture ? "
BASE_PROMPT, BASE_STEPS, BASE_REPLAY = 1024, 4, 32


def build(backbone, size_name, root):
    base_dir, vedas_dir = root / "base", root / "vedas"
    build_tiny_base(backbone, str(base_dir), seed=0, sizes=SIZES[size_name])
    convert_base(base_dir, vedas_dir)
    model, processor = load_vedas(vedas_dir)
    return perturb_vedas(model), processor


def image_side(prompt: int, visual_needed: int) -> int:
    """A square image side in pixels: about half the prompt in visual tokens (a merged 28-pixel cell is one token),
    at least `visual_needed` (K x T), at most 32 x 32 cells (the tiny vision tower attends over all its patches)."""
    cells = min(max(round((prompt / 2) ** 0.5), math.ceil(visual_needed**0.5)), 32)
    return 28 * cells


def prompt_inputs(processor, prompt: int, visual_needed: int):
    """Processor inputs of one image and filler text, `prompt` tokens long (to within one filler word)."""
    image = quadrant_image((image_side(prompt, visual_needed),) * 2)
    words = FILLER.split()
    count = 0
    inputs = make_inputs(processor, [""], [image])
    while inputs["input_ids"].shape[1] < prompt:
        missing = prompt - inputs["input_ids"].shape[1]
        count += max(1, missing // 2)  # a word is one or two tokens with the tiny tokenizer
        text = " ".join(words[i % len(words)] for i in range(count))
        inputs = make_inputs(processor, [text], [image])
    return inputs


def time_case(model, inputs, steps, replay, args):
    """Interleaved timing of one case: No-CoT, latent (T, K), latent (T = 1, K) and CoT."""
    def gen(num_steps, tokens, k=replay):
        return lambda: model.generate(**inputs, num_latent_steps=num_steps, num_replay_tokens=k, do_sample=False,
                                      min_new_tokens=tokens, max_new_tokens=tokens)

    variants = {"No-CoT": gen(0, ANSWER), "latent": gen(steps, ANSWER), "CoT": gen(0, args.cot_tokens)}
    if steps > 1:
        variants["latent T=1"] = gen(1, ANSWER)
    times, _ = time_variants(variants, args.repeats, inner=args.inner)
    row = {"prompt": inputs["input_ids"].shape[1], "T": steps, "K": replay,
           "visual": int((inputs["input_ids"] == model.config.image_token_id).sum()),
           "latent ms": spread_stats(times["latent"])["median"], "No-CoT ms": spread_stats(times["No-CoT"])["median"],
           "CoT ms": spread_stats(times["CoT"])["median"],
           "latent / No-CoT": ratio_stats(times, "latent", "No-CoT"),
           "CoT / latent": ratio_stats(times, "CoT", "latent")}
    if steps > 1:
        per_step = [(a - b) / (steps - 1) for a, b in zip(times["latent"], times["latent T=1"])]
        row["step ms"] = spread_stats(per_step)
    return row


def run_sweeps(model, processor, args) -> dict:
    sweeps = {"prompt": [], "T": [], "K": []}
    cases = ([("prompt", p, BASE_STEPS, BASE_REPLAY) for p in args.prompts]
             + [("T", args.fixed_prompt, t, BASE_REPLAY) for t in args.steps]
             + [("K", args.fixed_prompt, BASE_STEPS, k) for k in args.replays])
    for sweep, prompt, steps, replay in cases:
        inputs = prompt_inputs(processor, prompt, steps * replay)
        start = time.perf_counter()
        row = time_case(model, inputs, steps, replay, args)
        row["seconds"] = time.perf_counter() - start
        sweeps[sweep].append(row)
        print(f"[{sweep}] prompt {row['prompt']} T {steps} K {replay}: latent/No-CoT "
              f"{row['latent / No-CoT']['median']:.3f}, CoT/latent {row['CoT / latent']['median']:.3f} "
              f"({row['seconds']:.0f} s)", file=sys.stderr)
    return sweeps


def markdown(sweeps, meta) -> str:
    lines = [f"# Scaling of latent generation ({meta['size']} model, {meta['backbone']}, torch {meta['torch']})", "",
             f"torch threads {meta['before']['threads']}; load average before "
             f"{'/'.join(f'{x:.1f}' for x in meta['before']['load'])}, after "
             f"{'/'.join(f'{x:.1f}' for x in meta['after']['load'])}; {meta['repeats']} rounds x {meta['inner']} "
             f"interleaved calls per case; {ANSWER} answer tokens, CoT {meta['cot_tokens']} tokens. Ratios: median "
             f"of per-round ratios (IQR). Step: one latent step, (latent(T) - latent(T=1)) / (T - 1).", "",
             "| sweep | prompt | visual | T | K | latent ms | No-CoT ms | CoT ms | latent / No-CoT | CoT / latent | "
             "step ms | step µs / (K+1) tokens |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for sweep, rows in sweeps.items():
        for r in rows:
            step = r.get("step ms")
            step_cells = (f"{step['median']:.2f} ({step['iqr']:.2f}) | {1000 * step['median'] / (r['K'] + 1):.0f}"
                          if step else " | ")
            lines.append(
                f"| {sweep} | {r['prompt']} | {r['visual']} | {r['T']} | {r['K']} | {r['latent ms']:.1f} | "
                f"{r['No-CoT ms']:.1f} | {r['CoT ms']:.1f} | {r['latent / No-CoT']['median']:.3f} "
                f"({r['latent / No-CoT']['iqr']:.3f}) | {r['CoT / latent']['median']:.3f} "
                f"({r['CoT / latent']['iqr']:.3f}) | {step_cells} |")
    return "\n".join(lines) + "\n"


def plot(sweeps, path):
    """Ratios against each swept variable (top row) and the per-step cost against each (bottom row)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 3, figsize=(13, 7), constrained_layout=True)
    for column, (sweep, key, label) in enumerate([("prompt", "prompt", "prompt tokens"), ("T", "T", "T (latent steps)"),
                                                  ("K", "K", "K (replay tokens)")]):
        rows = sweeps[sweep]
        if not rows:
            continue
        x = [r[key] for r in rows]
        for ratio in ("latent / No-CoT", "CoT / latent"):
            med = [r[ratio]["median"] for r in rows]
            err = [[r[ratio]["median"] - r[ratio]["q1"] for r in rows],
                   [r[ratio]["q3"] - r[ratio]["median"] for r in rows]]
            axes[0, column].errorbar(x, med, yerr=err, marker="o", capsize=3, label=ratio)
        axes[0, column].set(xlabel=label, ylabel="ratio", title=f"ratios vs {label}")
        axes[0, column].legend()
        stepped = [r for r in rows if "step ms" in r]
        axes[1, column].plot([r[key] for r in stepped], [r["step ms"]["median"] for r in stepped], marker="o")
        axes[1, column].set(xlabel=label, ylabel="ms per latent step", title=f"one latent step vs {label}")
        axes[1, column].set_ylim(bottom=0)
        if sweep == "prompt":
            axes[0, column].set_xscale("log", base=2)
            axes[1, column].set_xscale("log", base=2)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--size", default="mid", choices=sorted(SIZES))
    parser.add_argument("--backbone", default="qwen2_vl", choices=["qwen2_vl", "qwen2_5_vl"])
    parser.add_argument("--prompts", default="256,512,1024,2048,4096")
    parser.add_argument("--steps", default="1,2,4,8")
    parser.add_argument("--replays", default="8,16,32,64")
    parser.add_argument("--fixed-prompt", type=int, default=BASE_PROMPT, help="prompt length of the T and K sweeps")
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--inner", type=int, default=2)
    parser.add_argument("--cot-tokens", type=int, default=100)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", default="benchmarks/scaling", help="folder for scaling.md, scaling.json, scaling.png")
    args = parser.parse_args()
    args.prompts, args.steps, args.replays = ([int(v) for v in text.split(",") if v]
                                              for text in (args.prompts, args.steps, args.replays))
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore")
    hf_logging.set_verbosity_error()
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory(prefix="bench_scaling_") as tmp, contextlib.redirect_stderr(io.StringIO()):
        model, processor = build(args.backbone, args.size, Path(tmp))
    before = machine_state()
    with torch.no_grad():
        sweeps = run_sweeps(model, processor, args)
    meta = {"size": args.size, "backbone": args.backbone, "torch": torch.__version__, "before": before,
            "after": machine_state(), "repeats": args.repeats, "inner": args.inner, "cot_tokens": args.cot_tokens}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    text = markdown(sweeps, meta)
    (out / "scaling.md").write_text(text)
    (out / "scaling.json").write_text(json.dumps({"meta": meta, "sweeps": sweeps}, indent=1))
    plot(sweeps, out / "scaling.png")
    print(text)


if __name__ == "__main__":
    main()
