"""Latent-generation latency and saliency memory, side by side in one run (issue 4; docs/design.md, "Measuring").

For each model size, a base Qwen2-VL (or Qwen2.5-VL) checkpoint is built offline in a temporary folder
(`build_tiny_base`), converted to Vedas (`convert_base`, K = 32) and its Vedas modules are given non-trivial
values (router weights and e(d), as `tests/conftest.py::perturb_vedas` does) so that routing depth scaling runs
its second pass. Every variant below then runs on the *same* inputs (one 448x448 image = 256 visual tokens plus
text, ~600 prompt tokens). Every round runs every variant `--inner` times, interleaved (A B C A B C) in a freshly
shuffled order, so that machine noise and order effects hit all of them alike; ratios are taken within each round
and reported as the median over rounds with their spread (IQR, max - min), next to each variant's median time.

Variants (greedy; the answer length is forced with `min_new_tokens = max_new_tokens`):

* `No-CoT`         Vedas `generate`, T = 0, 4 answer tokens (RDS active).
* `latent`         Vedas `generate`, T = 4, K = 32, causal KV cache, 4 answer tokens.
* `latent uncached` the same with `use_cache=False` (every step recomputes the whole latent forward).
* `latent RDS-off` the same as `latent` on the same weights with `routing_layers=[]` (context only).
* `CoT`            Vedas `generate`, T = 0, `--cot-tokens` (100) answer tokens.
* `ideal latent`   the plain base model (not Vedas) in a hand-written loop: prefill (vision tower included),
                   4 chunks of K + 1 = 33 embeddings on its warm `DynamicCache`, then 4 one-token decode forwards.
                   This is the least work a latent step can cost.
* `ideal No-CoT`   the same loop without the chunks (prefill + 4 decode forwards): the bare cost of No-CoT.
* `ideal latent + RDS passes` the ideal latent loop plus, after each routing layer's own pass, the plain layer
                   once more over as many tokens as Vedas's RDS second pass re-ran there (recorded from one Vedas
                   latent generate): the least work of the method with RDS on. Vedas latent over it is what
                   Vedas's own work (saliency rows, router, selection, masks, replay) costs.
* `base generate`  the plain base model's own `generate`, 4 tokens (HF generation-loop overhead, for context).

Saliency memory: the prefill of the prompt is profiled with `torch.profiler(profile_memory=True)` and the peak of
the bytes held by tensors allocated inside the profiled region is read off its memory timeline (exact for
tensors that ATen allocates; kernel-internal scratch of fused kernels such as SDPA is not a tensor and is not
seen). It is run on the same embeddings and positions as: Vedas RDS-off sdpa prefill without / with our saliency
capture (one attention row per layer: `(batch, heads, n)`), the base model's sdpa prefill, and the base model with
eager attention without / with `output_attentions=True` (every layer's `(batch, heads, n, n)` map is kept). Also printed: the bytes each method
hands back (our `(batch, visual)` score vs the tuple of attention maps).

Usage:  python benchmarks/bench_latent.py [--sizes tiny,mid] [--repeats 20] [--inner 4] [--slow-repeats 6] [--profile]
No assertions: this prints numbers. It needs no network and takes a few minutes on 2 otherwise idle CPU cores.
Timings on a busy machine are unreliable: with 2 threads on 2 cores, one competing process can slow every
variant several-fold and unevenly. The printed load averages and thread counts say how busy the machine was; the
spread of the per-round ratios says how far to trust a ratio (target: IQR under 0.03 on an idle machine). (On Linux with autogroup scheduling, `nice` alone does not shield the run
from other terminal sessions' processes; the autogroup priority in `/proc/<pid>/autogroup` does.)
"""

import argparse
import contextlib
import importlib.util
import io
import os
import random
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")

import torch  # noqa: E402


REPO = Path(__file__).resolve().parents[1]


def _import_stack():
    """The installed `vedas` / `vedas_trainer` packages, or this checkout when they are not installed."""
    try:
        import vedas  # noqa: F401
        import vedas_trainer  # noqa: F401
    except ImportError:  # running from a bare checkout: map the package names onto the repository folders
        for name, folder in (("vedas", REPO), ("vedas_trainer", REPO / "trainer")):
            spec = importlib.util.spec_from_file_location(name, folder / "__init__.py",
                                                          submodule_search_locations=[str(folder)])
            module = importlib.util.module_from_spec(spec)
            sys.modules[name] = module
            spec.loader.exec_module(module)


