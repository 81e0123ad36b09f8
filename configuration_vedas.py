"""Vedas configuration.

Vedas adds two modules to a Qwen2-VL / Qwen2.5-VL / Qwen3-VL backbone (visual replay and routing depth scaling) and
a latent-reasoning phase between the prompt and the answer. The settings live in :class:`VedasSettings`, shared by
the backbone-specific configs :class:`VedasConfig` (Qwen2-VL), :class:`Vedas25Config` (Qwen2.5-VL) and
:class:`Vedas3Config` (Qwen3-VL). They live on the top-level config; the backbone's sizes are read from its nested
`text_config` and `vision_config`.

The special tokens are defined here and only here (:data:`SPECIAL_TOKENS`).

This module is the first of the remote code that transformers imports, so it also checks the installed transformers
against :data:`TRANSFORMERS_RANGE` (one line: the installed and the supported versions) before anything else runs.
"""

import math
import warnings
from dataclasses import dataclass, field

import transformers


# The transformers releases this code supports: the first and the last minor version, both included. setup.py and
# MODEL_CARD.md state the same range; the CI compatibility job (.ci/compat) runs the core equivalences on each one.
TRANSFORMERS_RANGE = ("5.22", "5.24")


def _minor_version(version: str) -> tuple[int, int]:
    """`"5.24.0"` -> `(5, 24)`; suffixes are ignored (`"5.25.0.dev0"` -> `(5, 25)`, `"5.23.0rc1"` -> `(5, 23)`)."""
    numbers = []
    for piece in version.split(".")[:2]:
        digits = ""
        for char in piece:
            if not char.isdigit():
                break
            digits += char
        numbers.append(int(digits) if digits else 0)
    return tuple(numbers + [0] * (2 - len(numbers)))


def transformers_requirement() -> str:
    """The pip specifier of :data:`TRANSFORMERS_RANGE`: `">=5.22,<5.25"`."""
    low, high = TRANSFORMERS_RANGE
    major, minor = _minor_version(high)
    return f">={low},<{major}.{minor + 1}"


def check_transformers_version(installed: str) -> None:
    """Raise a one-line ImportError naming `installed` and the supported versions if `installed` is outside
    :data:`TRANSFORMERS_RANGE`."""
    low, high = TRANSFORMERS_RANGE
    if not _minor_version(low) <= _minor_version(installed) <= _minor_version(high):
        raise ImportError(
            f"This Vedas code supports transformers {low} to {high} (pip install "
            f"'transformers{transformers_requirement()}'), but transformers {installed} is installed."
        )


check_transformers_version(transformers.__version__)

# transformers 5.24 renamed the KV cache argument and output field `past_key_values` to `cache` (keeping the old name
# as a deprecated alias): the remote code passes and returns the cache under the installed version's name.
CACHE_ARG = "cache" if _minor_version(transformers.__version__) >= (5, 24) else "past_key_values"

from transformers import Qwen2_5_VLConfig, Qwen2VLConfig, Qwen3VLConfig  # noqa: E402 (after the version check)


START_LATENT_TOKEN = "<|start_latent|>"
LATENT_TOKEN = "<|latent|>"
END_LATENT_TOKEN = "<|end_latent|>"
REPLAY_TOKEN = "<|replay|>"
# config attribute prefix -> token string; the single source of truth for the special tokens
SPECIAL_TOKENS = {
    "start_latent": START_LATENT_TOKEN,
    "latent": LATENT_TOKEN,
    "end_latent": END_LATENT_TOKEN,
    "replay": REPLAY_TOKEN,
}

# Upper bounds on T and K, for the config and for generate's per-call values: each latent step is one forward and
# adds R + 1 columns, so a slip such as num_latent_steps=10000 would run for hours instead of failing at once.
MAX_LATENT_STEPS = 64
MAX_REPLAY_TOKENS = 1024

REPLAY_MODES = ("tokens", "soft_mix")
REPLAY_SCALES = ("softmax", "rescaled")
POSITION_MODES = ("original", "sequential")
ROUTING_MODES = ("causal", "global")
ROUTING_POSITION_MODES = ("original", "rearranged")
DEPTH_RESIDUALS = ("gated", "literal")
# OpenAI CLIP statistics, the Qwen2-VL image processor's defaults
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def _is_int(value) -> bool:
    """An int that is not a bool (JSON `true` would otherwise count as 1)."""
    return isinstance(value, int) and not isinstance(value, bool)


