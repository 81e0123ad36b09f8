"""Routing depth scaling (RDS) overhead on CPU: forward time of an RDS model over its base model, and causal cached
decoding against global-mode recomputation. Prints tables; asserts nothing.

    python benchmarks/bench_rds.py [--repeats 7] [--decode-tokens 32] [--threads 2]

Everything is measured in one run, side by side on the same inputs: the variants run round-robin, median of
`--repeats` runs after a warm-up (the `(min)` column uses the fastest run instead, which a busy shared machine
disturbs less):

* forward: the base checkpoint's model (plain transformers), the converted Vedas model with RDS switched off
  (`routing_layers=[]`, wrapper cost only) and with RDS on (perturbed router and e(d), so the second pass does real
  work). `expected` is the share of token-layer passes RDS adds, 1 + (#routing layers x α) / (#layers x sequence);
  it ignores that the second pass attends over α keys only and that embeddings and the LM head do not grow, so the
  compute actually added is a little smaller.
* decode: `--decode-tokens` tokens after the prompt, teacher-forced with the same tokens in every mode: causal
  routing with a `VedasCache` (one forward per token), global routing (one full forward over the whole sequence per
  token, no cache, as `generate` does in that mode) and the base model with its cache.

Where the overhead above `expected` goes (profiled on the mid-size model, one routing layer, 600 tokens, α = 32):
the second pass over 32 tokens costs about 8 % of the 600-token pass rather than 32/600 = 5.3 % (a 32-row matmul
streams the whole weight matrices for few rows), and the routing bookkeeping (router, top-α, gathers, mask,
write-back) adds about 1-2 % more, mostly per-operator dispatch cost. On the tiny model that fixed per-operator cost
dominates, so its ratio on long prompts stays well above `expected`.

Models: (a) the tiny test model (hidden 64, 4 layers), on a short image+text prompt and on the long text prompt;
(b) a mid-size CPU model (hidden 512, 8 layers) on a 600-token text prompt. Both are built from config in a
temporary folder and converted with `vedas_trainer.checkpoint.convert_base`.
"""

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch


REPO = Path(__file__).resolve().parents[1]

from transformers import AutoProcessor, DynamicCache  # noqa: E402

from vedas.routing_vedas import VedasCache  # noqa: E402
from vedas_trainer.checkpoint import BACKBONES, convert_base  # noqa: E402
from vedas_trainer.testing import make_inputs, perturb_vedas, quadrant_image  # noqa: E402
from vedas_trainer.tiny_base import TinySizes, build_tiny_base  # noqa: E402


MID_SIZES = TinySizes(
    hidden_size=512, intermediate_size=1408, num_hidden_layers=8, num_attention_heads=8, num_key_value_heads=4,
    mrope_section=[16, 8, 8], vision_depth=1, vision_embed_dim=64, vision_heads=4,
)


def median_times(fns: dict, repeats: int) -> tuple[dict, dict]:
    """Median and fastest seconds of each callable; the callables run round-robin (after one warm-up each) so that a
    change in machine load affects them alike."""
    for fn in fns.values():
        fn()
    times = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(values) for name, values in times.items()}, {
        name: min(values) for name, values in times.items()}


def build(root: Path, name: str, sizes: TinySizes, routing_topk: int):
    base_dir, vedas_dir = root / f"{name}-base", root / f"{name}-vedas"
    base, _ = build_tiny_base("qwen2_vl", str(base_dir), seed=0, sizes=sizes)
    convert_base(base_dir, vedas_dir, overrides={"routing_topk": routing_topk})
    return base.eval(), vedas_dir


def load(vedas_dir: Path, **overrides):
    """The converted model with perturbed router and e(d); `routing_layers=[]` drops the (unused) RDS weights."""
    model_type = json.loads((vedas_dir / "config.json").read_text())["model_type"]
    _, config_class, model_class = BACKBONES["qwen2_vl" if model_type == "vedas" else "qwen2_5_vl"]
    config = config_class.from_pretrained(vedas_dir, **overrides)
    return perturb_vedas(model_class.from_pretrained(vedas_dir, config=config).eval())


