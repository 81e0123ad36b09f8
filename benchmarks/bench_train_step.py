"""Latent training step vs plain SFT step on the same batch, with and without gradient checkpointing (issue 14,
item 5). Prints a Markdown report: per-variant times, the per-repeat ratios (median and spread) and peak memory.

A Qwen2-VL base (`--size mid`: hidden 512, 8 layers, the vision tower of the tiny base; `tiny`: the tiny base) is
built offline, converted to Vedas (K = 32) and given non-trivial router and e(d) weights (`perturb_vedas`), so that
routing runs its second pass. One batch of 2 samples (an `--image` x `--image` picture each: 256 visual tokens at
448, a question, T = 4 latent steps of K = 32 replay slots, `<|end_latent|>`, a supervised answer) is trained on
as:

* `SFT`              the same columns as a plain sequence: the latent block's tokens replaced by ordinary text, one
                     forward of the whole row (RDS active), same labels. The cost of a plain SFT step of that width.
* `latent`           the latent forward: T + 1 passes on the KV cache, replay, saliency, no crop re-encode.
* `latent+crop`      the same with `crop_images`: each step's dense window is cropped, re-encoded by the vision tower
                     without grad, and L_recon is added.
* `... ckpt`         the same under gradient checkpointing (non-reentrant). The latent passes keep their KV cache
                     (`VedasDecoderLayerMixin._checkpoint_with_cache`): each column runs once in forward and once in
                     the backward recomputation, as in SFT.
* `latent ckpt nocache` the latent forward under checkpointing with `use_cache=False`: every pass recomputes the
                     prefix (T + 1 prefix forwards), the cost checkpointing had before the cache was kept.

A step is forward + backward (no optimizer step: it is the same for both). Every repeat runs all variants in the
same order (A B C ... A B C ...), after `--warmup` untimed rounds (1), so that machine noise hits them alike; the
ratios are taken per repeat and reported as median, min and max. Peak memory is the peak of the bytes held by
tensors allocated during one step (torch.profiler's memory timeline on CPU; `torch.cuda.max_memory_allocated` on CUDA).

Usage:  python benchmarks/bench_train_step.py [--size mid|tiny] [--image 448] [--repeats 5] [--threads 2] [--no-memory]
        [--device cpu|cuda]
No assertions: it prints numbers. On a shared machine the times are noisy: the load average is printed at the start
and the end; compare ratios within one run.
"""

import argparse
import contextlib
import io
import os
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402


REPO = Path(__file__).resolve().parents[1]
# bench_latent maps `vedas` / `vedas_trainer` onto this checkout when they are not installed
import bench_latent  # noqa: E402, F401

from transformers.utils import logging as hf_logging  # noqa: E402

from vedas_trainer.checkpoint import convert_base, load_vedas  # noqa: E402
from vedas_trainer.testing import make_inputs, perturb_vedas, quadrant_image  # noqa: E402
from vedas_trainer.tiny_base import TinySizes, build_tiny_base  # noqa: E402


STEPS, REPLAY = 4, 32
SIZES = {
    "tiny": TinySizes(),
    # hidden 512, 8 layers, 8 heads (head_dim 64), 4 kv heads; the vision tower stays the tiny base's
    "mid": TinySizes(hidden_size=512, intermediate_size=1536, num_hidden_layers=8, num_attention_heads=8,
                     num_key_value_heads=4, mrope_section=[16, 8, 8]),
}
QUESTIONS = ["Which colour is the cell above the arrow in row 3 column 4 ? Choices : ( a ) red ( b ) blue",
             "Where does the arrow in the top left cell point ? Choices : ( a ) up ( b ) down"]
ANSWER = " answer : ( a ) red"


