"""The pieces of benchmarks/gpu_check.sh (run it, not this file, unless you want one piece).

    python benchmarks/gpu_check.py build   FOLDER [--tiny]      a random-weight base at 2B geometry, converted
    python benchmarks/gpu_check.py equiv   FOLDER [--cpu]       bf16 / sdpa (/ flash-attention-2) equivalences
    accelerate launch ... benchmarks/gpu_check.py train FOLDER  ZeRO-2 steps: tokens/s and peak memory
    python benchmarks/gpu_check.py latency FOLDER [--cpu]       latent / No-CoT and CoT / latent generate latency

"2B geometry" is Qwen2-VL-2B's published text shapes (hidden 1536, 12 heads, 2 KV heads, head_dim 128, MLP 8960,
mrope_section [16, 24, 24], rope_theta 1e6, a 151,936-row tied embedding) and vision shapes (width 1280, 16 heads,
MLP ratio 4, patch 14, merge 2), cut to 2 decoder layers and 2 vision blocks. `--tiny` uses the test-size model
instead, so that every piece runs on a CPU in seconds. No assertions on timings: the script prints numbers and
ratios; the equivalences print their error and PASS / FAIL against the stated tolerance.
"""

import argparse
import importlib.util
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch

QWEN2_VL_2B_ROWS = 151936
STEPS, REPLAY, ANSWER, COT_TOKENS = 4, 32, 8, 100


def geometry(tiny: bool):
    from vedas_trainer.tiny_base import TinySizes, build_tokenizer

    if tiny:
        return TinySizes()
    sizes = TinySizes(
        hidden_size=1536, intermediate_size=8960, num_hidden_layers=2, num_attention_heads=12, num_key_value_heads=2,
        mrope_section=[16, 24, 24], rope_theta=1e6, vision_depth=2, vision_embed_dim=1280, vision_heads=16,
        vision_mlp_ratio=4, min_pixels=56 * 56, max_pixels=28 * 28 * 1280,
    )
    sizes.spare_embedding_rows = QWEN2_VL_2B_ROWS - len(build_tokenizer(sizes))
    return sizes


def build(folder: Path, tiny: bool):
    from vedas_trainer.checkpoint import convert_base
    from vedas_trainer.testing import perturb_vedas
    from vedas_trainer.tiny_base import build_tiny_base

    build_tiny_base("qwen2_vl", str(folder / "base"), seed=0, sizes=geometry(tiny))
    model, _ = convert_base(folder / "base", folder / "vedas", overwrite=True,
                            overrides={"num_replay_tokens": 4 if tiny else REPLAY, "num_latent_steps": STEPS})
    perturb_vedas(model)  # routing really runs its second pass
    model.save_pretrained(folder / "vedas")
    rows = model.get_input_embeddings().weight.shape[0]
    print(f"built {'tiny' if tiny else '2B-geometry'} model: {sum(p.numel() for p in model.parameters()) / 1e6:.1f} M "
          f"parameters, hidden {model.config.text_config.hidden_size}, {rows} embedding rows")


def inputs_for(processor, size=448, batch=1):
    from vedas_trainer.testing import make_inputs, quadrant_image

    return make_inputs(processor, ["which cell does the arrow point to ?"] * batch,
                       [quadrant_image((size, size), seed=i) for i in range(batch)])


def latent_batch(model, processor, device, size=448):
    """A one-sample training-layout batch with STEPS latent steps and a supervised answer, on `device`."""
    inputs = inputs_for(processor, size)
    cfg = model.config
    ids, mask, types = model.build_latent_layout(inputs["input_ids"], inputs["attention_mask"],
                                                 inputs["mm_token_type_ids"], STEPS, cfg.num_replay_tokens)
    answer = processor.tokenizer(" answer : 3", add_special_tokens=False)["input_ids"]
    tail = torch.tensor([cfg.end_latent_token_id] + answer)[None]
    ids = torch.cat([ids, tail], 1)
    batch = dict(input_ids=ids, attention_mask=torch.cat([mask, torch.ones_like(tail)], 1),
                 mm_token_type_ids=torch.cat([types, torch.zeros_like(tail).int()], 1),
                 pixel_values=inputs["pixel_values"], image_grid_thw=inputs["image_grid_thw"])
    return {k: v.to(device) for k, v in batch.items()}


