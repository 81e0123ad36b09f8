"""Peak memory of a prompt prefill: Vedas against its base model, and what the difference is made of (issue 16).

    python benchmarks/bench_prefill_memory.py                     # tiny, mid and 2b (2B geometry, 2 layers)
    python benchmarks/bench_prefill_memory.py --sizes mid --top 12

Memory does not depend on the machine's load, so this runs anywhere. Each size's base is built offline
(`build_tiny_base`), converted (`convert_base`, K = 32) and loaded with routing layers off (RDS-off, as in
`bench_latent.py`'s memory table) and on. Every row runs on the same ~600-token prompt (one 448 x 448 image), and
its peak is the peak of live tensor bytes allocated inside the prefill (`census.Census`: every ATen operator's new
storages, freed when their last tensor dies; weights and inputs excluded; kernel scratch that is never a tensor is
not seen). Rows:

* **language model only**, on the same embeddings and positions (what `bench_latent.py`'s memory table measured):
  base without a cache, base with a `DynamicCache`, Vedas RDS-off with a `VedasCache` (the old table's Vedas row),
  Vedas RDS-off without a cache;
* **whole prefill as generate runs it**: the base model's forward with a cache and `logits_to_keep=1`, Vedas's plain
  forward (T = 0) the same way, and the latent prefill (pass 0 of `_latent_forward`: the prompt and
  `<|start_latent|>`, saliency on, after its layout, embeddings and positions are built), RDS off and on.

For the pairs that should match it prints Vedas / base and the call sites (`file:function`) whose live bytes at the
peak differ most between the two.
"""

import argparse
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
from bench_latent import QUESTION, REPLAY, SIZES  # noqa: E402  (also maps the packages onto a bare checkout)
from census import run_census  # noqa: E402
from transformers import DynamicCache  # noqa: E402
from transformers.utils import logging as hf_logging  # noqa: E402

from vedas.configuration_vedas import CACHE_ARG  # noqa: E402
from vedas.routing_vedas import VedasCache  # noqa: E402
from vedas_trainer.checkpoint import BACKBONES as CLASSES  # noqa: E402
from vedas_trainer.checkpoint import convert_base, load_vedas  # noqa: E402
from vedas_trainer.testing import make_inputs, perturb_vedas, quadrant_image  # noqa: E402
from vedas_trainer.tiny_base import TinySizes, build_tiny_base  # noqa: E402

# Qwen2-VL-2B's text shapes (hidden 1536, 12 heads of 128, 2 kv heads), cut to 2 layers; small vision tower and
# tokenizer: the prefill's activations and KV cache have the real per-layer sizes
MEMORY_SIZES = {**SIZES, "2b": TinySizes(hidden_size=1536, intermediate_size=8960, num_hidden_layers=2,
                                         num_attention_heads=12, num_key_value_heads=2, mrope_section=[16, 24, 24])}
# (Vedas row, base row) pairs whose ratio is the question
PAIRS = [
    ("LM: Vedas RDS-off, VedasCache", "LM: base, DynamicCache"),
    ("LM: Vedas RDS-off, VedasCache", "LM: base, no cache"),
    ("LM: Vedas RDS-off, no cache", "LM: base, no cache"),
    ("prefill: Vedas RDS-off, T=0", "prefill: base"),
    ("prefill: Vedas RDS-off, latent pass 0", "prefill: base"),
    ("prefill: Vedas RDS on, latent pass 0", "prefill: base"),
]


def build(backbone, sizes, root):
    base_dir, vedas_dir = root / "base", root / "vedas"
    build_tiny_base(backbone, str(base_dir), seed=0, sizes=sizes)
    convert_base(base_dir, vedas_dir, overrides={"num_replay_tokens": REPLAY})
    base = CLASSES[backbone][0].from_pretrained(base_dir, attn_implementation="sdpa").eval()
    vedas_off, processor = load_vedas(vedas_dir, routing_layers=[])
    vedas, _ = load_vedas(vedas_dir)
    perturb_vedas(vedas)
    return base, vedas_off, vedas, processor


def lm_rows(base, vedas_off, inputs):
    """The language model alone on the same embeddings and positions, with and without a cache."""
    ids, mask = inputs["input_ids"], inputs["attention_mask"]
    embeds = vedas_off._embed(ids, inputs["pixel_values"], inputs["image_grid_thw"])
    positions = vedas_off._latent_position_ids(ids, mask, inputs.get("mm_token_type_ids"), inputs["image_grid_thw"])
    text_config = base.config.text_config

    def base_lm(cache):
        return base.model.language_model(inputs_embeds=embeds, attention_mask=mask, position_ids=positions,
                                          use_cache=cache is not None, **{CACHE_ARG: cache})

    def vedas_lm(cache):
        state = vedas_off._routing_state(mask.bool(), mask.bool(), key_valid=mask.bool())
        return vedas_off.model.language_model(inputs_embeds=embeds, attention_mask=mask, position_ids=positions,
                                              use_cache=cache is not None, vedas_state=state, **{CACHE_ARG: cache})

    return {
        "LM: base, no cache": lambda: base_lm(None),
        "LM: base, DynamicCache": lambda: base_lm(DynamicCache(config=text_config)),
        "LM: Vedas RDS-off, VedasCache": lambda: vedas_lm(VedasCache(config=text_config)),
        "LM: Vedas RDS-off, no cache": lambda: vedas_lm(None),
    }


