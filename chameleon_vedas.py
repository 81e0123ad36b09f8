"""Vedas on Chameleon, the paper's early-fusion backbone: what differs from the Qwen-VL backbones, as overrides of the
backbone hooks of `VedasMixin` (`modeling_vedas.py`), `VedasSettings` (`configuration_vedas.py`) and
`VedasDecoderLayerMixin` (`routing_vedas.py`). Everything else (the latent loop, replay selection, routing, caches,
generation) is the shared code.

Chameleon has no vision tower. Its VQ-VAE turns each image into a G x G grid of codes, and each code is a token of the
language model's own vocabulary (`IMGIMG<code>Z`). The processor writes `<racm3:break>`, G² `<image>` placeholders and
`<eoss>` per image, and the model fills the placeholders with the embeddings of the code tokens. So, on Chameleon:

- V, what a replayed token copies, is the embedding of an image-code token at its image slot; visual replay selects
  among the G² code tokens of the prompt's images.
- The visual grid is the VQ latent grid: `image_grid_thw` is `(1, G, G)` per image (derived from `pixel_values`),
  one token per cell (merge size 1), so the dense window (Eq. 7) is W x W codes.
- Positions are 1-D RoPE, carried as three equal rows by the shared code: the text counter skips the replay slots,
  which take the positions of the code tokens they copy (`replay_positions="original"`).
- SCF-VR re-encodes the crop through the VQ encoder, the code-to-token map and the embedding (`_encode_crops`).
- Image-code tokens are never predicted: their logits are masked, as `ChameleonForConditionalGeneration` does.
"""

import torch
from transformers import ChameleonConfig
from transformers.models.chameleon.modeling_chameleon import ChameleonDecoderLayer, ChameleonForConditionalGeneration

from .configuration_vedas import VedasSettings
from .modeling_vedas import VedasMixin
from .routing_vedas import VedasDecoderLayerMixin


# ChameleonImageProcessor's rescale factor (about 2 / 255): pixels in [0, 255] go to x * 0.0078, then (x - 1) / 1
CHAMELEON_RESCALE = 0.0078


class VedasChameleonConfig(VedasSettings, ChameleonConfig):
    r"""Configuration of a Vedas model on a Chameleon backbone. See :class:`VedasSettings` for the Vedas fields.

    Chameleon's config is its text model's own (no nested `text_config`), and its visual grid is the VQ latent grid:
    one cell per VQ code, of 2^(len(vq_config.channel_multiplier) - 1) pixels (16 on Chameleon-7B). `crop_resolution`
    must be a multiple of it; it defaults to 160, the 10 x 10 cells of the other backbones' default."""

    model_type = "vedas_chameleon"
    crop_resolution: int = 160

    @property
    def text_config(self):
        """The config itself: the shared code reads the text model's sizes from `config.text_config`."""
        return self

    @property
    def visual_cell(self) -> tuple[int, str]:
        """Pixels per side of one VQ code: the encoder halves the image side at every level but the last."""
        return 2 ** (len(self.vq_config.channel_multiplier) - 1), "the VQ encoder's downsampling factor"

    @property
    def visual_merge_size(self) -> int:
        """One token per VQ cell (nothing is merged)."""
        return 1


class _ChameleonLayerStates(ChameleonDecoderLayer):
    """`ChameleonDecoderLayer` whose forward returns the hidden states alone, as the Qwen layers do: the contract of
    `VedasDecoderLayerMixin`, whose second pass calls this forward too."""

    def forward(self, *args, **kwargs) -> torch.Tensor:
        return super().forward(*args, **kwargs)[0]


class VedasChameleonDecoderLayer(VedasDecoderLayerMixin, _ChameleonLayerStates):
    """A Chameleon decoder layer with saliency capture and, at `routing_layers`, routing depth scaling. Its per-head
    q/k LayerNorms are read by the saliency row (`_heads`)."""

    def __init__(self, config, layer_idx: int, vedas_config):
        super().__init__(config, layer_idx)
        self._init_vedas(config, layer_idx, vedas_config)

    def __call__(self, *args, **kwargs) -> tuple:
        """`(hidden_states,)`: `ChameleonModel` reads its layers' outputs as tuples."""
        return (super().__call__(*args, **kwargs),)

    @staticmethod
    def _rope_position_ids(positions: torch.Tensor) -> torch.Tensor:
        """1-D RoPE takes the `(batch, w)` positions as they are."""
        return positions