_import_stack()

from transformers import DynamicCache  # noqa: E402
from transformers.utils import logging as hf_logging  # noqa: E402

from vedas.replay_vedas import visual_tokens  # noqa: E402
from vedas.routing_vedas import VedasCache  # noqa: E402
from vedas_trainer.checkpoint import BACKBONES as CLASSES  # noqa: E402
from vedas_trainer.checkpoint import convert_base, load_vedas  # noqa: E402
from vedas_trainer.testing import make_inputs, perturb_vedas, quadrant_image  # noqa: E402
from vedas_trainer.tiny_base import TinySizes, build_tiny_base  # noqa: E402


STEPS, REPLAY, ANSWER = 4, 32, 4
FLOOR = "ideal latent + RDS passes (base)"  # the variant that sets the least RDS can cost (`floor_loop`)
SIZES = {
    "tiny": TinySizes(),
    # hidden 512, 8 layers, 8 heads (head_dim 64 -> mrope sums to 32), 4 kv heads; vision tower stays small
    "mid": TinySizes(hidden_size=512, intermediate_size=1536, num_hidden_layers=8, num_attention_heads=8,
                     num_key_value_heads=4, mrope_section=[16, 8, 8]),
}
# ~330 text tokens with the tiny tokenizer; with 256 visual tokens the prompt is 595 tokens
QUESTION = " ".join(
    ["Which colour is the cell above the arrow in row 3 column 4 of the picture ? Choices : ( a ) red ( b ) blue"] * 9
    + ["Answer with the letter of the correct option ."]
)


# ------------------------------------------------------------------------------------------------ models / data
def build_models(backbone, sizes, root):
    base_dir, vedas_dir = root / "base", root / "vedas"
    build_tiny_base(backbone, str(base_dir), seed=0, sizes=sizes)
    convert_base(base_dir, vedas_dir, overrides={"num_replay_tokens": REPLAY})
    base_class = CLASSES[backbone][0]
    base = base_class.from_pretrained(base_dir, attn_implementation="sdpa").eval()
    eager = base_class.from_pretrained(base_dir, attn_implementation="eager").eval()
    vedas, processor = load_vedas(vedas_dir)
    perturb_vedas(vedas)
    vedas_off, _ = load_vedas(vedas_dir, routing_layers=[])
    return base, eager, vedas, vedas_off, processor


# ------------------------------------------------------------------------------------------------ variants
@torch.no_grad()
def bare_loop(base, inputs, steps, chunk, new_tokens):
    """The plain backbone: prefill, `steps` forwards of `chunk` embeddings on the warm cache, `new_tokens` decode
    forwards of one token each (greedy). Positions continue the text counter, as Vedas's latents do."""
    cache = DynamicCache(config=base.config.text_config)
    out = base(**inputs, past_key_values=cache, use_cache=True, logits_to_keep=1)
    batch = inputs["input_ids"].shape[0]
    if steps:
        delta = base.model.rope_deltas.view(batch, 1)
        chunk_embeds = base.get_input_embeddings().weight[:chunk][None].expand(batch, -1, -1)
        for _ in range(steps):
            start = cache.get_seq_length()
            positions = (start + delta + torch.arange(chunk)[None]).unsqueeze(0).expand(3, -1, -1)
            base.model.language_model(inputs_embeds=chunk_embeds, position_ids=positions, past_key_values=cache,
                                      use_cache=True)
    token = out.logits[:, -1].argmax(-1, keepdim=True)
    for _ in range(new_tokens):
        out = base(input_ids=token, past_key_values=cache, use_cache=True, logits_to_keep=1)
        token = out.logits[:, -1].argmax(-1, keepdim=True)


@contextlib.contextmanager
def _wrapped(owner, name, make_wrapper):
    """`owner.name` replaced by `make_wrapper(original)` inside the block."""
    original = getattr(owner, name)
    setattr(owner, name, make_wrapper(original))
    try:
        yield
    finally:
        setattr(owner, name, original)


