"""Vedas: multimodal latent reasoning with visual replay (SCF-VR) and routing depth scaling (RDS).

Sequence layout of a latent sample (R replay slots per step: K, or 1 in `"soft_mix"` mode):

    X  <|start_latent|>  [<|replay|> x R, <|latent|>] x T  <|end_latent|>  answer

Order of computation (the Coconut rule, with replay): the hidden state at the position just before B(t) (the
previous latent, or `<|start_latent|>` for t = 1) becomes z(t), and the attention of that same position over the
prompt's visual tokens selects B(t). Each latent step is one forward of R + 1 new tokens on the KV cache.
"""

import warnings
from dataclasses import dataclass, field

import torch
from torch import nn
from transformers import initialization as init
from transformers.conversion_mapping import get_checkpoint_conversion_mapping, register_checkpoint_conversion_mapping
from transformers.modeling_outputs import ModelOutput
from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import Qwen2_5_VLForConditionalGeneration
from transformers.models.qwen2_vl.modeling_qwen2_vl import Qwen2VLForConditionalGeneration
from transformers.models.qwen3_vl.modeling_qwen3_vl import Qwen3VLForConditionalGeneration

from .configuration_vedas import (
    CACHE_ARG,
    MAX_LATENT_STEPS,
    MAX_REPLAY_TOKENS,
    LatentBlock,
    Vedas3Config,
    Vedas25Config,
    VedasConfig,
)
from .replay_vedas import (
    ReplaySelection,
    VisualTokens,
    crop_and_resize,
    dense_windows,
    patchify_images,
    select_replay,
    visual_tokens,
    window_to_pixel_box,
)
from .routing_vedas import (
    DepthStepEmbedding,
    Vedas3DecoderLayer,
    Vedas25DecoderLayer,
    VedasCache,
    VedasDecoderLayer,
    VedasForwardState,
    _agree_across_ranks,
    _can_update_in_place,
    _in_lockstep,
)


def _output_dataclass(cls):
    """`@dataclass` for a `ModelOutput` whose KV cache field is written `past_key_values`: the field takes the
    installed transformers' name, `cache` from 5.24 on (generate then reads `outputs["cache"]`, and
    `past_key_values` is a read-only alias), `past_key_values` before. `__init__` accepts both names."""
    if CACHE_ARG == "past_key_values":
        return dataclass(cls)
    cls.__annotations__ = {CACHE_ARG if k == "past_key_values" else k: v for k, v in cls.__annotations__.items()}
    setattr(cls, CACHE_ARG, None)
    delattr(cls, "past_key_values")
    cls = dataclass(cls)
    init = cls.__init__

    def __init__(self, *args, past_key_values=None, **kwargs):
        if past_key_values is not None:
            kwargs[CACHE_ARG] = past_key_values
        init(self, *args, **kwargs)

    type.__setattr__(cls, "__init__", __init__)  # not through ModelOutput's metaclass, which warns on the old name
    return cls


@_output_dataclass
class VedasCausalLMOutput(ModelOutput):
    """
    Args:
        loss: `ce_loss + recon_weight * recon_loss` (λ-weighted), when labels are given.
        ce_loss: next-token cross-entropy on the supervised tokens.
        recon_loss: self-distillation MSE averaged over latent steps and samples (training with crop images).
        logits: `(batch, seq, vocab)`.
        past_key_values: the `VedasCache` (named `cache` from transformers 5.24 on).
        hidden_states: with `output_hidden_states`, `num_layers + 1` tensors `(batch, seq, hidden)`: the embeddings,
            then each layer's output (the last after the final norm: the logits are computed from it).
        attentions: with `output_attentions` (eager attention), one `(batch, heads, seq, seq + past)` map per layer.
        latent_trace: per latent step, what replay selected (see `VedasForConditionalGeneration.forward`).
        router_stats: per `(layer, depth)`: mean selected count, mean router score, mean threshold (detached).
    """

    loss: torch.FloatTensor | None = None
    ce_loss: torch.FloatTensor | None = None
    recon_loss: torch.FloatTensor | None = None
    logits: torch.FloatTensor | None = None
    past_key_values: VedasCache | None = None
    latent_trace: list | None = None
    router_stats: dict | None = None
    hidden_states: tuple | None = None
    attentions: tuple | None = None


@_output_dataclass
class VedasGenerateOutput(ModelOutput):
    """`generate(..., return_dict_in_generate=True)` with T > 0: HF's fields (those of beam search included) with
    the compact sequences `(batch * num_return_sequences, l)`, plus `latent_trace` (one row per prompt)."""

    sequences: torch.LongTensor | None = None
    sequences_scores: torch.FloatTensor | None = None
    scores: tuple | None = None
    logits: tuple | None = None
    beam_indices: torch.LongTensor | None = None
    attentions: tuple | None = None
    hidden_states: tuple | None = None
    past_key_values: VedasCache | None = None
    latent_trace: list | None = None


@dataclass
class _LatentLayout:
    """Where the latent block of a batch sits: its `<|start_latent|>` column, and the block's column arithmetic
    (`LatentBlock`, the one definition of where each step's replay slots and latent are)."""

    start: int  # column of <|start_latent|> (the same in every row)
    steps: torch.Tensor  # (batch,) latent steps of each row
    num_steps: int  # max over rows
    block: LatentBlock  # R replay slots then the latent, per step
    min_steps: int = 0  # min over rows: every row has steps 1..min_steps

    @property
    def slots(self) -> int:
        """R, the replay slots per step."""
        return self.block.slots

    def replay_columns(self, step: int) -> list[int]:
        """The R replay slots of step `step` (1-based): they follow z(step - 1), or the marker for step 1."""
        return [self.start + offset for offset in self.block.replay_offsets(step)]

    def replay_span(self, step: int) -> slice:
        """`replay_columns(step)` as a slice (they are contiguous), so that writes into them are views."""
        first = self.start + self.block.step_first(step)
        return slice(first, first + self.slots)

    def latent_column(self, step: int) -> int:
        """The column of z(step) (1-based), right after its replay slots."""
        return self.start + self.block.latent_offset(step)

    def rows_with_step(self, step: int) -> torch.Tensor | None:
        """`(batch,)` bool: the rows that have step `step`; None when all do (no row to keep unchanged)."""
        return None if step <= self.min_steps else self.steps >= step

    def end_column(self, num_steps):
        """The column of `<|end_latent|>` after `num_steps` steps (an int, or a tensor of per-row counts)."""
        return self.start + self.block.end_offset(num_steps)


@dataclass
class _DeepStack:
    """Qwen3-VL's DeepStack inputs of a batch: visual features of intermediate vision blocks that the text model adds,
    after decoder layer i, to the hidden states at the image positions (`Qwen3VLTextModel._deepstack_process`).

    What a replayed token carries: the merged final visual embedding only (the merger output V that the first layer
    received at that image slot), never DeepStack's additions. DeepStack applies at the image positions of the
    prompt and nowhere else, in the latent loop and in `generate` alike: a replay slot is an input of a latent step,
    not an image position (its token id is `<|replay|>`, not the image token), exactly as a latent z(t) is. Adding
    the features there too would make B(t) depend on where it is inserted (layers 0..len - 1 would see a second copy
    of features that the image position already received) and would break the equality of a latent step with the
    same step computed without DeepStack-aware slots; keeping the replayed token one vector also keeps it the same
    object on every backbone, with the same L_recon target, and the converted model equal to its base on the prompt.

    Args:
        mask: `(batch, l)` bool, the image positions (the image token in `input_ids`).
        features: one `(n, hidden)` tensor per DeepStack layer, the rows of `mask` in row-major order.
    """

    mask: torch.Tensor
    features: list

    def inputs(self, columns: slice) -> dict:
        """The text model's `visual_pos_masks` / `deepstack_visual_embeds` for the columns of one pass `[columns]`:
        the features of the image positions among them (none when the pass holds no image position)."""
        mask = self.mask[:, columns]
        if not bool(mask.any()):
            return {}
        order = torch.zeros(self.mask.shape, dtype=torch.long, device=mask.device)
        order[self.mask] = torch.arange(int(self.mask.sum()), device=mask.device)
        rows = order[:, columns][mask]  # the features of this pass's image positions, in row-major order
        return {"visual_pos_masks": mask, "deepstack_visual_embeds": [f[rows.to(f.device)] for f in self.features]}


@dataclass
class _LatentRun:
    """What the passes of one latent forward share; `_latent_step` updates embeds, positions, mask and visited."""

    layout: _LatentLayout
    num_replay: int  # K of this call
    embeds: torch.Tensor  # (batch, l, hidden): token embeddings, merger outputs, then z(t) and B(t) as written
    positions: torch.Tensor  # (3, batch, l) M-RoPE positions; replay slots take the copied tokens' positions
    mask: torch.Tensor  # (batch, l): attention mask; unused replay slots are 0
    visual: VisualTokens  # each sample's visual tokens (columns, images, merged cells)
    visited: torch.Tensor  # (batch, v): visual tokens replayed at an earlier step
    prompt_mask: torch.Tensor  # (batch, l): the routing prompt
    prompt_lengths: torch.Tensor  # (batch,)
    cache: VedasCache | None  # None: every pass recomputes the prefix
    deepstack: _DeepStack | None  # Qwen3-VL: the features added at the image positions (None on other backbones)
    replay_on: bool  # R > 0 and the batch has image tokens
    compute_recon: bool  # L_recon is computed (training, crop images, λ > 0)
    output_latent_trace: bool
    trace: list = field(default_factory=list)  # one dict per latent step
    recon: list = field(default_factory=list)  # (sample, crop window, mean B(t) (hidden,)) for L_recon


@dataclass
class _Replay:
    """B(t) of one latent step, from `_replay_tokens`."""

    tokens: torch.Tensor  # (batch, R, hidden): the weighted visual features
    positions: torch.Tensor  # (3, batch, R): positions of the copied tokens
    slot_valid: torch.Tensor  # (batch, R): slots that hold a token
    selection: ReplaySelection  # the top-K indices and weights over the visual tokens
    saliency: torch.Tensor  # (batch, v) float32: a(t)


@dataclass
class _LatentPass:
    """One pass of the latent forward, from `_latent_pass`."""

    hidden: torch.Tensor  # (batch, columns of the pass, hidden), after the final norm
    state: VedasForwardState  # routing state: saliency, router statistics and scores
    recorded: tuple | None  # (hidden_states, attentions) of the pass, when asked for and covered by it


@dataclass
class LatentPhase:
    """The latent phase `generate` runs before decoding the answer (`_latent_forward(..., return_hidden_only=True)`).

    Args:
        last_hidden_state: `(batch, columns, hidden)` of the last pass (it ends at z(T)).
        cache: the `VedasCache` holding the prompt and the T steps (None without a cache).
        position_ids: `(3, batch, l)` positions of the layout, the replay slots' filled in.
        attention_mask: `(batch, l)`, unused replay slots masked.
        latent_trace: one dict per step (see `forward`'s `output_latent_trace`).
    """

    last_hidden_state: torch.Tensor
    cache: VedasCache | None
    position_ids: torch.Tensor
    attention_mask: torch.Tensor
    latent_trace: list


def _per_call(name: str, value, config, bound: int) -> int:
    """A call's T or K (`value`, else the config's field `name`), checked by `_check_count`."""
    if value is None:
        return _check_count(f"config.{name}", getattr(config, name), bound)
    return _check_count(name, value, bound)


