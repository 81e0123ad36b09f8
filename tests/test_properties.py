"""Property-based equivalences (hypothesis) and numerical guards.

Properties, each over random backbones, images (count, size, content), prompts, batch compositions, latent steps T,
replay tokens K and Vedas settings (α, D, routing mode and positions, routing layers, replay mode/positions/scale):

- cached == uncached generation (`generate(use_cache=True)` vs `use_cache=False`);
- a left-padded batch == each sample alone;
- save -> load == original (a complete checkpoint folder, reloaded);
- converted-untrained == base (logits over the base vocabulary, bit for bit), also for bases without spare
  embedding rows and with untied embeddings.

The default run checks a small fixed (derandomised) sample per property. `VEDAS_PROPERTY_EXAMPLES=N` runs N random
cases per property; see docs/properties.md for the opt-in job and its last figures.

The numerical guards (plain tests, not hypothesis) check that router gates and replay weights are computed in
float32 in bf16 models and under bf16 autocast, on a prompt of about three thousand tokens, and that the router and
the replay softmax neither overflow nor lose precision on extreme bf16 / fp16 values.
"""

import functools
import json
import os
import tempfile
from dataclasses import dataclass, replace
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, Phase, event, example, given, reject, settings
from hypothesis import strategies as st
from PIL import Image
from transformers.models.qwen2_vl.image_processing_qwen2_vl import smart_resize

from backbones import BACKBONES, EXTRA_OVERRIDES
from conftest import TEST_OVERRIDES, base_positions, load_vedas, make_inputs, perturb_vedas, quadrant_image
from vedas_trainer.testing import eager_saliency
from vedas.configuration_vedas import (
    POSITION_MODES,
    REPLAY_MODES,
    REPLAY_SCALES,
    ROUTING_MODES,
    ROUTING_POSITION_MODES,
)
from vedas.replay_vedas import select_replay
from vedas.routing_vedas import VedasDecoderLayerMixin
from vedas_trainer.checkpoint import convert_base, load_base, save_vedas_checkpoint
from vedas_trainer.tiny_base import GENERIC_WORDS, TinySizes, build_tiny_base, chameleon_cell


# ------------------------------------------------------------------------------------------------------ settings
# Default CI: a small fixed sample. The opt-in job sets VEDAS_PROPERTY_EXAMPLES (e.g. 100) and draws fresh random
# cases on every run (pass `--hypothesis-seed=N` to repeat one).
_EXAMPLES = os.environ.get("VEDAS_PROPERTY_EXAMPLES")
PROPERTY = settings(
    max_examples=int(_EXAMPLES) if _EXAMPLES else 5,
    derandomize=_EXAMPLES is None,
    deadline=None,
    database=None,  # nothing written into the working tree; a failure prints its reproduction blob instead
    print_blob=True,
    # no "explain" phase: it re-runs each failing case many times (minutes here) only to list covered lines
    phases=[Phase.explicit, Phase.reuse, Phase.generate, Phase.target, Phase.shrink],
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)

# The tiny processor's pixel bounds (TinySizes): min_pixels = 56 * 56 (4 visual tokens), max_pixels = 448 * 448
# (256 visual tokens). One visual token covers 28 x 28 pixels.
SIZES = TinySizes()
MIN_SIDE = int(SIZES.min_pixels**0.5)
MAX_SIDE = int(SIZES.max_pixels**0.5)
assert MIN_SIDE == 56 and MAX_SIDE == 448, "the edge sizes below assume the default TinySizes pixel bounds"
EDGE_SIZES = [  # (width, height)
    (1, 1),  # tiny: scaled up to the minimum
    (1, 200),  # aspect ratio 200, the processor's limit
    (200, 3),
    (MIN_SIDE, MIN_SIDE),  # exactly min_pixels
    (MIN_SIDE - 1, MIN_SIDE + 1),  # just around it
    (MAX_SIDE, MAX_SIDE),  # exactly max_pixels
    (MAX_SIDE + 13, MAX_SIDE - 5),  # just above: scaled down
    (700, 90),  # wide, scaled down
    (28, 1400),  # tall and thin
]


# ----------------------------------------------------------------------------------------------------- strategies
@dataclass(frozen=True)
class ImageSpec:
    """An image to draw: `kind` "blocks" (coloured 14 x 14 blocks) or "flat" (one colour: all visual tokens carry
    the same features, so replay saliency can only differ by position)."""

    width: int
    height: int
    kind: str = "blocks"
    seed: int = 0

    def render(self) -> Image.Image:
        if self.kind == "flat":
            generator = torch.Generator().manual_seed(self.seed)
            colour = tuple(int(c) for c in torch.randint(0, 256, (3,), generator=generator))
            return Image.new("RGB", (self.width, self.height), colour)
        return quadrant_image((self.width, self.height), seed=self.seed)