@torch.no_grad()
def second_pass_widths(run) -> dict:
    """What RDS re-ran in one Vedas call `run()`: `{(layer, main pass index): [(depth, tokens), ...]}`, one entry
    per second pass (a depth step whose selection is empty runs none)."""
    from vedas.routing_vedas import VedasDecoderLayerMixin as Layer

    calls, widths = {}, {}

    def counting(route):  # a routing layer's main pass runs its depth steps 0, 1, ... in order
        def wrapper(self, hidden_states, depth, *args, **kwargs):
            if depth == 0:
                calls[self.layer_idx] = calls.get(self.layer_idx, 0) + 1
            return route(self, hidden_states, depth, *args, **kwargs)
        return wrapper

    def recording(second_pass):
        def wrapper(self, h_sel, *args, key, **kwargs):
            widths.setdefault((key[0], calls[key[0]] - 1), []).append((key[1], h_sel.shape[1]))
            return second_pass(self, h_sel, *args, key=key, **kwargs)
        return wrapper

    with _wrapped(Layer, "_route", counting), _wrapped(Layer, "_second_pass", recording):
        run()
    return widths


@torch.no_grad()
def floor_loop(base, inputs, steps, chunk, new_tokens, widths):
    """`bare_loop` plus the least work of routing depth scaling: after each routing layer's own pass, the plain
    backbone layer once more over as many tokens as Vedas's second pass re-ran there (`second_pass_widths`), on its
    own cache per (layer, depth), with no router, selection, mask or residual bookkeeping. Vedas latent over this
    loop is what Vedas's own work costs beyond the passes that the method needs."""
    layers = base.model.language_model.layers
    calls, caches = {}, {}

    def rerun(module, args, kwargs, output):
        index = module.self_attn.layer_idx
        call = calls[index] = calls.get(index, -1) + 1
        hidden = output[0] if isinstance(output, tuple) else output
        cos, sin = kwargs["position_embeddings"]
        for depth, width in widths.get((index, call), ()):
            cache = caches.setdefault((index, depth), DynamicCache(config=base.config.text_config))
            # forward, not __call__: this hook must not fire again
            module.forward(hidden[:, :width], position_embeddings=(cos[:, :width], sin[:, :width]),
                           past_key_values=cache, use_cache=True)
        return output

    routing = sorted({index for index, _ in widths})
    handles = [layers[i].register_forward_hook(rerun, with_kwargs=True) for i in routing]
    try:
        bare_loop(base, inputs, steps, chunk, new_tokens)
    finally:
        for handle in handles:
            handle.remove()
    return calls


def make_variants(base, vedas, vedas_off, inputs, cot_tokens):
    def gen(model, steps, new_tokens, **extra):
        return lambda: model.generate(**inputs, num_latent_steps=steps, num_replay_tokens=REPLAY, do_sample=False,
                                      min_new_tokens=new_tokens, max_new_tokens=new_tokens, **extra)

    answer = dict(min_new_tokens=ANSWER, max_new_tokens=ANSWER, do_sample=False)
    widths = second_pass_widths(gen(vedas, STEPS, ANSWER))
    return {
        "No-CoT (T=0, 4 tok)": gen(vedas, 0, ANSWER),
        "latent (T=4, K=32, cached)": gen(vedas, STEPS, ANSWER),
        "latent, use_cache=False": gen(vedas, STEPS, ANSWER, use_cache=False),
        "latent, RDS off": gen(vedas_off, STEPS, ANSWER),
        f"CoT (T=0, {cot_tokens} tok)": gen(vedas, 0, cot_tokens),
        "ideal latent (base, bare loop)": lambda: bare_loop(base, inputs, STEPS, REPLAY + 1, ANSWER),
        "ideal No-CoT (base, bare loop)": lambda: bare_loop(base, inputs, 0, REPLAY + 1, ANSWER),
        FLOOR: lambda: floor_loop(base, inputs, STEPS, REPLAY + 1, ANSWER, widths),
        "base generate (4 tok)": lambda: base.generate(**inputs, **answer),
    }


def time_variants(variants, repeats, inner=1, slow=(), slow_repeats=None, seed=0):
    """Wall ms of every call, per variant and repeat (`{name: [ms per repeat]}`), and each variant's warm-up output.

    One warm-up each; then `repeats` rounds. A round runs every variant `inner` times, interleaved (A B C A B C,
    never A A B B), in a freshly shuffled (seeded) order, so that a slow spell of the machine, or the allocator and
    cache state that one variant leaves behind, hits all variants of the round alike; a repeat's time is the mean of
    its `inner` calls. The `slow` variants (use_cache=False, CoT) take part in the first `slow_repeats` rounds only.
    Ratios are then taken within each round (`ratio_stats`)."""
    outputs = {name: fn() for name, fn in variants.items()}
    times = {name: [] for name in variants}
    rng = random.Random(seed)
    slow_repeats = repeats if slow_repeats is None else min(slow_repeats, repeats)
    for round_index in range(repeats):
        names = [name for name in variants if name not in slow or round_index < slow_repeats]
        order = rng.sample(names, len(names))
        spent = dict.fromkeys(order, 0.0)
        for _ in range(inner):
            for name in order:
                start = time.perf_counter()
                variants[name]()
                spent[name] += (time.perf_counter() - start) * 1000
        for name in order:
            times[name].append(spent[name] / inner)
    return times, outputs