def build_model(root: Path, size: str, device: str):
    """The perturbed Vedas model of that size (train mode) and its processor."""
    with contextlib.redirect_stderr(io.StringIO()):
        build_tiny_base("qwen2_vl", str(root / "base"), seed=0, sizes=SIZES[size])
        convert_base(root / "base", root / "vedas", overrides={"num_replay_tokens": REPLAY})
        model, processor = load_vedas(root / "vedas")
    perturb_vedas(model)
    return model.to(device).train(), processor


def build_batches(model, processor, image_side: int, device: str) -> dict:
    """The latent batch (`(batch, l)` ids in the latent layout, labels on the answer, crop images) and the SFT batch
    of the same width (the block's tokens replaced by a text token)."""
    cfg = model.config
    images = [quadrant_image((image_side, image_side), seed=s) for s in (1, 2)]
    inputs = make_inputs(processor, QUESTIONS, images)
    ids, mask, types = model.build_latent_layout(inputs["input_ids"], inputs["attention_mask"],
                                                 inputs["mm_token_type_ids"], STEPS, REPLAY)
    answer = processor.tokenizer(ANSWER, add_special_tokens=False)["input_ids"]
    tail = torch.tensor([cfg.end_latent_token_id] + answer)[None].expand(ids.shape[0], -1)
    ids = torch.cat([ids, tail], 1)
    labels = torch.full_like(ids, -100)
    labels[:, -len(answer):] = ids[:, -len(answer):]
    mask = torch.cat([mask, torch.ones_like(tail)], 1)
    types = torch.cat([types, torch.zeros_like(tail).to(types.dtype)], 1)
    pixels = {"pixel_values": inputs["pixel_values"].to(device), "image_grid_thw": inputs["image_grid_thw"].to(device)}
    latent = dict(input_ids=ids, attention_mask=mask, mm_token_type_ids=types, labels=labels)
    latent = {key: value.to(device) for key, value in latent.items()} | pixels
    block = torch.isin(ids, torch.tensor([cfg.start_latent_token_id, cfg.replay_token_id, cfg.latent_token_id,
                                          cfg.end_latent_token_id]))
    text_id = processor.tokenizer(" .", add_special_tokens=False)["input_ids"][-1]
    sft = dict(latent, input_ids=ids.masked_fill(block, text_id).to(device))
    crops = [[torch.from_numpy(np.array(image)).permute(2, 0, 1)] for image in images]
    return {"sft": sft, "latent": latent, "latent+crop": dict(latent, crop_images=crops)}


def step(model, batch, checkpointing: bool, use_cache=None):
    """One training step without the optimizer: forward, backward, gradients cleared."""
    if checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    try:
        out = model(**batch, use_cache=use_cache)
        out.loss.backward()
    finally:
        if checkpointing:
            model.gradient_checkpointing_disable()
        model.zero_grad(set_to_none=True)


def variants(batches) -> dict:
    """name -> (batch, gradient checkpointing, use_cache) of one step."""
    plan = {
        "SFT": ("sft", False, None), "latent": ("latent", False, None), "latent+crop": ("latent+crop", False, None),
        "SFT ckpt": ("sft", True, None), "latent ckpt": ("latent", True, None),
        "latent+crop ckpt": ("latent+crop", True, None), "latent ckpt nocache": ("latent", True, False),
    }
    return {name: (batches[batch], ckpt, cache) for name, (batch, ckpt, cache) in plan.items()}


def synchronize(device: str):
    if device == "cuda":
        torch.cuda.synchronize()


def time_rounds(model, plan: dict, repeats: int, warmup: int, device: str) -> dict:
    """name -> per-repeat seconds; `warmup` rounds first, then `repeats` rounds in the same order."""
    times = {name: [] for name in plan}
    for round_index in range(repeats + warmup):
        for name, (batch, ckpt, cache) in plan.items():
            synchronize(device)
            start = time.perf_counter()
            step(model, batch, ckpt, cache)
            synchronize(device)
            if round_index >= warmup:
                times[name].append(time.perf_counter() - start)
        print(f"round {round_index + 1} of {repeats + warmup} done", file=sys.stderr, flush=True)  # off the report
    return times