def text_prompt(processor, length: int, seed: int = 0) -> dict:
    """`length` random ordinary tokens (no special tokens): a text prompt of an exact length."""
    generator = torch.Generator().manual_seed(seed)
    special = set(processor.tokenizer.all_special_ids) | set(processor.tokenizer.added_tokens_decoder)
    ordinary = torch.tensor([i for i in range(len(processor.tokenizer)) if i not in special])
    ids = ordinary[torch.randint(len(ordinary), (1, length), generator=generator)]
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "mm_token_type_ids": torch.zeros_like(ids).int()}


def forward_row(label, base, plain, rds, inputs, repeats):
    cfg = rds.config
    seq = inputs["input_ids"].shape[1]
    layers = cfg.text_config.num_hidden_layers
    alphas = [min(int(cfg.routing_topk_for_layer(i)), seq) for i in cfg.routing_layers]
    expected = 1 + sum(alphas) / (layers * seq)

    def run(model):
        with torch.no_grad():
            model(**inputs)

    times, fastest = median_times(
        {name: (lambda m=m: run(m)) for name, m in (("base", base), ("plain", plain), ("rds", rds))}, repeats
    )
    with torch.no_grad():
        stats = rds(**inputs).router_stats
    selected = statistics.mean(float(s["selected"]) for s in stats.values())
    print(f"{label:<34} {seq:>5} {len(cfg.routing_layers)}/{layers:<3} {selected:>6.1f} "
          f"{times['base'] * 1e3:>9.1f} {times['plain'] * 1e3:>9.1f} {times['rds'] * 1e3:>9.1f} "
          f"{times['rds'] / times['base']:>8.3f} {times['rds'] / times['plain']:>8.3f} "
          f"{fastest['rds'] / fastest['plain']:>8.3f} {expected:>9.3f}")


def next_text_position(model, inputs) -> int:
    """The M-RoPE position of the first token after the prompt (images compress positions)."""
    if "image_grid_thw" not in inputs:
        return inputs["input_ids"].shape[1]
    positions, _ = model.model.get_rope_index(
        inputs["input_ids"], mm_token_type_ids=inputs["mm_token_type_ids"], image_grid_thw=inputs["image_grid_thw"],
        attention_mask=inputs["attention_mask"],
    )
    return int(positions.max()) + 1


