"""Routing depth scaling (RDS): the Vedas decoder layer, its per-forward state and its KV cache.

A routing layer runs the backbone's own decoder layer, lets `depth_router` score every token, and sends the
selected tokens through the same layer a second time. The selected tokens attend only to each other (causally, in
their original order) and keep their positions; the result is gated back in:

    out = H0 + mask ⊙ s ⊙ (f(H0) - H0) ⊙ e(d)

In `routing="causal"` mode the selection of a token never depends on a later token: the α best prompt tokens set
a threshold per sample and layer, and every later token is selected iff its score reaches it. The second pass keeps
its own keys and values in :class:`VedasCache`, so chunked and token-by-token decoding give the one-shot numbers.

A packed row (several sequences in one row, padding-free training) carries `segments`: each sequence is routed
as if it were alone (its own prompt, α, threshold, and a second pass that attends within the sequence only).
"""

from dataclasses import dataclass, field, replace

import torch
from torch import nn
from transformers import DynamicCache
from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import Qwen2_5_VLDecoderLayer
from transformers.models.qwen2_vl.modeling_qwen2_vl import Qwen2VLDecoderLayer, rotate_half
from transformers.models.qwen3_vl.modeling_qwen3_vl import Qwen3VLTextDecoderLayer

from .configuration_vedas import CACHE_ARG


class VedasCache(DynamicCache):
    """A `DynamicCache` that also holds what routing layers carry between forwards.

    Attributes:
        routing_kv (`dict[tuple[int, int], tuple[Tensor, Tensor, Tensor]]`):
            Per (layer, depth): keys and values `(batch, kv_heads, n, head_dim)` of the tokens the second pass has
            seen, and `(batch, n)` bool validity (samples select different numbers of tokens).
        routing_thresholds (`dict[tuple[int, int], Tensor]`):
            Per (layer, depth): the `(batch,)` threshold set by the prompt in causal mode.
        routing_positions (`dict[tuple[int, int], Tensor]`):
            Per (layer, depth): `(batch,)` count of selected tokens so far (next position in `"rearranged"` mode).
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.routing_kv = {}
        self.routing_thresholds = {}
        self.routing_positions = {}

    def _map_routing_batch(self, fn):
        """Apply `fn` to the batch dimension of the routing state too: generate's batch operations (beam search,
        contrastive search) must move it with the rows."""
        self.routing_kv = {key: tuple(fn(t) for t in value) for key, value in self.routing_kv.items()}
        self.routing_thresholds = {key: fn(value) for key, value in self.routing_thresholds.items()}
        self.routing_positions = {key: fn(value) for key, value in self.routing_positions.items()}

    def reorder_cache(self, beam_idx: torch.LongTensor):
        """Reorder the rows (beam search), the routing state with them."""
        super().reorder_cache(beam_idx)
        self._map_routing_batch(lambda t: t.index_select(0, beam_idx.to(t.device)))

    def batch_repeat_interleave(self, repeats: int):
        """Repeat each row `repeats` times (beams, `num_return_sequences`), the routing state with them."""
        super().batch_repeat_interleave(repeats)
        self._map_routing_batch(lambda t: t.repeat_interleave(repeats, dim=0))

    def batch_select_indices(self, indices: torch.Tensor):
        """Keep the rows `indices`, the routing state with them."""
        super().batch_select_indices(indices)
        self._map_routing_batch(lambda t: t[indices])

    def crop(self, tokens_to_remove: int):
        """Crop as `DynamicCache` does, refused once routing layers hold second-pass keys."""
        if self.routing_kv and tokens_to_remove != 0:
            raise NotImplementedError(
                "VedasCache cannot be cropped once routing layers hold second-pass keys (assisted / speculative "
                "decoding): the routing cache does not record which positions its keys came from."
            )
        super().crop(tokens_to_remove)


class _SecondPassKV:
    """Duck-typed stand-in for a cache, handed to the backbone's attention during the second pass.

    The attention module only calls `update(key, value, layer_idx)`; this returns the routing keys/values seen so
    far concatenated with the new ones, and records them in the `VedasCache` when there is one.
    """

    def __init__(self, store: dict | None, key: tuple[int, int], past: tuple | None):
        self.store, self.key, self.past = store, key, past
        self.new_valid = None

    def update(self, key_states, value_states, layer_idx=None, *args, **kwargs):
        """The second pass's keys and values after the earlier ones, recorded (with their validity) in the store."""
        if self.past is not None:
            key_states = torch.cat([self.past[0], key_states], dim=2)
            value_states = torch.cat([self.past[1], value_states], dim=2)
        if self.store is not None:
            past_valid = self.past[2] if self.past is not None else self.new_valid[:, :0]
            self.store[self.key] = (key_states, value_states, torch.cat([past_valid, self.new_valid], dim=1))
        return key_states, value_states