def _check_count(name: str, value, bound: int) -> int:
    """`value` as an int in `[0, bound]`, else a one-line ValueError naming it (bools, floats and strings too)."""
    try:
        count = None if isinstance(value, bool) else value.__index__()
    except (AttributeError, TypeError, RuntimeError):
        count = None
    if count is None or not 0 <= count <= bound:
        raise ValueError(f"{name} must be an integer in [0, {bound}], got {value!r}.")
    return count


def _write_rows(target: torch.Tensor, values, rows: torch.Tensor | None):
    """`target` (a view into the run's tensors) set to `values` (a tensor or a number) in place where `rows`
    (broadcast to it; None: everywhere)."""
    if rows is not None:
        values = torch.where(rows, values, target)
    if isinstance(values, torch.Tensor):
        target.copy_(values)
    else:
        target.fill_(values)


def _write_embeds(run: _LatentRun, rows, writes):
    """Write `(columns (a slice), values (batch, columns, hidden))` pairs into `run.embeds` for the `rows` `(batch,)`
    that have the step (None: all). Under autograd out of place: the earlier passes' inputs are views of
    `run.embeds` that backward may need. Without it (`generate`) in place, touching only those columns: the
    out-of-place form allocates, zero-fills and selects two more `(batch, l, hidden)` tensors at every step."""
    if not _can_update_in_place(run.embeds):
        fill = torch.zeros(run.mask.shape, dtype=torch.bool, device=run.mask.device)
        new_embeds = torch.zeros_like(run.embeds)
        for columns, values in writes:
            fill[:, columns] = True if rows is None else rows[:, None]
            new_embeds[:, columns] = values
        run.embeds = torch.where(fill.unsqueeze(-1), new_embeds, run.embeds)
        return
    for columns, values in writes:
        _write_rows(run.embeds[:, columns], values, None if rows is None else rows[:, None, None])


def _accumulate_router_stats(total: dict, new: dict, passes_before: int):
    """Merge one pass's router stats into the running ones: selected counts add up over the passes (tokens selected
    per sample in the whole sequence), mean score and threshold are averaged over the passes."""
    for key, stats in new.items():
        if key not in total:
            total[key] = dict(stats)
            continue
        total[key]["selected"] = total[key]["selected"] + stats["selected"]
        for name in ("score", "threshold"):
            total[key][name] = (total[key][name] * passes_before + stats[name]) / (passes_before + 1)


def _segment_any(flag: torch.Tensor, segments: torch.Tensor) -> torch.Tensor:
    """`(batch, l)` bool: whether any token of each token's segment is flagged. flag, segments: `(batch, l)`."""
    count = torch.zeros(flag.shape[0], int(segments.max()) + 1, dtype=torch.long, device=flag.device)
    count = count.scatter_add(1, segments, flag.long())
    return count.gather(1, segments) > 0


def _before_first(flag: torch.Tensor, segments: torch.Tensor) -> torch.Tensor:
    """`(batch, l)` bool: no flagged token at or before this column within its segment (segments are contiguous)."""
    count = flag.long().cumsum(-1)
    starts = torch.ones_like(flag)
    starts[:, 1:] = segments[:, 1:] != segments[:, :-1]
    # flags counted before each segment (the count is non-decreasing, so cummax carries a segment's base forward)
    base = torch.where(starts, count - flag.long(), 0).cummax(-1).values
    return count == base