def spread_stats(values) -> dict:
    """Median, quartiles, IQR, min, max and max - min of a list of numbers."""
    values = sorted(values)
    if len(values) == 1:
        q1 = q3 = values[0]
    else:
        q1, _, q3 = statistics.quantiles(values, n=4, method="inclusive")
    return {"median": statistics.median(values), "q1": q1, "q3": q3, "iqr": q3 - q1, "min": values[0],
            "max": values[-1], "range": values[-1] - values[0], "n": len(values)}


def ratio_stats(times, top, bottom) -> dict:
    """`spread_stats` of the per-round ratios top / bottom (rounds where both ran: the slow variants run in the
    first rounds only), so that machine noise common to a round cancels."""
    return spread_stats([a / b for a, b in zip(times[top], times[bottom])])


# ------------------------------------------------------------------------------------------------ memory
def peak_tensor_bytes(fn):
    """Peak bytes of tensors allocated inside `fn` (torch.profiler memory timeline; pre-existing tensors excluded)."""
    from torch.profiler import ProfilerActivity, profile
    from torch.profiler._memory_profiler import Action

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True, record_shapes=True, with_stack=True) as prof:
        result = fn()
    live = peak = 0
    for _, action, _, size in prof._memory_profile().timeline:
        if action == Action.CREATE:
            live += size
        elif action == Action.DESTROY:
            live -= size
        peak = max(peak, live)
    return peak, result


@torch.no_grad()
def saliency_memory(vedas_off, eager, base, inputs):
    """Peak tensor bytes of one prompt prefill: our saliency row vs output_attentions (eager), plus references."""
    model = vedas_off
    ids, mask = inputs["input_ids"], inputs["attention_mask"]
    embeds = model._embed(ids, inputs["pixel_values"], inputs["image_grid_thw"])
    positions = model._latent_position_ids(ids, mask, inputs.get("mm_token_type_ids"), inputs["image_grid_thw"])
    visual = visual_tokens(is_image=(ids == model.config.image_token_id) & mask.bool(),
                           image_grid_thw=inputs["image_grid_thw"],
                           merge_size=model.config.vision_config.spatial_merge_size)
    columns, valid = visual.columns, visual.valid

    def ours(capture):
        state = model._routing_state(mask.bool(), mask.bool(), key_valid=mask.bool())
        if capture:
            state.saliency_columns, state.saliency_valid = columns, valid
        model.model.language_model(inputs_embeds=embeds, attention_mask=mask, position_ids=positions,
                                   past_key_values=VedasCache(config=model.config.text_config), use_cache=True,
                                   vedas_state=state)
        return state.key_saliency

    def theirs(lm, attentions):
        out = lm(inputs_embeds=embeds, attention_mask=mask, position_ids=positions, use_cache=False,
                 output_attentions=attentions)
        return out.attentions

    rows = {}
    rows["sdpa prefill (Vedas, RDS off, VedasCache), no saliency"] = peak_tensor_bytes(lambda: ours(False))
    rows["sdpa prefill (VedasCache) + our saliency row"] = peak_tensor_bytes(lambda: ours(True))
    rows["sdpa prefill (base), no cache"] = peak_tensor_bytes(lambda: theirs(base.model.language_model, False))
    rows["sdpa prefill (base), DynamicCache"] = peak_tensor_bytes(lambda: base.model.language_model(
        inputs_embeds=embeds, attention_mask=mask, position_ids=positions, use_cache=True,
        past_key_values=DynamicCache(config=base.config.text_config)))
    rows["eager prefill (base), no attentions"] = peak_tensor_bytes(lambda: theirs(eager.model.language_model, False))
    rows["eager prefill + output_attentions=True"] = peak_tensor_bytes(lambda: theirs(eager.model.language_model,
                                                                                      True))
    ours_kept = rows["sdpa prefill (VedasCache) + our saliency row"][1]
    theirs_kept = rows["eager prefill + output_attentions=True"][1]
    kept = {
        "ours": ours_kept.numel() * ours_kept.element_size() if ours_kept is not None else 0,
        "output_attentions": sum(a.numel() * a.element_size() for a in theirs_kept) if theirs_kept else 0,
    }
    text_cfg = model.config.text_config
    heads, n = text_cfg.num_attention_heads, ids.shape[1]
    kept["row per layer"] = ids.shape[0] * heads * n * 4  # the transient (batch, heads, n) fp32 row
    return {name: peak for name, (peak, _) in rows.items()}, kept, (text_cfg.num_hidden_layers, heads, n)