def load(folder: Path, device, dtype, attention):
    from vedas_trainer.checkpoint import load_vedas

    model, processor = load_vedas(folder / "vedas")
    model.set_attn_implementation(attention)
    return model.to(device=device, dtype=dtype).eval(), processor


def equiv(folder: Path, device):
    """Latent forward logits: sdpa vs eager (fp32), bf16 vs fp32 (sdpa), flash-attention-2 vs sdpa (bf16), as the
    relative L2 error over the prompt and answer columns (the replay and latent slots are inputs, not predictions).
    Also printed: the latent steps whose replayed tokens are the same. With random weights the saliency has near
    ties, which bf16's rounding may break the other way; a different replayed token then changes what follows."""
    runs = [("eager", torch.float32), ("sdpa", torch.float32), ("sdpa", torch.bfloat16)]
    if device.type == "cuda" and importlib.util.find_spec("flash_attn") is not None:
        runs.append(("flash_attention_2", torch.bfloat16))
    results = {}
    for attention, dtype in runs:
        model, processor = load(folder, device, dtype, attention)
        batch = latent_batch(model, processor, device)
        slots = torch.isin(batch["input_ids"], torch.tensor([model.config.replay_token_id, model.config.latent_token_id],
                                                              device=device))
        with torch.no_grad():
            out = model(**batch, output_latent_trace=True)
        results[attention, dtype] = (out.logits.float()[~slots].cpu(), [step["replay_indices"].cpu()
                                                                          for step in out.latent_trace])
        del model
    checks = [("sdpa vs eager, fp32", ("sdpa", torch.float32), ("eager", torch.float32), 1e-4),
              ("bf16 vs fp32, sdpa", ("sdpa", torch.bfloat16), ("sdpa", torch.float32), 5e-2)]
    if ("flash_attention_2", torch.bfloat16) in results:
        checks.append(("flash-attention-2 vs sdpa, bf16", ("flash_attention_2", torch.bfloat16),
                       ("sdpa", torch.bfloat16), 5e-2))
    else:
        print("flash-attention-2: not installed (or no CUDA): skipped")
    failed = 0
    for name, a, b, tolerance in checks:
        (logits_a, picks_a), (logits_b, picks_b) = results[a], results[b]
        error = ((logits_a - logits_b).norm() / logits_b.norm().clamp(min=1e-12)).item()
        same = sum(torch.equal(x, y) for x, y in zip(picks_a, picks_b))
        failed += error > tolerance
        print(f"{name}: relative L2 error of the prompt and answer logits {error:.2e} (tolerance {tolerance:g}) -> "
              f"{'PASS' if error <= tolerance else 'FAIL'}; the same replayed tokens at {same} of {len(picks_b)} "
              f"latent steps")
    return failed


