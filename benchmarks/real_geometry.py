"""Real geometry on CPU: Vedas on random-weight models with the published shapes of Qwen2-VL-2B/7B and
Qwen2.5-VL-3B/7B, cut to 2 decoder layers and 2 vision blocks, on real image sizes.

    python benchmarks/real_geometry.py                                   # the default set (see DEFAULT_RUNS)
    python benchmarks/real_geometry.py --models qwen2-vl-2b --sizes 280x280
    python benchmarks/real_geometry.py --models all --sizes all --out benchmarks/real_geometry.md

Per model it builds the base with transformers' own classes (config with the published text and vision shapes, a
151,936-row embedding, a byte-level BPE tokenizer of Qwen's size with Qwen's special tokens at Qwen's ids, the real
Qwen2-VL image processor with Qwen's min/max pixels), saves it and converts it with `convert_base`, the function
`examples/convert_base.py` and `examples/train.py` call. Per image size it then checks, and times:

* **convert**: the converted model's plain forward equals the base's (the last layer's hidden states at every
  position and the logits of the last positions over every row but the Vedas tokens'), max |difference| printed;
* **train**: one latent training step at the last curriculum stage (T = 4 latent steps, K = 32 replay tokens, crop
  re-encode and L_recon on, lambda = 0.2) built by `VedasCollator`, forward and backward; the loss and L_recon must
  be finite and the routers, e(d) and token_sr must get a finite gradient. The vision tower and the embeddings are
  frozen (a LoRA-like setting, so that the 7B gradients fit in this machine's memory; gradient still flows through
  them to the decoder);
* **generate**: latent generation (T = 4, 4 new tokens, greedy) with and without the KV cache; the sequences must be
  equal and the scores close.

Time is wall-clock; memory is the process's peak resident set size during the phase, sampled every 5 ms from
/proc/self/statm (the model's own weights included), so phases can be compared without a process per case.
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import shutil
import sys
import tempfile
import threading
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path

import torch

# Qwen's vocabulary: 151,643 regular (byte-level BPE) tokens, then the special tokens at ids 151,643 onwards, in
# an embedding of 151,936 rows (the rows past the tokenizer are the spare rows conversion reuses).
QWEN_REGULAR_TOKENS = 151_643
QWEN_EMBEDDING_ROWS = 151_936
QWEN2_VL_SPECIAL = [
    "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>", "<|object_ref_end|>", "<|box_start|>",
    "<|box_end|>", "<|quad_start|>", "<|quad_end|>", "<|vision_start|>", "<|vision_end|>", "<|vision_pad|>",
    "<|image_pad|>", "<|video_pad|>",
]
# Qwen2.5-VL's tokenizer adds the tool-call and fill-in-the-middle tokens after them (151,665 tokens in all)
QWEN25_VL_EXTRA = ["<tool_call>", "</tool_call>", "<|fim_prefix|>", "<|fim_middle|>", "<|fim_suffix|>", "<|fim_pad|>",
                   "<|repo_name|>", "<|file_sep|>"]
# the processor's bounds in Qwen's preprocessor_config.json (both backbones)
MIN_PIXELS, MAX_PIXELS = 56 * 56, 28 * 28 * 16384  # 3,136 and 12,845,056
LAYERS, VISION_BLOCKS = 2, 2
STEPS, REPLAY, NEW_TOKENS, RECON_WEIGHT = 4, 32, 4, 0.2


@dataclass
class Geometry:
    """Published shapes (config.json of the Instruct checkpoints); `layers`/`vision_depth` are the real depths,
    which the benchmark cuts to LAYERS and VISION_BLOCKS."""

    backbone: str
    hidden: int
    intermediate: int
    heads: int
    kv_heads: int
    layers: int
    tie: bool
    vision: dict = field(default_factory=dict)
    head_dim: int = 128
    mrope_section: tuple = (16, 24, 24)
    rope_theta: float = 1e6
    max_positions: int = 32768


QWEN2_VISION = dict(depth=32, embed_dim=1280, num_heads=16, mlp_ratio=4, hidden_act="quick_gelu")
QWEN25_VISION = dict(depth=32, hidden_size=1280, num_heads=16, intermediate_size=3420, hidden_act="silu",
                     window_size=112, fullatt_block_indexes=[7, 15, 23, 31], tokens_per_second=2)
MODELS = {
    "qwen2-vl-2b": Geometry("qwen2_vl", 1536, 8960, 12, 2, 28, True, QWEN2_VISION),
    "qwen2-vl-7b": Geometry("qwen2_vl", 3584, 18944, 28, 4, 28, False, QWEN2_VISION),
    "qwen2.5-vl-3b": Geometry("qwen2_5_vl", 2048, 11008, 16, 2, 36, True, QWEN25_VISION, max_positions=128000),
    "qwen2.5-vl-7b": Geometry("qwen2_5_vl", 3584, 18944, 28, 4, 28, False, QWEN25_VISION, max_positions=128000),
}
SIZES = {"280x280": (280, 280), "448x448": (448, 448), "1024x768": (1024, 768), "2048x512": (2048, 512)}
# What runs without --models/--sizes: every model at 280 x 280 (each geometry: GQA ratios 6, 7 and 8, Qwen2.5-VL's
# window attention, tied and untied heads) and the panorama on the 2B model (the most extreme grid, 146 x 36 patches).
# About 10 minutes on 2 CPU cores; all 16 cases take about an hour (the 7B cases at 1024 x 768 and 2048 x 512 take
# 5 to 10 minutes each, most of it the uncached generation that recomputes the prefix at every step).
DEFAULT_RUNS = [(model, "280x280") for model in MODELS] + [("qwen2-vl-2b", "2048x512")]


# ----------------------------------------------------------------------------------------------------------------
# Memory and time
# ----------------------------------------------------------------------------------------------------------------

_PAGE = os.sysconf("SC_PAGE_SIZE")


def rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * _PAGE


class Phase:
    """Wall time and peak RSS of a block (a sampling thread, every 5 ms)."""

    def __init__(self):
        self.seconds = self.peak = self.start_rss = 0

    def __enter__(self):
        self._stop = threading.Event()
        self.start_rss = self.peak = rss()

        def sample():
            while not self._stop.wait(0.005):
                self.peak = max(self.peak, rss())

        self._thread = threading.Thread(target=sample, daemon=True)
        self._thread.start()
        self._started = time.perf_counter()
        return self

    def __exit__(self, *exc):
        self.seconds = time.perf_counter() - self._started
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, rss())
        return False


def gib(n: float) -> str:
    return f"{n / 2**30:.2f}"


# ----------------------------------------------------------------------------------------------------------------
# The base: tokenizer of Qwen's size, config with the published shapes, real processor
# ----------------------------------------------------------------------------------------------------------------

def build_tokenizer(backbone: str):
    """A byte-level BPE tokenizer with Qwen's layout: BPE merges learned on a small corpus (so prompts encode in few
    tokens), its vocabulary padded with unreachable filler tokens to 151,643 regular tokens, then Qwen's special
    tokens at Qwen's ids (<|endoftext|> = 151643, <|im_end|> = 151645, <|image_pad|> = 151655, ...)."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from vedas_trainer.tiny_base import CHAT_TEMPLATE, training_corpus

    learner = Tokenizer(models.BPE())
    learner.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    learner.train_from_iterator(training_corpus(), trainers.BpeTrainer(
        vocab_size=1000, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False))
    learned = json.loads(learner.to_str())["model"]
    vocab = dict(learned["vocab"])
    for i in range(QWEN_REGULAR_TOKENS - len(vocab)):
        vocab[f"<filler_{i}>"] = len(vocab)
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in learned["merges"]]
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=merges))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    special = QWEN2_VL_SPECIAL + (QWEN25_VL_EXTRA if backbone == "qwen2_5_vl" else [])
    tokenizer.add_special_tokens([AddedToken(token, special=True, normalized=False) for token in special])
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, eos_token="<|im_end|>", pad_token="<|endoftext|>",
        extra_special_tokens={"image_token": "<|image_pad|>", "video_token": "<|video_pad|>"},
        model_max_length=32768, chat_template=CHAT_TEMPLATE,
    )
    assert fast.convert_tokens_to_ids("<|endoftext|>") == 151643 and fast.convert_tokens_to_ids("<|image_pad|>") == 151655
    return fast