# ------------------------------------------------------------------------------------------------ profile
@contextlib.contextmanager
def timed_methods(targets, totals):
    """Temporarily wrap `(owner class, method name)` pairs so that their wall time adds up in `totals[name]`;
    `_second_pass` calls (a routing layer that selected some token) are also counted."""
    def timing(name):
        def make_wrapper(original):
            def wrapper(*args, **kwargs):
                start = time.perf_counter()
                result = original(*args, **kwargs)
                totals[name] = totals.get(name, 0.0) + (time.perf_counter() - start) * 1000
                if name == "_second_pass":  # generate records no router statistics: count the calls instead
                    totals["second passes"] = totals.get("second passes", 0) + 1
                return result
            return wrapper
        return make_wrapper

    with contextlib.ExitStack() as stack:
        for owner, name in targets:
            stack.enter_context(_wrapped(owner, name, timing(name)))
        yield totals


@torch.no_grad()
def bare_loop_phases(base, inputs, steps, chunk, new_tokens):
    """`bare_loop` with a wall-clock split: prefill, latent-like chunks, decode (ms)."""
    phases, mark = {}, time.perf_counter()

    def lap(name):
        nonlocal mark
        now = time.perf_counter()
        phases[name] = (now - mark) * 1000
        mark = now

    cache = DynamicCache(config=base.config.text_config)
    out = base(**inputs, past_key_values=cache, use_cache=True, logits_to_keep=1)
    lap("prefill")
    delta = base.model.rope_deltas.view(-1, 1)
    chunk_embeds = base.get_input_embeddings().weight[:chunk][None].expand(delta.shape[0], -1, -1)
    for _ in range(steps):
        positions = (cache.get_seq_length() + delta + torch.arange(chunk)[None]).unsqueeze(0).expand(3, -1, -1)
        base.model.language_model(inputs_embeds=chunk_embeds, position_ids=positions, past_key_values=cache,
                                  use_cache=True)
    lap("chunks")
    token = out.logits[:, -1].argmax(-1, keepdim=True)
    for _ in range(new_tokens):
        out = base(input_ids=token, past_key_values=cache, use_cache=True, logits_to_keep=1)
        token = out.logits[:, -1].argmax(-1, keepdim=True)
    lap("decode")
    return phases


def profile_latent(vedas, base, inputs, runs=3, top=12):
    """Where the time of a cached latent generate goes: a phase split against the ideal loop (medians of `runs`,
    interleaved) and the top ATen ops by self CPU time (torch.profiler) of one more run."""
    from torch.profiler import ProfilerActivity, profile
    from transformers import GenerationMixin

    from vedas.modeling_vedas import VedasMixin
    from vedas.routing_vedas import VedasDecoderLayerMixin

    def latent():
        return vedas.generate(**inputs, num_latent_steps=STEPS, num_replay_tokens=REPLAY, do_sample=False,
                              min_new_tokens=ANSWER, max_new_tokens=ANSWER)

    targets = [(VedasMixin, "_latent_forward"), (GenerationMixin, "generate"),
               (VedasDecoderLayerMixin, "_add_saliency"), (VedasDecoderLayerMixin, "_last_query"),
               (VedasDecoderLayerMixin, "_route"),
               (VedasDecoderLayerMixin, "_second_pass"), (VedasMixin, "_embed")]
    ours, ideal = [], []
    latent()
    for _ in range(runs):
        totals = {}
        with timed_methods(targets, totals):
            start = time.perf_counter()
            latent()
            totals["total"] = (time.perf_counter() - start) * 1000
        ours.append(totals)
        phases = bare_loop_phases(base, inputs, STEPS, REPLAY + 1, ANSWER)
        phases["total"] = sum(phases.values())
        ideal.append(phases)

    def med(rows, key):
        return statistics.median(r.get(key, 0.0) for r in rows)

    split = [
        ("prefill + 4 latent chunks (`_latent_forward`) vs prefill + 4 chunks", med(ours, "_latent_forward"),
         med(ideal, "prefill") + med(ideal, "chunks")),
        ("  of which vision tower + embeddings (`_embed`)", med(ours, "_embed"), None),
        ("  of which saliency rows (`_last_query` + `_add_saliency`)",
         med(ours, "_last_query") + med(ours, "_add_saliency"), None),
        ("  of which RDS (`_route`: router, selection, second pass)", med(ours, "_route"), None),
        ("answer: HF generate loop vs 4 bare decode forwards", med(ours, "generate"), med(ideal, "decode")),
        ("total", med(ours, "total"), med(ideal, "total")),
    ]
    second_passes = med(ours, "second passes")
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        latent()
    ops = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=top)
    return split, second_passes, ops