class VedasChameleonForConditionalGeneration(VedasMixin, ChameleonForConditionalGeneration):
    """Vedas on a Chameleon backbone (the module docstring lists what differs). `pixel_values` are the processor's
    `(images, 3, S, S)`; `image_grid_thw` is not needed (the VQ grid follows from S)."""

    config_class = VedasChameleonConfig
    config: VedasChameleonConfig
    _decoder_layer_class = VedasChameleonDecoderLayer
    _no_split_modules = ["VedasChameleonDecoderLayer", "ChameleonVQVAE"]

    def __init__(self, config: VedasChameleonConfig):
        if config.swin_norm:
            raise ValueError("Vedas supports Chameleon's pre-norm decoder layers only (swin_norm=False, as in 7B).")
        super().__init__(config)
        self._init_vedas_modules()
        self.post_init()

    # ------------------------------------------------------------------ backbone hooks
    @property
    def _text_model(self):
        """`ChameleonModel` is the decoder stack itself (its VQ-VAE only runs when given pixel_values)."""
        return self.model

    def _run_text_model(self, position_ids=None, **kwargs):
        """`ChameleonModel`'s forward over `inputs_embeds` (no pixel_values: the images are embedded already)."""
        if position_ids is not None and position_ids.ndim == 3:
            position_ids = position_ids[0]  # the shared code's (t, h, w) rows are equal here: the 1-D positions
        return self.model(position_ids=position_ids, **kwargs)

    def _image_embeddings(self, pixel_values, image_grid_thw) -> tuple[torch.Tensor, None]:
        """The embeddings of the images' code tokens `(images * G², hidden)`, row-major per image; no DeepStack."""
        features = self.model.get_image_features(pixel_values.to(self.model.vqmodel.dtype))
        return features.pooler_output.flatten(0, 1), None

    def _default_position_ids(self, input_ids, embeds, image_grid_thw, key_valid, past_key_values, mm_token_type_ids):
        """1-D positions counting the real tokens (as `generate` derives them); None without a mask (Chameleon's
        own: consecutive after the cache)."""
        if key_valid is None:
            return None
        return (key_valid.long().cumsum(-1) - 1).clamp(min=0)

    def _latent_position_ids(self, input_ids, attention_mask, mm_token_type_ids, image_grid_thw):
        """1-D positions over the counted tokens (images are tokens like any other), as three equal rows."""
        return super()._latent_position_ids(input_ids, attention_mask, mm_token_type_ids, image_grid_thw=None)

    def _latent_run(self, *, pixel_values, image_grid_thw, **kwargs):
        """The shared preparation, with each image's VQ grid `(1, G, G)` when the processor gave none."""
        if pixel_values is not None and image_grid_thw is None:
            image_grid_thw = self._vq_grid(pixel_values)
        return super()._latent_run(pixel_values=pixel_values, image_grid_thw=image_grid_thw, **kwargs)

    def _vq_grid(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """`(images, 3)`: `(1, H / cell, W / cell)` for images `(images, 3, H, W)`."""
        cell = self.config.visual_cell[0]
        height, width = pixel_values.shape[-2:]
        grid = torch.tensor([1, height // cell, width // cell], device=pixel_values.device)
        return grid[None].expand(pixel_values.shape[0], -1)

    def _expand_inputs_for_generation(self, expand_size=1, is_encoder_decoder=False, input_ids=None, **model_kwargs):
        """The shared expansion (beams, `num_return_sequences`), given the VQ grids it groups the images by."""
        pixel_values = model_kwargs.get("pixel_values")
        if pixel_values is not None and model_kwargs.get("image_grid_thw") is None:
            model_kwargs["image_grid_thw"] = self._vq_grid(pixel_values)
        return super()._expand_inputs_for_generation(expand_size, is_encoder_decoder, input_ids, **model_kwargs)

    def _expand_images(self, input_ids, pixel_values, image_grid_thw, expand_size):
        """Each row's images `(images, 3, S, S)` (one `pixel_values` row each) repeated as a group, `expand_size`
        times, in row order, with their grids."""
        tokens = image_grid_thw.prod(-1)
        row_ends = (input_ids == self.config.image_token_id).sum(-1).cumsum(0)
        image_row = torch.searchsorted(row_ends, tokens.cumsum(0).to(row_ends.device, row_ends.dtype))
        count = tokens.shape[0]
        copies = torch.arange(expand_size, device=row_ends.device)[:, None]
        key = (image_row[None] * expand_size + copies) * count + torch.arange(count, device=row_ends.device)
        images = key.flatten().argsort() % count  # (row, copy, image) order
        return pixel_values[images.to(pixel_values.device)], image_grid_thw[images.to(image_grid_thw.device)]

    def _lm_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Chameleon's logits: the image-code tokens are never predicted (their logits at the dtype's minimum)."""
        logits = self.lm_head(hidden)
        logits[..., self.model.vocabulary_mapping.image_tokens] = torch.finfo(logits.dtype).min
        return logits

    def _grid_region(self, image: torch.Tensor) -> torch.Tensor:
        """The central square of `(3, H, W)`: the processor resizes the shorter side and centre-crops a square, so
        the VQ grid covers that square only."""
        height, width = image.shape[-2:]
        side = min(height, width)
        top, left = (height - side) // 2, (width - side) // 2
        return image[:, top : top + side, left : left + side]

    def _encode_crops(self, crops: torch.Tensor) -> torch.Tensor:
        """Crops `(n, 3, S, S)` in [0, 1], normalised as ChameleonImageProcessor does, through the VQ encoder and
        the code tokens' embeddings, mean-pooled over the S/cell x S/cell codes: `(n, hidden)`."""
        mean = torch.tensor(self.config.image_mean, device=crops.device)[:, None, None]
        std = torch.tensor(self.config.image_std, device=crops.device)[:, None, None]
        pixel_values = (crops * 255 * CHAMELEON_RESCALE - mean) / std
        features = self.model.get_image_features(pixel_values.to(self.model.vqmodel.dtype))
        return features.pooler_output.mean(1)


__all__ = ["VedasChameleonConfig", "VedasChameleonForConditionalGeneration", "VedasChameleonDecoderLayer"]