def train(folder: Path, steps: int, cpu: bool):
    """`steps` ZeRO-2 steps (run under `accelerate launch` with a DeepSpeed config) of the latent curriculum's last
    stage on the synthetic task: tokens/s (non-padding tokens through the model) and peak memory."""
    from vedas_trainer.checkpoint import load_vedas
    from vedas_trainer.collator import VedasCollator
    from vedas_trainer.synthetic import build_synthetic_dataset
    from vedas_trainer.trainer import VedasTrainer, VedasTrainingArguments

    batch = 8
    args = VedasTrainingArguments(
        output_dir=str(folder / "train"), max_steps=steps, per_device_train_batch_size=batch, learning_rate=1e-5,
        cot_warmup_epochs=0, skip_curriculum=True, max_latent_stage=STEPS, bf16=not cpu, use_cpu=cpu,
        logging_steps=max(steps // 4, 1), save_strategy="no", report_to="none", dataloader_num_workers=0)
    model, processor = load_vedas(folder / "vedas")
    collator = TokenCounter(VedasCollator(processor, model.config, **args.collator_kwargs()))
    data = build_synthetic_dataset(batch * steps * args.world_size, seed=0, split="train")
    trainer = VedasTrainer(model=model.train(), args=args, train_dataset=data, data_collator=collator)
    device = args.device
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    trainer.add_callback(StepClock())
    trainer.train()
    clock = next(cb for cb in trainer.callback_handler.callbacks if isinstance(cb, StepClock))
    timed = clock.seconds[1:] or clock.seconds  # the first step includes warm-up (allocations, kernels)
    tokens = collator.tokens[1:] if len(clock.seconds) > 1 else collator.tokens
    rate = sum(tokens[: len(timed)]) * args.world_size / sum(timed)
    peak = (torch.cuda.max_memory_allocated(device) if device.type == "cuda" else peak_rss()) / 2 ** 30
    if args.process_index == 0:
        print(f"ZeRO-2 training, {len(clock.seconds)} steps x {batch} samples x {args.world_size} process(es) at "
              f"stage {STEPS}: {rate:,.0f} tokens/s (median step {statistics.median(timed):.3f} s, first step "
              f"{clock.seconds[0]:.2f} s), peak memory {peak:.2f} GiB ({'CUDA allocated' if device.type == 'cuda' else 'process RSS'})")


class TokenCounter:
    """Wraps a collator; records the non-padding tokens of every batch it builds."""

    def __init__(self, collator):
        self.collator, self.tokens = collator, []

    def __getattr__(self, name):
        return getattr(self.__dict__["collator"], name)

    def __call__(self, samples):
        batch = self.collator(samples)
        self.tokens.append(int(batch["attention_mask"].sum()))
        return batch


def peak_rss() -> float:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024.0


def make_step_clock():
    from transformers import TrainerCallback

    class Clock(TrainerCallback):
        def __init__(self):
            self.seconds, self.started = [], None

        def on_step_begin(self, args, state, control, **kwargs):
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            self.started = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            self.seconds.append(time.perf_counter() - self.started)

    return Clock


StepClock = make_step_clock()


def latency(folder: Path, device, repeats: int):
    """Median generate latency: No-CoT (T = 0, ANSWER tokens), latent (T = STEPS, ANSWER tokens) and explicit CoT
    (T = 0, COT_TOKENS tokens), lengths forced with min_new_tokens; bf16 on CUDA."""
    model, processor = load(folder, device, torch.bfloat16 if device.type == "cuda" else torch.float32, "sdpa")
    inputs = {k: v.to(device) for k, v in inputs_for(processor).items()}

    def run(steps, tokens):
        with torch.no_grad():
            model.generate(**inputs, num_latent_steps=steps, do_sample=False, min_new_tokens=tokens,
                           max_new_tokens=tokens)
        if device.type == "cuda":
            torch.cuda.synchronize()

    variants = {"No-CoT": (0, ANSWER), "latent": (STEPS, ANSWER), "CoT": (0, COT_TOKENS)}
    for steps, tokens in variants.values():  # warm-up
        run(steps, tokens)
    times = {name: [] for name in variants}
    for _ in range(repeats):  # interleaved, so that drifts hit every variant alike
        for name, (steps, tokens) in variants.items():
            started = time.perf_counter()
            run(steps, tokens)
            times[name].append(time.perf_counter() - started)
    median = {name: statistics.median(values) for name, values in times.items()}
    for name, (steps, tokens) in variants.items():
        print(f"generate {name:7s} (T={steps}, {tokens:3d} tokens): median {1000 * median[name]:8.1f} ms over {repeats}")
    print(f"latent / No-CoT = {median['latent'] / median['No-CoT']:.2f}x (goal <= 1.3x); "
          f"CoT / latent = {median['CoT'] / median['latent']:.2f}x (goal >= 5x)")
    return median


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("piece", choices=("build", "equiv", "train", "latency"))
    parser.add_argument("folder", type=Path)
    parser.add_argument("--tiny", action="store_true", help="build: the test-size model instead of 2B geometry")
    parser.add_argument("--cpu", action="store_true", help="run on the CPU (the default is CUDA)")
    parser.add_argument("--steps", type=int, default=20, help="train: ZeRO-2 steps")
    parser.add_argument("--repeats", type=int, default=5, help="latency: timed rounds")
    args = parser.parse_args(argv)
    if args.piece != "build" and not args.cpu and not torch.cuda.is_available():
        sys.exit("gpu_check.py: error: no CUDA device; pass --cpu (with --tiny) to check the script on a CPU")
    device = torch.device("cpu" if args.cpu else "cuda")
    if args.piece == "build":
        build(args.folder, args.tiny)
    elif args.piece == "equiv":
        return 1 if equiv(args.folder, device) else 0
    elif args.piece == "train":
        train(args.folder, args.steps, args.cpu)
    else:
        latency(args.folder, device, args.repeats)
    return 0


if __name__ == "__main__":
    sys.exit(main())
