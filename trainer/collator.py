"""The curriculum collator: unified samples -> model inputs in the latent layout of the current stage.

One row of a batch (docs/design.md, "Sequence layout"; the block's tokens are `config.latent_block_ids`, the
layout `VedasForConditionalGeneration.forward` expects)::

    [pad ...] prompt  <|start_latent|> ([<|replay|>] * R + [<|latent|>]) * T_row <|end_latent|>  target <|im_end|> [pad ...]
    labels:   -100 ...................................................................  target <|im_end|>  -100 ...

* stage 0 (and ``mode="cot"``): no latent block, the target is the whole CoT then ``answer : X``;
* stage k in [1, max_latent_stage): the first ``min(k, n_steps)`` steps are replaced by ``min(k, n_steps) * c``
  latent slots, the target is the remaining steps then ``answer : X``;
* stage >= max_latent_stage: every step is latent and every row gets ``max_latent_stage * c`` slots ("pad to max",
  as Coconut does), so the latent budget does not leak how many steps a sample had;
* ``mode="nocot"``: prompt then ``answer : X`` (the No-CoT baseline).

Prompts are left-padded so that every row's prompt ends, and its ``<|start_latent|>`` sits, in the same column;
targets are right-padded. Steps are merged to ``max_latent_stage`` chunks with :func:`vedas_trainer.data.merge_steps`.
"""

from __future__ import annotations

import logging
import random
from typing import Any, Mapping, Sequence

import numpy as np
import torch
from PIL import Image

from .data import MAX_PIXELS, MIN_PIXELS, load_image, merge_steps
from .prompting import build_prompt, format_answer, format_cot
from .samples import DataError, SampleCheck

__all__ = ["VedasCollator", "MODES"]

logger = logging.getLogger(__name__)

MODES = ("latent", "cot", "nocot")
END_OF_TURN_TOKEN = "<|im_end|>"




def _sample_id(sample: Mapping[str, Any], position: int) -> str:
    sample_id = sample.get("id") if isinstance(sample, Mapping) else None
    return str(sample_id) if sample_id not in (None, "") else f"<batch position {position}>"


def _size_field(size, name: str):
    # image_processor.size is a dict in saved configs and a SizeDict object once loaded
    return size.get(name) if isinstance(size, Mapping) else getattr(size, name, None)


def _pixel_bounds(processor) -> tuple[int, int]:
    """(min_pixels, max_pixels) the collator normalises images to before the processor sees them.

    The lower bound is the processor's own minimum, so tiny images are upsampled once and the crops the model
    takes for self-distillation come from the same picture the vision tower sees. The upper bound is never
    below the data loader's MAX_PIXELS: images from `load_vedas_dataset` pass unchanged (crops keep their full
    resolution), while a huge image handed in directly is shrunk instead of becoming a multi-hundred-MB
    `crop_images` tensor.
    """
    image_processor = getattr(processor, "image_processor", None)
    size = getattr(image_processor, "size", None) or {}
    low = getattr(image_processor, "min_pixels", None) or _size_field(size, "shortest_edge") or MIN_PIXELS
    high = getattr(image_processor, "max_pixels", None) or _size_field(size, "longest_edge") or MAX_PIXELS
    low = int(low)
    return low, max(int(high), MAX_PIXELS, low)


def _as_uint8_chw(image: Image.Image) -> torch.Tensor:
    """A PIL image as the (3, H, W) uint8 tensor the model crops for self-distillation."""
    array = np.asarray(image.convert("RGB"), dtype=np.uint8)
    return torch.from_numpy(array.copy()).permute(2, 0, 1).contiguous()


