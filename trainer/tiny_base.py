"""Tiny Qwen2-VL / Qwen2.5-VL / Qwen3-VL / Chameleon *base* checkpoints built offline: config, random weights, a
byte-level BPE tokenizer trained with `tokenizers`, the backbone's real processor and a chat template.

Chameleon has no vision tower: a VQ-VAE turns each image into a grid of codes, which are tokens of the language
model's own vocabulary (`IMGIMG<code>Z`, listed in the config's `vocabulary_map`); its tokenizer holds them, and
its processor writes `<racm3:break> <image> x n <eoss>` for each image (`build_chameleon_parts`).

All sizes live in :class:`TinySizes`; tests use the defaults and the embedded training run passes larger values.
"""

import os
from dataclasses import asdict, dataclass, field

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import (
    ChameleonConfig,
    ChameleonForConditionalGeneration,
    ChameleonImageProcessor,
    ChameleonProcessor,
    PreTrainedTokenizerFast,
    Qwen2_5_VLConfig,
    Qwen2_5_VLForConditionalGeneration,
    Qwen2_5_VLProcessor,
    Qwen2VLConfig,
    Qwen2VLForConditionalGeneration,
    Qwen2VLImageProcessor,
    Qwen2VLProcessor,
    Qwen2VLVideoProcessor,
    Qwen3VLConfig,
    Qwen3VLForConditionalGeneration,
    Qwen3VLProcessor,
    Qwen3VLVideoProcessor,
)


BACKBONES = ("qwen2_vl", "qwen2_5_vl", "qwen3_vl", "chameleon")
# backbone -> (config class, model class, processor class, video processor class); the vision settings that differ
# (patch size, normalisation, the vision config's fields) are in `_vision_config` and `build_processor`
_CLASSES = {
    "qwen2_vl": (Qwen2VLConfig, Qwen2VLForConditionalGeneration, Qwen2VLProcessor, Qwen2VLVideoProcessor),
    "qwen2_5_vl": (Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration, Qwen2_5_VLProcessor, Qwen2VLVideoProcessor),
    "qwen3_vl": (Qwen3VLConfig, Qwen3VLForConditionalGeneration, Qwen3VLProcessor, Qwen3VLVideoProcessor),
    "chameleon": (ChameleonConfig, ChameleonForConditionalGeneration, ChameleonProcessor, None),
}
# Qwen3-VL's vision tower: 16-pixel patches (merged cells of 32 pixels) and inputs normalised with mean = std = 0.5
QWEN3_PATCH_SIZE = 16
QWEN3_IMAGE_MEAN = QWEN3_IMAGE_STD = [0.5, 0.5, 0.5]
# the Qwen2-VL special tokens, in Qwen's order
QWEN_SPECIAL_TOKENS = [
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|image_pad|>",
    "<|video_pad|>",
]
# Qwen2-VL's chat template without the default system prompt (short prompts matter for a tiny model)
CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'text' %}{{ content['text'] }}{% endif %}{% endfor %}{% endif %}"
    "<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
GENERIC_WORDS = (
    "the answer is question choices choice option image picture what which where how many colour color "
    "a b c d e yes no left right up down above below row column step start final cell arrow follow move "
    "0 1 2 3 4 5 6 7 8 9 . , : ? ( ) - ! ' \""
).split()


@dataclass
class TinySizes:
    """Sizes of a tiny base model. `mrope_section` must sum to head_dim / 2."""

    hidden_size: int = 64
    intermediate_size: int = 256
    num_hidden_layers: int = 4
    num_attention_heads: int = 4
    num_key_value_heads: int = 2
    mrope_section: list[int] = field(default_factory=lambda: [4, 2, 2])
    rope_theta: float = 10000.0
    vision_depth: int = 2
    vision_embed_dim: int = 64
    vision_heads: int = 4
    vision_mlp_ratio: int = 2
    tokenizer_vocab_size: int = 600
    spare_embedding_rows: int = 16
    min_pixels: int = 28 * 28 * 4
    max_pixels: int = 28 * 28 * 256
    tie_word_embeddings: bool = True
    # Chameleon: square images of `image_size` pixels; the VQ encoder halves the side len(multiplier) - 1 times
    image_size: int = 32
    vq_base_channels: int = 32  # a multiple of 32 (the encoder's GroupNorm has 32 groups)
    vq_channel_multiplier: list[int] = field(default_factory=lambda: [1, 1, 2])
    vq_codes: int = 32
    vq_embed_dim: int = 8