def _check_int(name: str, value, low: int, high: int | None = None):
    """Refuse a `value` that is not an int (bools included) in `[low, high]`, naming the field."""
    if not _is_int(value) or value < low or (high is not None and value > high):
        bounds = f">= {low}" if high is None else f"in [{low}, {high}]"
        raise ValueError(f"VedasConfig.{name} must be an integer {bounds}, got {value!r}.")


def _edit_distance(a: str, b: str) -> int:
    """Levenshtein distance: insertions, deletions and substitutions."""
    previous = list(range(len(b) + 1))
    for i, char in enumerate(a, 1):
        current = [i]
        for j, other in enumerate(b, 1):
            current.append(min(previous[j] + 1, current[j - 1] + 1, previous[j - 1] + (char != other)))
        previous = current
    return previous[-1]


def _warn_misspelt(kwargs: dict):
    """Warn about keys that are not Vedas fields but nearly are (`num_latent_step`): the config would keep them as
    unused attributes, and the intended field its default."""
    fields = [name for name in VedasSettings.__dataclass_fields__ if not name.startswith("_")]
    for key in kwargs:
        if key in fields:
            continue
        distance, closest = min((_edit_distance(key, name), name) for name in fields)
        if distance <= max(1, len(key) // 6):
            warnings.warn(
                f"VedasConfig got the unknown key {key!r}, which has no effect: did you mean {closest!r}?",
                stacklevel=3,
            )


@dataclass(frozen=True)
class LatentBlock:
    """The column arithmetic of a latent block with R = `slots` replay slots per step, the one place that says where
    each token of `VedasSettings.latent_block_ids` sits. Offsets count from `<|start_latent|>` (offset 0):

        offset  0                 1 .. R           R + 1        ...  first(t) .. first(t) + R   ...  T (R + 1) + 1
        token   <|start_latent|>  <|replay|> x R   <|latent|>        step t: R slots, then z(t)      <|end_latent|>

    Step t (1-based) covers `step_width` columns from `step_first(t)`; its latent sits at `latent_in_step` within
    them, its replay slots at the others. The token ids (`step_ids`), the model's layout (`_LatentLayout`), its
    layout check, `expand_latent_sequences` and the lockstep padding all read these, so that one edit here changes
    the layout everywhere. Offsets accept ints or integer tensors (per-row step counts)."""

    slots: int  # R

    @property
    def step_width(self) -> int:
        """Columns of one step: its R replay slots and its latent."""
        return self.slots + 1

    @property
    def latent_in_step(self) -> int:
        """Where the latent sits among its step's columns: after the R replay slots (Coconut: B(t), then z(t))."""
        return self.slots

    def step_first(self, step):
        """The offset of step `step`'s first column (1-based steps)."""
        return 1 + (step - 1) * self.step_width

    def latent_offset(self, step):
        """The offset of z(step)."""
        return self.step_first(step) + self.latent_in_step

    def replay_offsets(self, step: int) -> list[int]:
        """The offsets of step `step`'s R replay slots, in order."""
        first = self.step_first(step)
        return [first + i for i in range(self.step_width) if i != self.latent_in_step]

    def end_offset(self, num_steps):
        """The offset of `<|end_latent|>` after `num_steps` steps; also the number of columns after the marker that
        the steps and `<|end_latent|>` take."""
        return self.step_first(num_steps + 1)

    def step_ids(self, replay_id: int, latent_id: int) -> list[int]:
        """The token ids of one step, in column order."""
        return [latent_id if i == self.latent_in_step else replay_id for i in range(self.step_width)]


@dataclass(kw_only=True, repr=False)
class VedasSettings:
    r"""
    The Vedas hyper-parameters. Defaults are the paper's (arXiv 2604.10500; docs/design.md, section 8).

    Latent reasoning:
        num_latent_steps (`int`, *optional*, defaults to 4):
            T_r, the number of latent reasoning steps `generate` runs when the call does not say otherwise.

    Visual replay (SCF-VR):
        num_replay_tokens (`int`, *optional*, defaults to 32):
            K, the visual tokens replayed before each latent. 0 disables replay.
        replay_mode (`str`, *optional*, defaults to `"tokens"`):
            `"tokens"` inserts the K weighted tokens B(t); `"soft_mix"` inserts one token, their weighted sum.
        replay_scale (`str`, *optional*, defaults to `"softmax"`):
            `"softmax"` weights the K tokens by softmax(saliency) (each is about V/K, as in the authors' code);
            `"rescaled"` multiplies those weights by K so that uniform saliency keeps features at their scale.
        replay_positions (`str`, *optional*, defaults to `"original"`):
            `"original"` (paper: keep old position) gives replayed tokens the M-RoPE (t, h, w) ids of the tokens
            they copy; `"sequential"` gives them the next text positions.
        window_size (`int`, *optional*, defaults to 3):
            W, the side of the dense window on the merged grid that is cropped for self-distillation.
        crop_resolution (`int`, *optional*, defaults to 280):
            Side in pixels of the re-encoded crop; a multiple of patch_size * spatial_merge_size (28 on Qwen2-VL
            and Qwen2.5-VL; 32 on Qwen3-VL, whose default is 320).
        recon_weight (`float`, *optional*, defaults to 1.0):
            λ, the weight of the self-distillation loss L_recon (paper: 1.0 for 2B/3B, 0.2 for 7B). L_recon is
            `mse_loss` with mean reduction: it averages over the hidden dimension as well as over the (step,
            sample) pairs, as the authors' release does (`nn.MSELoss`, weight 0.2), while Eq. 8 writes a squared
            L2 norm, d_model times larger per pair (docs/design.md, section 7).
        recon_normalize_target (`bool`, *optional*, defaults to True):
            Layer-normalise (no affine) the teacher's pooled crop features u_ref before the MSE, so that L_recon
            keeps its scale while the vision tower trains. False uses the raw pooled features, as the authors'
            release does (still the mean-reduced MSE, not Eq. 8's squared norm).
        image_mean, image_std (`list[float]`):
            Normalisation used to re-encode crops; copied from the image processor at conversion.

    Routing depth scaling (RDS):
        routing_layers (`list[int]`, *optional*):
            0-based decoder layers that get a `depth_router` and a second pass. Defaults to 0, 2, 4, ...
            (the paper's odd 1-indexed layers). An empty list disables RDS.
        routing_topk (`int`, `float` or `list[int]`, *optional*, defaults to 32):
            α, tokens selected per layer: a count (>= 1), a fraction of the prompt in (0, 1], or a cosine
            schedule `[α_s, α_e]` with α(l) = round(α_e + (α_s - α_e) / 2 * (1 + cos(π l / L))).
        max_depth (`int`, *optional*, defaults to 1):
            D, how many times routing and the second pass repeat in a routing layer.
        routing (`str`, *optional*, defaults to `"causal"`):
            `"causal"`: top-α of the prompt sets a per-layer threshold that later tokens must reach (cacheable,
            exact under incremental decoding). `"global"`: paper-literal top-α over the whole current sequence,
            no KV cache.
        routing_positions (`str`, *optional*, defaults to `"original"`):
            Positions of the tokens in the second pass: their own (`"original"`) or new consecutive ones
            (`"rearranged"`).
        depth_gate_init (`float`, *optional*, defaults to 0.0):
            Initial value of the step embeddings e(d) (`depth_step_embed`). 0 makes a converted model compute
            exactly its base model until training moves e.
        depth_residual (`str`, *optional*, defaults to `"gated"`):
            How a routing layer's second pass enters its output (Eqs. 10-11), with h the layer's output, m the
            selection, s the router gate and f the second pass. `"gated"`: out = h + m ⊙ s ⊙ (f(h) - h) ⊙ e(d), so
            unselected tokens keep h exactly (our reading; docs/design.md, section 5). `"literal"`: Eq. 11 as
            printed, H(D) = H(0) + Σ_d H(d) ⊙ e(d) with H(d) = h + m ⊙ s ⊙ (f(h) - h), so every token, selected or
            not, is scaled by (1 + e(d)). Both compute the base model while e(d) = 0.

    Special tokens (strings in :data:`SPECIAL_TOKENS`, ids filled in by the conversion):
        start_latent_token_id, latent_token_id, end_latent_token_id, replay_token_id (`int`, *optional*)
    """

    num_latent_steps: int = 4
    num_replay_tokens: int = 32
    replay_mode: str = "tokens"
    replay_scale: str = "softmax"
    replay_positions: str = "original"
    window_size: int = 3
    crop_resolution: int = 280
    recon_weight: float = 1.0
    recon_normalize_target: bool = True
    image_mean: list[float] = field(default_factory=lambda: list(CLIP_MEAN))
    image_std: list[float] = field(default_factory=lambda: list(CLIP_STD))
    routing_layers: list[int] | None = None
    routing_topk: int | float | list[int] = 32
    max_depth: int = 1
    routing: str = "causal"
    routing_positions: str = "original"
    depth_gate_init: float = 0.0
    depth_residual: str = "gated"
    start_latent_token: str = START_LATENT_TOKEN
    latent_token: str = LATENT_TOKEN
    end_latent_token: str = END_LATENT_TOKEN
    replay_token: str = REPLAY_TOKEN
    start_latent_token_id: int | None = None
    latent_token_id: int | None = None
    end_latent_token_id: int | None = None
    replay_token_id: int | None = None

    def __post_init__(self, **kwargs):
        """The backbone config's set-up, then the Vedas defaults and checks; a misspelt Vedas key warns."""
        _warn_misspelt(kwargs)
        super().__post_init__(**kwargs)
        self._finalize_vedas()

    @classmethod
    def from_dict(cls, config_dict, **kwargs):
        """The backbone's `from_dict`, with the overrides (`from_pretrained(dir, **overrides)`) checked too."""
        # `from_pretrained(dir, **overrides)` sets the overrides after `__init__` ran the checks: run them again
        _warn_misspelt({key: value for key, value in kwargs.items() if key not in config_dict})
        result = super().from_dict(config_dict, **kwargs)
        (result[0] if isinstance(result, tuple) else result)._finalize_vedas()
        return result

    def _finalize_vedas(self):
        """Fills the default routing layers (0, 2, 4, ...), normalises list fields, then validates."""
        num_layers = self.text_config.num_hidden_layers
        if self.routing_layers is None:
            self.routing_layers = list(range(0, num_layers, 2))
        self.routing_layers = sorted(i if isinstance(i, bool) else int(i) for i in self.routing_layers)
        if isinstance(self.routing_topk, tuple):
            self.routing_topk = list(self.routing_topk)
        self._validate_vedas()

    def _validate_vedas(self):
        """Refuses, in one line naming the field, a value the model cannot use (ints exclude booleans)."""
        for name, allowed in (("replay_mode", REPLAY_MODES), ("replay_scale", REPLAY_SCALES),
                              ("replay_positions", POSITION_MODES), ("routing", ROUTING_MODES),
                              ("routing_positions", ROUTING_POSITION_MODES), ("depth_residual", DEPTH_RESIDUALS)):
            if getattr(self, name) not in allowed:
                raise ValueError(f"VedasConfig.{name}={getattr(self, name)!r} is not one of {allowed}.")
        _check_int("num_latent_steps", self.num_latent_steps, low=0, high=MAX_LATENT_STEPS)
        _check_int("num_replay_tokens", self.num_replay_tokens, low=0, high=MAX_REPLAY_TOKENS)
        _check_int("window_size (W)", self.window_size, low=1)
        _check_int("max_depth (D)", self.max_depth, low=1)
        unit, name = self.visual_cell
        if not _is_int(self.crop_resolution) or self.crop_resolution < unit or self.crop_resolution % unit:
            raise ValueError(
                f"VedasConfig.crop_resolution must be a positive multiple of {name} ({unit}), got "
                f"{self.crop_resolution!r}."
            )
        if isinstance(self.recon_weight, bool) or not self.recon_weight >= 0:
            raise ValueError(f"VedasConfig.recon_weight (λ) must be a number >= 0, got {self.recon_weight!r}.")
        self._validate_routing()

    def _validate_routing(self):
        """The RDS fields: routing layers within the decoder, α a count, a fraction or a cosine schedule."""
        num_layers = self.text_config.num_hidden_layers
        bad = [i for i in self.routing_layers if not _is_int(i) or not 0 <= i < num_layers]
        if bad:
            raise ValueError(
                f"VedasConfig.routing_layers has indices {bad} outside the {num_layers} decoder layers "
                f"(valid: 0..{num_layers - 1})."
            )
        if len(set(self.routing_layers)) != len(self.routing_layers):
            raise ValueError(f"VedasConfig.routing_layers has duplicates: {self.routing_layers}.")
        topk = self.routing_topk
        if isinstance(topk, bool):
            raise ValueError(f"VedasConfig.routing_topk (α) must be a number or [α_s, α_e], got {topk!r}.")
        if isinstance(topk, list):
            if len(topk) != 2 or not all(_is_int(a) and a >= 1 for a in topk):
                raise ValueError(
                    f"VedasConfig.routing_topk as a cosine schedule must be [α_s, α_e] with two integers >= 1, "
                    f"got {topk!r}."
                )
        elif isinstance(topk, int):
            if topk < 1:
                raise ValueError(f"VedasConfig.routing_topk (α) must be >= 1 tokens, got {topk!r}.")
        elif isinstance(topk, float):
            if not 0.0 < topk <= 1.0:
                raise ValueError(
                    f"VedasConfig.routing_topk (α) as a fraction of the prompt must be in (0, 1], got {topk!r}."
                )
        else:
            raise ValueError(f"VedasConfig.routing_topk (α) must be an int, a float or [α_s, α_e], got {topk!r}.")
        for name in ("image_mean", "image_std"):
            if len(getattr(self, name)) != 3:
                raise ValueError(f"VedasConfig.{name} must have 3 values, got {getattr(self, name)!r}.")

    @property
    def visual_cell(self) -> tuple[int, str]:
        """The side in pixels of one cell of the visual grid (one visual token), and what it is made of."""
        return self.vision_config.patch_size * self.vision_config.spatial_merge_size, "patch_size * spatial_merge_size"

    @property
    def visual_merge_size(self) -> int:
        """Patches per side of one visual token (the merger's side): `image_grid_thw` counts patches."""
        return self.vision_config.spatial_merge_size

    @property
    def replay_tokens_per_step(self) -> int:
        """R for the config's own K (see `replay_slots`)."""
        return self.replay_slots(self.num_replay_tokens)

    def replay_slots(self, num_replay_tokens: int) -> int:
        """R, the replay slots before each latent for K = `num_replay_tokens`: K for `"tokens"`, 1 for
        `"soft_mix"`, 0 when replay is off."""
        if num_replay_tokens == 0:
            return 0
        return 1 if self.replay_mode == "soft_mix" else num_replay_tokens

    def latent_block(self, num_replay_tokens: int) -> LatentBlock:
        """The column arithmetic of a latent block for K = `num_replay_tokens` (R = `replay_slots(K)`)."""
        return LatentBlock(self.replay_slots(num_replay_tokens))

    def latent_block_ids(self, num_steps: int, num_replay_tokens: int | None = None, *, start: bool = True,
                         end: bool = True) -> list[int]:
        """The token ids of a latent block, the one definition of the sequence layout (docs/design.md, section 2)
        that the collator, `forward`, `generate` and evaluation all read:

            <|start_latent|>  ([<|replay|>] x R + [<|latent|>]) x T  <|end_latent|>

        with T = `num_steps` and R = `replay_slots(K)` (K defaults to `num_replay_tokens`; K = 0 gives the compact
        form `generate` returns). `start` / `end` leave out the markers."""
        k = self.num_replay_tokens if num_replay_tokens is None else num_replay_tokens
        step = self.latent_block(k).step_ids(self.replay_token_id, self.latent_token_id)
        return [self.start_latent_token_id] * start + step * num_steps + [self.end_latent_token_id] * end

    def routing_topk_for_layer(self, layer_idx: int) -> int | float:
        """α for one decoder layer: the count, the fraction, or the cosine schedule's value at `layer_idx`."""
        if isinstance(self.routing_topk, list):
            alpha_s, alpha_e = self.routing_topk
            num_layers = self.text_config.num_hidden_layers
            return int(round(alpha_e + (alpha_s - alpha_e) / 2 * (1 + math.cos(math.pi * layer_idx / num_layers))))
        return self.routing_topk

    def special_token_ids(self) -> dict[str, int | None]:
        """`{"start_latent": id, "latent": id, "end_latent": id, "replay": id}` (None before conversion)."""
        return {name: getattr(self, f"{name}_token_id") for name in SPECIAL_TOKENS}


class VedasConfig(VedasSettings, Qwen2VLConfig):
    r"""Configuration of a Vedas model on a Qwen2-VL backbone. See :class:`VedasSettings` for the Vedas fields."""

    model_type = "vedas"


class Vedas25Config(VedasSettings, Qwen2_5_VLConfig):
    r"""Configuration of a Vedas model on a Qwen2.5-VL backbone. See :class:`VedasSettings` for the Vedas fields."""

    model_type = "vedas_2_5"


class Vedas3Config(VedasSettings, Qwen3VLConfig):
    r"""Configuration of a Vedas model on a Qwen3-VL backbone (interleaved M-RoPE, DeepStack, 16-pixel patches). See
    :class:`VedasSettings` for the Vedas fields. Its merged cell is 32 pixels (Qwen2-VL: 28), so `crop_resolution`
    must be a multiple of 32; it defaults to 320, the 10 x 10 merged cells of the other backbones' 280."""

    model_type = "vedas_3"
    crop_resolution: int = 320


__all__ = ["VedasConfig", "Vedas25Config", "Vedas3Config", "VedasSettings", "SPECIAL_TOKENS"]