def _packed_positions(position_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Packed rows, recognised as transformers does: text positions that do not go up by one start a new sequence.

    position_ids: `(batch, l)` text positions, or `(4, batch, l)` (text, then M-RoPE); `(3, batch, l)` M-RoPE
    alone carries no text positions and is never packed. Returns the positions for the backbone (2-D ones as 4 rows,
    so that its attention mask is packed too) and `(batch, l)` segment ids, or None when no row is packed.
    """
    if position_ids.ndim == 3 and position_ids.shape[0] != 4:
        return position_ids, None
    text = position_ids if position_ids.ndim == 2 else position_ids[0]
    starts = torch.ones_like(text, dtype=torch.bool)
    starts[:, 1:] = text[:, 1:] - text[:, :-1] != 1
    segments = starts.long().cumsum(-1) - 1
    if not bool((segments[:, -1] > 0).any()):
        return position_ids, None
    if position_ids.ndim == 2:
        position_ids = torch.cat([text[None], text[None].expand(3, -1, -1)])
    return position_ids, segments


def _mask_segments(allowed: torch.Tensor, token_valid: torch.Tensor, past_length: int) -> torch.Tensor | None:
    """Packed sequences of a 4-D mask's `(batch, l, l)` block over this forward's tokens, for routing: a real token
    that does not see the real token before it starts a sequence. Refuses a mask that is not causal attention over
    the real tokens of each sequence, which routing could not honour. Returns `(batch, l)` ids, or None if unpacked.
    """
    length = token_valid.shape[1]
    columns = torch.arange(length, device=allowed.device)
    previous = torch.where(token_valid, columns, -1).cummax(-1).values  # last real token at or before each column
    previous = torch.cat([torch.full_like(previous[:, :1], -1), previous[:, :-1]], 1)
    sees_previous = allowed.gather(2, previous.clamp(min=0)[..., None]).squeeze(2) & (previous >= 0)
    segments = (token_valid & ~sees_previous & (previous >= 0)).long().cumsum(-1)
    expected = (columns[:, None] >= columns[None]) & token_valid[:, None, :]
    expected = expected & (segments[:, :, None] == segments[:, None, :])
    wrong = (allowed != expected) & token_valid[:, :, None]
    if past_length > 0:  # on a cache the new tokens continue one sequence
        wrong = wrong | (token_valid[:, :, None] & (segments[:, :, None] > 0))
    if bool(wrong.any()):
        row, query = (int(i) for i in wrong.any(-1).nonzero()[0])
        raise ValueError(
            f"The 4-D attention_mask is not causal attention over padding and packed sequences (row {row}, query "
            f"{query}); routing layers re-select and re-attend tokens under that structure only."
        )
    return segments if bool((segments[:, -1] > 0).any()) else None


def _pad_for_steps(module, layout: _LatentLayout, input_ids, mask, mm_token_type_ids, labels):
    """Agrees the number of latent passes across ranks in lockstep (`_agree_across_ranks`). A batch with fewer
    steps than another rank's gains passes that none of its rows uses (like a row with fewer steps than its batch)
    and, where its columns run out, masked columns on the right (`_latent_forward` drops them again)."""
    steps = _agree_across_ranks(module, [layout.num_steps])[0]
    extra = layout.end_column(steps) + 1 - input_ids.shape[1] if steps > layout.num_steps else 0
    layout.num_steps = steps
    if extra <= 0:
        return input_ids, mask, mm_token_type_ids, labels

    def pad(tensor, value):
        return None if tensor is None else nn.functional.pad(tensor, (0, extra), value=value)

    pad_id = module.config.text_config.pad_token_id
    return pad(input_ids, 0 if pad_id is None else pad_id), pad(mask, 0), pad(mm_token_type_ids, 0), pad(labels, -100)


def _main_pass_attentions(attentions, state: VedasForwardState):
    """The recorded attention maps without the routing layers' second passes: one per layer."""
    if not attentions:
        return attentions
    if len(attentions) != len(state.attention_calls):
        raise RuntimeError(f"{len(attentions)} attention maps were recorded for {len(state.attention_calls)} calls.")
    return tuple(attn for attn, main in zip(attentions, state.attention_calls) if main)


def _join_passes(recorded: list, length: int) -> tuple[tuple | None, tuple | None]:
    """Per-layer hidden states and attention maps of the latent forward's passes joined over the sequence: hidden
    states `(batch, chunk, hidden)` along it, attention rows `(batch, heads, chunk, end)` padded with zeros to
    `length` keys (a pass sees no later key) and stacked. `recorded`: `(hidden_states, attentions)` per pass."""
    if not recorded:
        return None, None
    hidden_states, attentions = None, None
    if recorded[0][0]:
        hidden_states = tuple(torch.cat(layer, dim=1) for layer in zip(*(states for states, _ in recorded)))
    if recorded[0][1]:
        attentions = tuple(
            torch.cat([nn.functional.pad(a, (0, length - a.shape[-1])) for a in layer], dim=2)
            for layer in zip(*(maps for _, maps in recorded))
        )
    return hidden_states, attentions


# The modules Vedas adds to the backbone (routing layers: `depth_router`, `depth_step_embed`; the model: `token_sr`),
# by the names their parameters carry: what LoRA trains in full and what a base checkpoint lacks.
VEDAS_MODULES = ("depth_router", "depth_step_embed", "token_sr")


class VedasMixin:
    """The Vedas logic shared by the Qwen2-VL, Qwen2.5-VL, Qwen3-VL and Chameleon classes. A backbone class adds its
    transformers parent, its config class and its routing decoder layer (`_decoder_layer_class`); what else differs
    is read from the backbone itself (its `get_rope_index`, rotary embedding, image features and DeepStack) through
    the backbone hooks below, whose defaults are the Qwen family's (chameleon_vedas.py overrides them)."""

    _decoder_layer_class = None

    def _init_vedas_modules(self):
        """The routing decoder layers (replacing the backbone's) and `token_sr`, from a validated config."""
        # VedasSettings checks its fields when it is built and loaded; fields set on it since are checked here
        self.config._finalize_vedas()
        text_config = self.config.text_config
        layers = self._text_model.layers
        for idx in range(len(layers)):
            layers[idx] = self._decoder_layer_class(text_config, idx, self.config)
        hidden = text_config.hidden_size
        # token_sr predicts the crop's pooled features from the mean of B(t) (self-distillation)
        self.token_sr = nn.Sequential(nn.Linear(hidden, hidden), nn.GELU(), nn.Linear(hidden, hidden))
        self._warned = set()
        self._routing_prompt_length = None  # set by generate while it decodes without a cache
        self._generating = False  # set by generate: its forwards skip the router statistics nobody reads there

    def _init_weights(self, module):
        """The backbone's init, and e(d) = `depth_gate_init` (0 by default: the converted model is its base)."""
        super()._init_weights(module)
        if isinstance(module, DepthStepEmbedding):
            init.constant_(module.weight, self.config.depth_gate_init)

    def initialize_weights(self):
        """transformers' init, then e(d) of every routing layer. transformers hands each nested model (here the text
        model, which holds the decoder layers) to that model's own `_init_weights`, which does not know
        `DepthStepEmbedding`: without this pass e(d) would keep whatever its storage held (zeros from `__init__`,
        uninitialised memory when `from_pretrained` lacks the key). `init.constant_` skips loaded parameters."""
        super().initialize_weights()
        with torch.no_grad():
            for module in self.modules():
                if isinstance(module, DepthStepEmbedding):
                    self._init_weights(module)

    # ------------------------------------------------------------------ backbone hooks
    # What differs between backbones, read through these methods only; the defaults are the Qwen-VL family's, and a
    # backbone module such as chameleon_vedas.py overrides them.
    @property
    def _text_model(self) -> nn.Module:
        """The decoder stack: its `layers`, its `rotary_emb`, and a forward over `inputs_embeds`."""
        return self.model.language_model

    def _run_text_model(self, **kwargs):
        """The decoder stack's forward (`inputs_embeds`, masks, positions as `_latent_position_ids` writes them)."""
        return self._text_model(**kwargs)

    def _image_embeddings(self, pixel_values, image_grid_thw) -> tuple[torch.Tensor, tuple | None]:
        """`(n, hidden)` embeddings of the image slots of the batch, in order (V, what replay copies), and the
        DeepStack features (Qwen3-VL: one tuple of per-image tensors per layer; None elsewhere)."""
        features = self.model.get_image_features(pixel_values, image_grid_thw)
        return torch.cat(features.pooler_output), getattr(features, "deepstack_features", None)

    def _default_position_ids(self, input_ids, embeds, image_grid_thw, key_valid, past_key_values, mm_token_type_ids):
        """Positions of a plain forward called without them (`(3, batch, past + l)`, or None: the backbone's)."""
        return self.model.compute_3d_position_ids(
            input_ids=input_ids, inputs_embeds=embeds, image_grid_thw=image_grid_thw, video_grid_thw=None,
            attention_mask=key_valid, **{CACHE_ARG: past_key_values}, mm_token_type_ids=mm_token_type_ids,
        )

    def _lm_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Logits `(batch, l, vocab)` of final hidden states `(batch, l, hidden)`."""
        return self.lm_head(hidden)

    def _grid_region(self, image: torch.Tensor) -> torch.Tensor:
        """The part `(3, h, w)` of an original image `(3, H, W)` that the processor's visual grid covers."""
        return image

    def _encode_crops(self, crops: torch.Tensor) -> torch.Tensor:
        """SCF-VR's teacher: crops `(n, 3, S, S)` in [0, 1] re-encoded as the prompt's images are, mean-pooled over
        their visual tokens: `(n, hidden)`. Called under no_grad."""
        cfg, vision = self.config, self.config.vision_config
        pixel_values, grid_thw = patchify_images(crops, vision.patch_size, vision.temporal_patch_size,
                                                 vision.spatial_merge_size, cfg.image_mean, cfg.image_std)
        features = self.model.get_image_features(pixel_values.to(self.model.visual.dtype), grid_thw.to(self.device))
        return torch.stack([f.mean(0) for f in features.pooler_output])

    # ------------------------------------------------------------------ helpers
    def _warn_once(self, key: str, message: str):
        """Warn `message` the first time this model meets `key` (no image, few visual tokens, ...)."""
        if key not in self._warned:
            self._warned.add(key)
            warnings.warn(message, stacklevel=3)

    def _replay_slots(self, num_replay_tokens: int) -> int:
        """R for K = `num_replay_tokens` (`VedasSettings.replay_slots`)."""
        return self.config.replay_slots(num_replay_tokens)

    def _routing_state(self, token_valid, prompt_mask, key_valid=None, record_scores=False,
                       prompt_lengths=None, segments=None) -> VedasForwardState:
        """`prompt_lengths` defaults to the prompt tokens of this forward (pass the whole prompt's when chunking);
        with packed `segments` `(batch, l)`, to those of each segment `(batch, segments)`."""
        if prompt_lengths is None:
            prompt = (prompt_mask & token_valid).long()
            if segments is None:
                prompt_lengths = prompt.sum(-1)
            else:
                prompt_lengths = torch.zeros(prompt.shape[0], int(segments.max()) + 1, dtype=torch.long,
                                             device=prompt.device).scatter_add(1, segments, prompt)
        return VedasForwardState(
            token_valid=token_valid,
            prompt_mask=prompt_mask,
            prompt_lengths=prompt_lengths,
            segments=segments,
            key_valid=key_valid,
            rotary_emb=self._text_model.rotary_emb,
            routing_mode=self.config.routing,
            record_scores=record_scores,
            record_stats=not self._generating,
        )

    def _embed(self, input_ids, pixel_values, image_grid_thw, inputs_embeds=None):
        """Token embeddings `(batch, l, hidden)` (`inputs_embeds` when given) with the merger outputs scattered into
        the image slots (found in input_ids, else as transformers does: the rows equal to the image token's)."""
        return self._embed_visual(input_ids, pixel_values, image_grid_thw, inputs_embeds=inputs_embeds)[0]

    def _embed_visual(self, input_ids, pixel_values, image_grid_thw, inputs_embeds=None):
        """`_embed`, and the backbone's DeepStack inputs (a `_DeepStack`, or None: no image, or a backbone without
        DeepStack)."""
        table = self.model.get_input_embeddings()
        embeds = table(input_ids) if inputs_embeds is None else inputs_embeds
        if pixel_values is None:
            return embeds, None
        image_embeds, layers = self._image_embeddings(pixel_values, image_grid_thw)
        if input_ids is not None:
            image_mask = (input_ids == self.config.image_token_id).unsqueeze(-1)
        else:
            image_row = table(torch.tensor(self.config.image_token_id, device=embeds.device)).to(embeds.dtype)
            image_mask = (embeds == image_row).all(-1, keepdim=True)
        if int(image_mask.sum()) != image_embeds.shape[0]:
            raise ValueError(
                f"The batch has {int(image_mask.sum())} image tokens but the images give {image_embeds.shape[0]} "
                f"visual features: input_ids and pixel_values/image_grid_thw do not belong together."
            )
        embeds = embeds.masked_scatter(image_mask, image_embeds.to(embeds.dtype))
        deepstack = _DeepStack(image_mask[..., 0], [torch.cat(f) for f in layers]) if layers else None
        return embeds, deepstack

    @property
    def _global_routing(self) -> bool:
        """Whether routing re-selects over the whole sequence at every forward (`routing="global"` with at least one
        routing layer), which rules out a KV cache. Without routing layers the mode changes nothing."""
        return self.config.routing == "global" and bool(self.config.routing_layers)

    def _check_cache(self, past_key_values):
        """Refuse a cache routing cannot use: not a `VedasCache` with routing layers, or a filled one under
        `routing="global"`."""
        if past_key_values is None:
            return
        if self.config.routing_layers and not isinstance(past_key_values, VedasCache):
            raise TypeError(
                f"Vedas routing layers keep their own keys and thresholds: pass a `VedasCache`, not "
                f"{type(past_key_values).__name__}."
            )
        if self._global_routing and past_key_values.get_seq_length() > 0:
            raise ValueError(
                "routing='global' re-selects top-α over the whole sequence at every step, so a KV cache would give "
                "wrong numbers. Call with use_cache=False (generate does this for you)."
            )

    # ------------------------------------------------------------------ forward
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        past_key_values: VedasCache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        pixel_values: torch.Tensor | None = None,
        image_grid_thw: torch.LongTensor | None = None,
        mm_token_type_ids: torch.IntTensor | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        crop_images: list | None = None,
        num_replay_tokens: int | None = None,
        output_latent_trace: bool = False,
        output_router_scores: bool = False,
        output_attentions: bool | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
        **kwargs,
    ) -> VedasCausalLMOutput | tuple:
        r"""
        A plain prompt runs the backbone (with routing depth scaling). A batch in the latent layout (it contains
        `<|latent|>` slots) runs the latent forward: teacher forcing with latents filled in and visual replay.

        Latent batches must be built like the collator does: every row has `<|start_latent|>` in the same column
        (prompts left-padded), followed by its steps `[<|replay|> x R, <|latent|>]` and `<|end_latent|>`.

        attention_mask: `(batch, past + l)` (1 = token, 0 = padding), or, in a plain forward, a 4-D
            `(batch, 1, l, past + l)` mask as transformers takes it (bool: True attends; float: additive, a key
            at -1e3 or below is masked). With routing layers a 4-D mask must be causal attention over padding and
            packed sequences (what routing can honour); other masks are refused.
        position_ids: in a plain forward without attention_mask and cache, positions that restart inside a row
            (`DataCollatorWithFlattening`: 2-D `(batch, l)`, or text positions as the first of 4 rows) mark packed
            sequences: attention and routing then keep each sequence to itself.
        inputs_embeds (`(batch, l, hidden)`, *optional*): instead of, or with, input_ids. A latent batch needs
            input_ids (the layout is read from the token ids); given with them, the latent forward starts from
            these embeddings.
        output_attentions / output_hidden_states / return_dict: as in transformers. `attentions` has one map per
            layer (the second passes of routing layers are left out; eager attention only), `hidden_states` the
            embeddings and each layer's output (the last one after the final norm, which the logits are computed
            from). A latent forward returns them over the whole sequence: with a cache its passes are joined (each
            attention row padded with zeros to the full length, the keys a pass could not see).
        crop_images (`list[list[torch.Tensor]]`, *optional*):
            Per sample, its original images as `(3, H, W)` uint8 tensors, in prompt order. When given in training
            (and `recon_weight > 0`), the self-distillation loss is computed: the dense W x W window of each step's
            replayed tokens is cropped from the original image, re-encoded without grad and predicted by `token_sr`.
        num_replay_tokens (`int`, *optional*): K for this call (defaults to `config.num_replay_tokens`).
        output_latent_trace (`bool`): return `latent_trace`, a list over steps of dicts with `replay_indices`
            `(batch, K)` (index among the sample's visual tokens, -1 where nothing was left), `replay_weights`
            `(batch, K)`, `saliency` `(batch, v)` float32 (the step's saliency of each visual token of the sample, 0
            past its count), `crop_window` (per sample `(image, row0, row1, col0, col1)` or None) and
            `router_scores` (per `(layer, depth)`: `(batch, tokens of that pass)` scores and selection).
        """
        if kwargs.get("pixel_values_videos") is not None:
            raise NotImplementedError("Vedas replays image tokens; video inputs are not supported.")
        if input_ids is None and inputs_embeds is None:
            raise ValueError("Pass input_ids (or, for a plain forward, inputs_embeds).")
        past_key_values = kwargs.pop("cache", past_key_values)  # its name from transformers 5.24 on
        self._check_cache(past_key_values)
        cfg = self.config
        attentions_default, hidden_default = (
            getattr(cfg, f"output_{name}", False) for name in ("attentions", "hidden_states")
        )
        record = {
            "output_attentions": attentions_default if output_attentions is None else output_attentions,
            "output_hidden_states": hidden_default if output_hidden_states is None else output_hidden_states,
        }
        return_dict = getattr(cfg, "return_dict", True) if return_dict is None else return_dict
        image_inputs = {"pixel_values": pixel_values, "image_grid_thw": image_grid_thw}
        if self._is_latent_batch(input_ids, inputs_embeds):
            if past_key_values is not None and past_key_values.get_seq_length() > 0:
                raise ValueError("A latent-layout batch must start from an empty cache (generate runs the steps).")
            out = self._latent_forward(
                input_ids, attention_mask, pixel_values, image_grid_thw, mm_token_type_ids, labels,
                crop_images=crop_images, num_replay_tokens=num_replay_tokens, use_cache=use_cache,
                past_key_values=past_key_values, output_latent_trace=output_latent_trace, position_ids=position_ids,
                inputs_embeds=inputs_embeds, **record,
            )
        else:
            out = self._plain_forward(
                input_ids, inputs_embeds, attention_mask, position_ids, past_key_values, labels, use_cache,
                image_inputs, mm_token_type_ids, logits_to_keep=logits_to_keep,
                output_router_scores=output_router_scores, **record,
            )
        return out if return_dict else out.to_tuple()

    def _is_latent_batch(self, input_ids, inputs_embeds) -> bool:
        """Whether the batch is in the latent layout (holds `<|latent|>` slots). Without input_ids the layout cannot
        be read: embeddings that contain the `<|latent|>` row are refused rather than run as a plain prompt."""
        latent_id = self.config.latent_token_id
        if latent_id is None:
            return False
        if input_ids is not None:
            return self._has_latent_slots(input_ids)  # a <|latent|> after the latent block is an ordinary token
        latent_row = self.model.get_input_embeddings()(torch.tensor(latent_id, device=inputs_embeds.device))
        if bool((inputs_embeds == latent_row.to(inputs_embeds.dtype)).all(-1).any()):
            raise ValueError(
                "inputs_embeds contain the <|latent|> embedding but no input_ids were given: a latent-layout batch "
                "needs input_ids, from which the latent forward reads where each step, its replay slots and "
                "<|end_latent|> are (pass input_ids, with or without inputs_embeds)."
            )
        return False

    def _plain_forward(self, input_ids, inputs_embeds, attention_mask, position_ids, past_key_values, labels, use_cache,
                       image_inputs, mm_token_type_ids, logits_to_keep=0, output_router_scores=False,
                       **record) -> VedasCausalLMOutput:
        """The backbone over `(batch, l)` new tokens (`past` more in the cache), with routing depth scaling.

        While `generate` decodes without a cache it sets `_routing_prompt_length` to the prompt's width: the
        routing prompt then ends there at the latest, so that the generated tokens are compared with the
        prompt's thresholds, as on the cache, instead of joining its top-α."""
        # masks, packing and the cache are checked before any work (the image tower included)
        tokens = input_ids if input_ids is not None else inputs_embeds[..., 0]
        dtype = inputs_embeds.dtype if inputs_embeds is not None else self.model.get_input_embeddings().weight.dtype
        past_length = past_key_values.get_seq_length() if past_key_values is not None else 0
        backbone_mask, key_valid, token_valid, segments = self._attention_masks(attention_mask, tokens, past_length,
                                                                                dtype)
        if position_ids is not None and attention_mask is None and past_key_values is None:
            position_ids, segments = _packed_positions(position_ids)  # packed rows, recognised as transformers does
        if segments is not None:
            if use_cache or past_key_values is not None:
                raise ValueError(
                    f"Packed rows (several sequences in one row) cannot fill or continue a KV cache: got "
                    f"use_cache={use_cache}; pass use_cache=False."
                )
            use_cache = False  # (transformers' text model would otherwise open a cache, which turns packing off)
        if use_cache and past_key_values is None:
            past_key_values = VedasCache(config=self.config.text_config)
        embeds, deepstack = self._embed_visual(input_ids, *image_inputs.values(), inputs_embeds=inputs_embeds)
        length = embeds.shape[1]
        if position_ids is None:
            position_ids = self._default_position_ids(input_ids, embeds, image_inputs["image_grid_thw"], key_valid,
                                                      past_key_values, mm_token_type_ids)
            if position_ids is not None:  # on a cache, HF derives positions for the whole attention mask
                position_ids = position_ids[..., -length:]
        prompt_mask = self._prompt_mask(input_ids, labels, token_valid, prompt_length=self._routing_prompt_length,
                                        past_length=past_length, segments=segments)
        state = self._routing_state(token_valid, prompt_mask, record_scores=output_router_scores, segments=segments)
        outputs = self._run_text_model(
            inputs_embeds=embeds, attention_mask=backbone_mask, position_ids=position_ids,
            use_cache=use_cache, vedas_state=state, **record, **{CACHE_ARG: past_key_values},
            **(deepstack.inputs(slice(None)) if deepstack is not None else {}),
        )
        hidden = outputs.last_hidden_state
        slice_indices = slice(-logits_to_keep, None) if isinstance(logits_to_keep, int) else logits_to_keep
        logits = self._lm_logits(hidden[:, slice_indices])
        loss = None
        if labels is not None:
            loss = self.loss_function(logits=logits, labels=labels, vocab_size=self.config.text_config.vocab_size)
        trace = [{"router_scores": state.router_scores}] if output_router_scores else None
        return VedasCausalLMOutput(
            loss=loss, ce_loss=loss, logits=logits, past_key_values=outputs.get(CACHE_ARG),
            hidden_states=outputs.get("hidden_states"),
            attentions=_main_pass_attentions(outputs.get("attentions"), state),
            router_stats=state.router_stats, latent_trace=trace,
        )

    def _attention_masks(self, attention_mask, tokens, past_length, dtype):
        """Reads a 2-D or 4-D attention mask for `tokens` `(batch, l)`. Returns the mask for the backbone (a bool 4-D
        one made additive in `dtype`), `(batch, past + l)` key validity (or None), `(batch, l)` token validity and
        `(batch, l)` packed-sequence ids (or None)."""
        batch, length = tokens.shape[:2]
        if attention_mask is None:
            return None, None, torch.ones(batch, length, dtype=torch.bool, device=tokens.device), None
        if attention_mask.ndim == 2:
            return attention_mask, attention_mask, attention_mask[:, -length:].bool(), None
        if attention_mask.ndim != 4 or tuple(attention_mask.shape) != (batch, 1, length, past_length + length):
            raise ValueError(
                f"attention_mask must be 2-D (batch, {past_length + length}) or 4-D (batch, 1, {length}, "
                f"{past_length + length}) here, got shape {tuple(attention_mask.shape)}."
            )
        # bool: True attends; float: additive, and exp(-1e3) is 0 in every float dtype
        allowed = attention_mask[:, 0] if attention_mask.dtype == torch.bool else attention_mask[:, 0] > -1e3
        columns = torch.arange(length, device=tokens.device)
        token_valid = allowed[:, columns, past_length + columns]  # a real token attends to itself
        key_valid = torch.cat([(allowed[:, :, :past_length] & token_valid[..., None]).any(1), token_valid], 1)
        segments = None
        if self.config.routing_layers:
            segments = _mask_segments(allowed[:, :, past_length:], token_valid, past_length)
        if attention_mask.dtype == torch.bool:  # eager attention adds the mask: make it additive
            backbone_mask = torch.zeros(attention_mask.shape, dtype=dtype, device=attention_mask.device)
            backbone_mask = backbone_mask.masked_fill(~attention_mask, torch.finfo(dtype).min)
        else:
            backbone_mask = attention_mask
        return backbone_mask, key_valid.long(), token_valid, segments

    def _prompt_mask(self, input_ids, labels, token_valid, prompt_length=None, past_length=0, segments=None):
        """The routing prompt, `(batch, l)` bool over this forward's columns, per packed sequence (`segments`; one per
        row when None): its columns before its first `<|start_latent|>`, else before its first supervised token,
        else all of it; and never past the first `prompt_length` columns of the sequence (`past_length` columns
        are in the cache).

        A sequence whose first token is already supervised (every token labelled, as in plain language-model data)
        would have an empty prompt, so nothing would be selected and the router and e(d) would get no gradient: its
        whole sequence is the prompt instead (top-α over all its tokens), with a one-time warning.
        """
        length = token_valid.shape[1]
        if segments is None:
            segments = torch.zeros_like(token_valid, dtype=torch.long)
        prompt = token_valid
        if labels is not None:
            by_labels = _before_first(labels[:, -length:] != -100, segments)
            empty = ~_segment_any(by_labels & token_valid, segments) & _segment_any(token_valid, segments)
            if bool(empty.any()):
                self._warn_once(
                    "all-supervised",
                    "Every token of some sequence is supervised (labels start at its first token), so it has no "
                    "routing prompt: top-α runs over the whole sequence.",
                )
            prompt = torch.where(empty, token_valid, by_labels)
        if input_ids is not None and self.config.start_latent_token_id is not None:
            marker = input_ids == self.config.start_latent_token_id
            prompt = torch.where(_segment_any(marker, segments), _before_first(marker, segments), prompt)
        if prompt_length is not None:
            columns = torch.arange(length, device=token_valid.device)[None]
            prompt = prompt & (columns < max(prompt_length - past_length, 0))
        return prompt & token_valid

    # ----------------------------------------------------------- latent layout
    def _parse_latent_layout(self, input_ids, num_replay: int) -> _LatentLayout:
        """Check the latent layout of every row `(batch, l)` against `config.latent_block_ids` and return where
        things are; errors name the offending row."""
        cfg = self.config
        slots = cfg.replay_slots(num_replay)
        in_block = self._latent_block(input_ids)  # tokens after the block (the answer) are ordinary tokens
        is_start = (input_ids == cfg.start_latent_token_id) & in_block
        steps = ((input_ids == cfg.latent_token_id) & in_block).sum(-1)
        markers = is_start.sum(-1)
        unmarked = (markers != 1) & (steps > 0)
        # one host sync for the check and the fewest steps of a row (-1: some row is malformed), not one per row
        min_steps = int(torch.where(unmarked.any(), -1, steps.min()))
        if min_steps < 0:
            row = int(unmarked.int().argmax())
            raise ValueError(
                f"Sample {row} of the batch has {int(steps[row])} <|latent|> slots but {int(markers[row])} "
                f"<|start_latent|> markers (expected exactly one)."
            )
        compact = (steps > 0) & ~((input_ids == cfg.replay_token_id) & in_block).any(-1)
        if slots > 0 and bool(compact.any()):
            row = int(compact.int().argmax())
            raise ValueError(
                f"Sample {row} of the batch has {int(steps[row])} <|latent|> slots without their {slots} <|replay|> "
                f"slots each (generate's compact output): expand it with model.expand_latent_sequences(input_ids, "
                f"attention_mask, mm_token_type_ids) before calling forward."
            )
        has_start = is_start.any(-1)
        start_columns = is_start.int().argmax(-1)[has_start].unique()
        if start_columns.numel() != 1:
            raise ValueError(
                f"<|start_latent|> sits in different columns across the batch ({start_columns.tolist()}); left-pad the "
                f"prompts so that the latent block starts in the same column (the Vedas collator does this)."
            )
        layout = _LatentLayout(start=int(start_columns), steps=steps, num_steps=int(steps.max()),
                               block=cfg.latent_block(num_replay), min_steps=min_steps)
        self._check_block_tokens(input_ids, layout, has_start, num_replay)
        return layout

    def _check_block_tokens(self, input_ids, layout: _LatentLayout, has_start, num_replay: int):
        """Refuse a row whose tokens after `<|start_latent|>` are not its T_row steps and `<|end_latent|>`, as
        `config.latent_block_ids` lays them out (naming the row)."""
        cfg, steps, slots = self.config, layout.steps, layout.slots
        available = input_ids.shape[1] - layout.start - 1
        end_col = layout.end_column(steps) - layout.start  # offsets from the marker; fewer steps close earlier
        if bool((end_col > available).any()):
            row = int((end_col > available).int().argmax())
            raise ValueError(
                f"Sample {row} of the batch has a malformed latent layout: its {int(steps[row])} <|latent|> slots "
                f"with {slots} <|replay|> slots each need {int(end_col[row])} columns after <|start_latent|>, "
                f"only {available} follow."
            )
        width = int(end_col.max())
        block = input_ids[:, layout.start + 1 : layout.start + 1 + width]
        longest = cfg.latent_block_ids(num_steps=layout.num_steps, num_replay_tokens=num_replay, start=False)
        expected = torch.tensor(longest, device=input_ids.device)[None].expand(input_ids.shape[0], -1)
        offset = torch.arange(1, width + 1, device=input_ids.device)[None]
        end_col = end_col[:, None]
        expected = torch.where(offset == end_col, cfg.end_latent_token_id, expected)
        bad = ((block != expected) & (offset <= end_col) & has_start[:, None]).any(-1)
        if bool(bad.any()):
            row = int(bad.int().argmax())
            raise ValueError(
                f"Sample {row} of the batch has a malformed latent layout: after <|start_latent|> it needs "
                f"{int(steps[row])} x ({slots} <|replay|> + <|latent|>) then <|end_latent|>, got token ids "
                f"{block[row, : int(end_col[row])].tolist()}."
            )

    def _latent_position_ids(self, input_ids, attention_mask, mm_token_type_ids, image_grid_thw):
        """(3, batch, seq) M-RoPE positions; replay slots are skipped by the text counter (they are filled with the
        positions of the tokens they copy at each step), unless `replay_positions="sequential"`."""
        text_mask = attention_mask.bool()
        if self.config.replay_positions == "original":
            text_mask = text_mask & ~((input_ids == self.config.replay_token_id) & self._latent_block(input_ids))
        if mm_token_type_ids is None:
            mm_token_type_ids = torch.zeros_like(input_ids, dtype=torch.int)
        if image_grid_thw is None:  # text only: 1-D positions over the counted tokens
            positions = (text_mask.long().cumsum(-1) - 1).clamp(min=0)
            return positions[None].expand(3, -1, -1).clone()
        positions, _ = self.model.get_rope_index(
            input_ids, mm_token_type_ids=mm_token_type_ids, image_grid_thw=image_grid_thw,
            attention_mask=text_mask.long(),
        )
        return positions

    def _recon_targets(self, requests, grids, crop_images, dtype):
        """u_ref: the crops of the dense windows (`requests`: `(sample, (image, row0, row1, col0, col1))`),
        re-encoded without grad and mean-pooled, layer-normalised with `recon_normalize_target`: `(n, hidden)`."""
        cfg = self.config
        size = (cfg.crop_resolution, cfg.crop_resolution)
        crops = []
        for row, (image, r0, r1, c0, c1) in requests:
            if row >= len(crop_images) or image >= len(crop_images[row]):
                raise ValueError(f"crop_images[{row}] has no image {image}: pass every image of every sample.")
            original = self._grid_region(crop_images[row][image])
            box = window_to_pixel_box((r0, r1), (c0, c1), grids[row][image], tuple(original.shape[-2:]))
            crops.append(crop_and_resize(original, box, size))
        with torch.no_grad():
            pooled = self._encode_crops(torch.stack(crops).to(self.device)).float()
        if cfg.recon_normalize_target:  # a fixed scale while the vision tower (and so u_ref) keeps moving
            pooled = nn.functional.layer_norm(pooled, pooled.shape[-1:])
        return pooled.to(dtype)

    def _idle_recon(self, dtype) -> torch.Tensor:
        """Zero times the reconstruction of a blank crop, for a rank in lockstep whose batch selected no crop
        window: it runs the vision tower and `token_sr` like the ranks that have crops."""
        cfg = self.config
        blank = torch.zeros(1, 3, cfg.crop_resolution, cfg.crop_resolution, device=self.device)
        with torch.no_grad():
            pooled = self._encode_crops(blank)
        prediction = self.token_sr(pooled.to(dtype))
        return prediction.float().sum() * 0.0

    def _recon_loss(self, run: _LatentRun, crop_images, dtype) -> torch.Tensor | None:
        """Eq. 8 in the release's mean form: L_recon = mean over the (step, sample) pairs with a crop window and
        over the hidden dimension of (token_sr(mean B(t)) - u_ref)^2 (docs/design.md, section 7)."""
        if not run.recon:
            return None
        targets = self._recon_targets(requests=[(row, window) for row, window, _ in run.recon],
                                      grids=run.visual.grids, crop_images=crop_images, dtype=dtype)
        predictions = self.token_sr(torch.stack([mean_replay for _, _, mean_replay in run.recon]))
        return nn.functional.mse_loss(predictions.float(), targets.float())

    # ----------------------------------------------------------- latent forward
    def _latent_forward(self, input_ids, attention_mask, pixel_values, image_grid_thw, mm_token_type_ids, labels, *,
                        crop_images=None, num_replay_tokens=None, use_cache=None, past_key_values=None,
                        output_latent_trace=False, position_ids=None, return_hidden_only=False, inputs_embeds=None,
                        output_attentions=False, output_hidden_states=False):
        """Teacher forcing over a batch in the latent layout, `input_ids` `(batch, l)` (docs/design.md, section 3).

        Pass 0 runs X and `<|start_latent|>`; pass t (1 <= t < T) the R replay slots and z(t) of step t; pass T the
        rest. After pass t - 1, latent step t writes (see `_latent_step`)

            z(t) = h_L(last position)                        (Coconut: the last hidden state, post-norm)
            a(t) = mean over layers and heads of softmax(q_last · K^T / sqrt(d)) over the visual tokens
            B(t) = softmax(a(t)[S]) ⊙ V[S],  S = top-K unvisited visual tokens of a(t)

        into columns z(t) and B(t). With a `VedasCache` each pass runs only its new columns, under gradient
        checkpointing too (each column then runs once more in backward); without one (`use_cache=False`,
        `routing="global"`) each pass recomputes the prefix, with the same numbers.
        The loss is L = CE + λ · L_recon (`_recon_loss`). Returns a `VedasCausalLMOutput` with logits
        `(batch, l, vocab)`, or, with `return_hidden_only` (generate: the passes stop at z(T)), a `LatentPhase`.
        """
        run = self._latent_run(input_ids=input_ids, attention_mask=attention_mask, pixel_values=pixel_values,
                               image_grid_thw=image_grid_thw, mm_token_type_ids=mm_token_type_ids, labels=labels,
                               crop_images=crop_images, num_replay_tokens=num_replay_tokens, use_cache=use_cache,
                               past_key_values=past_key_values, position_ids=position_ids, inputs_embeds=inputs_embeds,
                               generating=return_hidden_only, output_latent_trace=output_latent_trace)
        layout = run.layout
        record = {"output_attentions": output_attentions, "output_hidden_states": output_hidden_states}
        # pass 0 ends at <|start_latent|>, pass t at z(t); the last pass runs to the end (generate: to z(T))
        last = layout.latent_column(layout.num_steps) + 1 if return_hidden_only else run.mask.shape[1]
        ends = [layout.start + 1] + [layout.latent_column(t) + 1 for t in range(1, layout.num_steps)] + [last]
        begin, hidden_chunks, router_stats, recorded = 0, [], {}, []
        for step, end in enumerate(ends):
            latent_pass = self._latent_pass(run, begin=begin, end=end, step=step, **record)
            hidden_chunks.append(latent_pass.hidden)
            if latent_pass.recorded:
                recorded.append(latent_pass.recorded)
            if run.cache is not None:  # each pass saw new tokens; without a cache the last pass covers them all
                _accumulate_router_stats(total=router_stats, new=latent_pass.state.router_stats, passes_before=step)
            else:
                router_stats = latent_pass.state.router_stats
            begin = end
            if step < layout.num_steps:
                run.trace.append(self._latent_step(run, t=step + 1, last_hidden=latent_pass.hidden[:, -1],
                                                   state=latent_pass.state))
        hidden = torch.cat(hidden_chunks, dim=1) if run.cache is not None else hidden_chunks[-1]
        hidden = hidden[:, : input_ids.shape[1]]  # without the columns `_pad_for_steps` may have added
        if return_hidden_only:
            return LatentPhase(last_hidden_state=hidden_chunks[-1], cache=run.cache, position_ids=run.positions,
                               attention_mask=run.mask, latent_trace=run.trace)
        return self._latent_output(run, hidden=hidden, labels=labels, crop_images=crop_images,
                                   router_stats=router_stats, recorded=recorded,
                                   output_latent_trace=output_latent_trace)

    def _latent_run(self, input_ids, attention_mask, pixel_values, image_grid_thw, mm_token_type_ids, labels, *,
                    crop_images, num_replay_tokens, use_cache, past_key_values, position_ids, inputs_embeds,
                    generating, output_latent_trace) -> _LatentRun:
        """Checks a latent batch and prepares what its passes share: layout, embeddings `(batch, l, hidden)`,
        M-RoPE positions `(3, batch, l)`, the visual tokens, the routing prompt and whether a cache carries the
        passes."""
        cfg = self.config
        if position_ids is not None:
            raise ValueError("Positions of a latent batch follow from its layout; do not pass position_ids.")
        if attention_mask is not None and attention_mask.ndim != 2:
            raise ValueError(
                f"A latent-layout batch takes a 2-D (batch, seq) attention_mask, got shape "
                f"{tuple(attention_mask.shape)}: its passes build their own 4-D masks from it."
            )
        num_replay = cfg.num_replay_tokens if num_replay_tokens is None else num_replay_tokens
        if num_replay < 0:
            raise ValueError(f"num_replay_tokens must be >= 0, got {num_replay}.")
        mask = torch.ones_like(input_ids) if attention_mask is None else attention_mask.clone()
        layout = self._parse_latent_layout(input_ids, num_replay=num_replay)
        if not generating:  # every rank in lockstep runs as many passes as the rank with the most latent steps
            input_ids, mask, mm_token_type_ids, labels = _pad_for_steps(
                self, layout, input_ids, mask, mm_token_type_ids, labels)
        embeds, deepstack = self._embed_visual(input_ids, pixel_values, image_grid_thw, inputs_embeds=inputs_embeds)
        if embeds is inputs_embeds:  # the caller's tensor: the steps may write into the embeddings in place
            embeds = embeds.clone()
        visual = visual_tokens(is_image=(input_ids == cfg.image_token_id) & mask.bool(),
                               image_grid_thw=image_grid_thw, merge_size=cfg.visual_merge_size)
        self._warn_replay_shortage(visual=visual, num_replay=num_replay, slots=layout.slots, layout=layout)
        # labels too: a row without a latent block (stage 0 in a mixed batch) ends its prompt where supervision starts
        prompt_mask = self._prompt_mask(input_ids=input_ids, labels=labels, token_valid=mask.bool())
        # Such a row's prompt may run past the first pass, whose top-α would then see only part of it: recompute
        # the prefix at every pass instead, so that the last pass routes that row over its whole prompt (the same
        # rule as `generate`'s, which hands the cache to the answer loop and so never recomputes).
        prompt_past_first_pass = bool(prompt_mask[:, layout.start + 1 :].any()) and not generating
        # (under gradient checkpointing the layers keep the cache: VedasDecoderLayerMixin._checkpoint_with_cache)
        cached = use_cache is not False and not (self._global_routing or prompt_past_first_pass)
        if not generating:  # the uncached saliency runs k_proj once more: one rank without a cache, all without
            cached = cached and not _agree_across_ranks(self, [int(not cached)])[0]
        replay_on = layout.slots > 0 and visual.columns.shape[1] > 0
        return _LatentRun(
            layout=layout, num_replay=num_replay, embeds=embeds, mask=mask, visual=visual,
            positions=self._latent_position_ids(input_ids=input_ids, attention_mask=mask,
                                                mm_token_type_ids=mm_token_type_ids, image_grid_thw=image_grid_thw),
            visited=torch.zeros_like(visual.valid), prompt_mask=prompt_mask, prompt_lengths=prompt_mask.sum(-1),
            cache=(past_key_values or VedasCache(config=cfg.text_config)) if cached else None, deepstack=deepstack,
            replay_on=replay_on,
            compute_recon=(self.training and crop_images is not None and cfg.recon_weight > 0 and replay_on
                           and layout.num_steps > 0),
            output_latent_trace=output_latent_trace,
        )

    def _warn_replay_shortage(self, visual, num_replay: int, slots: int, layout: _LatentLayout):
        """Warn once when the batch has no image (no replay), or when K x T exceeds some sample's visual tokens."""
        if slots > 0 and visual.columns.shape[1] == 0:
            self._warn_once("no-image", "The batch has no image tokens: latent steps run without visual replay.")
            return
        counts = visual.valid.sum(-1)
        counts = counts[counts > 0]  # samples without an image replay nothing at all
        if slots > 0 and int(counts.min()) < num_replay * layout.num_steps:
            self._warn_once(
                "few-visual",
                f"K x T = {num_replay} x {layout.num_steps} exceeds the visual tokens of some sample "
                f"({int(counts.min())}): the last steps replay what remains.",
            )

    def _latent_pass(self, run: _LatentRun, *, begin: int, end: int, step: int, output_attentions: bool,
                     output_hidden_states: bool) -> _LatentPass:
        """One pass of the text model over columns `[begin, end)` (`[0, end)` without a cache), saliency captured
        when a latent step follows."""
        chunk = slice(begin if run.cache is not None else 0, end)
        mask = run.mask[:, :end]
        key_valid = mask.bool()  # the pass's tokens are its last columns: their validity is a view of it
        state = self._routing_state(
            token_valid=key_valid[:, chunk], prompt_mask=run.prompt_mask[:, chunk], key_valid=key_valid,
            record_scores=run.output_latent_trace, prompt_lengths=run.prompt_lengths,
        )
        if run.replay_on and step < run.layout.num_steps:
            state.saliency_columns, state.saliency_valid = run.visual.columns, run.visual.valid
        record = run.cache is not None or step == run.layout.num_steps  # without a cache the last pass has it all
        outputs = self._run_text_model(
            inputs_embeds=run.embeds[:, chunk], attention_mask=mask,
            position_ids=run.positions[:, :, chunk], use_cache=run.cache is not None, vedas_state=state,
            output_attentions=output_attentions and record, output_hidden_states=output_hidden_states and record,
            **{CACHE_ARG: run.cache}, **(run.deepstack.inputs(chunk) if run.deepstack is not None else {}),
        )
        recorded = None
        if record and (output_attentions or output_hidden_states):
            recorded = (outputs.get("hidden_states"), _main_pass_attentions(outputs.get("attentions"), state))
        return _LatentPass(hidden=outputs.last_hidden_state, state=state, recorded=recorded)

    def _latent_step(self, run: _LatentRun, t: int, last_hidden, state) -> dict:
        """Latent step t: writes z(t) = `last_hidden` `(batch, hidden)` into its column and B(t) into its R replay
        slots (positions and attention mask too), for the rows that have step t. Returns the step's trace."""
        layout, batch = run.layout, run.mask.shape[0]
        rows = layout.rows_with_step(t)  # None: every row has this step
        by_row = None if rows is None else rows[:, None]  # broadcasts over (batch, R) and (3, batch, R)
        latent = layout.latent_column(t)
        writes = [(slice(latent, latent + 1), last_hidden[:, None])]
        trace = {"router_scores": state.router_scores}
        columns = layout.replay_span(t)  # slices: the writes below are views, not index tensors built per step
        if run.replay_on:
            replay = self._replay_tokens(run, rows=rows, state=state)
            writes.append((columns, replay.tokens))
            if self.config.replay_positions == "original":
                _write_rows(run.positions[:, :, columns], replay.positions, by_row)
            _write_rows(run.mask[:, columns], replay.slot_valid, by_row)
            if run.compute_recon or run.output_latent_trace:
                trace.update(self._replay_trace(run, replay=replay, rows=rows))
        elif layout.slots > 0:
            # No image in the whole batch: the slots are masked out, like the unused slots of a sample whose
            # visual tokens ran out (or that has none, in a batch with images), so that a prompt without an
            # image computes the same alone as in any batch.
            _write_rows(run.mask[:, columns], 0, by_row)
            if run.output_latent_trace:  # the same trace fields as with images: nothing selected
                device = run.mask.device
                trace.update(replay_indices=torch.full((batch, run.num_replay), -1, dtype=torch.long, device=device),
                             replay_weights=torch.zeros(batch, run.num_replay, device=device),
                             saliency=torch.zeros(batch, 0, device=device), crop_window=[None] * batch)
        _write_embeds(run, rows, writes)
        return trace

    def _replay_tokens(self, run: _LatentRun, rows, state) -> _Replay:
        """B(t) from the pass's saliency: the top-K unvisited visual tokens weighted by softmax(a[S]) (`select_replay`),
        summed into one token with `replay_mode="soft_mix"`; marks them visited for the rows that have this step."""
        cfg = self.config
        saliency = state.visual_saliency()
        selection = select_replay(saliency=saliency, candidate_mask=run.visual.valid, visited=run.visited,
                                  k=run.num_replay, rescale=cfg.replay_scale == "rescaled")
        run.visited = selection.visited if rows is None else torch.where(rows[:, None], selection.visited, run.visited)
        hidden = run.embeds.shape[-1]
        # the chosen tokens' columns, then one gather of their merger outputs V and positions (gathering all the
        # visual tokens first copied the whole of V, (batch, v, hidden), at every step)
        columns = run.visual.columns.gather(1, selection.indices)  # (batch, K)
        chosen = run.embeds.gather(1, columns.unsqueeze(-1).expand(-1, -1, hidden))
        tokens = chosen * selection.weights.to(run.embeds.dtype).unsqueeze(-1)  # B(t): (batch, K, hidden)
        positions = run.positions.gather(2, columns[None].expand(3, -1, -1))
        slot_valid = selection.valid
        if cfg.replay_mode == "soft_mix":
            tokens = tokens.sum(1, keepdim=True)
            positions = positions[:, :, :1]  # the most salient token's position
            slot_valid = selection.valid.any(-1, keepdim=True)
        return _Replay(tokens=tokens, positions=positions, slot_valid=slot_valid, selection=selection,
                       saliency=saliency)

    def _replay_trace(self, run: _LatentRun, replay: _Replay, rows) -> dict:
        """The step's trace fields (replayed indices and weights, saliency, crop window) and, when L_recon is on,
        its `(sample, window, mean B(t))` entries in `run.recon`."""
        selection = replay.selection
        replayed = selection.valid if rows is None else selection.valid & rows[:, None]
        windows = dense_windows(selection.indices, replayed, run.visual, self.config.window_size)
        if run.compute_recon:
            valid_count = selection.valid.sum(-1, keepdim=True).clamp(min=1)
            mean_replay = replay.tokens.sum(1) / (1 if self.config.replay_mode == "soft_mix" else valid_count)
            run.recon.extend((row, window, mean_replay[row]) for row, window in enumerate(windows) if window)
        return {
            "replay_indices": selection.indices.masked_fill(~selection.valid, -1),
            "replay_weights": selection.weights.detach(),
            "saliency": replay.saliency.detach(),
            "crop_window": windows,
        }

    def _latent_output(self, run: _LatentRun, *, hidden, labels, crop_images, router_stats, recorded,
                       output_latent_trace) -> VedasCausalLMOutput:
        """Logits `(batch, l, vocab)` from the joined passes, L = CE + λ · L_recon, and the recorded states."""
        cfg = self.config
        logits = self._lm_logits(hidden)
        ce_loss = recon_loss = loss = None
        if labels is not None:
            ce_loss = self.loss_function(logits=logits, labels=labels, vocab_size=cfg.text_config.vocab_size)
            loss = ce_loss
        if run.compute_recon:
            recon_loss = self._recon_loss(run, crop_images=crop_images, dtype=hidden.dtype)
        if recon_loss is not None:
            loss = recon_loss * cfg.recon_weight if loss is None else loss + cfg.recon_weight * recon_loss
        elif run.compute_recon and loss is not None and _in_lockstep(self):  # no crop here, maybe on other ranks
            loss = loss + self._idle_recon(hidden.dtype)
        hidden_states, attentions = _join_passes(recorded, hidden.shape[1])
        return VedasCausalLMOutput(
            loss=loss, ce_loss=ce_loss, recon_loss=recon_loss, logits=logits, past_key_values=run.cache,
            latent_trace=run.trace if output_latent_trace else None, router_stats=router_stats,
            hidden_states=hidden_states, attentions=attentions,
        )

    # ---------------------------------------------------------------- generate
    def _latent_block(self, input_ids):
        """`(batch, l)` bool: the columns of each row's latent block, from its first `<|start_latent|>` up to (not
        including) the first `<|end_latent|>` after it, or to the row's end if the block is not closed. A
        `<|latent|>` or `<|replay|>` outside it (one the model generates in its answer) is an ordinary token."""
        cfg = self.config
        if cfg.start_latent_token_id is None or input_ids is None:
            return torch.zeros_like(input_ids, dtype=torch.bool)
        opened = (input_ids == cfg.start_latent_token_id).cumsum(-1) > 0
        closed = ((input_ids == cfg.end_latent_token_id) & opened).cumsum(-1) > 0
        return opened & ~closed

    def _has_latent_slots(self, input_ids) -> bool:
        """Whether `input_ids` hold `<|latent|>` slots in a latent block (then forward runs the latent forward)."""
        latent = self.config.latent_token_id
        # a slot follows its block's <|start_latent|> in the same input: a decode step's one token is never one,
        # and answering that without a look at the ids saves a host sync per generated token
        if input_ids is None or latent is None or input_ids.shape[-1] < 2:
            return False
        return bool(((input_ids == latent) & self._latent_block(input_ids)).any())

    def build_latent_layout(self, input_ids, attention_mask, mm_token_type_ids=None, num_latent_steps=None,
                            num_replay_tokens=None):
        """Append `<|start_latent|>` (if missing) and T steps of `[<|replay|> x R, <|latent|>]` to left-padded
        prompts `(batch, l)`. Returns `(input_ids, attention_mask, mm_token_type_ids)`, `(batch, l')`, in the latent
        layout (without `<|end_latent|>`)."""
        cfg = self.config
        steps = _per_call("num_latent_steps", num_latent_steps, cfg, MAX_LATENT_STEPS)
        num_replay = _per_call("num_replay_tokens", num_replay_tokens, cfg, MAX_REPLAY_TOKENS)
        if attention_mask is not None and not bool(attention_mask[:, -1].all()):
            raise ValueError(
                "Latent generation needs left-padded prompts (the last column is padding for some rows): set "
                "processor.tokenizer.padding_side = 'left'."
            )
        ends_with_start = bool((input_ids[:, -1] == cfg.start_latent_token_id).all())
        block = cfg.latent_block_ids(num_steps=steps, num_replay_tokens=num_replay, start=not ends_with_start,
                                     end=False)
        extra = torch.tensor(block, dtype=input_ids.dtype, device=input_ids.device)[None].expand(input_ids.shape[0], -1)
        input_ids = torch.cat([input_ids, extra], dim=1)
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        else:
            attention_mask = torch.cat([attention_mask, torch.ones_like(extra)], dim=1)
        if mm_token_type_ids is not None:
            mm_token_type_ids = torch.cat([mm_token_type_ids, torch.zeros_like(extra).to(mm_token_type_ids.dtype)], 1)
        return input_ids, attention_mask, mm_token_type_ids

    def compact_latent_sequences(self, sequences):
        """Drop the `<|replay|>` slots of the latent block, `(batch, l)` -> `(batch, l')`, so that the returned
        sequences show one `<|latent|>` per step (a `<|replay|>` generated in the answer stays). Rows that lose
        different numbers of columns are right-padded with the pad token."""
        drop = (sequences == self.config.replay_token_id) & self._latent_block(sequences)
        lengths = (~drop).sum(-1)
        width = int(lengths.max()) if sequences.shape[0] else 0
        # a stable sort puts the kept columns first, in their order
        out = sequences.gather(1, torch.sort(drop.to(torch.int8), dim=-1, stable=True).indices[:, :width])
        pad = self.generation_config.pad_token_id
        return out.masked_fill(torch.arange(width, device=out.device)[None] >= lengths[:, None], pad or 0)

    def expand_latent_sequences(self, input_ids, attention_mask=None, mm_token_type_ids=None,
                                num_replay_tokens=None):
        """The inverse of `compact_latent_sequences`: insert R `<|replay|>` slots before each `<|latent|>` of the
        latent block, `(batch, l)` -> `(batch, l + T * R)`, so that `generate`'s output can be fed to `forward`
        (teacher forcing). The block must sit in the same columns in every row, as `generate` returns it. Returns
        `(input_ids, attention_mask, mm_token_type_ids)`; a block that already has its slots comes back as is."""
        cfg = self.config
        num_replay = _per_call("num_replay_tokens", num_replay_tokens, cfg, MAX_REPLAY_TOKENS)
        in_block = self._latent_block(input_ids)
        latent = (input_ids == cfg.latent_token_id) & in_block
        if (self._replay_slots(num_replay) == 0 or not bool(latent.any())
                or bool(((input_ids == cfg.replay_token_id) & in_block).any())):
            return input_ids, attention_mask, mm_token_type_ids
        moved = (latent != latent[:1]).any(-1)
        if bool(moved.any()):
            raise ValueError(
                f"Row {int(moved.int().argmax())} of input_ids has its <|latent|> slots in other columns than row 0: "
                f"left-pad the rows so that the latent block sits in the same columns in every row."
            )
        block = cfg.latent_block(num_replay)  # each latent column becomes its whole step: R replay slots and itself
        repeats = torch.where(latent[0], block.step_width, 1)
        columns = torch.arange(input_ids.shape[1], device=input_ids.device)
        source = torch.repeat_interleave(columns, repeats)
        copy = torch.arange(source.shape[0], device=input_ids.device) - (repeats.cumsum(0) - repeats)[source]
        is_slot = latent[0][source] & (copy != block.latent_in_step)  # a step's columns other than its latent's
        input_ids = input_ids[:, source].masked_fill(is_slot[None], cfg.replay_token_id)
        attention_mask = attention_mask[:, source] if attention_mask is not None else None
        mm_token_type_ids = mm_token_type_ids[:, source] if mm_token_type_ids is not None else None
        return input_ids, attention_mask, mm_token_type_ids

    def _prefilled_latent_block(self, input_ids, attention_mask, mm_token_type_ids, num_latent_steps, num_replay):
        """For a prompt that already holds a whole latent block (such as `generate`'s own output fed back):
        `(input_ids, attention_mask, mm_token_type_ids, T)` with its replay slots re-inserted; None for a prompt
        without one. The latents are hidden states, not tokens: they are recomputed from the prompt."""
        cfg = self.config
        if input_ids is None or None in (cfg.start_latent_token_id, cfg.end_latent_token_id):
            return None
        opened = (input_ids == cfg.start_latent_token_id).cumsum(-1) > 0
        closed = ((input_ids == cfg.end_latent_token_id) & opened).any(-1)
        open_end = opened[:, -1] & ~closed & (input_ids[:, -1] != cfg.start_latent_token_id)
        if bool(open_end.any()):
            raise ValueError(
                f"Row {int(open_end.int().argmax())} of input_ids has a <|start_latent|> without its <|end_latent|>: "
                f"pass the prompt alone (generate appends the latent block) or a whole sequence that generate returned."
            )
        if not bool(closed.any()):
            return None
        if not bool(closed.all()):
            raise ValueError(
                f"Row {int((~closed).int().argmax())} of input_ids has no latent block while other rows have one: "
                f"feed back whole sequences that generate returned, or prompts alone."
            )
        steps = ((input_ids == cfg.latent_token_id) & self._latent_block(input_ids)).sum(-1)
        if bool((steps != steps[0]).any()) or (num_latent_steps is not None and num_latent_steps != int(steps[0])):
            raise ValueError(
                f"input_ids already hold a latent block of {steps.tolist()} steps per row but num_latent_steps="
                f"{num_latent_steps}: leave num_latent_steps unset to rerun the block (the same in every row), or "
                f"pass the prompt without it."
            )
        ids, mask, types = self.expand_latent_sequences(input_ids, attention_mask, mm_token_type_ids, num_replay)
        return ids, mask, types, int(steps[0])

    def _generation_setting(self, kwargs: dict, name: str):
        """The value `generate` will use for a generation-config field: the call's keyword, else a non-None value of
        a passed `generation_config`, else the model's `generation_config`."""
        if name in kwargs:
            return kwargs[name]
        passed = getattr(kwargs.get("generation_config"), name, None)
        return passed if passed is not None else getattr(self.generation_config, name, None)

    def _validate_latent_generate(self, kwargs: dict, steps: int):
        """Refuse, before any work and in one line, what Vedas generation cannot do (see `generate`)."""
        for name in ("assistant_model", "prompt_lookup_num_tokens", "assistant_early_exit", "use_mtp"):
            value = self._generation_setting(kwargs, name)
            if value not in (None, False) and (steps > 0 or self.config.routing_layers):
                shown = value if isinstance(value, (int, float)) else type(value).__name__
                raise ValueError(
                    f"{name}={shown} asks for assisted (draft-and-verify) decoding, which Vedas does not support: it "
                    f"crops rejected draft tokens from the KV cache, and the routing cache (second-pass keys and "
                    f"thresholds) and the latent steps cannot be cropped. Decode without it."
                )
        implementation = self._generation_setting(kwargs, "cache_implementation")
        if implementation not in (None, "dynamic"):
            raise ValueError(
                f"cache_implementation={implementation!r} is not supported: Vedas keeps routing thresholds, "
                f"second-pass keys and the latent steps in a dynamic VedasCache that generate builds itself; leave "
                f"cache_implementation unset (static caches and torch.compile'd decoding cannot hold that state)."
            )
        cache = kwargs.get("past_key_values")
        if cache is not None and not isinstance(cache, VedasCache):
            raise ValueError(
                f"past_key_values={type(cache).__name__} is not supported: Vedas generation needs a VedasCache "
                f"(routing thresholds and second-pass keys per row); pass none and generate builds one."
            )
        if cache is not None and steps > 0 and cache.get_seq_length() > 0:
            raise ValueError(
                f"past_key_values holds {cache.get_seq_length()} tokens, but latent generation starts from the "
                f"prompt: pass no cache (generate prefills one with the prompt and the latent steps)."
            )
        if self._generation_setting(kwargs, "compile_config") is not None:
            raise ValueError(
                "compile_config is not supported: compiled decoding needs a static cache, and Vedas keeps its routing "
                "and latent state in a dynamic VedasCache; call generate without compile_config."
            )
        if implementation == "dynamic":  # what generate builds anyway; HF refuses it next to a passed cache
            kwargs["cache_implementation"] = None

    def _hf_generate(self, **kwargs):
        """transformers' `generate`, with the KV cache passed under the installed version's name."""
        if "past_key_values" in kwargs and CACHE_ARG != "past_key_values":
            kwargs[CACHE_ARG] = kwargs.pop("past_key_values")
        return super().generate(**kwargs)

    @torch.no_grad()
    def generate(self, input_ids=None, attention_mask=None, pixel_values=None, image_grid_thw=None,
                 mm_token_type_ids=None, num_latent_steps=None, num_replay_tokens=None, output_latent_trace=False,
                 **kwargs):
        r"""
        Latent generation: prefill, T latent steps (each one forward of R + 1 tokens on the cache), then
        `<|end_latent|>` and the answer through the standard HF generation loop: greedy, sampling, beam search,
        beam sampling, `num_return_sequences`, streamers, stopping criteria and stop strings all apply. The latent
        steps run once per prompt; their cache and routing state are then repeated for the beams / returned
        sequences, so `latent_trace` has one row per prompt.

        num_latent_steps (`int`, *optional*): T, in `[0, MAX_LATENT_STEPS]`; defaults to `config.num_latent_steps`.
            0 is the plain model.
        num_replay_tokens (`int`, *optional*): K for this call, in `[0, MAX_REPLAY_TOKENS]`.
        output_latent_trace (`bool`): with `return_dict_in_generate=True`, also return `latent_trace`.

        The returned sequences hold the prompt (with `<|start_latent|>`), one `<|latent|>` per step,
        `<|end_latent|>` and the answer. They can be fed back as `input_ids` (e.g. to continue with more
        `max_new_tokens`): a prompt that already holds a whole latent block gets no new one; its latent steps are
        recomputed (latents are hidden states, not tokens) and decoding continues after its last token. Leave
        `num_latent_steps` unset then, or equal to the block's T. For `forward`, expand them first with
        `expand_latent_sequences`. A `<|latent|>` the model generates in its answer is an ordinary token.

        Refused before any work, in one line: assisted and prompt-lookup decoding (the routing cache cannot be
        cropped), static caches, `cache_implementation` other than dynamic, `compile_config`, and non-integer or
        out-of-range T and K.
        """
        generating, self._generating = self._generating, True  # the latent phase and decoding: no router stats
        try:
            return self._generate(input_ids, attention_mask, pixel_values, image_grid_thw, mm_token_type_ids,
                                  num_latent_steps, num_replay_tokens, output_latent_trace, kwargs)
        finally:
            self._generating = generating

    def _generate(self, input_ids, attention_mask, pixel_values, image_grid_thw, mm_token_type_ids,
                  num_latent_steps, num_replay_tokens, output_latent_trace, kwargs):
        """`generate`'s work, its keywords in `kwargs`."""
        if "cache" in kwargs:  # the name from transformers 5.24 on
            kwargs["past_key_values"] = kwargs.pop("cache")
        cfg = self.config
        num_replay = _per_call("num_replay_tokens", num_replay_tokens, cfg, MAX_REPLAY_TOKENS)
        steps = _per_call("num_latent_steps", num_latent_steps, cfg, MAX_LATENT_STEPS)
        if mm_token_type_ids is None and pixel_values is not None and input_ids is not None:
            mm_token_type_ids = (input_ids == cfg.image_token_id).int()  # what the processor returns (images only)
        prefilled = self._prefilled_latent_block(input_ids, attention_mask, mm_token_type_ids, num_latent_steps,
                                                 num_replay)
        if prefilled is not None:
            input_ids, attention_mask, mm_token_type_ids, steps = prefilled
        self._validate_latent_generate(kwargs, steps)
        use_cache = self._generation_setting(kwargs, "use_cache") is not False and not self._global_routing
        kwargs.pop("use_cache", None)
        kwargs.update(pixel_values=pixel_values, image_grid_thw=image_grid_thw)
        if steps == 0:
            if use_cache and kwargs.get("past_key_values") is None:
                kwargs["past_key_values"] = VedasCache(config=cfg.text_config)
            # each step without a cache recomputes the sequence: the generated tokens must not join the prompt
            self._routing_prompt_length = None if use_cache else input_ids.shape[1]
            try:
                return self._hf_generate(input_ids=input_ids, attention_mask=attention_mask,
                                         mm_token_type_ids=mm_token_type_ids, use_cache=use_cache, **kwargs)
            finally:
                self._routing_prompt_length = None
        if None in (cfg.start_latent_token_id, cfg.latent_token_id, cfg.end_latent_token_id, cfg.replay_token_id):
            raise ValueError("This checkpoint has no latent special tokens; convert it with examples/convert_base.py.")
        if prefilled is None:
            input_ids, attention_mask, mm_token_type_ids = self._append_latent_block(
                input_ids, attention_mask, mm_token_type_ids, steps, num_replay
            )
        elif attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        return self._generate_latent(input_ids, attention_mask, mm_token_type_ids, num_replay, use_cache,
                                     output_latent_trace, kwargs)

    def _append_latent_block(self, input_ids, attention_mask, mm_token_type_ids, steps, num_replay):
        """The prompt's latent layout with `<|end_latent|>` appended: `(input_ids, attention_mask,
        mm_token_type_ids)`, `(batch, l')`."""
        ids, mask, types = self.build_latent_layout(input_ids, attention_mask, mm_token_type_ids, steps, num_replay)
        end = torch.full_like(ids[:, :1], self.config.end_latent_token_id)
        if types is not None:
            types = torch.cat([types, torch.zeros_like(end).to(types.dtype)], dim=1)
        return torch.cat([ids, end], dim=1), torch.cat([mask, torch.ones_like(end)], dim=1), types

    def _generate_latent(self, full_ids, full_mask, types, num_replay, use_cache, output_latent_trace, kwargs):
        """The latent steps, then the HF loop from `<|end_latent|>` on, over the full layout `(batch, l)`."""
        pixel_values, image_grid_thw = kwargs["pixel_values"], kwargs["image_grid_thw"]
        latent_args = dict(num_replay_tokens=num_replay, return_hidden_only=True)
        wants_trace = output_latent_trace and bool(self._generation_setting(kwargs, "return_dict_in_generate"))
        cache = kwargs.pop("past_key_values", None)
        trace = None
        if not use_cache:  # every step recomputes the whole latent forward (slow, exact)
            outputs = self._hf_generate(input_ids=full_ids, attention_mask=full_mask, mm_token_type_ids=types,
                                        use_cache=False, num_replay_tokens=num_replay, **kwargs)
            if wants_trace:
                # the HF loop keeps no per-forward outputs; the latent steps are the same in every recomputation
                # (they never see the answer), so one more latent forward gives the trace the cached path returns
                trace = self._latent_forward(
                    full_ids, full_mask, pixel_values, image_grid_thw, types, None, use_cache=False,
                    output_latent_trace=True, **latent_args,
                ).latent_trace
        else:
            phase = self._latent_forward(
                full_ids, full_mask, pixel_values, image_grid_thw, types, None, use_cache=True,
                past_key_values=cache, output_latent_trace=wants_trace, **latent_args,
            )
            trace, positions, mask = phase.latent_trace, phase.position_ids, phase.attention_mask
            # the answer continues the text position counter after the last latent; keep rope_deltas consistent
            if hasattr(self.model, "rope_deltas"):  # M-RoPE backbones offset the answer's positions by it
                self.model.rope_deltas = positions[0, :, -1:] - mask.sum(-1, keepdim=True) + 1
            # the images are in the cache; the HF loop expands the cache for beams (_expand_inputs_for_generation)
            kwargs.update(pixel_values=None, image_grid_thw=None)
            outputs = self._hf_generate(input_ids=full_ids, attention_mask=mask, position_ids=positions,
                                        past_key_values=phase.cache, use_cache=True, **kwargs)
        if isinstance(outputs, torch.Tensor):
            return self.compact_latent_sequences(outputs)
        fields = {key: value for key, value in outputs.items() if key in VedasGenerateOutput.__dataclass_fields__}
        fields["sequences"] = self.compact_latent_sequences(outputs.sequences)
        return VedasGenerateOutput(**fields, latent_trace=trace if wants_trace else None)

    def _expand_inputs_for_generation(self, expand_size=1, is_encoder_decoder=False, input_ids=None, **model_kwargs):
        """HF's expansion to `batch * expand_size` rows (beams, `num_return_sequences`), plus what it cannot know:
        each sample's images are repeated as a group (HF would repeat single patch rows of `pixel_values`), and a
        cache that `generate` prefilled with the latent steps for `batch` rows is expanded with its routing state."""
        pixel_values, grid = model_kwargs.pop("pixel_values", None), model_kwargs.pop("image_grid_thw", None)
        expanded, model_kwargs = super()._expand_inputs_for_generation(
            expand_size=expand_size, is_encoder_decoder=is_encoder_decoder, input_ids=input_ids, **model_kwargs
        )
        if expand_size > 1 and pixel_values is not None and grid is not None and input_ids is not None:
            pixel_values, grid = self._expand_images(input_ids, pixel_values, grid, expand_size)
        model_kwargs.update(pixel_values=pixel_values, image_grid_thw=grid)
        for value in model_kwargs.values():
            if (
                expand_size > 1 and isinstance(value, VedasCache) and input_ids is not None
                and value.get_seq_length() > 0 and value.layers[0].keys.shape[0] == input_ids.shape[0]
            ):
                value.batch_repeat_interleave(expand_size)
        return expanded, model_kwargs

    def _expand_images(self, input_ids, pixel_values, image_grid_thw, expand_size):
        """Each row's images repeated as a group, `expand_size` times, in row order: `pixel_values` `(patches, d)` and
        `image_grid_thw` `(images, 3)` for the rows of `input_ids.repeat_interleave(expand_size, 0)`."""
        patches = image_grid_thw.prod(-1)
        tokens = patches // self.config.vision_config.spatial_merge_size**2
        row_ends = (input_ids == self.config.image_token_id).sum(-1).cumsum(0)
        image_row = torch.searchsorted(row_ends, tokens.cumsum(0).to(row_ends.dtype))  # the row holding each image
        count = patches.shape[0]
        copies = torch.arange(expand_size, device=patches.device)[:, None]
        key = (image_row.to(patches.device)[None] * expand_size + copies) * count
        key = key + torch.arange(count, device=patches.device)
        images = key.flatten().argsort() % count  # (row, copy, image) order
        sizes = patches[images]
        starts = (patches.cumsum(0) - patches)[images]
        offsets = torch.arange(int(sizes.sum()), device=patches.device)
        index = torch.repeat_interleave(starts - (sizes.cumsum(0) - sizes), sizes) + offsets  # each image's patch rows
        return pixel_values[index.to(pixel_values.device)], image_grid_thw[images]

    def _prepare_position_ids_for_generation(self, inputs_tensor, model_kwargs):
        """None for a latent layout (forward derives its positions), else the backbone's."""
        if self._has_latent_slots(model_kwargs.get("input_ids", inputs_tensor)):
            return None
        return super()._prepare_position_ids_for_generation(inputs_tensor, model_kwargs)

    # ------------------------------------------------------------------ loading checks (the AutoModel path)
    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *model_args, **kwargs):
        """`PreTrainedModel.from_pretrained`, from safetensors weights only.

        transformers falls back to `pytorch_model.bin` when a folder has no safetensors file, and unpickling can run
        arbitrary code: here `use_safetensors` is always True, and a folder without `model.safetensors` (or
        `model.safetensors.index.json`) is refused in one line. A truncated or corrupt safetensors file is named
        (see `_load_pretrained_model`) instead of ending in a bare `SafetensorError`.
        """
        if kwargs.get("use_safetensors") is False:
            raise ValueError(
                "Vedas checkpoints load from safetensors only: use_safetensors=False is refused, because "
                "unpickling pytorch_model.bin can run arbitrary code."
            )
        kwargs["use_safetensors"] = True
        try:
            return super().from_pretrained(pretrained_model_name_or_path, *model_args, **kwargs)
        except OSError as err:
            text = str(err)
            if "model.safetensors" not in text or not ("no file named" in text or "does not appear to have" in text):
                raise
            raise OSError(
                f"{str(pretrained_model_name_or_path)!r} has no model.safetensors or model.safetensors.index.json: "
                f"Vedas loads weights from safetensors only, never from pickle files such as pytorch_model.bin "
                f"(unpickling can run arbitrary code); re-save it with save_pretrained(safe_serialization=True)."
            ) from None

    @staticmethod
    def _load_pretrained_model(model, state_dict, checkpoint_files, *args, **kwargs):
        """The backbone's `_load_pretrained_model`, with a damaged safetensors file named in a one-line OSError.

        Only on failure, transformers' own `load_state_dict` re-reads each file's header (to the meta device, no
        tensor data) to find the damaged one: the same files `from_pretrained` was loading, read by transformers.
        """
        parent = super(VedasMixin, type(model))._load_pretrained_model
        try:
            return parent(model, state_dict, checkpoint_files, *args, **kwargs)
        except Exception as err:
            if type(err).__name__ != "SafetensorError":
                raise
            from transformers.modeling_utils import load_state_dict

            files = [str(f) for f in checkpoint_files or [] if str(f).endswith(".safetensors")]
            broken = []
            for file in files if len(files) > 1 else []:
                try:
                    load_state_dict(file, map_location="meta")
                except Exception:  # noqa: BLE001 (any failure marks the file as the damaged one)
                    broken.append(file)
            named = ", ".join(repr(f) for f in (broken or files)) or "a safetensors weight file"
            raise OSError(
                f"Cannot load the weights: {named} is truncated or corrupt ({err}); copy or download it again."
            ) from None