# ------------------------------------------------------------------------------------------------ main
RATIOS = [  # (label, numerator, denominator, note); names as in make_variants
    ("latent / No-CoT", "latent (T=4, K=32, cached)", "No-CoT (T=0, 4 tok)", "issue 4 aim ≤ 1.3 is a GPU figure"),
    ("CoT / latent", "CoT", "latent (T=4, K=32, cached)", "higher is better"),
    ("uncached / cached latent", "latent, use_cache=False", "latent (T=4, K=32, cached)", "cost of use_cache=False"),
    ("**latent / ideal latent**", "latent (T=4, K=32, cached)", "ideal latent (base, bare loop)", "target ≤ 1.10"),
    ("ideal latent / ideal No-CoT", "ideal latent (base, bare loop)", "ideal No-CoT (base, bare loop)",
     "the least a latent phase costs"),
    ("No-CoT / ideal No-CoT", "No-CoT (T=0, 4 tok)", "ideal No-CoT (base, bare loop)", "generate + RDS, no latents"),
    ("latent RDS-off / ideal latent", "latent, RDS off", "ideal latent (base, bare loop)", "target ≤ 1.05"),
    ("ideal + RDS passes / ideal latent", FLOOR, "ideal latent (base, bare loop)", "the least RDS can cost"),
    ("latent / ideal + RDS passes", "latent (T=4, K=32, cached)", FLOOR, "Vedas's own work: saliency, bookkeeping"),
    ("latent / latent RDS-off", "latent (T=4, K=32, cached)", "latent, RDS off", "RDS cost in latent generate"),
    ("base generate / ideal No-CoT", "base generate (4 tok)", "ideal No-CoT (base, bare loop)", "HF loop overhead"),
]
SPREAD_TARGET = 0.03
# the ratios issue 16 tracks: the spread verdict is about these
HEADLINE = ("latent / No-CoT", "CoT / latent", "**latent / ideal latent**", "latent RDS-off / ideal latent",
            "latent / latent RDS-off")


def fmt_mb(num_bytes):
    return f"{num_bytes / 2**20:.3f}"


def machine_state() -> dict:
    """What says how busy the machine is: load averages and torch's thread counts."""
    return {"load": os.getloadavg(), "threads": torch.get_num_threads(), "interop": torch.get_num_interop_threads()}


def measure_size(args, size_name, root) -> dict:
    """Build one size's models, time the variants, record the facts and optional memory / profile tables."""
    with contextlib.redirect_stderr(io.StringIO()):
        base, eager, vedas, vedas_off, processor = build_models(args.backbone, SIZES[size_name], root)
    inputs = make_inputs(processor, [QUESTION], [quadrant_image((448, 448))])
    variants = make_variants(base, vedas, vedas_off, inputs, args.cot_tokens)
    variants["CoT"] = variants.pop(f"CoT (T=0, {args.cot_tokens} tok)")
    before = machine_state()
    start = time.perf_counter()
    times, outputs = time_variants(variants, args.repeats, inner=args.inner, slow={"latent, use_cache=False", "CoT"},
                                   slow_repeats=args.slow_repeats)
    seconds = time.perf_counter() - start
    # facts printed next to the table (not asserted): same tokens with and without the cache, and how many tokens
    # the RDS second pass re-ran per routing layer (prefill, then latent chunks 1-3)
    trace = vedas.generate(**inputs, num_latent_steps=STEPS, num_replay_tokens=REPLAY, do_sample=False,
                           min_new_tokens=ANSWER, max_new_tokens=ANSWER, return_dict_in_generate=True,
                           output_latent_trace=True).latent_trace
    selected = {}
    for step in trace:
        for (layer, _), (_, sel) in sorted(step["router_scores"].items()):
            selected.setdefault(f"L{layer}", []).append(int(sel.sum()))
    result = {
        "sizes": SIZES[size_name], "times": times, "seconds": seconds, "before": before, "after": machine_state(),
        "prompt": inputs["input_ids"].shape[1], "selected": selected,
        "visual": int((inputs["input_ids"] == vedas.config.image_token_id).sum()),
        "same": torch.equal(outputs["latent (T=4, K=32, cached)"], outputs["latent, use_cache=False"]),
    }
    if not args.no_memory:
        result["memory"] = saliency_memory(vedas_off, eager, base, inputs)
    if args.profile:
        result["profile"] = profile_latent(vedas, base, inputs)
    return result