def build_base(name: str, folder: Path, seed: int = 0):
    """Random-weight base with the published shapes, cut to LAYERS decoder layers and VISION_BLOCKS vision blocks;
    saved to `folder` with its processor. Returns (model, processor)."""
    from transformers import (Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration, Qwen2VLConfig,
                              Qwen2VLForConditionalGeneration)

    from vedas_trainer.tiny_base import TinySizes, build_processor

    geo = MODELS[name]
    tokenizer = build_tokenizer(geo.backbone)
    processor = build_processor(geo.backbone, tokenizer, TinySizes(min_pixels=MIN_PIXELS, max_pixels=MAX_PIXELS))
    ids = {token: tokenizer.convert_tokens_to_ids(token) for token in QWEN2_VL_SPECIAL}
    text = dict(
        vocab_size=QWEN_EMBEDDING_ROWS, hidden_size=geo.hidden, intermediate_size=geo.intermediate,
        num_hidden_layers=LAYERS, num_attention_heads=geo.heads, num_key_value_heads=geo.kv_heads,
        max_position_embeddings=geo.max_positions, rms_norm_eps=1e-6, hidden_act="silu",
        rope_parameters={"rope_type": "default", "rope_theta": geo.rope_theta, "mrope_section": list(geo.mrope_section)},
        bos_token_id=ids["<|endoftext|>"], eos_token_id=ids["<|im_end|>"], pad_token_id=ids["<|endoftext|>"],
    )
    vision = dict(geo.vision, depth=VISION_BLOCKS, patch_size=14, spatial_merge_size=2, temporal_patch_size=2)
    if geo.backbone == "qwen2_vl":
        config_class, model_class = Qwen2VLConfig, Qwen2VLForConditionalGeneration
        vision["hidden_size"] = geo.hidden  # Qwen2-VL's vision config names the merger's output size hidden_size
    else:
        config_class, model_class = Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration
        vision["out_hidden_size"] = geo.hidden
        # of the cut tower, block 0 uses window attention and block 1 full attention (the real tower: 7, 15, 23, 31)
        vision["fullatt_block_indexes"] = [VISION_BLOCKS - 1]
    config = config_class(
        text_config=text, vision_config=vision, image_token_id=ids["<|image_pad|>"],
        video_token_id=ids["<|video_pad|>"], vision_start_token_id=ids["<|vision_start|>"],
        vision_end_token_id=ids["<|vision_end|>"], tie_word_embeddings=geo.tie,
    )
    torch.manual_seed(seed)
    model = model_class(config).eval()
    model.generation_config.pad_token_id = ids["<|endoftext|>"]
    model.generation_config.eos_token_id = ids["<|im_end|>"]
    head_dim = config.text_config.hidden_size // config.text_config.num_attention_heads
    assert head_dim == geo.head_dim and sum(geo.mrope_section) * 2 == head_dim, (head_dim, geo.mrope_section)
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    return model, processor