def latent_pass0(model, inputs):
    """Pass 0 of generate's latent forward (prompt + `<|start_latent|>`, saliency on), with its preparation."""
    ids, mask, types = model._append_latent_block(inputs["input_ids"], inputs["attention_mask"],
                                                  inputs["mm_token_type_ids"], 4, REPLAY)
    run = model._latent_run(ids, mask, inputs["pixel_values"], inputs["image_grid_thw"], types, None,
                            crop_images=None, num_replay_tokens=REPLAY, use_cache=True, past_key_values=None,
                            position_ids=None, inputs_embeds=None, generating=True, output_latent_trace=False)
    latent_pass = model._latent_pass(run, begin=0, end=run.layout.start + 1, step=0, output_attentions=False,
                                     output_hidden_states=False)
    return run, latent_pass


def prefill_rows(base, vedas_off, vedas, inputs):
    """The whole prefill as generate runs it: image tower, embeddings, positions, language model, last logits."""
    def plain(model, cache):
        return model(**inputs, use_cache=True, logits_to_keep=1, **{CACHE_ARG: cache})

    config = base.config.text_config
    return {
        "prefill: base": lambda: plain(base, DynamicCache(config=config)),
        "prefill: Vedas RDS-off, T=0": lambda: plain(vedas_off, VedasCache(config=config)),
        "prefill: Vedas RDS-off, latent pass 0": lambda: latent_pass0(vedas_off, inputs),
        "prefill: Vedas RDS on, latent pass 0": lambda: latent_pass0(vedas, inputs),
    }


@torch.no_grad()
def measure(size_name, backbone, root):
    with contextlib.redirect_stderr(io.StringIO()):
        base, vedas_off, vedas, processor = build(backbone, MEMORY_SIZES[size_name], root)
    inputs = make_inputs(processor, [QUESTION], [quadrant_image((448, 448))])
    rows = {**lm_rows(base, vedas_off, inputs), **prefill_rows(base, vedas_off, vedas, inputs)}
    for fn in rows.values():  # warm-up: lazily built buffers (rotary tables, ...) are not the prefill's
        fn()
    censuses = {name: run_census(fn)[0] for name, fn in rows.items()}
    text = base.config.text_config
    kv = 2 * text.num_hidden_layers * text.num_key_value_heads * (text.hidden_size // text.num_attention_heads)
    facts = {"prompt": inputs["input_ids"].shape[1], "kv bytes": kv * inputs["input_ids"].shape[1] * 4}
    return censuses, facts


def mib(num_bytes):
    return f"{num_bytes / 2**20:.2f}"


def report(results, top):
    names = list(next(iter(results.values()))[0])
    print("| prefill | " + " | ".join(f"{s} peak MiB" for s in results) + " |")
    print("|---|" + "---:|" * len(results))
    for name in names:
        print(f"| {name} | " + " | ".join(mib(c[name].peak) for c, _ in results.values()) + " |")
    print("| (KV cache of the prompt, fp32) | " + " | ".join(mib(f["kv bytes"]) for _, f in results.values()) + " |")
    print("\n| Vedas / base (peak) | " + " | ".join(results) + " |")
    print("|---|" + "---:|" * len(results))
    for ours, theirs in PAIRS:
        print(f"| {ours} / {theirs} | "
              + " | ".join(f"{c[ours].peak / c[theirs].peak:.3f}" for c, _ in results.values()) + " |")
    for size_name, (censuses, facts) in results.items():
        print(f"\n## {size_name} (prompt {facts['prompt']} tokens): what differs at the peak\n")
        for ours, theirs in PAIRS:
            a, b = censuses[ours].peak_sites, censuses[theirs].peak_sites
            diff = sorted(((a[s] - b[s], s) for s in set(a) | set(b)), key=lambda x: -abs(x[0]))[:top]
            print(f"{ours} vs {theirs}: {mib(censuses[ours].peak)} vs {mib(censuses[theirs].peak)} MiB; "
                  f"live at the peak, by call site (MiB, + = more in Vedas):")
            print("  " + "; ".join(f"{s} {'+' if d >= 0 else ''}{mib(d)}" for d, s in diff if d))


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", default="tiny,mid,2b", help="comma-separated: " + ", ".join(MEMORY_SIZES))
    parser.add_argument("--backbone", default="qwen2_vl", choices=sorted(CLASSES))
    parser.add_argument("--top", type=int, default=6, help="call sites listed per pair")
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    hf_logging.set_verbosity_error()
    torch.manual_seed(0)
    results = {}
    with tempfile.TemporaryDirectory(prefix="bench_prefill_memory_") as tmp:
        for size_name in [s.strip() for s in args.sizes.split(",") if s.strip()]:
            results[size_name] = measure(size_name, args.backbone, Path(tmp) / size_name)
    print(f"# Prefill memory, Vedas vs base ({args.backbone}, torch {torch.__version__}; peak live tensor bytes "
          f"allocated inside the prefill)\n")
    report(results, args.top)


if __name__ == "__main__":
    main()