def training_corpus(extra_words=()) -> list[str]:
    """Text to train the tokenizer on: the embedded task's vocabulary plus generic words."""
    from .synthetic import synthetic_vocabulary

    words = list(dict.fromkeys([*synthetic_vocabulary(), *GENERIC_WORDS, *extra_words]))
    # each word alone and in a sentence, so BPE learns both word-initial (" red") and bare forms
    return [" ".join(words)] * 8 + [f" {w}" for w in words] * 4 + words * 4


def build_tokenizer(sizes: TinySizes, corpus: list[str] | None = None, special_tokens: list[str] | None = None,
                    named_tokens: dict[str, str] | None = None, chat_template: str = CHAT_TEMPLATE,
                    **tokens) -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer: any text encodes, and the task's words become single tokens. `special_tokens`
    (default: Qwen's) take the first ids; `named_tokens` become attributes (`tokenizer.image_token`, ...)."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=sizes.tokenizer_vocab_size,
        special_tokens=special_tokens or QWEN_SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(corpus or training_corpus(), trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        extra_special_tokens=named_tokens or {"image_token": "<|image_pad|>", "video_token": "<|video_pad|>"},
        model_max_length=32768,
        chat_template=chat_template,
        **tokens,
    )


# ------------------------------------------------------------------------------------------------------- Chameleon
# Chameleon's own marker tokens: an image is `<racm3:break>`, its codes, then `<eoss>`; `<image>` is the placeholder
# the processor expands and the model fills with the code embeddings; `<reserved08706>` ends a chat prompt (sep)
CHAMELEON_MARKERS = {"image_token": "<image>", "boi_token": "<racm3:break>", "eoi_token": "<eoss>"}
CHAMELEON_SEP = "<reserved08706>"
CHAMELEON_CHAT_TEMPLATE = CHAT_TEMPLATE.replace("<|vision_start|><|image_pad|><|vision_end|>", "<image>")


def chameleon_code_token(code: int) -> str:
    """The token of VQ code `code`, as Chameleon's vocabulary spells it: digits written as letters A-J between
    `IMGIMG` and `Z` (`ChameleonImageVocabularyMapping.bpe2img` reads them back): 12 -> `IMGIMGBCZ`."""
    return "IMGIMG" + "".join(chr(ord("A") + int(digit)) for digit in str(code)) + "Z"


def chameleon_cell(sizes: TinySizes) -> int:
    """Pixels per side of one VQ code: the encoder halves the image side once per level but the last."""
    return 2 ** (len(sizes.vq_channel_multiplier) - 1)


def build_chameleon_parts(sizes: TinySizes, seed: int = 0):
    """The tokenizer (Qwen's chat tokens, Chameleon's markers and one token per VQ code), the ChameleonProcessor
    (images resized and centre-cropped to `image_size`, one `<image>` per code) and the ChameleonConfig of a tiny
    Chameleon, whose `vocabulary_map` is the tokenizer's vocabulary. Returns `(config, processor)`."""
    codes = [chameleon_code_token(code) for code in range(sizes.vq_codes)]
    tokenizer = build_tokenizer(
        sizes, special_tokens=[*QWEN_SPECIAL_TOKENS, *CHAMELEON_MARKERS.values(), CHAMELEON_SEP, *codes],
        named_tokens=CHAMELEON_MARKERS, chat_template=CHAMELEON_CHAT_TEMPLATE, sep_token=CHAMELEON_SEP,
    )
    side = sizes.image_size
    image_processor = ChameleonImageProcessor(size={"shortest_edge": side}, crop_size={"height": side, "width": side})
    grid = side // chameleon_cell(sizes)
    processor = ChameleonProcessor(image_processor=image_processor, tokenizer=tokenizer, image_seq_length=grid * grid)
    processor.chat_template = CHAMELEON_CHAT_TEMPLATE
    vq_config = dict(
        embed_dim=sizes.vq_embed_dim, num_embeddings=sizes.vq_codes, latent_channels=sizes.vq_embed_dim,
        resolution=side, base_channels=sizes.vq_base_channels, channel_multiplier=sizes.vq_channel_multiplier,
        num_res_blocks=1,
    )
    rows = (len(tokenizer) + sizes.spare_embedding_rows + 63) // 64 * 64
    ids = {token: tokenizer.convert_tokens_to_ids(token) for token in QWEN_SPECIAL_TOKENS}
    config = ChameleonConfig(
        vocab_size=rows, hidden_size=sizes.hidden_size, intermediate_size=sizes.intermediate_size,
        num_hidden_layers=sizes.num_hidden_layers, num_attention_heads=sizes.num_attention_heads,
        num_key_value_heads=sizes.num_key_value_heads, max_position_embeddings=4096,
        rope_parameters={"rope_type": "default", "rope_theta": sizes.rope_theta},
        vq_config=vq_config, vocabulary_map=dict(tokenizer.get_vocab()), bos_token_id=ids["<|endoftext|>"],
        eos_token_id=ids["<|im_end|>"], pad_token_id=ids["<|endoftext|>"],
        tie_word_embeddings=sizes.tie_word_embeddings,
    )
    return config, processor


def build_processor(backbone: str, tokenizer, sizes: TinySizes):
    """The backbone's real processor. Qwen3-VL's vision tower cuts 16-pixel patches (Qwen2-VL: 14), so its pixel
    bounds are scaled to keep the same numbers of merged cells, and it normalises with mean = std = 0.5."""
    _, _, processor_class, video_class = _classes(backbone)
    pixels, vision = {"min_pixels": sizes.min_pixels, "max_pixels": sizes.max_pixels}, {}
    if backbone == "qwen3_vl":
        pixels = {key: value * QWEN3_PATCH_SIZE**2 // 14**2 for key, value in pixels.items()}
        vision = {"patch_size": QWEN3_PATCH_SIZE, "image_mean": QWEN3_IMAGE_MEAN, "image_std": QWEN3_IMAGE_STD}
    image_processor = Qwen2VLImageProcessor(**pixels, **vision)
    if backbone == "qwen3_vl":  # its video processor takes the bounds as a size dict
        pixels = {"size": {"shortest_edge": pixels["min_pixels"], "longest_edge": pixels["max_pixels"]}}
    video_processor = video_class(**pixels, **vision)
    return processor_class(
        image_processor=image_processor, tokenizer=tokenizer, video_processor=video_processor, chat_template=CHAT_TEMPLATE
    )


def _classes(backbone: str) -> tuple:
    """(config, model, processor, video processor) classes of a backbone; a one-line error naming an unknown one."""
    if backbone not in _CLASSES:
        raise ValueError(f"backbone must be one of {BACKBONES}, got {backbone!r}.")
    return _CLASSES[backbone]


def build_config(backbone: str, tokenizer, sizes: TinySizes):
    config_class = _classes(backbone)[0]
    rows = len(tokenizer) + sizes.spare_embedding_rows
    rows = (rows + 63) // 64 * 64  # like Qwen: spare rows after the tokenizer's last id
    ids = {tok: tokenizer.convert_tokens_to_ids(tok) for tok in QWEN_SPECIAL_TOKENS}
    text = dict(
        vocab_size=rows,
        hidden_size=sizes.hidden_size,
        intermediate_size=sizes.intermediate_size,
        num_hidden_layers=sizes.num_hidden_layers,
        num_attention_heads=sizes.num_attention_heads,
        num_key_value_heads=sizes.num_key_value_heads,
        max_position_embeddings=4096,
        rope_parameters={"rope_type": "default", "rope_theta": sizes.rope_theta, "mrope_section": sizes.mrope_section},
        bos_token_id=ids["<|endoftext|>"],
        eos_token_id=ids["<|im_end|>"],
        pad_token_id=ids["<|endoftext|>"],
    )
    if backbone == "qwen3_vl":  # its head_dim is a field (default 128), and its M-RoPE interleaves t, h, w
        text.update(head_dim=sizes.hidden_size // sizes.num_attention_heads)
        text["rope_parameters"]["mrope_interleaved"] = True
    return config_class(
        text_config=text,
        vision_config=_vision_config(backbone, sizes),
        image_token_id=ids["<|image_pad|>"],
        video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"],
        vision_end_token_id=ids["<|vision_end|>"],
        tie_word_embeddings=sizes.tie_word_embeddings,
    )


def _vision_config(backbone: str, sizes: TinySizes) -> dict:
    """The vision tower's fields, which each backbone names differently; its output size is the LLM's hidden size."""
    if backbone == "qwen2_vl":
        return dict(depth=sizes.vision_depth, embed_dim=sizes.vision_embed_dim, hidden_size=sizes.hidden_size,
                    num_heads=sizes.vision_heads, mlp_ratio=sizes.vision_mlp_ratio)
    vision = dict(depth=sizes.vision_depth, hidden_size=sizes.vision_embed_dim, num_heads=sizes.vision_heads,
                  intermediate_size=sizes.vision_embed_dim * sizes.vision_mlp_ratio, out_hidden_size=sizes.hidden_size)
    if backbone == "qwen2_5_vl":
        return dict(vision, window_size=56, fullatt_block_indexes=[sizes.vision_depth - 1])
    # Qwen3-VL: a learned position grid (16 x 16, resampled to each image) and DeepStack features taken from the
    # first vision blocks, which the first decoder layers add at the image positions
    return dict(vision, patch_size=QWEN3_PATCH_SIZE, num_position_embeddings=256,
                deepstack_visual_indexes=list(range(min(2, sizes.vision_depth))))


def for_backbone(backbone: str, overrides: dict) -> dict:
    """Vedas settings written for Qwen2-VL's 28-pixel merged cells (the embedded default's `crop_resolution`), for
    `backbone`: a crop keeps its number of merged cells (56 = 2 cells of 28 -> 64 = 2 cells of 32 on Qwen3-VL)."""
    _classes(backbone)  # a one-line error for an unknown backbone
    cell = {"qwen3_vl": QWEN3_PATCH_SIZE * 2, "chameleon": chameleon_cell(TinySizes())}.get(backbone, 28)
    if "crop_resolution" not in overrides or cell == 28:
        return dict(overrides)
    return {**overrides, "crop_resolution": overrides["crop_resolution"] * cell // 28}


def build_tiny_base(backbone: str, out_dir: str | None = None, seed: int = 0, sizes: TinySizes | None = None):
    """Build (and, with `out_dir`, save) a tiny base model and its processor. Returns `(model, processor)`."""
    _classes(backbone)  # an unknown backbone fails before the tokenizer is trained
    sizes = sizes or TinySizes()
    if backbone == "chameleon":
        config, processor = build_chameleon_parts(sizes)
    else:
        tokenizer = build_tokenizer(sizes)
        processor = build_processor(backbone, tokenizer, sizes)
        config = build_config(backbone, tokenizer, sizes)
    torch.manual_seed(seed)
    model = _classes(backbone)[1](config).eval()
    model.generation_config.pad_token_id = config.get_text_config().pad_token_id
    model.generation_config.eos_token_id = config.get_text_config().eos_token_id
    if out_dir is not None:
        os.makedirs(out_dir, exist_ok=True)
        model.save_pretrained(out_dir)
        processor.save_pretrained(out_dir)
    return model, processor


__all__ = [
    "TinySizes", "build_tiny_base", "for_backbone", "build_tokenizer", "build_processor", "build_config", "asdict",
    "build_chameleon_parts", "chameleon_code_token", "chameleon_cell",
]