@dataclass
class VedasForwardState:
    """What one model forward tells its decoder layers, passed to them as the `vedas_state` keyword.

    Shapes use `l` for the tokens of this forward and `n` for all keys (cache + this forward).

    Args:
        token_valid (`(batch, l)` bool): real tokens; padding and unused replay slots are never selected.
        prompt_mask (`(batch, l)` bool): tokens that set the causal-mode threshold (the routing prompt).
        prompt_lengths (`(batch,)` or `(batch, segments)` long): length of the whole prompt (of each segment), for
            α given as a fraction.
        key_valid (`(batch, n)` bool): keys the main attention may see (for the saliency row).
        saliency_columns (`(batch, v)` long, optional): key columns of the visual tokens. When set, every layer
            adds the attention row of the last query (averaged over heads) to `key_saliency`; `visual_saliency()`
            reads its mean over the layers at these columns (real where `saliency_valid`).
        rotary_emb (`nn.Module`): the text model's rotary embedding (for `"rearranged"` second-pass positions).
        record_scores (`bool`): keep the full router scores per layer (for traces and plots).
        record_stats (`bool`): keep the router statistics per layer (`router_stats`, for the training logs);
            `generate` turns them off, as nothing reads them there.
        segments (`(batch, l)` long, optional): index of the packed sequence each token belongs to, non-decreasing
            along the row (None: one sequence per row).
        attention_calls (`list[bool]`): one entry per call of a layer's attention module, True for the layer's own
            pass and False for a second pass, so that recorded attention maps can be filtered (one per layer).
    """

    token_valid: torch.Tensor
    prompt_mask: torch.Tensor
    prompt_lengths: torch.Tensor
    key_valid: torch.Tensor | None = None
    saliency_columns: torch.Tensor | None = None
    saliency_valid: torch.Tensor | None = None
    rotary_emb: nn.Module | None = None
    routing_mode: str = "causal"
    record_scores: bool = False
    record_stats: bool = True
    key_saliency: torch.Tensor | None = None  # (batch, n) float32: the layers' rows summed over every key column
    saliency_layers: int = 0
    router_stats: dict = field(default_factory=dict)
    router_scores: dict = field(default_factory=dict)
    segments: torch.Tensor | None = None
    attention_calls: list = field(default_factory=list)
    _per_forward: dict = field(default_factory=dict, init=False, repr=False)  # `replace` starts an empty one

    def key_invalid(self, length: int) -> torch.Tensor:
        """`~key_valid[:, None, :length]` `(batch, 1, length)`, computed once per forward instead of once per layer."""
        if ("keys", length) not in self._per_forward:
            self._per_forward[("keys", length)] = ~self.key_valid[:, None, :length]
        return self._per_forward[("keys", length)]

    def segment_ids(self) -> torch.Tensor:
        """`segments`, or zeros `(batch, l)` when rows are not packed (one sequence each), built once per forward and
        only when read: a latent step's chunk, whose tokens all meet a stored threshold, never reads them."""
        if self.segments is not None:
            return self.segments
        if "segments" not in self._per_forward:
            self._per_forward["segments"] = torch.zeros_like(self.token_valid, dtype=torch.long)
        return self._per_forward["segments"]

    def last_rotary(self, position_embeddings: tuple) -> tuple[torch.Tensor, torch.Tensor]:
        """`(cos, sin)` of the last position `(batch, 1, head_dim)`, for `_rotate_last`, once per forward (the text
        model hands every layer the same position embeddings). `sin`'s first half is negated, so that the rotation
        of the last query needs no `rotate_half` (which slices, negates and concatenates) at every layer."""
        cos, sin = position_embeddings
        cached = self._per_forward.get("rotary")
        if cached is None or cached[0] is not cos:
            half = sin.shape[-1] // 2
            last_sin = sin[:, -1:]
            signed = torch.cat([-last_sin[..., :half], last_sin[..., half:]], dim=-1)
            cached = self._per_forward["rotary"] = (cos, cos[:, -1:], signed)
        return cached[1], cached[2]

    def visual_saliency(self) -> torch.Tensor:
        """a(t): the saliency of the visual tokens `(batch, v)` float32, the layers' rows averaged at
        `saliency_columns`, 0 where not `saliency_valid`. The rows are summed over all key columns and gathered once
        here rather than at every layer (the same additions per column, so the same numbers)."""
        row = self.key_saliency.gather(1, self.saliency_columns).masked_fill(~self.saliency_valid, 0.0)
        return row / max(self.saliency_layers, 1)


@dataclass
class _Selected:
    """The tokens a routing layer selected, gathered in position order into `w` slots (`_route`).

    Args:
        order (`(batch, w)` long): the column of each slot's token (slots past a row's count hold unselected ones).
        valid (`(batch, w)` bool): slots that hold a selected token.
        counts (`(batch,)` long): selected tokens per row.
        full (`bool`): every slot is valid (one row, at least one token): the masks below have nothing to mask.
    """

    order: torch.Tensor
    valid: torch.Tensor
    counts: torch.Tensor
    full: bool

    def masked(self, update: torch.Tensor) -> torch.Tensor:
        """`update` `(batch, w, hidden)` zeroed on invalid slots."""
        return update if self.full else update * self.valid.unsqueeze(-1)