# ----------------------------------------------------------------------------------------------------------------
# Inputs
# ----------------------------------------------------------------------------------------------------------------

QUESTION = "which cell does the arrow point to ?"
CHOICES = ["the red cell", "the green cell", "the blue cell", "the yellow cell"]
STEPS_TEXT = ["start : the arrow is in row 2 , column 3 .", "step 1 : it points up to row 1 .",
              "step 2 : row 1 , column 3 is green .", "step 3 : so the cell is green ."]


def image_of(size_name: str):
    from vedas_trainer.testing import quadrant_image

    return quadrant_image(SIZES[size_name], seed=1)


def prompt_inputs(processor, size_name):
    from vedas_trainer.testing import make_inputs

    return make_inputs(processor, [QUESTION], [image_of(size_name)])


def base_reference(base, processor, size_name, keep: int = 16) -> dict:
    """The base's plain forward on the prompt: last hidden states (all positions) and the last `keep` logits."""
    inputs = prompt_inputs(processor, size_name)
    with torch.no_grad():
        out = base(**inputs, output_hidden_states=True, logits_to_keep=keep)
    return {"hidden": out.hidden_states[-1].clone(), "logits": out.logits.clone(),
            "tokens": inputs["input_ids"].shape[1], "visual": int((inputs["input_ids"] == base.config.image_token_id).sum())}


# ----------------------------------------------------------------------------------------------------------------
# The checks of one (model, size)
# ----------------------------------------------------------------------------------------------------------------