class VedasCollator:
    """Builds training batches for a curriculum stage.

    Args:
        processor: the checkpoint's processor (Qwen2-VL / Qwen2.5-VL processor with the chat template).
        config: the model's `VedasConfig` (special-token ids and R = `config.replay_tokens_per_step`).
        stage: the initial curriculum stage (changed by `set_stage`, usually through `CurriculumCallback`).
        max_latent_stage: the last stage; samples' steps are merged to at most this many.
        latents_per_step: c, latent slots per replaced step.
        uniform_prob: per sample, the probability of training it at a stage drawn uniformly from
            [0, max_latent_stage] instead of the current one. The draw is seeded by (seed, epoch, sample id), so a
            resumed run and every data-parallel rank draw the same stages.
        mode: `"latent"` (the curriculum), `"cot"` (explicit CoT at every stage) or `"nocot"` (answer only).
        seed: seed of the `uniform_prob` draws.
        max_length: limit on the real tokens of a row (prompt, latent block and target). A prompt or latent block
            that does not fit raises (images cannot be truncated); a target that does not fit is cut at the end.

    The stage and epoch live in a shared-memory tensor: DataLoader workers (persistent ones included) see
    `set_stage` / `set_epoch` calls made in the main process before the epoch's iterator starts.
    """

    def __init__(
        self,
        processor,
        config,
        stage: int = 0,
        max_latent_stage: int = 4,
        latents_per_step: int = 1,
        uniform_prob: float = 0.0,
        mode: str = "latent",
        seed: int = 0,
        max_length: int | None = None,
    ):
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        if not isinstance(max_latent_stage, int) or max_latent_stage < 1:
            raise ValueError(f"max_latent_stage must be an integer >= 1, got {max_latent_stage!r}")
        if not isinstance(latents_per_step, int) or latents_per_step < 1:
            raise ValueError(f"latents_per_step (c) must be an integer >= 1, got {latents_per_step!r}")
        if not 0.0 <= uniform_prob <= 1.0:
            raise ValueError(f"uniform_prob must be in [0, 1], got {uniform_prob!r}")
        if max_length is not None and max_length < 1:
            raise ValueError(f"max_length must be >= 1 or None, got {max_length!r}")
        self.processor = processor
        self.tokenizer = processor.tokenizer
        self.config = config
        self.max_latent_stage = max_latent_stage
        self.latents_per_step = latents_per_step
        self.uniform_prob = float(uniform_prob)
        self.mode = mode
        self.seed = seed
        self.max_length = max_length

        ids = config.special_token_ids()
        if mode == "latent" and any(value is None for value in ids.values()):
            raise ValueError(
                f"The config has no latent special-token ids ({ids}); convert the base checkpoint first "
                f"(examples/convert_base.py)."
            )
        end_of_turn = self.tokenizer.convert_tokens_to_ids(END_OF_TURN_TOKEN)
        if end_of_turn is None or end_of_turn == self.tokenizer.unk_token_id:
            end_of_turn = self.tokenizer.eos_token_id
        self.end_of_turn_id = end_of_turn
        self.pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else end_of_turn
        self.min_pixels, self.max_pixels = _pixel_bounds(processor)
        # Special-token strings inside sample text would be tokenised as control tokens: a "<|latent|>" in a
        # rationale becomes a latent slot, an "<|image_pad|>" in a question breaks the image placeholder count.
        self._control_strings = sorted(
            {token.content for token in getattr(self.tokenizer, "added_tokens_decoder", {}).values() if token.special}
            | set(getattr(self.tokenizer, "all_special_tokens", []))
        )
        # [stage, epoch] in shared memory, so that DataLoader workers (forked or spawned, persistent or not) read
        # what the main process set before the epoch's iterator started
        self._state = torch.zeros(2, dtype=torch.long)
        try:
            self._state.share_memory_()
        except RuntimeError as err:  # no shared memory (e.g. a tiny /dev/shm): fine without persistent workers
            logger.warning("VedasCollator: no shared memory (%s); use dataloader_persistent_workers=False.", err)
        self.set_stage(stage)
        self._warned_truncation = False

    # ------------------------------------------------------------------ curriculum state
    @property
    def stage(self) -> int:
        return int(self._state[0])

    @property
    def epoch(self) -> int:
        return int(self._state[1])

    def set_stage(self, stage: int) -> None:
        if not isinstance(stage, (int, np.integer)) or stage < 0:
            raise ValueError(f"stage must be an integer >= 0, got {stage!r}")
        self._state[0] = int(stage)

    def set_epoch(self, epoch: int) -> None:
        """The epoch seeds the `uniform_prob` draws (a new draw every epoch, reproducible on resume)."""
        self._state[1] = int(epoch)

    def num_latent_slots(self, stage: int, num_steps: int) -> tuple[int, int]:
        """`(steps replaced, T_row latent slots)` of a sample with `num_steps` (merged) steps at `stage`."""
        if stage <= 0:
            return 0, 0
        if stage >= self.max_latent_stage:  # everything latent, padded to the maximum budget
            return num_steps, self.max_latent_stage * self.latents_per_step
        replaced = min(stage, num_steps)
        return replaced, replaced * self.latents_per_step

    def sample_stage(self, sample: Mapping[str, Any], position: int = 0) -> int:
        """The stage a sample is trained at in this batch (the current stage, or a seeded uniform draw)."""
        if self.mode != "latent":
            return 0
        if self.uniform_prob > 0.0:
            # str seeds are hashed with sha512 by `random`, independent of PYTHONHASHSEED and of batch composition
            rng = random.Random(f"vedas-uniform/{self.seed}/{self.epoch}/{_sample_id(sample, position)}")
            if rng.random() < self.uniform_prob:
                return rng.randint(0, self.max_latent_stage)
        return self.stage

    # ------------------------------------------------------------------ one sample
    def _normalised_image(self, image, *, field: str) -> Image.Image:
        """A PIL image handed in with a sample, as the processor needs it: RGB, first frame, sides >= 28 px, aspect
        <= 200, within the collator's pixel bounds (a no-op for images from `load_vedas_dataset`)."""
        if not isinstance(image, Image.Image):
            raise DataError(
                f"expected a PIL image, got {type(image).__name__} {image!r:.80} (decode paths and bytes with "
                f"vedas_trainer.data.load_image or load the data with load_vedas_dataset)",
                field=field,
            )
        return load_image(image, field=field, min_pixels=self.min_pixels, max_pixels=self.max_pixels)

    def _checked_sample(self, sample, position: int) -> dict[str, Any]:
        """A validated copy of one sample with its images normalised; DataError naming the sample and field.

        The rules are `SampleCheck`'s (`vedas_trainer.samples`), the ones the data adapters apply to raw rows, so a
        sample from `load_vedas_dataset` passes; the collator applies them again because it also takes hand-made
        samples (evaluation sets, the synthetic task, user code), where a wrong type would otherwise fail deep
        inside the tokenizer or image processor, or, worse, train on something silently wrong (a steps string split
        into characters, an answer of None rendered as "None"). On top, it refuses the tokenizer's control-token
        strings inside text.
        """
        check = SampleCheck(sample_id=f"<batch position {position}>", control_strings=self._control_strings)
        if not isinstance(sample, Mapping):
            raise check.error(None, f"expected a sample dict, got {type(sample).__name__}")
        check.sample_id = check.identifier(sample.get("id")) or check.sample_id
        # the No-CoT baseline never reads the steps
        return check.sample(sample, self._normalised_image, need_steps=self.mode != "nocot")

    def _target_text(self, sample, stage: int) -> tuple[str, int]:
        """The supervised text after the prompt (or after `<|end_latent|>`) and T_row."""
        if self.mode == "nocot":
            return format_answer(sample["answer"]), 0
        steps = merge_steps(sample["steps"], self.max_latent_stage)
        replaced, slots = self.num_latent_slots(stage, len(steps))
        return format_cot(steps[replaced:], sample["answer"]), slots

    def _encode_prompts(self, samples) -> tuple[list[dict[str, Any]], dict[str, Any]]:
        """All prompts of the batch in ONE processor call (images are preprocessed together, which is much faster
        than one call per sample); returns per-row prompt ids/types and the batch's image tensors."""
        images = [sample["images"] for sample in samples]
        prompts = [
            build_prompt(self.processor, sample["question"], sample.get("choices"), num_images=len(sample_images))
            for sample, sample_images in zip(samples, images)
        ]
        flat_images = [image for sample_images in images for image in sample_images]
        encoded = self.processor(
            text=prompts, images=flat_images or None, padding=True, padding_side="left", return_tensors="pt"
        )
        mm_types = encoded.get("mm_token_type_ids")
        if mm_types is None:  # older processors: derive it, the model needs it with images
            mm_types = (encoded["input_ids"] == self.config.image_token_id).long()
        rows = []
        for i, sample_images in enumerate(images):
            keep = encoded["attention_mask"][i].bool()
            rows.append({
                "prompt_ids": encoded["input_ids"][i][keep],
                "prompt_types": mm_types[i][keep],
                "crop_images": [_as_uint8_chw(image) for image in sample_images],
            })
        return rows, {"pixel_values": encoded.get("pixel_values"), "image_grid_thw": encoded.get("image_grid_thw")}

    def _encode(self, sample, position: int, row: dict[str, Any]) -> dict[str, Any]:
        """Adds the latent block and the supervised target to a row whose prompt is already encoded."""
        sample_id = _sample_id(sample, position)
        prompt_ids = row["prompt_ids"]
        if self.max_length is not None and len(prompt_ids) > self.max_length:
            raise ValueError(
                f"Sample {sample_id!r}: its prompt is {len(prompt_ids)} tokens (images included), longer than "
                f"max_length={self.max_length}. Raise max_length or lower the processor's max_pixels."
            )
        target_text, slots = self._target_text(sample, self.sample_stage(sample, position))
        block = self.config.latent_block_ids(num_steps=slots) if slots else []  # the layout's one definition
        target = self.tokenizer(target_text, add_special_tokens=False)["input_ids"] + [self.end_of_turn_id]
        if self.max_length is not None:
            room = self.max_length - len(prompt_ids) - len(block)
            if room < 0:
                raise ValueError(
                    f"Sample {sample_id!r}: prompt ({len(prompt_ids)} tokens) plus its latent block ({len(block)}) "
                    f"exceeds max_length={self.max_length}."
                )
            if len(target) > room:
                if not self._warned_truncation:
                    logger.warning(
                        "Sample %r: target cut from %d to %d tokens to fit max_length=%d (warned once).",
                        sample_id, len(target), room, self.max_length,
                    )
                    self._warned_truncation = True
                target = target[:room]
        return {
            **row,
            "suffix_ids": torch.tensor(block + target, dtype=prompt_ids.dtype),
            "num_block": len(block),
        }

    # ------------------------------------------------------------------ batch
    def __call__(self, samples: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
        if not samples:
            raise ValueError("VedasCollator got an empty batch.")
        samples = [self._checked_sample(sample, position) for position, sample in enumerate(samples)]
        prompts, images = self._encode_prompts(samples)
        rows = [self._encode(sample, position, row) for position, (sample, row) in enumerate(zip(samples, prompts))]
        prompt_width = max(len(row["prompt_ids"]) for row in rows)
        suffix_width = max(len(row["suffix_ids"]) for row in rows)
        batch, width = len(rows), prompt_width + suffix_width
        type_dtype = rows[0]["prompt_types"].dtype

        input_ids = torch.full((batch, width), self.pad_id, dtype=torch.long)
        attention_mask = torch.zeros((batch, width), dtype=torch.long)
        labels = torch.full((batch, width), -100, dtype=torch.long)
        mm_token_type_ids = torch.zeros((batch, width), dtype=type_dtype)
        for i, row in enumerate(rows):
            # left-pad the prompt so that it ends (and <|start_latent|> starts) in column `prompt_width` in every row
            first = prompt_width - len(row["prompt_ids"])
            input_ids[i, first:prompt_width] = row["prompt_ids"]
            mm_token_type_ids[i, first:prompt_width] = row["prompt_types"]
            end = prompt_width + len(row["suffix_ids"])
            input_ids[i, prompt_width:end] = row["suffix_ids"]
            attention_mask[i, first:end] = 1
            # the latent block (markers, replay and latent slots) is never supervised, the target after it is
            labels[i, prompt_width + row["num_block"] : end] = row["suffix_ids"][row["num_block"] :]

        return {
            "input_ids": input_ids,
            "attention_mask": attention_mask,
            "labels": labels,
            "mm_token_type_ids": mm_token_type_ids,
            "pixel_values": images["pixel_values"],
            "image_grid_thw": images["image_grid_thw"],
            "crop_images": [row["crop_images"] for row in rows],
        }