def peak_bytes(fn, device: str) -> int:
    """Peak bytes of tensors allocated while `fn` runs (tensors alive before it are not counted)."""
    if device == "cuda":
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        fn()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - before
    return bench_latent.peak_tensor_bytes(fn)[0]


RATIOS = [  # (label, numerator, denominator)
    ("latent / SFT (crop re-encode excluded)", "latent", "SFT"),
    ("latent+crop / SFT (crop re-encode included)", "latent+crop", "SFT"),
    ("latent ckpt / SFT ckpt (excluded)", "latent ckpt", "SFT ckpt"),
    ("latent+crop ckpt / SFT ckpt (included)", "latent+crop ckpt", "SFT ckpt"),
    ("latent ckpt nocache / SFT ckpt (before: T + 1 prefix recomputes)", "latent ckpt nocache", "SFT ckpt"),
    ("latent ckpt / latent (cost of checkpointing)", "latent ckpt", "latent"),
]


def report(args, model, batches, times, memory, load):
    """Print the Markdown report."""
    cfg, ids = model.config, batches["latent"]["input_ids"]
    visual = int((ids[0] == cfg.image_token_id).sum())
    sizes = SIZES[args.size]
    print(f"# Training step: latent vs SFT (qwen2_vl {args.size}, {args.device}, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads)\n")
    print(f"Batch 2 x {ids.shape[1]} columns ({args.image}x{args.image} images, {visual} visual tokens per sample, "
          f"T = {STEPS}, K = {REPLAY}); "
          f"hidden {sizes.hidden_size}, {sizes.num_hidden_layers} layers, routing layers {cfg.routing_layers}, "
          f"α = {cfg.routing_topk}. A step is forward + backward. {args.repeats} repeats after {args.warmup} warm-up "
          f"round(s), variants interleaved in every repeat. Load average (1 min) at start / end: {load[0]:.1f} / "
          f"{load[1]:.1f} on {os.cpu_count()} CPUs: other processes share the machine, so the times are noisy; the ratios are "
          f"taken within each repeat.\n")
    print("| variant | median s | min s | max s | peak memory MiB |")
    print("|---|---:|---:|---:|---:|")
    for name, values in times.items():
        peak = f"{memory[name] / 2**20:.1f}" if name in memory else "-"
        print(f"| {name} | {statistics.median(values):.3f} | {min(values):.3f} | {max(values):.3f} | {peak} |")
    print("\n| ratio (per repeat) | median | min | max |")
    print("|---|---:|---:|---:|")
    for label, top, bottom in RATIOS:
        ratios = [a / b for a, b in zip(times[top], times[bottom])]
        print(f"| {label} | {statistics.median(ratios):.2f} | {min(ratios):.2f} | {max(ratios):.2f} |")


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=1, help="untimed rounds before the timed ones")
    parser.add_argument("--size", default="mid", choices=sorted(SIZES))
    parser.add_argument("--image", type=int, default=448, help="side of the square images, in pixels")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--no-memory", action="store_true", help="skip the peak-memory runs")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore")
    hf_logging.set_verbosity_error()
    torch.manual_seed(0)
    load_start = os.getloadavg()[0]
    with tempfile.TemporaryDirectory(prefix="bench_train_step_") as tmp:  # the weights may be memory-mapped
        model, processor = build_model(Path(tmp), args.size, args.device)
        batches = build_batches(model, processor, args.image, args.device)
        plan = variants(batches)
        times = time_rounds(model, plan, args.repeats, args.warmup, args.device)
        memory = {}
        if not args.no_memory:
            for name, (batch, ckpt, cache) in plan.items():
                memory[name] = peak_bytes(lambda: step(model, batch, ckpt, cache), args.device)
        report(args, model, batches, times, memory, (load_start, os.getloadavg()[0]))


if __name__ == "__main__":
    main()