def check_conversion(model, processor, reference, size_name, keep: int = 16) -> float:
    inputs = prompt_inputs(processor, size_name)
    with torch.no_grad():
        out = model(**inputs, output_hidden_states=True, logits_to_keep=keep)
    new_rows = torch.tensor(sorted(model.config.special_token_ids().values()))
    columns = torch.ones(out.logits.shape[-1], dtype=torch.bool)
    columns[new_rows] = False  # the Vedas tokens' rows are re-initialised by design
    hidden = (out.hidden_states[-1] - reference["hidden"]).abs().max().item()
    logits = (out.logits[..., columns] - reference["logits"][..., columns]).abs().max().item()
    return max(hidden, logits)


def latent_train_step(model, processor, size_name) -> dict:
    """One training step at the last stage (every step latent), as the Trainer runs it: collator, forward with
    labels and crop images, backward."""
    from vedas_trainer.collator import VedasCollator

    collator = VedasCollator(processor, model.config, stage=STEPS, max_latent_stage=STEPS, latents_per_step=1)
    sample = {"id": "s-0", "images": [image_of(size_name)], "question": QUESTION, "choices": CHOICES,
              "steps": STEPS_TEXT, "answer": "B"}
    batch = collator([sample])
    model.train()
    model.zero_grad(set_to_none=True)
    out = model(**batch)
    forward = time.perf_counter()
    out.loss.backward()
    backward = time.perf_counter()
    model.eval()
    grads = {}
    for name, param in model.named_parameters():
        for part in ("depth_router", "depth_step_embed", "token_sr"):
            if part in name:
                grads.setdefault(part, []).append(param.grad)
    problems = [f"{part}: no gradient" for part, gs in grads.items() if all(g is None for g in gs)]
    problems += [f"{part}: non-finite gradient" for part, gs in grads.items()
                 if any(g is not None and not torch.isfinite(g).all() for g in gs)]
    recon = getattr(out, "recon_loss", None)
    if recon is None or not torch.isfinite(recon):
        problems.append(f"recon_loss = {recon}")
    if not torch.isfinite(out.loss):
        problems.append(f"loss = {out.loss.item()}")
    model.zero_grad(set_to_none=True)
    return {"tokens": batch["input_ids"].shape[1], "loss": out.loss.item(), "backward_s": backward - forward,
            "recon": None if recon is None else recon.item(), "problems": problems}


def latent_generate(model, processor, size_name, use_cache: bool):
    from vedas_trainer.testing import no_eos

    inputs = prompt_inputs(processor, size_name)
    with torch.no_grad():
        return model.generate(**inputs, num_latent_steps=STEPS, max_new_tokens=NEW_TOKENS, do_sample=False,
                              use_cache=use_cache, return_dict_in_generate=True, output_scores=True, **no_eos(model))


def compare_generations(cached, uncached) -> tuple[bool, float]:
    """(same sequences, max |score difference|); suppressed tokens score -inf on both sides and are compared as
    such, not subtracted."""
    if not torch.equal(cached.sequences, uncached.sequences):
        return False, math.inf
    diff = 0.0
    for a, b in zip(cached.scores, uncached.scores):
        finite = torch.isfinite(a)
        if not torch.equal(finite, torch.isfinite(b)) or not torch.equal(a[~finite], b[~finite]):
            return True, math.inf
        diff = max(diff, (a[finite] - b[finite]).abs().max().item())
    return True, diff


# ----------------------------------------------------------------------------------------------------------------
# Driver
# ----------------------------------------------------------------------------------------------------------------

def run_model(name: str, size_names: list[str], scratch: Path, rows: list[dict], log) -> None:
    from vedas_trainer.checkpoint import convert_base

    folder = scratch / name
    shutil.rmtree(folder, ignore_errors=True)
    with Phase() as build:
        base, processor = build_base(name, folder / "base")
    params = sum(p.numel() for p in base.parameters())
    with Phase() as ref_phase:
        references = {size: base_reference(base, processor, size) for size in size_names}
    log(f"{name}: base built and saved in {build.seconds:.1f} s ({params / 1e6:.0f} M parameters, peak RSS "
        f"{gib(build.peak)} GiB); reference forwards {ref_phase.seconds:.1f} s")
    del base
    gc.collect()
    with Phase() as convert:
        model, processor = convert_base(folder / "base", folder / "vedas", overwrite=True,
                                        overrides={"recon_weight": RECON_WEIGHT, "num_replay_tokens": REPLAY,
                                                   "num_latent_steps": STEPS})
    shutil.rmtree(folder / "base", ignore_errors=True)
    log(f"{name}: convert_base {convert.seconds:.1f} s, peak RSS {gib(convert.peak)} GiB (base and Vedas model "
        f"together), {len(processor.tokenizer)} tokens, {model.get_input_embeddings().weight.shape[0]} rows")
    # train the decoder and the Vedas modules; the vision tower and the embeddings stay frozen (see the docstring)
    for pname, param in model.named_parameters():
        param.requires_grad_(not ("visual" in pname or "embed_tokens" in pname or "lm_head" in pname))
    for size in size_names:
        row = {"model": name, "size": size, "visual": references[size]["visual"],
               "prompt": references[size]["tokens"], "build_s": build.seconds, "convert_s": convert.seconds,
               "convert_peak": convert.peak, "failures": []}
        rows.append(row)
        check_size(model, processor, size, references[size], row, log)
        log(format_row(row))
        gc.collect()
    del model
    gc.collect()
    shutil.rmtree(folder, ignore_errors=True)


