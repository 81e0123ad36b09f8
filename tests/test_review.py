"""Fidelity checks from the code review (issue 13): gradients under gradient checkpointing, the literal Eq. 11
option, config checks."""

import pytest
import torch

from conftest import BACKBONES, load_vedas, perturb_vedas
from test_latent import training_batch


@pytest.fixture(scope="module", params=BACKBONES)
def model_and_processor(request, vedas_dirs):
    model, processor = load_vedas(vedas_dirs[request.param])
    return perturb_vedas(model), processor


def _gradients(model, batch, checkpointing=None):
    """Every parameter's gradient after one training forward and backward (with gradient checkpointing when
    `checkpointing` is `{"use_reentrant": ...}`), and the losses."""
    model.zero_grad()
    model.train()
    if checkpointing is not None:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=checkpointing)
    try:
        out = model(**batch)
        out.loss.backward()
    finally:
        if checkpointing is not None:
            model.gradient_checkpointing_disable()
        model.eval()
    grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    return grads, (out.ce_loss.detach(), out.recon_loss.detach())


@pytest.mark.parametrize("reentrant", [False, True])
def test_gradient_checkpointing_gives_the_same_gradients(model_and_processor, reentrant):
    """All parameter gradients, not only the losses, equal those without checkpointing: the replay weights reach
    q_proj / k_proj through the saliency, and the router, e(d) and token_sr (crop images, recon on) train."""
    model, processor = model_and_processor
    batch = training_batch(model, processor)
    reference, ref_losses = _gradients(model, batch)
    names = list(reference)
    for part in ("self_attn.q_proj", "self_attn.k_proj", "depth_router", "depth_step_embed", "token_sr"):
        assert any(part in n and reference[n].abs().sum() > 0 for n in names), part
    grads, losses = _gradients(model, batch, checkpointing={"use_reentrant": reentrant})
    torch.testing.assert_close(losses, ref_losses, atol=1e-5, rtol=1e-5)
    assert sorted(grads) == sorted(reference), set(reference) ^ set(grads)
    # relative to each gradient's scale: the saliency path to q_proj / k_proj is small next to the attention's own
    far = {}
    for name in names:
        error = float((grads[name] - reference[name]).abs().max() / reference[name].abs().max().clamp(min=1e-12))
        if error > 1e-4:
            far[name] = error
    assert not far, far