def print_timing(size_name, res, args):
    sizes, before, after = res["sizes"], res["before"], res["after"]
    print(f"## {size_name}: hidden {sizes.hidden_size}, {sizes.num_hidden_layers} layers, "
          f"{sizes.num_attention_heads} heads / {sizes.num_key_value_heads} kv, prompt {res['prompt']} tokens "
          f"({res['visual']} visual)\n")
    print(f"torch threads {before['threads']} (inter-op {before['interop']}) on {os.cpu_count()} CPUs; load average "
          f"(1/5/15 min) before {'/'.join(f'{x:.1f}' for x in before['load'])}, after "
          f"{'/'.join(f'{x:.1f}' for x in after['load'])}; timing took {res['seconds']:.0f} s.\n")
    print("| variant | median ms | IQR ms | min ms | max ms | repeats |")
    print("|---|---:|---:|---:|---:|---:|")
    for name, values in res["times"].items():
        st = spread_stats(values)
        print(f"| {name} | {st['median']:.1f} | {st['iqr']:.1f} | {st['min']:.1f} | {st['max']:.1f} | {st['n']} |")
    print(f"\nuse_cache=False gives the cached tokens: {res['same']}. Tokens re-run by the RDS second pass per "
          f"routing layer, in the prefill then latent chunks 1-3 (of {REPLAY + 1}): {res['selected']}\n")


def print_ratios(summary):
    """Per size: the median of the per-round ratios, their IQR and max - min; the spread the estimate is judged by
    is the IQR (`SPREAD_TARGET`)."""
    print("## Ratios (per round, then the median over the rounds; spread = IQR, and max - min)\n")
    print("| ratio | " + " | ".join(f"{s} median | {s} IQR | {s} max-min" for s in summary) + " | note |")
    print("|---|" + "---:|---:|---:|" * len(summary) + "---|")
    worst = {}
    for label, top, bottom, note in RATIOS:
        cells = []
        for size_name, res in summary.items():
            st = ratio_stats(res["times"], top, bottom)
            cells += [f"{st['median']:.3f}", f"{st['iqr']:.3f}", f"{st['range']:.3f}"]
            if label in HEADLINE:
                worst[size_name] = max(worst.get(size_name, 0.0), st["iqr"])
        print(f"| {label} | " + " | ".join(cells) + f" | {note} |")
    for size_name, iqr in worst.items():
        verdict = "under" if iqr < SPREAD_TARGET else "NOT under"
        print(f"\n{size_name}: the largest IQR of the tracked ratios ({', '.join(HEADLINE)}) is {iqr:.3f}, "
              f"{verdict} the {SPREAD_TARGET} target"
              + ("" if iqr < SPREAD_TARGET else " (more --inner calls per repeat shorten it roughly as "
                 "1/sqrt(inner); a loaded machine widens it)") + ".")