def decode_row(label, base, causal, global_model, inputs, tokens, repeats):
    """Teacher-forced decoding of `tokens` new tokens after the prompt (the same tokens in every mode)."""
    prompt_len = inputs["input_ids"].shape[1]
    first_position = next_text_position(causal, inputs)

    def step(model, ids, i, cache):
        position = torch.tensor([[[first_position + i]]]).expand(3, 1, 1)
        return model(input_ids=ids[:, -1:], attention_mask=torch.ones_like(ids), position_ids=position,
                     past_key_values=cache, use_cache=True)

    with torch.no_grad():  # the tokens to decode: greedy continuation of the causal model
        ids = inputs["input_ids"]
        cache = VedasCache(config=causal.config.text_config)
        out = causal(**inputs, past_key_values=cache, use_cache=True)
        for i in range(tokens):
            ids = torch.cat([ids, out.logits[:, -1:].argmax(-1)], 1)
            out = step(causal, ids, i, cache)
    full = ids

    def cached(model, cache_class):
        def once():
            with torch.no_grad():
                cache = cache_class(config=model.config.text_config)
                model(**inputs, past_key_values=cache, use_cache=True)  # prefill, not timed
                start = time.perf_counter()
                for i in range(tokens):
                    step(model, full[:, : prompt_len + i + 1], i, cache)
                return time.perf_counter() - start

        return once

    def recompute():
        with torch.no_grad():
            start = time.perf_counter()
            for i in range(tokens):  # a full forward over prompt + i new tokens, as generate does uncached
                seq = full[:, : prompt_len + i + 1]
                types = torch.cat([inputs["mm_token_type_ids"], torch.zeros(1, i + 1, dtype=torch.int)], 1)
                global_model(**{**inputs, "input_ids": seq, "attention_mask": torch.ones_like(seq),
                                "mm_token_type_ids": types}, use_cache=False)
            return time.perf_counter() - start

    runs = {"base": cached(base, DynamicCache), "causal": cached(causal, VedasCache), "global": recompute}
    for fn in runs.values():
        fn()
    # the global recompute is slow and steady (32 long forwards): fewer samples of it
    counts = {"base": repeats, "causal": repeats, "global": max(1, repeats // 3)}
    samples = {name: [] for name in runs}
    for i in range(repeats):
        for name, fn in runs.items():
            if i < counts[name]:
                samples[name].append(fn())
    t_base, t_causal, t_global = (statistics.median(samples[name]) for name in ("base", "causal", "global"))
    print(f"{label:<34} {prompt_len:>6} {tokens:>6} {t_base * 1e3:>10.1f} {t_causal * 1e3:>12.1f} "
          f"{t_global * 1e3:>11.1f} {t_causal / t_base:>11.3f} {t_global / t_causal:>13.1f}")


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--decode-tokens", type=int, default=32)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--prompt-length", type=int, default=600)
    parser.add_argument("--alpha", type=int, default=32)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        tiny_base, tiny_dir = build(root, "tiny", TinySizes(), args.alpha)
        mid_base, mid_dir = build(root, "mid", MID_SIZES, args.alpha)
        processor = AutoProcessor.from_pretrained(tiny_dir, trust_remote_code=True)
        models = {
            name: (base, load(folder), load(folder, routing_layers=[]), load(folder, routing="global"))
            for name, base, folder in (("tiny", tiny_base, tiny_dir), ("mid", mid_base, mid_dir))
        }
        image_prompt = make_inputs(processor, ["what colour is the arrow in the final cell ?"], [quadrant_image()])
        long_prompt = text_prompt(processor, args.prompt_length)

        print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, median of {args.repeats}, "
              f"α = {args.alpha}, routing layers every other layer (0, 2, ...); "
              f"load average before: {os.getloadavg()[0]:.2f}")
        print("\nForward (no cache), times in ms")
        print(f"{'model / prompt':<34} {'seq':>5} {'route':<5} {'sel/l':>6} {'base':>9} {'vedas-off':>9} "
              f"{'vedas-rds':>9} {'rds/base':>8} {'rds/off':>8} {'(min)':>8} {'expected':>9}")
        tiny = models["tiny"]
        forward_row("(a) tiny h64 L4, image+text", tiny[0], tiny[2], tiny[1], image_prompt, args.repeats)
        forward_row(f"(a) tiny h64 L4, text {args.prompt_length}", tiny[0], tiny[2], tiny[1], long_prompt, args.repeats)
        mid = models["mid"]
        forward_row(f"(b) mid h512 L8, text {args.prompt_length}", mid[0], mid[2], mid[1], long_prompt, args.repeats)

        print(f"\nDecode {args.decode_tokens} tokens after the prompt (prefill excluded), times in ms")
        print(f"{'model / prompt':<34} {'prompt':>6} {'tokens':>6} {'base-cache':>10} {'causal-cache':>12} "
              f"{'global-full':>11} {'causal/base':>11} {'global/causal':>13}")
        decode_row("(a) tiny h64 L4, image+text", tiny[0], tiny[1], tiny[3], image_prompt, args.decode_tokens,
                   args.repeats)
        decode_row(f"(b) mid h512 L8, text {args.prompt_length}", mid[0], mid[1], mid[3], long_prompt,
                   args.decode_tokens, args.repeats)
        print(f"\nload average after: {os.getloadavg()[0]:.2f} (on a shared machine, a load above the thread count "
              f"makes every timing noisy)")


if __name__ == "__main__":
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    main()
