"""Small helpers shared by the tests and the benchmarks: deterministic images, processor inputs, and non-trivial
values for the Vedas modules (with the default depth_gate_init = 0, e(d) = 0 makes routing depth scaling a
no-op)."""

import os
import socket

import torch
from PIL import Image


def quadrant_image(size=(112, 84), seed=0):
    """A deterministic RGB image of coloured 14 x 14 blocks (`size` is (width, height))."""
    generator = torch.Generator().manual_seed(seed)
    w, h = size
    pixels = (torch.rand(h // 14 + 1, w // 14 + 1, 3, generator=generator) * 255).to(torch.uint8)
    pixels = pixels.repeat_interleave(14, 0).repeat_interleave(14, 1)[:h, :w]
    return Image.fromarray(pixels.numpy())


def make_inputs(processor, questions, images):
    """Processor inputs for a batch: each sample is one image (or a list of images) and a question."""
    texts, flat_images = [], []
    for question, sample_images in zip(questions, images):
        sample_images = sample_images if isinstance(sample_images, list) else [sample_images]
        content = [{"type": "image"} for _ in sample_images] + [{"type": "text", "text": question}]
        texts.append(processor.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True))
        flat_images.extend(sample_images)
    return processor(text=texts, images=flat_images or None, return_tensors="pt", padding=True)


def two_prompts(processor):
    """A left-padded batch of two prompts whose images differ in size (and so in visual token count)."""
    return make_inputs(
        processor, ["what colour is the arrow in the last cell ?", "which ?"],
        [quadrant_image((112, 84), seed=1), quadrant_image((56, 112), seed=2)],
    )


def no_eos(model):
    """generate() options that keep every row decoding to max_new_tokens, so that runs line up token by token."""
    eos = model.generation_config.eos_token_id
    return {"suppress_tokens": eos if isinstance(eos, list) else [eos]}


def answer_log_probs(model, inputs, sequences, num_new):
    """Teacher-forced log-probabilities of the last `num_new` tokens of each compact sequence `(batch * n, l)` (n per
    prompt, in prompt order), from latent forwards of the expanded layout: `(batch * n, num_new)`."""
    batch, prompt = inputs["input_ids"].shape
    extra = sequences.shape[1] - prompt
    mask = torch.cat([inputs["attention_mask"], torch.ones(batch, extra, dtype=torch.long)], 1)
    types = torch.cat([inputs["mm_token_type_ids"], torch.zeros(batch, extra, dtype=torch.int)], 1)
    rows = sequences.view(batch, -1, sequences.shape[1])
    result = []
    for copy in range(rows.shape[1]):  # one forward per returned sequence of each prompt, with the prompts' images
        ids, layout_mask, layout_types = model.expand_latent_sequences(rows[:, copy], mask, types)
        with torch.no_grad():
            logits = model(input_ids=ids, attention_mask=layout_mask, mm_token_type_ids=layout_types,
                           pixel_values=inputs["pixel_values"], image_grid_thw=inputs["image_grid_thw"]).logits
        log_probs = logits[:, -num_new - 1 : -1].float().log_softmax(-1)
        result.append(log_probs.gather(-1, ids[:, -num_new:, None]).squeeze(-1))
    return torch.stack(result, 1).flatten(0, 1)


def perturb_vedas(model, seed=0, gate=0.5, check_init=True):
    """Give the router and e(d) non-trivial values so that routing really changes the outputs.

    Meant for untrained (converted or freshly built) models. With `check_init`, e(d) must first hold exactly
    `config.depth_gate_init`, what every loading path initialises it to: overwriting it unchecked once hid that
    some paths left it at zero or as uninitialised memory. Pass `check_init=False` for a model already perturbed
    or trained."""
    if check_init:
        gates = {name: param for name, param in model.named_parameters() if "depth_step_embed" in name}
        for name, param in gates.items():
            if not torch.equal(param.detach(), torch.full_like(param, model.config.depth_gate_init)):
                raise AssertionError(
                    f"{name} holds values in [{param.min().item():.3g}, {param.max().item():.3g}], not "
                    f"depth_gate_init={model.config.depth_gate_init}: this model's e(d) was not initialised."
                )
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "depth_step_embed" in name:
                param.copy_(gate + 0.1 * torch.randn(param.shape, generator=generator))
            elif "depth_router" in name:
                param.copy_(torch.randn(param.shape, generator=generator))
    return model


def eager_saliency(model, inputs):
    """The reference for the first latent step's saliency, from the backbone's eager attention maps: the attention of
    `<|start_latent|>` (appended to the one-sample prompt) to each visual token, averaged over heads, then over layers.
    Returns a (num_visual_tokens,) float tensor; the model must be loaded with `attn_implementation="eager"`."""
    ids = torch.cat([inputs["input_ids"], torch.tensor([[model.config.start_latent_token_id]])], 1)
    with torch.no_grad():
        maps = model.model(
            input_ids=ids, attention_mask=torch.ones_like(ids), pixel_values=inputs["pixel_values"],
            image_grid_thw=inputs["image_grid_thw"], output_attentions=True,
            mm_token_type_ids=torch.cat([inputs["mm_token_type_ids"], torch.zeros_like(ids[:, :1]).int()], 1),
        ).attentions
    visual = (ids[0] == model.config.image_token_id).nonzero().squeeze(1)
    return torch.stack([m[0, :, -1, visual].float().mean(0) for m in maps]).mean(0)


def child_env(scratch, **overrides) -> dict[str, str]:
    """The environment for a child training process (train.py under accelerate/torchrun): one thread, offline, its
    own remote-code module cache under `scratch`, and none of this process's rendezvous variables (a pytest or
    harness started under torchrun/accelerate must not leak them into its children)."""
    env = {key: value for key, value in os.environ.items()
           if not key.startswith(("ACCELERATE_", "TORCHELASTIC_"))
           and key not in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")}
    env.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false",
               MPLBACKEND="Agg", HF_MODULES_CACHE=str(os.path.join(scratch, "hf_modules")), PYTHONNOUSERSITE="1")
    env.update(overrides)
    return env


def free_port() -> int:
    """A free TCP port on loopback (another distributed job may hold accelerate's default port 29500)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