class VedasForConditionalGeneration(VedasMixin, Qwen2VLForConditionalGeneration):
    """Vedas on a Qwen2-VL backbone."""

    config_class = VedasConfig
    config: VedasConfig
    _decoder_layer_class = VedasDecoderLayer
    _no_split_modules = ["VedasDecoderLayer", "Qwen2VLVisionBlock"]

    def __init__(self, config: VedasConfig):
        super().__init__(config)
        self._init_vedas_modules()
        self.post_init()


class Vedas25ForConditionalGeneration(VedasMixin, Qwen2_5_VLForConditionalGeneration):
    """Vedas on a Qwen2.5-VL backbone."""

    config_class = Vedas25Config
    config: Vedas25Config
    _decoder_layer_class = Vedas25DecoderLayer
    _no_split_modules = ["Vedas25DecoderLayer", "Qwen2_5_VLVisionBlock"]

    def __init__(self, config: Vedas25Config):
        super().__init__(config)
        self._init_vedas_modules()
        self.post_init()


class Vedas3ForConditionalGeneration(VedasMixin, Qwen3VLForConditionalGeneration):
    """Vedas on a Qwen3-VL backbone. What differs from the Qwen2 backbones is the backbone's own: the text model's
    interleaved M-RoPE (its `get_rope_index` and rotary embedding; replayed tokens keep their original positions as
    elsewhere), per-head q/k norms (`Vedas3DecoderLayer`, read by the saliency row), the vision tower's 16-pixel
    patches and learned position grid, and DeepStack, added at the prompt's image positions only (`_DeepStack`)."""

    config_class = Vedas3Config
    config: Vedas3Config
    _decoder_layer_class = Vedas3DecoderLayer
    _no_split_modules = ["Vedas3DecoderLayer", "Qwen3VLVisionBlock"]

    def __init__(self, config: Vedas3Config):
        super().__init__(config)
        self._init_vedas_modules()
        self.post_init()


# Custom classes do not inherit the backbone's key renames; register them so legacy-layout checkpoints
# (Qwen2-VL's `visual.*`, `model.layers.*`) load with no missing or unexpected keys. Qwen3-VL has no legacy layout.
for _vedas_class in (VedasForConditionalGeneration, Vedas25ForConditionalGeneration, Vedas3ForConditionalGeneration):
    _backbone = next(c for c in _vedas_class.__mro__ if c.__module__.startswith("transformers.models."))
    _renames = get_checkpoint_conversion_mapping(_backbone.__name__)
    if _renames is not None:
        register_checkpoint_conversion_mapping(_vedas_class.__name__, _renames, overwrite=True)


__all__ = [
    "VedasForConditionalGeneration", "Vedas25ForConditionalGeneration", "Vedas3ForConditionalGeneration",
    "VedasCausalLMOutput", "VedasCache",
]