def _top_alpha(scores: torch.Tensor, mask: torch.Tensor, k: torch.Tensor,
               segments: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row and segment, exactly min(k, count) highest-scoring tokens where `mask` (equal scores: the earlier
    position wins), and the k-th largest score (capped at the count; +inf where the segment has none).

    Ranks rather than `score >= k-th score` keep exactly α even when scores tie (a saturated sigmoid gives 1.0).
    scores, mask: (batch, l); k: (batch, s) long; segments: (batch, l) long in [0, s), non-decreasing along the row.
    Returns `(top (batch, l) bool, kth (batch, s) float)`.
    """
    length = scores.shape[1]
    count = torch.zeros_like(k).scatter_add_(1, segments, mask.long())
    k = torch.minimum(k, count)
    # best first within the row, then (stable) grouped by segment: each segment's tokens are contiguous, best first
    by_score = scores.masked_fill(~mask, float("-inf")).sort(dim=-1, descending=True, stable=True)
    by_segment = segments.gather(1, by_score.indices).sort(dim=-1, stable=True)
    order = by_score.indices.gather(1, by_segment.indices)
    values = by_score.values.gather(1, by_segment.indices)
    sizes = torch.zeros_like(k).scatter_add_(1, segments, torch.ones_like(segments))
    starts = sizes.cumsum(-1) - sizes  # (batch, s): first sorted slot of each segment
    rank_sorted = torch.arange(length, device=scores.device)[None] - starts.gather(1, by_segment.values)
    rank = torch.empty_like(order).scatter_(1, order, rank_sorted)
    top = mask & (rank < k.gather(1, segments))
    kth = values.gather(1, (starts + k - 1).clamp(min=0, max=length - 1))
    return top, torch.where(k > 0, kth, torch.full_like(kth, float("inf")))


class VedasDecoderLayerMixin:
    """Adds saliency capture and (on routing layers) routing depth scaling to a backbone decoder layer.

    Keeping the backbone layer class as the base keeps its parameter names, so base checkpoints load unchanged
    and the second pass reuses exactly the same weights and code.
    """

    def _init_vedas(self, config, layer_idx: int, vedas_config):
        """The layer's routing settings and, on routing layers, its `depth_router` and e(d) (`depth_step_embed`).
        `vedas_config` was validated by the model that builds the layer (`VedasMixin._init_vedas_modules`)."""
        self.layer_idx = layer_idx
        self.is_routing_layer = layer_idx in vedas_config.routing_layers
        if self.is_routing_layer:
            self.routing_topk = vedas_config.routing_topk_for_layer(layer_idx)
            self.max_depth = vedas_config.max_depth
            self.routing_positions = vedas_config.routing_positions
            self.depth_residual = vedas_config.depth_residual
            self.depth_router = DepthRouter(config.hidden_size)
            self.depth_step_embed = DepthStepEmbedding(vedas_config.max_depth, config.hidden_size)

    def __call__(self, hidden_states, *args, vedas_state: VedasForwardState | None = None, **kwargs):
        """The layer and its saliency row (the last query projected before the layer runs, q·k on the keys after
        it), computed outside any checkpoint: reentrant checkpointing runs the layer without grad, which would cut
        the gradient that the replay weights send to q_proj and k_proj through the saliency. The row reads only the
        layer's input, its weights and the cache the layer just filled.

        Under gradient checkpointing with a `VedasCache` (the latent forward's passes), the layer is checkpointed
        here with its cache as explicit inputs and outputs (`_checkpoint_with_cache`), so that the passes keep
        reusing the prefix's keys and values. Otherwise transformers checkpoints it, and drops any cache."""
        cache = kwargs.get(CACHE_ARG, kwargs.get("past_key_values"))
        query = None
        if vedas_state is not None and vedas_state.saliency_columns is not None:
            # the last query before the layer runs: its q_proj then finds the weights this projection just read
            # still in the CPU cache (after the layer, its MLP has evicted them; about 2% of a latent generate)
            query = self._last_query(hidden_states, vedas_state.last_rotary(kwargs["position_embeddings"]))
        checkpointing = self.gradient_checkpointing and self.training
        if checkpointing and isinstance(cache, VedasCache):
            output = self._checkpoint_with_cache(hidden_states, args, kwargs, cache, vedas_state)
        else:
            output = super().__call__(hidden_states, *args, vedas_state=vedas_state, **kwargs)
            if checkpointing:  # the checkpointed layer ran without the cache
                cache = None
        if query is not None:
            self._add_saliency(hidden_states, query, kwargs["position_embeddings"], cache, vedas_state)
        return output

    # ------------------------------------------------------- checkpointing with a cache
    def _checkpoint_with_cache(self, hidden_states, args, kwargs, cache: VedasCache, state):
        """The layer over `(batch, l, hidden)` new tokens, checkpointed, on a `VedasCache` that keeps growing.

        transformers' checkpointing drops the cache, because a layer that writes its keys and values into it would
        write them again when the backward pass recomputes it. Here the checkpointed function is pure: it gets this
        layer's cached keys and values (and, on a routing layer, its second-pass keys, values, thresholds and
        positions) as inputs, runs the layer on a private `VedasCache` built from them, and returns the new
        tensors as outputs, which are then written into `cache`. They are part of the autograd graph, so later
        passes attend to them with gradient, and the recomputation in backward writes only to its own private
        cache. Each column thus runs once in forward and once in the backward recomputation, whatever T."""
        name = CACHE_ARG if CACHE_ARG in kwargs else "past_key_values"
        idx = self.layer_idx
        layer = cache.layers[idx] if len(cache.layers) > idx else None
        past = (layer.keys, layer.values) if layer is not None and layer.get_seq_length() > 0 else ()
        keys = [(idx, depth) for depth in range(self.max_depth)] if self.is_routing_layer else []
        routing_kv = {key: cache.routing_kv[key] for key in keys if key in cache.routing_kv}
        snapshot = ({key: cache.routing_thresholds[key] for key in keys if key in cache.routing_thresholds},
                    {key: cache.routing_positions[key] for key in keys if key in cache.routing_positions})
        views = []  # the private cache of each run: the first is the forward's, later ones the recomputations'

        def run(hidden, *tensors):
            view = _private_cache(idx, tensors, len(past) > 0, routing_kv, snapshot)
            run_state = state if not views or state is None else _scratch_state(state)  # recomputation: no stats
            views.append(view)
            with _checkpointing_off(self):
                out = VedasDecoderLayerMixin._plain_call(self, hidden, *args, vedas_state=run_state,
                                                         **{**kwargs, name: view})
            new_keys, new_values = (t[:, :, past[0].shape[2] if past else 0 :] for t in _layer_kv(view, idx))
            routed = [t for key in sorted(view.routing_kv) for t in view.routing_kv[key][:2]]
            return (out, new_keys, new_values, *routed)

        tensors = [*past, *(t for key in sorted(routing_kv) for t in routing_kv[key][:2])]
        if torch.is_grad_enabled():
            out, new_keys, new_values, *routed = self._gradient_checkpointing_func(run, hidden_states, *tensors)
        else:  # nothing to recompute
            out, new_keys, new_values, *routed = run(hidden_states, *tensors)
        view = views[0]
        cache.update(new_keys, new_values, idx)
        for n, key in enumerate(sorted(view.routing_kv)):
            cache.routing_kv[key] = (routed[2 * n], routed[2 * n + 1], view.routing_kv[key][2])
        cache.routing_thresholds.update(view.routing_thresholds)
        cache.routing_positions.update(view.routing_positions)
        return out

    def _plain_call(self, *args, **kwargs):
        """The backbone layer's `__call__` (module hooks, then `forward`), bypassing the saliency of `__call__`."""
        return super().__call__(*args, **kwargs)

    def forward(self, hidden_states, attention_mask=None, position_ids=None, past_key_values=None, use_cache=False,
                position_embeddings=None, vedas_state: VedasForwardState | None = None, **kwargs):
        """The backbone layer, then (on routing layers) D rounds of routing depth scaling; see `__call__` for the
        saliency."""
        past_key_values = kwargs.pop("cache", past_key_values)  # its name since transformers 5.24
        hidden_states = super().forward(
            hidden_states,
            attention_mask=attention_mask,
            position_ids=position_ids,
            **{CACHE_ARG: past_key_values},
            use_cache=use_cache,
            position_embeddings=position_embeddings,
            **kwargs,
        )
        if vedas_state is None:
            return hidden_states
        vedas_state.attention_calls.append(True)
        if self.is_routing_layer:
            for depth in range(self.max_depth):
                hidden_states = self._route(hidden_states, depth, position_embeddings, past_key_values, vedas_state)
        return hidden_states

    # ---------------------------------------------------------------- saliency
    def _add_saliency(self, hidden_states, query, position_embeddings, past_key_values, state: VedasForwardState):
        """Attention of the last query (`_last_query`: `(batch * kv_heads, groups, head_dim)`) over all keys
        `(batch, n)`, averaged over heads; added to the state.

        Only one attention row is computed (from q·k, so it carries gradient); no attention map is materialised.
        """
        attn = self.self_attn
        if past_key_values is not None and len(past_key_values.layers) > self.layer_idx:
            keys = past_key_values.layers[self.layer_idx].keys  # (b, kv_heads, n, d), rotary already applied
        else:  # no cache (e.g. under gradient checkpointing): the keys of this forward are all the keys
            keys = self._heads(attn.k_proj, getattr(attn, "k_norm", None), hidden_states).transpose(1, 2)
            keys = _rotate(keys, *position_embeddings)
        batch, kv_heads, length, head_dim = keys.shape
        # q·k and the softmax in fp32 even under autocast (which would run the matmul in bf16/fp16): over thousands
        # of keys the row's probabilities are ~1e-4 each, and their differences decide which tokens are replayed
        with fp32_region(hidden_states.device):
            # the query heads grouped by their key-value head, one bmm (b * kv_heads, groups, d) @ (.., d, n): no
            # (b, heads, n, d) copy of the cache at every layer and step
            keys = keys.float().reshape(batch * kv_heads, length, head_dim).transpose(1, 2)
            logits = torch.bmm(query.float(), keys).view(batch, -1, length) * attn.scaling
            logits = logits.masked_fill(state.key_invalid(length), float("-inf"))  # (b, heads, n)
            row = logits.softmax(-1).mean(1)  # (b, n)
        state.key_saliency = row if state.key_saliency is None else state.key_saliency + row
        state.saliency_layers += 1

    def _last_query(self, hidden_states, rotary: tuple) -> torch.Tensor:
        """The last query of the layer input `(batch, l, hidden)`, rotated (`rotary`: `VedasForwardState.last_rotary`)
        and grouped by key-value head: `(batch * kv_heads, groups, head_dim)`. As the backbone's attention computes
        it, for one token: 2-D, `(batch, heads, head_dim)`, so that no per-layer view or transpose adds a token axis."""
        attn = self.self_attn
        query = self._heads(attn.q_proj, getattr(attn, "q_norm", None), hidden_states[:, -1])  # (b, heads, d)
        cos, signed_sin = rotary
        # x * cos + rotate_half(x) * sin, with rotate_half(x) * sin = roll(x) * signed_sin to the bit (a product's
        # sign flips exactly)
        query = query * cos + query.roll(attn.head_dim // 2, -1) * signed_sin
        return query.view(-1, attn.num_key_value_groups, attn.head_dim)

    def _heads(self, projection, head_norm, hidden_states):
        """Queries or keys `(..., heads, head_dim)` of the layer input `(..., hidden)` (a sequence `(batch, l, hidden)`
        or one token `(batch, hidden)`), before the rotary embedding, as the backbone's attention computes them:
        Qwen3-VL normalises each head (`q_norm`, `k_norm`, an RMSNorm over head_dim) between the projection and the
        rotation; Qwen2-VL / Qwen2.5-VL have no such norm."""
        states = projection(self.input_layernorm(hidden_states))
        states = states.view(*states.shape[:-1], -1, self.self_attn.head_dim)
        return states if head_norm is None else head_norm(states)

    # ----------------------------------------------------------------- routing
    def router_scores(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """The router gates s = sigmoid(w·h + b) of `(batch, l, hidden)` states: `(batch, l)` float32 (see
        :class:`DepthRouter`)."""
        return torch.sigmoid(self.depth_router(hidden_states)).squeeze(-1)

    def _alpha(self, state: VedasForwardState) -> torch.Tensor:
        """α per sample and segment `(batch, s)`: a count, or a fraction of the prompt length (at least one token)."""
        lengths = state.prompt_lengths if state.prompt_lengths.ndim == 2 else state.prompt_lengths[:, None]
        if isinstance(self.routing_topk, float):
            return torch.ceil(self.routing_topk * lengths.float()).long().clamp(min=1)
        return torch.full_like(lengths, int(self.routing_topk))

    def _route(self, hidden_states, depth, position_embeddings, past_key_values, state: VedasForwardState):
        """Depth step d of a routing layer on its output h `(batch, l, hidden)`: the router scores s, the selection
        m (`_select`), the second pass f over the selected tokens (`_second_pass`), and the output
        h + m ⊙ s ⊙ (f(h) - h) ⊙ e(d) (`depth_residual="gated"`) or h + e(d) ⊙ (h + m ⊙ s ⊙ (f(h) - h))
        (`"literal"`, see `_depth_residual`)."""
        key = (self.layer_idx, depth)
        cache = past_key_values if isinstance(past_key_values, VedasCache) else None
        scores = self.router_scores(hidden_states)  # (b, l), fp32
        selected = self._select(scores, key=key, cache=cache, state=state)
        # gather the selected tokens in position order: a stable sort puts them first, padding slots after
        counts = selected.sum(-1)
        width = int(counts.max())
        if width == 0 and not _in_lockstep(self):
            return self._depth_residual(hidden_states, hidden_states, depth)
        # one row's `width` selected tokens fill every slot: no slot to mask (as in a generate of one prompt)
        full = hidden_states.shape[0] == 1 and width > 0
        width = max(width, 1)  # ranks in lockstep run the second pass even on nothing: one masked slot, zero update
        order = torch.sort((~selected).to(torch.int8), dim=-1, stable=True).indices[:, :width]  # (b, w)
        if full:
            sel_valid = torch.ones_like(order, dtype=torch.bool)
        else:
            sel_valid = torch.arange(width, device=counts.device)[None] < counts[:, None]
        tokens = _Selected(order=order, valid=sel_valid, counts=counts, full=full)
        index = order.unsqueeze(-1)
        h_sel = hidden_states.gather(1, index.expand(-1, -1, hidden_states.shape[-1]))
        f_sel = self._second_pass(h_sel, tokens, position_embeddings=position_embeddings, key=key, cache=cache,
                                  state=state)
        delta = (f_sel - h_sel) * scores.gather(1, order).unsqueeze(-1).to(h_sel.dtype)  # ⊙ s
        if self.depth_residual == "literal":  # H(d) = h + m ⊙ s ⊙ (f(h) - h), then Eq. 11 as printed
            delta = tokens.masked(delta)
            routed = hidden_states.scatter_add(1, index.expand_as(delta), delta)
            return self._depth_residual(hidden_states, routed, depth)
        delta = tokens.masked(delta * self.depth_step_embed.weight[depth])
        if _can_update_in_place(hidden_states):  # h is this layer's own output: no (batch, l, hidden) copy
            return hidden_states.scatter_add_(1, index.expand_as(delta), delta)
        # under autograd out of place, as backward may need h unchanged: one copy of the hidden states plus the
        # selected rows (indices are distinct)
        return hidden_states.scatter_add(1, index.expand_as(delta), delta)

    def _select(self, scores, key, cache, state: VedasForwardState):
        """The selection m `(batch, l)` bool from the router scores s `(batch, l)`: top-α of the sequence
        (`"global"`), else top-α of the routing prompt, which sets the threshold that later tokens (and those after
        it on the cache) must reach. Records the router statistics (when `state.record_stats`)."""
        valid = state.token_valid
        if state.routing_mode == "global":
            selected, threshold = _top_alpha(scores, valid, self._alpha(state), state.segment_ids())
        elif cache is not None and key in cache.routing_thresholds:
            threshold = cache.routing_thresholds[key][:, None]
            selected = valid & (scores >= threshold)
        else:  # the prompt's top-α is selected and sets the threshold that every later token must reach
            prompt = state.prompt_mask & valid
            segments = state.segment_ids()
            top, threshold = _top_alpha(scores, prompt, self._alpha(state), segments)  # threshold: (b, segments)
            selected = torch.where(prompt, top, valid & (scores >= threshold.gather(1, segments)))
            if cache is not None:  # a cache never holds packed rows: one segment
                cache.routing_thresholds[key] = threshold[:, 0]

        if state.record_stats:  # ~10 reductions per routing layer and pass, which generate never reads
            counts = selected.sum(-1)
            stats = {"selected": counts.float().mean(),
                     "threshold": threshold.masked_fill(threshold.isinf(), 0).mean(),
                     "score": (scores * valid).sum() / valid.sum().clamp(min=1)}
            state.router_stats[key] = {name: value.detach() for name, value in stats.items()}
        if state.record_scores:
            state.router_scores[key] = (scores.detach(), selected)
        return selected

    def _second_pass(self, h_sel, tokens: _Selected, position_embeddings, key, cache, state):
        """f: the same layer over the selected tokens `h_sel` `(batch, w, hidden)` (`tokens`), causal among them
        within each packed sequence, after the selected keys on the cache; at their own positions or, with
        `routing_positions="rearranged"`, at consecutive new ones."""
        width, counts = h_sel.shape[1], tokens.counts
        # which packed sequence each selected token belongs to (None: one sequence per row)
        sel_segments = None if state.segments is None else state.segments.gather(1, tokens.order)
        past = cache.routing_kv.get(key) if cache is not None else None
        start = cache.routing_positions.get(key) if cache is not None else None
        if self.routing_positions == "rearranged":
            first = torch.zeros_like(counts) if start is None else start
            positions = first[:, None] + _ranks_in_sequence(sel_segments, width, h_sel.shape[0], counts.device)
            cos, sin = state.rotary_emb(h_sel, self._rope_position_ids(positions))
        else:
            columns = tokens.order.unsqueeze(-1).expand(-1, -1, position_embeddings[0].shape[-1])
            cos, sin = (t.gather(1, columns) for t in position_embeddings)
        if cache is not None:
            cache.routing_positions[key] = counts if start is None else start + counts

        mask = _second_pass_mask(tokens, sel_segments, None if past is None else past[2], h_sel.dtype)
        kv = _SecondPassKV(cache.routing_kv if cache is not None else None, key, past)
        kv.new_valid = tokens.valid
        state.attention_calls.append(False)
        return super().forward(h_sel, attention_mask=mask, use_cache=True, **{CACHE_ARG: kv},
                               position_embeddings=(cos, sin))

    @staticmethod
    def _rope_position_ids(positions: torch.Tensor) -> torch.Tensor:
        """Text positions `(batch, w)` as the backbone's rotary embedding takes them: M-RoPE's (t, h, w) rows, all
        equal for routed tokens, `(3, batch, w)`. A backbone with 1-D RoPE overrides this."""
        return positions[None].expand(3, -1, -1)

    def _depth_residual(self, hidden_states, routed, depth: int):
        """The output of depth step d when nothing else is added: h itself (`"gated"`, whose update is added in
        `_route`), or h + e(d) ⊙ H(d) (`"literal"`, Eq. 11: every token scaled by (1 + e(d)) when unselected).
        hidden_states h, routed H(d): `(batch, l, hidden)`."""
        if self.depth_residual == "literal":
            return hidden_states + routed * self.depth_step_embed.weight[depth]
        return hidden_states


def _ranks_in_sequence(sel_segments: torch.Tensor | None, width: int, batch: int, device) -> torch.Tensor:
    """`(batch, w)`: each selected token's rank among the selected tokens of its packed sequence (`sel_segments`
    `(batch, w)`; None: one sequence per row, whose ranks are the slots)."""
    rank = torch.arange(width, device=device)[None].expand(batch, -1)
    if sel_segments is None:
        return rank
    first = torch.ones_like(sel_segments, dtype=torch.bool)
    first[:, 1:] = sel_segments[:, 1:] != sel_segments[:, :-1]
    return rank - torch.where(first, rank, 0).cummax(-1).values  # the rank of the sequence's first token subtracted


def _second_pass_mask(tokens: _Selected, sel_segments, past_valid, dtype) -> torch.Tensor:
    """The second pass's `(batch, 1, w, n_past + w)` additive mask: valid past keys (`past_valid` `(batch,
    n_past)`, or None), causal among the new ones of the same packed sequence; invalid rows see themselves only, so
    no row is fully masked (their output is discarded). A full selection without packing is plain causal."""
    valid, width = tokens.valid, tokens.valid.shape[1]
    allowed = torch.ones(width, width, dtype=torch.bool, device=valid.device).tril()[None]
    if not tokens.full:
        allowed = allowed & valid[:, None, :]
    if sel_segments is not None:
        allowed = allowed & (sel_segments[:, :, None] == sel_segments[:, None, :])
    if not tokens.full:  # (otherwise the diagonal is allowed already)
        allowed = allowed | torch.eye(width, dtype=torch.bool, device=valid.device)[None]
    if past_valid is not None:
        past = past_valid[:, None, :].expand(-1, width, -1)
        if not tokens.full:
            past = past & valid[:, :, None]
        allowed = torch.cat([past, allowed], dim=-1)  # (a full selection has one row, as `allowed` then)
    mask = torch.zeros(allowed.shape, dtype=dtype, device=valid.device)
    return mask.masked_fill_(~allowed, torch.finfo(dtype).min)[:, None]


def _layer_kv(cache: DynamicCache, layer_idx: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The keys and values `(batch, kv_heads, n, head_dim)` that `cache` holds for one layer."""
    layer = cache.layers[layer_idx]
    return layer.keys, layer.values


def _private_cache(layer_idx: int, tensors, has_past: bool, routing_kv: dict, snapshot: tuple) -> VedasCache:
    """A `VedasCache` holding only what one layer reads: its past keys and values (`tensors[:2]` when `has_past`),
    then its routing layers' second-pass keys and values (the rest of `tensors`, in the sorted order of
    `routing_kv`'s keys, whose validity masks they take), thresholds and positions (`snapshot`, copied)."""
    view = VedasCache()
    tensors = list(tensors)
    if has_past:
        view.update(tensors.pop(0), tensors.pop(0), layer_idx)
    for n, key in enumerate(sorted(routing_kv)):
        view.routing_kv[key] = (tensors[2 * n], tensors[2 * n + 1], routing_kv[key][2])
    view.routing_thresholds, view.routing_positions = dict(snapshot[0]), dict(snapshot[1])
    return view


def _scratch_state(state: VedasForwardState) -> VedasForwardState:
    """A copy of `state` whose records (router statistics and scores, attention calls) a recomputation fills
    instead of the forward's."""
    return replace(state, router_stats={}, router_scores={}, attention_calls=[])


class _checkpointing_off:
    """Within the block, `module` runs as if gradient checkpointing were off (transformers' own wrapper, which
    drops the cache, stands aside); the flag is restored after."""

    def __init__(self, module: nn.Module):
        self.module = module

    def __enter__(self):
        self.saved, self.module.gradient_checkpointing = self.module.gradient_checkpointing, False

    def __exit__(self, *exc):
        self.module.gradient_checkpointing = self.saved


def _in_lockstep(module: nn.Module) -> bool:
    """True when every data-parallel rank runs this forward together and must run the same collectives: training
    under torch.distributed, or any forward of a model whose weights DeepSpeed ZeRO-3 partitions (each module's
    weights are gathered from all ranks as it runs). Then a data-dependent shortcut that skips a module on one rank
    only (a latent pass, a routing round with nothing selected, the reconstruction without a crop) makes the ranks'
    gathers fall out of step: a hang."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return False
    if torch.distributed.get_world_size() < 2:
        return False
    return module.training or hasattr(next(module.parameters(), None), "ds_id")


def _agree_across_ranks(module: nn.Module, values: list[int]) -> list[int]:
    """The largest of each value over all ranks in lockstep (see `_in_lockstep`); the values unchanged otherwise."""
    if not _in_lockstep(module):
        return list(values)
    device = next(module.parameters()).device
    tensor = torch.tensor(values, dtype=torch.long, device=device)
    torch.distributed.all_reduce(tensor, op=torch.distributed.ReduceOp.MAX)
    return [int(v) for v in tensor.tolist()]


def _rotate(x, cos, sin):
    """The backbone's rotary embedding on one tensor (its `apply_rotary_pos_emb` rotates q and k together);
    cos/sin are (batch, seq, head_dim)."""
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    return x * cos + rotate_half(x) * sin


def _can_update_in_place(tensor: torch.Tensor) -> bool:
    """Whether a step may write into `tensor` in place: only while autograd records nothing (`generate`, a forward
    under `torch.no_grad`, the no-grad forward of a reentrant checkpoint, whose backward recomputes it with grad)
    and `tensor` is no part of a graph. Under autograd, backward may need the values an in-place write destroys."""
    return not (torch.is_grad_enabled() or tensor.requires_grad)


def fp32_region(device: torch.device):
    """A block where autocast is off, so that float32 operands stay float32 (autocast runs matmul and linear in
    bf16/fp16 whatever their input dtype). Devices without autocast support have nothing to turn off, and when
    autocast is off already (inference in the model's dtype), entering and leaving a context per layer and router
    call would be Python work for nothing."""
    device_type = device.type if torch.amp.is_autocast_available(device.type) else "cpu"
    if not torch.is_autocast_enabled(device_type):
        return _NO_REGION
    return torch.autocast(device_type=device_type, enabled=False)


class _NoRegion:
    """A context that does nothing (`contextlib.nullcontext`, which the remote code does not import)."""

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


_NO_REGION = _NoRegion()


class DepthRouter(nn.Linear):
    """The router of a routing layer: one logit w·h + b per token, `(batch, l, hidden)` -> `(batch, l, 1)` float32.

    The logit is computed from float32 copies of the input and weights, with autocast off: in bf16 a logit near 6
    is rounded to a multiple of 1/32 (8 significant bits), and in fp16 the dot product over the hidden size
    overflows on large activations. The gates are compared with a per-layer threshold and multiply the update, so
    they must not depend on the model's storage dtype. The parameters stay `weight` (1, hidden) and `bias` (1,), in
    the model's dtype; only the computation is float32. Calling the module (rather than reading its weight
    elsewhere) keeps parameter hooks such as DeepSpeed ZeRO-3 gathering working.
    """

    def __init__(self, hidden_size: int):
        super().__init__(hidden_size, 1)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        with fp32_region(hidden_states.device):
            return nn.functional.linear(hidden_states.float(), self.weight.float(), self.bias.float())


class DepthStepEmbedding(nn.Module):
    """e(d), one learned vector per depth step (D, hidden); zero-initialised by default (`depth_gate_init`)."""

    def __init__(self, max_depth: int, hidden_size: int):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(max_depth, hidden_size))


class VedasDecoderLayer(VedasDecoderLayerMixin, Qwen2VLDecoderLayer):
    """A Qwen2-VL decoder layer with saliency capture and, at `routing_layers`, routing depth scaling."""

    def __init__(self, config, layer_idx: int, vedas_config):
        super().__init__(config, layer_idx)
        self._init_vedas(config, layer_idx, vedas_config)


class Vedas25DecoderLayer(VedasDecoderLayerMixin, Qwen2_5_VLDecoderLayer):
    """A Qwen2.5-VL decoder layer with saliency capture and, at `routing_layers`, routing depth scaling."""

    def __init__(self, config, layer_idx: int, vedas_config):
        super().__init__(config, layer_idx)
        self._init_vedas(config, layer_idx, vedas_config)


class Vedas3DecoderLayer(VedasDecoderLayerMixin, Qwen3VLTextDecoderLayer):
    """A Qwen3-VL text decoder layer with saliency capture and, at `routing_layers`, routing depth scaling.

    DeepStack's visual features are added by the text model after this layer returns (to the image positions of
    its input), so a routing layer's second pass sees, and its update adds to, the states before that addition."""

    def __init__(self, config, layer_idx: int, vedas_config):
        super().__init__(config, layer_idx)
        self._init_vedas(config, layer_idx, vedas_config)