@dataclass(frozen=True)
class Sample:
    question: str
    images: tuple[ImageSpec, ...] = ()


@dataclass
class Case:
    """One generated case: a backbone (and base variant), Vedas settings (config fields, set at conversion), a batch,
    the generate arguments, and the seed of the non-trivial router / e(d) values (`perturb_vedas`)."""

    backbone: str
    settings: dict
    batch: list[Sample]
    num_latent_steps: int  # T
    num_replay_tokens: int  # K
    max_new_tokens: int = 3
    perturb_seed: int = 0
    base_variant: str = "default"


def _aspect_ok(size):
    # the Qwen2-VL processor refuses aspect ratios above 200 (its own ValueError, not the model's concern)
    return max(size) / min(size) <= 200


image_sizes = st.one_of(
    st.sampled_from(EDGE_SIZES),
    st.tuples(st.integers(1, 160), st.integers(1, 160)),
    st.tuples(st.integers(1, 480), st.integers(1, 480)).filter(_aspect_ok),
)
images = st.builds(
    lambda size, kind, seed: ImageSpec(size[0], size[1], kind, seed),
    image_sizes,
    st.sampled_from(["blocks", "blocks", "flat"]),
    st.integers(0, 1000),
)
questions = st.one_of(
    st.lists(st.sampled_from(GENERIC_WORDS), max_size=12).map(" ".join),  # short, in-vocabulary
    st.lists(st.sampled_from(GENERIC_WORDS), min_size=40, max_size=200).map(" ".join),  # long
    st.text(max_size=40),  # any unicode: the byte-level tokenizer splits it into many tokens
)
samples = st.builds(Sample, questions, st.lists(images, max_size=2).map(tuple))
# Visual tokens per batch are capped to keep a case under a few seconds on CPU (two images at the upper pixel bound
# still fit): the cost of uncached generation grows with T + new tokens times the sequence length.
MAX_VISUAL_TOKENS = 2 * SIZES.max_pixels // 28**2