def check_size(model, processor, size: str, reference: dict, row: dict, log) -> None:
    """One image size on the converted model: convert == base, one latent training step, generate with and without
    the cache; the timings, peaks and failures go into `row` (a failing check is recorded, the others still run)."""
    name = row["model"]

    def attempt(label, fn):
        try:
            return fn()
        except Exception as err:  # noqa: BLE001 - the point is to report what breaks at this shape
            row["failures"].append(f"{label}: {type(err).__name__}: {str(err)[:300]}")
            log(f"{name} {size}: {label} FAILED\n{traceback.format_exc()}")
            return None

    diff = attempt("convert==base", lambda: check_conversion(model, processor, reference, size))
    row["convert_diff"] = diff
    if diff is not None and diff != 0.0:
        row["failures"].append(f"convert==base: max |difference| {diff:.3g}")
    with Phase() as phase:
        result = attempt("train step", lambda: latent_train_step(model, processor, size))
    row.update(train_s=phase.seconds, train_peak=phase.peak, train_base=phase.start_rss)
    if result is not None:
        row.update(train_tokens=result["tokens"], loss=result["loss"], recon=result["recon"],
                   backward_s=result["backward_s"])
        row["failures"] += [f"train step: {p}" for p in result["problems"]]
    gc.collect()
    with Phase() as cached_phase:
        cached = attempt("generate (cache)", lambda: latent_generate(model, processor, size, True))
    with Phase() as uncached_phase:
        uncached = attempt("generate (no cache)", lambda: latent_generate(model, processor, size, False))
    row.update(gen_cache_s=cached_phase.seconds, gen_nocache_s=uncached_phase.seconds,
               gen_peak=max(cached_phase.peak, uncached_phase.peak))
    if cached is not None and uncached is not None:
        same, score_diff = compare_generations(cached, uncached)
        row.update(gen_same=same, score_diff=score_diff)
        if not same or not score_diff <= 1e-3:
            row["failures"].append(f"cache != no cache (same sequences: {same}, max score difference "
                                   f"{score_diff:.3g})")


HEADER = ("| model | image | visual tokens | prompt / train tokens | converted == base (max abs diff) | train step s (backward) "
          "| train peak RSS GiB | loss (L_recon) | generate s, cache / no cache | cache == no cache (max score diff) "
          "| generate peak RSS GiB |")


def _num(value, fmt):
    return "—" if value is None else format(value, fmt)