def print_memory(memory):
    print("\n## Saliency memory (one prompt prefill)\n")
    print("Peak bytes of tensors allocated during the prefill, from torch.profiler's memory timeline "
          "(profile_memory=True; weights and inputs excluded; fused-kernel scratch not seen). Same embeddings "
          "and positions for every row. Compare rows with the same cache setting: a prefill that fills a KV "
          "cache keeps its keys and values (2 x layers x kv heads x head_dim x prompt x 4 bytes).\n")
    print("| prefill | " + " | ".join(f"{s} peak MiB" for s in memory) + " |")
    print("|---|" + "---:|" * len(memory))
    for name in next(iter(memory.values()))[0]:
        print(f"| {name} | " + " | ".join(fmt_mb(m[0][name]) for m in memory.values()) + " |")
    print("| returned: our saliency `(batch, visual)` | "
          + " | ".join(fmt_mb(m[1]["ours"]) for m in memory.values()) + " |")
    print("| returned: output_attentions `L x (batch, heads, n, n)` | "
          + " | ".join(fmt_mb(m[1]["output_attentions"]) for m in memory.values()) + " |")
    print("| transient per layer, ours `(batch, heads, n)` fp32 | "
          + " | ".join(fmt_mb(m[1]["row per layer"]) for m in memory.values()) + " |")
    for size_name, (peaks, kept, (layers, heads, n)) in memory.items():
        vedas_peak = peaks["sdpa prefill (Vedas, RDS off, VedasCache), no saliency"]
        extra_ours = peaks["sdpa prefill (VedasCache) + our saliency row"] - vedas_peak
        extra_eager = peaks["eager prefill + output_attentions=True"] - peaks["eager prefill (base), no attentions"]
        same_cache = vedas_peak / peaks["sdpa prefill (base), DynamicCache"]
        print(f"\n{size_name}: Vedas RDS-off / base prefill, both filling a cache: {same_cache:.3f}. Saliency adds "
              f"{fmt_mb(extra_ours)} MiB to the sdpa prefill peak; output_attentions adds {fmt_mb(extra_eager)} MiB "
              f"to the eager one ({layers} layers x {heads} heads x {n}² fp32 maps kept).")


def print_profiles(profiles):
    for size_name, (split, second_passes, ops) in profiles.items():
        print(f"\n## Where the time of a cached latent generate goes ({size_name}; medians of 3, interleaved)\n")
        print("| phase | Vedas ms | ideal (base) ms |")
        print("|---|---:|---:|")
        for label, ours, ideal in split:
            print(f"| {label} | {ours:.1f} | {'' if ideal is None else f'{ideal:.1f}'} |")
        print(f"\nRDS second passes run per latent generate (routing layer x forward with >= 1 token selected): "
              f"{second_passes:.0f}\n")
        print("Top ATen ops by self CPU time (torch.profiler, one cached latent generate):\n")
        print("```\n" + ops.strip() + "\n```")


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", default="tiny,mid", help="comma-separated: tiny, mid")
    parser.add_argument("--repeats", type=int, default=20, help="rounds; every variant runs in each round")
    parser.add_argument("--inner", type=int, default=4,
                        help="calls of each variant per round, interleaved; a repeat's time is their mean")
    parser.add_argument("--slow-repeats", type=int, default=6,
                        help="rounds that include the slow variants (use_cache=False, CoT), at most --repeats")
    parser.add_argument("--cot-tokens", type=int, default=100)
    parser.add_argument("--backbone", default="qwen2_vl", choices=["qwen2_vl", "qwen2_5_vl"])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--no-memory", action="store_true", help="skip the saliency memory measurement")
    parser.add_argument("--profile", action="store_true",
                        help="split one cached latent generate into phases vs the ideal loop, and list its top ATen ops")
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore")
    hf_logging.set_verbosity_error()
    torch.manual_seed(0)
    summary = {}
    with tempfile.TemporaryDirectory(prefix="bench_latent_") as tmp:
        for size_name in [s.strip() for s in args.sizes.split(",") if s.strip()]:
            summary[size_name] = measure_size(args, size_name, Path(tmp) / size_name)

    print(f"# Vedas latent generation benchmark ({args.backbone}, CPU, torch {torch.__version__})\n")
    print(f"{args.repeats} rounds after one warm-up; in each round every variant runs {args.inner} times, "
          f"interleaved, in a shuffled order (use_cache=False and CoT: in the first "
          f"{min(args.slow_repeats, args.repeats)} "
          f"rounds). T = {STEPS}, K = {REPLAY}, answers forced to {ANSWER} tokens (CoT: {args.cot_tokens}). RDS: "
          f"routing layers {{0, 2, 4, ...}}, α = 32, perturbed router and e(d).\n")
    for size_name, res in summary.items():
        print_timing(size_name, res, args)
    print_ratios(summary)
    memory = {name: res["memory"] for name, res in summary.items() if "memory" in res}
    if memory:
        print_memory(memory)
    print_profiles({name: res["profile"] for name, res in summary.items() if "profile" in res})


if __name__ == "__main__":
    main()