def visual_tokens(batch, backbone=None) -> int:
    """Visual tokens of a batch: one per 28 x 28 block of each image as the processor resizes it (Qwen2-VL; the
    Qwen3-VL processor's bounds are scaled to 32 x 32 blocks, so its counts are the same up to rounding). On
    Chameleon every image is one grid of VQ codes, whatever its size."""
    if backbone == "chameleon":
        return sum(len(sample.images) for sample in batch) * (SIZES.image_size // chameleon_cell(SIZES)) ** 2
    total = 0
    for sample in batch:
        for image in sample.images:
            height, width = smart_resize(image.height, image.width, 28, SIZES.min_pixels, SIZES.max_pixels)
            total += height * width // 28**2
    return total


def batches(min_size, max_size):
    return st.lists(samples, min_size=min_size, max_size=max_size).filter(
        lambda batch: visual_tokens(batch) <= MAX_VISUAL_TOKENS
    )


routing_topk = st.one_of(
    st.integers(1, 48),  # a count
    st.floats(0.01, 1.0),  # a fraction of the prompt
    st.lists(st.integers(1, 48), min_size=2, max_size=2),  # a cosine schedule [α_s, α_e]
)
vedas_settings = st.fixed_dictionaries(
    {
        "routing_topk": routing_topk,
        "max_depth": st.integers(1, 3),
        "routing": st.sampled_from(ROUTING_MODES),
        "routing_positions": st.sampled_from(ROUTING_POSITION_MODES),
        "routing_layers": st.lists(st.integers(0, SIZES.num_hidden_layers - 1), unique=True, max_size=4).map(sorted),
        "replay_mode": st.sampled_from(REPLAY_MODES),
        "replay_positions": st.sampled_from(POSITION_MODES),
        "replay_scale": st.sampled_from(REPLAY_SCALES),
    }
)


@st.composite
def cases(draw, min_batch=1, max_batch=3, base_variants=("default",)):
    return Case(
        backbone=draw(st.sampled_from(BACKBONES)),
        settings=draw(vedas_settings),
        batch=draw(batches(min_batch, max_batch)),
        num_latent_steps=draw(st.integers(0, 3)),
        num_replay_tokens=draw(st.integers(0, 6)),
        max_new_tokens=draw(st.integers(1, 4)),
        perturb_seed=draw(st.integers(0, 3)),
        base_variant=draw(st.sampled_from(base_variants)),
    )


# -------------------------------------------------------------------------------------------------------- models
# Bases are built once per (backbone, variant) and Vedas models once per (backbone, variant, settings, perturbation),
# and kept while this module runs: rebuilding them for every example would dominate the run time. The models are
# tiny (a few MB each) and the model caches are bounded.
_ROOT = None


@pytest.fixture(scope="module", autouse=True)
def _model_root(tmp_path_factory):
    global _ROOT
    _ROOT = tmp_path_factory.mktemp("properties")
    yield
    _ROOT = None
    for cache in (_base_dir, _vedas_model, _base_model):
        cache.cache_clear()


@functools.lru_cache(maxsize=None)
def _base_dir(backbone: str, variant: str) -> Path:
    """A tiny base checkpoint. Variants: "default"; "untied" (separate lm_head); "no_spare_rows" (the embedding has
    exactly one row per tokenizer id, so the conversion must grow it for the four new tokens)."""
    folder = _ROOT / f"base-{backbone}-{variant}"
    sizes = TinySizes(tie_word_embeddings=variant != "untied")
    model, processor = build_tiny_base(backbone, None, seed=0, sizes=sizes)
    if variant == "no_spare_rows":
        model.resize_token_embeddings(len(processor.tokenizer), mean_resizing=False)
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder


@functools.lru_cache(maxsize=4)
def _base_model(backbone: str, variant: str):
    base, processor = load_base(_base_dir(backbone, variant))
    processor.tokenizer.padding_side = "left"
    return base.eval(), processor


@functools.lru_cache(maxsize=16)
def _vedas_model(backbone: str, variant: str, settings_json: str, perturb_seed):
    """Convert the base with these settings, load the checkpoint folder, and (unless `perturb_seed` is None) give
    the router and e(d) non-trivial values: an untrained model has e(d) = 0, which makes routing a no-op."""
    with tempfile.TemporaryDirectory(dir=_ROOT) as folder:
        overrides = {**TEST_OVERRIDES, **EXTRA_OVERRIDES.get(backbone, {}), **json.loads(settings_json)}
        convert_base(_base_dir(backbone, variant), Path(folder) / "vedas", overrides=overrides)
        model, processor = load_vedas(Path(folder) / "vedas")
    if perturb_seed is not None:
        perturb_vedas(model, seed=perturb_seed)
    return model, processor


def vedas_model(case: Case, perturbed=True):
    return _vedas_model(case.backbone, case.base_variant, json.dumps(case.settings, sort_keys=True),
                        case.perturb_seed if perturbed else None)


# ------------------------------------------------------------------------------------------------------- helpers
def record_coverage(case: Case):
    """Label the case for `--hypothesis-show-statistics`, which then reports how often each kind of input ran."""
    tokens = visual_tokens(case.batch, case.backbone)
    sizes = {(image.width, image.height) for sample in case.batch for image in sample.images}
    event(f"backbone={case.backbone}")
    event(f"batch size={len(case.batch)}")
    event(f"T={case.num_latent_steps}, K {'> 0' if case.num_replay_tokens else '= 0'}")
    event(f"routing={case.settings['routing']}, {len(case.settings['routing_layers'])} routing layers")
    event(f"α as {type(case.settings['routing_topk']).__name__}, D={case.settings['max_depth']}")
    buckets = ((0, "none"), (64, "1-64"), (256, "65-256"), (MAX_VISUAL_TOKENS, f"257-{MAX_VISUAL_TOKENS}"))
    event("visual tokens per batch: " + next(label for limit, label in buckets if tokens <= limit))
    event(f"an edge-size image (EDGE_SIZES): {any(size in EDGE_SIZES for size in sizes)}")
    event(f"a sample without an image: {any(not sample.images for sample in case.batch)}")


def batch_inputs(processor, batch):
    return make_inputs(processor, [s.question for s in batch], [[im.render() for im in s.images] for s in batch])


def greedy(model, inputs, case, **kwargs):
    return model.generate(
        **inputs, num_latent_steps=case.num_latent_steps, num_replay_tokens=case.num_replay_tokens,
        max_new_tokens=case.max_new_tokens, do_sample=False, return_dict_in_generate=True, output_scores=True,
        output_latent_trace=True, **kwargs,
    )


REPLAY_TRACE = ("replay_indices", "replay_weights", "saliency", "crop_window")


def compare_traces(got, expected, row=None, exact=False) -> bool:
    """Check that two runs' latent traces agree: the same saliency rows (to 1e-4, or identical with `exact`), replayed
    tokens, crop windows and weights (to 1e-5). With `row`, row `row` of `got` (a batch) is compared with `expected`
    (one sample).

    Replay takes the top-K of the saliency, a discrete choice: two tokens whose saliency differs by a rounding error
    (a flat image makes all visual tokens alike) may come out in either order when the runs round differently. Then
    the picked tokens' saliencies must agree to 1e-6 relative in both runs (a tie, not a difference), the runs
    legitimately part from there, and the function returns False. Otherwise it returns True.
    """
    assert got is not None and expected is not None, "output_latent_trace=True must return a trace"
    assert len(got) == len(expected)
    for step, (g, e) in enumerate(zip(got, expected), start=1):
        assert [k for k in REPLAY_TRACE if k in g] == [k for k in REPLAY_TRACE if k in e], f"latent step {step}"
        if "replay_indices" not in e:
            continue
        if row is not None:  # tensors and lists alike: keep the batch axis
            g = {k: g[k][row : row + 1] for k in REPLAY_TRACE}
        # saliency is (batch, v) over the batch's widest sample: compare the columns both have, the rest is padding
        width = min(g["saliency"].shape[1], e["saliency"].shape[1])
        for extra in (g["saliency"][:, width:], e["saliency"][:, width:]):
            assert not extra.any(), f"latent step {step}: saliency past the sample's visual tokens"
        g_saliency, e_saliency = g["saliency"][:, :width], e["saliency"][:, :width]
        if exact:
            assert torch.equal(g_saliency, e_saliency), f"latent step {step}"
        else:
            torch.testing.assert_close(g_saliency, e_saliency, atol=1e-7, rtol=1e-4,
                                       msg=lambda m: f"latent step {step} saliency: {m}")
        g_indices, e_indices = g["replay_indices"][0], e["replay_indices"][0]
        if not exact and g_indices.tolist() != e_indices.tolist():
            assert (g_indices >= 0).sum() == (e_indices >= 0).sum(), f"latent step {step}"
            for saliency in (g_saliency[0], e_saliency[0]):
                torch.testing.assert_close(
                    saliency[g_indices[g_indices >= 0]], saliency[e_indices[e_indices >= 0]], rtol=1e-6, atol=0,
                    msg=lambda m: f"latent step {step}: the runs replay different tokens that are not tied: {m}",
                )
            return False
        assert g_indices.tolist() == e_indices.tolist(), f"latent step {step}"
        assert list(g["crop_window"]) == list(e["crop_window"]), f"latent step {step}"
        if exact:
            assert torch.equal(g["replay_weights"], e["replay_weights"]), f"latent step {step}"
        else:
            torch.testing.assert_close(g["replay_weights"], e["replay_weights"], atol=1e-5, rtol=1e-4,
                                       msg=lambda m: f"latent step {step}: {m}")
    return True


def reject_tie():
    event("rejected: the runs part at a numerical tie in the replay choice")
    reject()


# ---------------------------------------------------------------------------------------------------- properties
# Regression cases: failures the property runs found, kept as explicit examples (see docs/properties.md).
NO_RDS = dict(routing_topk=6, max_depth=1, routing="causal", routing_positions="original", routing_layers=[],
              replay_mode="tokens", replay_positions="original", replay_scale="softmax")
# A prompt without an image next to prompts with images: its replay slots were attended as <|replay|> tokens when
# it ran alone (no image in the batch) but masked out in the batch.
TEXT_ONLY_ROW_IN_IMAGE_BATCH = Case(
    "qwen2_vl", NO_RDS, [Sample("the"), Sample("", (ImageSpec(1, 1), ImageSpec(1, 1))), Sample("")],
    num_latent_steps=2, num_replay_tokens=4, max_new_tokens=1,
)
# routing="global" without routing layers: generate kept the cache, the latent forward did not ("do not pass
# position_ids" from the answer loop).
GLOBAL_WITHOUT_ROUTING_LAYERS = Case(
    "qwen2_5_vl", {**NO_RDS, "routing": "global"}, [Sample("what colour ?"), Sample("", (ImageSpec(56, 84),))],
    num_latent_steps=2, num_replay_tokens=2, max_new_tokens=2,
)
# Plain generation (T = 0) without a cache took the generated tokens into the routing prompt, whose top-α sets the
# causal thresholds: with α (13 at layer 0) above the prompt length every generated token was selected, while on the
# cache it is compared with the prompt's threshold.
ROUTING_PROMPT_WITHOUT_CACHE = Case(
    "qwen2_vl", {**NO_RDS, "routing_topk": [13, 1], "routing_layers": [0]}, [Sample("")],
    num_latent_steps=0, num_replay_tokens=0, max_new_tokens=2,
)
# A flat 448 x 448 image: replay step 2 picked token 179 in the batch and 210 alone, whose saliencies differ by
# 2 ulp (3.0950862e-3 vs 3.0950857e-3 alone, equal in the batch). Not a model bug: the comparison now tells such ties
# from differences (see compare_traces) using the saliency the trace reports.
FLAT_IMAGE_TIE = Case(
    "qwen2_vl",
    {"routing_topk": 0.59375, "max_depth": 2, "routing": "global", "routing_positions": "original",
     "routing_layers": [0, 1, 2, 3], "replay_positions": "original", "replay_mode": "soft_mix",
     "replay_scale": "softmax"},
    [Sample(""), Sample(
        "right image where up ( step is option : cell row 4 move what the option where 2 question arrow step e "
        "choices ' ? step 1 up answer 2 how right answer cell ( column 0 : option a",
        (ImageSpec(27, 99, "blocks", 191), ImageSpec(448, 448, "flat", 235)),
    )],
    num_latent_steps=2, num_replay_tokens=5, max_new_tokens=1, perturb_seed=2,
)
# generate(use_cache=False, output_latent_trace=True) (and every generate in global mode) returned no latent trace.
TRACE_WITHOUT_CACHE = Case(
    "qwen2_vl", {**NO_RDS, "routing_layers": [0, 2]}, [Sample("which arrow ?", (ImageSpec(112, 84, seed=3),))],
    num_latent_steps=2, num_replay_tokens=3, max_new_tokens=2,
)


# Qwen3-VL in every property, whatever the fixed sample draws: routing active in two layers (DeepStack adds to the
# output of layers 0 and 1), replay, two images of different sizes in one prompt.
QWEN3_CASE = Case(
    "qwen3_vl", {**NO_RDS, "routing_layers": [0, 1], "routing_topk": 0.5},
    [Sample("which arrow ?", (ImageSpec(112, 84, seed=3), ImageSpec(64, 96, seed=5))), Sample("what colour ?")],
    num_latent_steps=2, num_replay_tokens=3, max_new_tokens=2,
)
# Chameleon likewise: its images are VQ codes of the vocabulary (64 per image here, whatever the image's size), with
# 1-D positions; routing in two layers, replay, two images in one prompt and a prompt without one.
CHAMELEON_CASE = Case(
    "chameleon", {**NO_RDS, "routing_layers": [1, 3], "routing_topk": 0.5},
    [Sample("which arrow ?", (ImageSpec(112, 84, seed=3), ImageSpec(64, 96, seed=5))), Sample("what colour ?")],
    num_latent_steps=2, num_replay_tokens=3, max_new_tokens=2,
)


@pytest.mark.property
@PROPERTY
@given(case=cases())
@example(case=QWEN3_CASE)
@example(case=CHAMELEON_CASE)
@example(case=ROUTING_PROMPT_WITHOUT_CACHE)
@example(case=GLOBAL_WITHOUT_ROUTING_LAYERS)
@example(case=TRACE_WITHOUT_CACHE)
def test_cached_generation_equals_uncached(case):
    """Latent generation on the KV cache (one forward of R + 1 tokens per step, then cached decoding) gives the
    tokens and scores of recomputing the whole latent forward at every step."""
    record_coverage(case)
    model, processor = vedas_model(case)
    inputs = batch_inputs(processor, case.batch)
    cached = greedy(model, inputs, case)
    uncached = greedy(model, inputs, case, use_cache=False)
    if case.num_latent_steps and not compare_traces(cached.latent_trace, uncached.latent_trace):
        reject_tie()
    assert cached.sequences.tolist() == uncached.sequences.tolist()
    assert len(cached.scores) == len(uncached.scores)
    for step, (c, u) in enumerate(zip(cached.scores, uncached.scores)):
        torch.testing.assert_close(c, u, atol=1e-4, rtol=1e-4, msg=lambda m: f"answer token {step}: {m}")


@pytest.mark.property
@PROPERTY
@given(case=cases(min_batch=2))
@example(case=QWEN3_CASE)
@example(case=CHAMELEON_CASE)
@example(case=TEXT_ONLY_ROW_IN_IMAGE_BATCH)
@example(case=GLOBAL_WITHOUT_ROUTING_LAYERS)
@example(case=FLAT_IMAGE_TIE)  # may end in reject_tie(), see test_replay_ties_are_told_apart_from_differences
def test_left_padded_batch_equals_singles(case):
    """Each row of a left-padded batch generates what the sample generates alone: the same prompt tokens, latent
    block and answer (a row that stops early is padded in the batch), scores within tolerance, the same replay."""
    record_coverage(case)
    model, processor = vedas_model(case)
    inputs = batch_inputs(processor, case.batch)
    batch = greedy(model, inputs, case)
    width = inputs["input_ids"].shape[1]
    pad = model.generation_config.pad_token_id
    for row, sample in enumerate(case.batch):
        single_inputs = batch_inputs(processor, [sample])
        single = greedy(model, single_inputs, case)
        if case.num_latent_steps and not compare_traces(batch.latent_trace, single.latent_trace, row=row):
            reject_tie()
        n = single_inputs["input_ids"].shape[1]
        assert inputs["input_ids"][row, width - n :].tolist() == single_inputs["input_ids"][0].tolist()
        assert not inputs["attention_mask"][row, : width - n].any()
        got = batch.sequences[row, width - n :].tolist()
        expected = single.sequences[0].tolist()
        assert got[: len(expected)] == expected, f"row {row}"
        assert set(got[len(expected) :]) <= {pad}, f"row {row} continues after the sample alone stopped"
        for step, score in enumerate(single.scores):
            torch.testing.assert_close(batch.scores[step][row], score[0], atol=1e-4, rtol=1e-4,
                                       msg=lambda m: f"row {row}, answer token {step}: {m}")


def test_replay_ties_are_told_apart_from_differences():
    """FLAT_IMAGE_TIE, from the 1000-case batch == singles run: at replay step 2 the 5th place is a tie to rounding
    among the flat image's tokens, so the batch and the single run may replay different tokens (they did there).
    `compare_traces` accepts that as a tie, and still fails on a real difference (another image)."""
    case = FLAT_IMAGE_TIE
    model, processor = vedas_model(case)
    batch = greedy(model, batch_inputs(processor, case.batch), case)
    single = greedy(model, batch_inputs(processor, case.batch[1:]), case)
    step1, step2 = single.latent_trace
    available = step2["saliency"][0].clone()
    available[step1["replay_indices"][0]] = float("-inf")  # step 1's tokens are not replayed again
    top = available.topk(case.num_replay_tokens + 1).values
    assert top[-2] - top[-1] <= 1e-6 * top[-1], "the K-th and (K+1)-th candidates are tied"
    compare_traces(batch.latent_trace, single.latent_trace, row=1)  # equal, or parted at that tie: no error
    blocks = Sample(case.batch[1].question, (case.batch[1].images[0], ImageSpec(448, 448, "blocks", 235)))
    other = greedy(model, batch_inputs(processor, [blocks]), case)
    with pytest.raises(AssertionError, match="saliency"):
        compare_traces(other.latent_trace, single.latent_trace)


@pytest.mark.property
@PROPERTY
@given(case=cases())
@example(case=QWEN3_CASE)
@example(case=CHAMELEON_CASE)
def test_save_then_load_equals_original(case):
    """A complete checkpoint folder (weights, config, processor, remote code) reloads to the same settings and
    bit-identical logits, generations and latent traces."""
    record_coverage(case)
    model, processor = vedas_model(case)
    inputs = batch_inputs(processor, case.batch)
    with torch.no_grad():
        before = model(**inputs).logits
    generated = greedy(model, inputs, case)
    with tempfile.TemporaryDirectory(dir=_ROOT) as folder:
        save_vedas_checkpoint(model, processor, folder)
        reloaded, reloaded_processor = load_vedas(folder)
    for name in case.settings:
        assert getattr(reloaded.config, name) == getattr(model.config, name), name
        assert type(getattr(reloaded.config, name)) is type(getattr(model.config, name)), name  # 1.0 is not 1
    reloaded_inputs = batch_inputs(reloaded_processor, case.batch)
    assert reloaded_inputs["input_ids"].tolist() == inputs["input_ids"].tolist()
    with torch.no_grad():
        after = reloaded(**reloaded_inputs).logits
    torch.testing.assert_close(after, before, rtol=0, atol=0)
    regenerated = greedy(reloaded, reloaded_inputs, case)
    assert regenerated.sequences.tolist() == generated.sequences.tolist()
    for new, old in zip(regenerated.scores, generated.scores, strict=True):
        torch.testing.assert_close(new, old, rtol=0, atol=0)
    if case.num_latent_steps:
        assert compare_traces(regenerated.latent_trace, generated.latent_trace, exact=True)


@pytest.mark.property
@PROPERTY
@given(case=cases(base_variants=("default", "untied", "no_spare_rows")))
@example(case=QWEN3_CASE)
# one unpadded sample (the forwards get no position_ids), on a base whose embedding the conversion must grow
@example(case=replace(CHAMELEON_CASE, batch=CHAMELEON_CASE.batch[:1], base_variant="no_spare_rows"))
def test_converted_untrained_equals_base(case):
    """With e(d) = 0 (depth_gate_init) a converted model computes its base exactly, whatever the Vedas settings:
    the same tokenization, bit-identical logits over the base vocabulary, and the same plain (T = 0) generation."""
    record_coverage(case)
    base, base_processor = _base_model(case.backbone, case.base_variant)
    model, processor = vedas_model(case, perturbed=False)
    vocab = len(base_processor.tokenizer)
    inputs = batch_inputs(processor, case.batch)
    base_inputs = batch_inputs(base_processor, case.batch)
    assert inputs["input_ids"].tolist() == base_inputs["input_ids"].tolist()
    positions = base_positions(model, inputs)
    with torch.no_grad():
        got = model(**inputs, **positions).logits
        expected = base(**base_inputs, **positions).logits
    torch.testing.assert_close(got[..., :vocab], expected[..., :vocab], rtol=0, atol=0)
    # greedy decoding over the base vocabulary: the spare embedding rows past it differ by design (four of them are
    # the Vedas tokens now), and an untrained model may well pick one
    rows = max(model.get_output_embeddings().weight.shape[0], base.get_output_embeddings().weight.shape[0])
    suppress = list(range(vocab, rows))
    plain = model.generate(**inputs, num_latent_steps=0, max_new_tokens=case.max_new_tokens, do_sample=False,
                           suppress_tokens=suppress)
    base_plain = base.generate(**base_inputs, max_new_tokens=case.max_new_tokens, do_sample=False,
                               suppress_tokens=suppress)
    assert plain.tolist() == base_plain.tolist()


# -------------------------------------------------------------------------------------------- numerical guards
LONG_PROMPT_TOKENS = 3000  # text tokens, plus the visual tokens of one image


def long_prompt_inputs(processor):
    """One sample: a 112 x 112 image (16 visual tokens) and a question of about LONG_PROMPT_TOKENS tokens."""
    words = (GENERIC_WORDS * (LONG_PROMPT_TOKENS // len(GENERIC_WORDS) + 1))[:LONG_PROMPT_TOKENS]
    inputs = make_inputs(processor, [" ".join(words)], [quadrant_image((112, 112), seed=11)])
    assert inputs["input_ids"].shape[1] > LONG_PROMPT_TOKENS
    return inputs


def routing_layers(model):
    return [layer for layer in model.model.language_model.layers if getattr(layer, "is_routing_layer", False)]


def fp32_router_reference(model, inputs, context):
    """Per routing layer, the depth-0 router scores recomputed in float32 from the hidden states the layer scored.

    A forward hook records each routing layer's input and keyword arguments; the backbone's own decoder layer is
    re-run on them (same dtype, same code, same context: the same H0) and s = sigmoid(w·H0 + b) is computed from
    fp32 operands with autocast off. Returns `(output, {layer_idx: (batch, l) float32 reference})`.
    """
    records, handles = {}, []
    for layer in routing_layers(model):
        def hook(module, args, kwargs, output, idx=layer.layer_idx):
            records[idx] = (args[0] if args else kwargs["hidden_states"], kwargs)

        handles.append(layer.register_forward_hook(hook, with_kwargs=True))
    try:
        with context(), torch.no_grad():
            out = model(**inputs, output_router_scores=True)
    finally:
        for handle in handles:
            handle.remove()
    reference = {}
    for layer in routing_layers(model):
        hidden, kwargs = records[layer.layer_idx]
        kwargs = {k: v for k, v in kwargs.items() if k not in ("vedas_state", "past_key_values", "use_cache")}
        mro = type(layer).__mro__
        backbone_layer = mro[mro.index(VedasDecoderLayerMixin) + 1]
        with context(), torch.no_grad():
            h0 = backbone_layer.forward(layer, hidden, **kwargs)
        router = layer.depth_router
        with torch.autocast("cpu", enabled=False):
            logits = h0.float() @ router.weight.float()[0] + router.bias.float()[0]
        reference[layer.layer_idx] = torch.sigmoid(logits)
    return out, reference


def no_autocast():
    return torch.autocast("cpu", enabled=False)


def bf16_autocast():
    return torch.autocast("cpu", dtype=torch.bfloat16)


# (backbone, model dtype, autocast context): bf16 weights, and fp32 weights under bf16 autocast (what `--bf16`
# training does: matmul and linear run in bf16 even on fp32 operands). fp16 models are slow on CPU; the fp16 guards
# are the unit tests further down. One backbone each: the router and saliency code is the shared mixin's.
PRECISIONS = {
    "qwen2_vl-bf16": ("qwen2_vl", torch.bfloat16, no_autocast),
    "qwen2_5_vl-fp32-autocast-bf16": ("qwen2_5_vl", torch.float32, bf16_autocast),
}


def low_precision_model(vedas_dirs, precision, perturb, attn_implementation="sdpa"):
    backbone, dtype, context = PRECISIONS[precision]
    model, processor = load_vedas(vedas_dirs[backbone], attn_implementation=attn_implementation)
    if perturb:
        perturb_vedas(model, seed=1)
    inputs = {k: v.to(dtype) if v.is_floating_point() else v for k, v in long_prompt_inputs(processor).items()}
    return model.to(dtype), inputs, context


@pytest.mark.parametrize("precision", list(PRECISIONS))
def test_router_gates_are_fp32_on_a_long_low_precision_prompt(vedas_dirs, precision):
    """Router scores of a bf16 / autocast forward over ~3k tokens: finite logits, and the gates equal an fp32
    computation from the same hidden states to 1e-6 (bf16 router logits put them off by up to ~4e-4 here)."""
    model, inputs, context = low_precision_model(vedas_dirs, precision, perturb=True)
    out, reference = fp32_router_reference(model, inputs, context)
    assert torch.isfinite(out.logits).all()
    assert reference, "the model has routing layers"
    for layer_idx, expected in reference.items():
        scores, selected = out.latent_trace[0]["router_scores"][(layer_idx, 0)]
        assert scores.dtype == torch.float32
        assert 0 < int(selected.sum()) < selected.numel()  # the gates matter: some tokens in, some out
        torch.testing.assert_close(scores, expected, atol=1e-6, rtol=0)


@pytest.mark.parametrize("precision", list(PRECISIONS))
def test_replay_weights_are_fp32_on_a_long_low_precision_prompt(vedas_dirs, precision):
    """Step 1 of latent generation in bf16 / autocast over ~3k tokens: finite scores, and the replay weights are the
    float32 softmax of the replayed tokens' saliency (the last query's attention over the visual tokens, averaged
    over heads and layers, read from eager attention maps) to 1e-5; weights rounded to bf16 (about 1/8 each) would
    be off by up to 4.9e-4.

    The untrained model is used (e(d) = 0), so the backbone's attention maps are exactly the model's."""
    model, inputs, context = low_precision_model(vedas_dirs, precision, perturb=False, attn_implementation="eager")
    k = 8
    with context():
        out = model.generate(**inputs, num_latent_steps=1, num_replay_tokens=k, max_new_tokens=1, do_sample=False,
                             return_dict_in_generate=True, output_latent_trace=True, output_scores=True)
    assert torch.isfinite(out.scores[0]).all()
    weights = out.latent_trace[0]["replay_weights"][0]
    indices = out.latent_trace[0]["replay_indices"][0]
    assert weights.dtype == torch.float32 and (indices >= 0).all()

    with context():
        saliency = eager_saliency(model, inputs)
    torch.testing.assert_close(weights, saliency[indices].softmax(-1), atol=1e-5, rtol=0)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_router_is_fp32_in_low_precision_models(vedas_dirs, dtype):
    """A bf16 / fp16 router on moderate activations (logits of a few units, where the sigmoid is steep: low-precision
    logits move the gates by 1e-4 to 1e-3) and on activations of about ±1e4 (fp16 logits overflow to inf): finite
    float32 logits equal to the float32 reference, and gates equal to it to 1e-6."""
    model, _ = load_vedas(vedas_dirs["qwen2_vl"])
    layer = perturb_vedas(model, seed=2).to(dtype).model.language_model.layers[model.config.routing_layers[0]]
    generator = torch.Generator().manual_seed(0)
    hidden_size = model.config.text_config.hidden_size
    hidden = torch.cat([
        torch.randn(1, 300, hidden_size, generator=generator) * 0.3,
        (torch.randn(1, 300, hidden_size, generator=generator) * 1e4).clamp(-6e4, 6e4),  # within fp16's range
    ]).to(dtype)
    router = layer.depth_router
    with torch.autocast("cpu", enabled=False):
        expected = hidden.float() @ router.weight.float()[0] + router.bias.float()[0]  # (2, 300)
    logits = router(hidden)
    assert logits.dtype == torch.float32 and torch.isfinite(logits).all()
    torch.testing.assert_close(logits.squeeze(-1), expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(layer.router_scores(hidden), torch.sigmoid(expected), atol=1e-6, rtol=0)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_select_replay_softmax_is_fp32_for_extreme_scores(dtype):
    """Saliency at the ends of the dtype's range (and thousands of candidates): finite weights that equal the float32
    softmax of the same values, rounded once to the saliency dtype."""
    finfo = torch.finfo(dtype)
    generator = torch.Generator().manual_seed(0)
    saliency = torch.stack([
        (torch.rand(4000, generator=generator) * 2 - 1) * finfo.max,  # huge values of both signs
        torch.rand(4000, generator=generator) * 1e-3,  # tiny values: near-uniform weights
        torch.full((4000,), finfo.max),  # ties at the top of the range: exactly uniform weights
    ]).to(dtype)
    candidates = torch.ones_like(saliency, dtype=torch.bool)
    visited = torch.zeros_like(candidates)
    for rescale in (False, True):
        selection = select_replay(saliency, candidates, visited, k=16, rescale=rescale)
        assert selection.weights.dtype == dtype and torch.isfinite(selection.weights).all()
        chosen = saliency.float().gather(1, selection.indices)
        expected = chosen.softmax(-1) * (16 if rescale else 1)
        torch.testing.assert_close(selection.weights, expected.to(dtype), atol=0, rtol=0)