def format_row(row: dict) -> str:
    diff = row.get("convert_diff")
    same = row.get("gen_same")
    score = "" if not same else f" ({row['score_diff']:.1g})"
    return (f"| {row['model']} | {row['size']} | {row['visual']} | {row['prompt']} / {row.get('train_tokens', '—')} "
            f"| {'—' if diff is None else ('PASS (0)' if diff == 0 else f'FAIL ({diff:.2g})')} "
            f"| {_num(row.get('train_s'), '.1f')} ({_num(row.get('backward_s'), '.1f')}) | {gib(row['train_peak']) if 'train_peak' in row else '—'} "
            f"| {_num(row.get('loss'), '.3f')} ({_num(row.get('recon'), '.3f')}) "
            f"| {_num(row.get('gen_cache_s'), '.1f')} / {_num(row.get('gen_nocache_s'), '.1f')} "
            f"| {'—' if same is None else ('PASS' if same and row['score_diff'] <= 1e-3 else 'FAIL')}"
            f"{score} "
            f"| {gib(row['gen_peak']) if 'gen_peak' in row else '—'} |")


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default=None,
                        help=f"comma-separated subset of {', '.join(MODELS)}, or 'all' (default: DEFAULT_RUNS)")
    parser.add_argument("--sizes", default=None,
                        help=f"comma-separated subset of {', '.join(SIZES)}, or 'all' (default: DEFAULT_RUNS)")
    parser.add_argument("--out", default=None, help="also write the table (Markdown) to this file")
    parser.add_argument("--scratch", default=None, help="folder for the saved base and converted models "
                        "(default: a temporary folder; the 7B ones take about 13 GB while they exist)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    args = parser.parse_args(argv)

    def pick(value, known, what):
        if value is None:
            return None
        names = list(known) if value == "all" else [v.strip() for v in value.split(",") if v.strip()]
        unknown = [n for n in names if n not in known]
        if unknown or not names:
            parser.error(f"--{what}: unknown {unknown or value!r}; choose from {', '.join(known)} or 'all'")
        return names

    models, sizes = pick(args.models, MODELS, "models"), pick(args.sizes, SIZES, "sizes")
    if models is None and sizes is None:
        runs = list(DEFAULT_RUNS)
    else:
        runs = [(m, s) for m in (models or list(MODELS)) for s in (sizes or list(SIZES))]
        if models is None or sizes is None:  # one of them given: keep the default's pairs within it
            runs = [(m, s) for m, s in DEFAULT_RUNS if (models is None or m in models) and (sizes is None or s in sizes)]
    return args, runs


def render(rows: list[dict], planned: int, seconds: float) -> str:
    """The Markdown report of the rows so far (written after every case, so an interrupted run leaves a table)."""
    import transformers

    failures = [(row["model"], row["size"], f) for row in rows for f in row["failures"]]
    partial = "" if len(rows) == planned else f" (interrupted or still running: {len(rows)} of {planned} cases)"
    lines = [
        f"Real geometry on CPU ({torch.get_num_threads()} threads, torch {torch.__version__}, transformers "
        f"{transformers.__version__}): {len(rows)} cases in {seconds:.0f} s{partial}.",
        "",
        f"Published shapes cut to {LAYERS} decoder layers and {VISION_BLOCKS} vision blocks, fp32, random weights; "
        f"T = {STEPS} latent steps, K = {REPLAY} replay tokens, crop re-encode and L_recon on (lambda = "
        f"{RECON_WEIGHT}); generation: {NEW_TOKENS} new tokens, greedy. Peak RSS is the whole process (model "
        f"weights included).",
        "",
        "| model | build + save s | convert_base s | convert peak RSS GiB |",
        "|---|---|---|---|",
    ]
    seen = set()
    for row in rows:
        if row["model"] not in seen:
            seen.add(row["model"])
            lines.append(f"| {row['model']} | {row['build_s']:.1f} | {row['convert_s']:.1f} | {gib(row['convert_peak'])} |")
    lines += ["", HEADER, "|" + "---|" * (HEADER.count("|") - 1)]
    lines += [format_row(row) for row in rows]
    lines += ["", "Failures:" if failures else "Failures: none."]
    lines += [f"- {model} {size}: {failure}" for model, size, failure in failures]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    args, runs = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    import transformers

    started = time.perf_counter()
    rows: list[dict] = []

    def log(text):
        print(text, flush=True)
        if args.out and text.startswith("| "):  # a finished case: rewrite the report
            Path(args.out).write_text(render(rows, len(runs), time.perf_counter() - started))

    scratch_parent = Path(args.scratch) if args.scratch else Path(tempfile.mkdtemp(prefix="vedas-real-geometry-"))
    scratch_parent.mkdir(parents=True, exist_ok=True)
    print(f"torch {torch.__version__}, transformers {transformers.__version__}, {torch.get_num_threads()} threads; "
          f"{len(runs)} cases\n{HEADER}", flush=True)
    try:
        for name in dict.fromkeys(m for m, _ in runs):
            run_model(name, [s for m, s in runs if m == name], scratch_parent, rows, log)
    finally:
        if not args.scratch:
            shutil.rmtree(scratch_parent, ignore_errors=True)
    text = render(rows, len(runs), time.perf_counter() - started)
    print("\n" + text)
    if args.out:
        Path(args.out).write_text(text)
    return 1 if any(row["failures"] for row in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
