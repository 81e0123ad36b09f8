"""Training under DeepSpeed ZeRO-3 or FSDP (and any data-parallel engine): whole models, full-size weights.

Under ZeRO-3 every rank holds a slice of each weight (`param.ds_shape` is the real shape, `param.shape` is 0) and a
module's weights are gathered from all ranks while it runs. So:

* a model must be built whole, outside transformers' ZeRO-3 init (:func:`outside_zero3_init`): the Trainer
  partitions it when it prepares the engine, and a model built inside the init would be born as empty slices;
* shapes are read with :func:`param_shape`;
* a checksum or a saved checkpoint needs the gathered weights (:func:`full_parameter_checksum`,
  :func:`gathered_state_dict`), and every rank must take part in the gathering;
* a model that runs on one rank alone (the final evaluation) is a whole copy (:func:`whole_copy`).

FSDP shards the same way (flat parameters per wrapped unit): :func:`is_partitioned` and the checksum cover it too.
"""

from __future__ import annotations

import contextlib
import hashlib

import torch


def zero3_enabled() -> bool:
    """Whether transformers sees a DeepSpeed ZeRO-3 configuration (set by the TrainingArguments or accelerate)."""
    from transformers.integrations import is_deepspeed_zero3_enabled

    return is_deepspeed_zero3_enabled()


@contextlib.contextmanager
def outside_zero3_init():
    """Models built (`from_pretrained`, `_from_config`, `Model(config)`) inside are whole, even when a ZeRO-3
    configuration is registered. transformers' `unset_hf_deepspeed_config` turns its ZeRO-3 init off; the config
    that was registered (by the TrainingArguments or accelerate's DeepSpeed plugin) is registered again on exit."""
    from transformers.integrations import deepspeed as hf_deepspeed

    registered = hf_deepspeed._hf_deepspeed_config_weak_ref
    hf_deepspeed.unset_hf_deepspeed_config()
    try:
        yield
    finally:
        hf_deepspeed._hf_deepspeed_config_weak_ref = registered


def param_shape(param: torch.Tensor) -> torch.Size:
    """The full shape of a weight, also when ZeRO-3 holds only this rank's slice of it."""
    return getattr(param, "ds_shape", None) or param.shape


def _fsdp_modules(model) -> list:
    from torch.distributed.fsdp import FullyShardedDataParallel

    return [module for module in model.modules() if isinstance(module, FullyShardedDataParallel)]


def is_partitioned(model) -> bool:
    """Whether ZeRO-3 or FSDP shards the model's weights across ranks (then every rank must run its forwards)."""
    return any(hasattr(param, "ds_id") for param in model.parameters()) or bool(_fsdp_modules(model))


@contextlib.contextmanager
def _fsdp_full_params(model):
    """The full weights of an FSDP-wrapped model inside (every rank must enter); a no-op for other models."""
    if not _fsdp_modules(model):
        yield
        return
    from torch.distributed.fsdp import FullyShardedDataParallel

    with FullyShardedDataParallel.summon_full_params(model, writeback=False, recurse=True):
        yield


@contextlib.contextmanager
def gathered(params):
    """The full values of ZeRO-3-partitioned `params` inside (read only); a no-op for ordinary tensors. Every rank
    must enter it (it all-gathers)."""
    params = [p for p in params if hasattr(p, "ds_id")]
    if not params:
        yield
        return
    import deepspeed

    with deepspeed.zero.GatheredParameters(params, modifier_rank=None):
        yield


def full_parameter_checksum(model) -> tuple[float, str, int]:
    """(sum of |p|, sha256 of the raw bytes, number of values) over all parameters in name order, on the full
    weights: data-parallel ranks must agree. Under ZeRO-3 or FSDP every rank must call it (it gathers); the names
    are the model's own (without FSDP's wrapper prefixes), so the digest is the one of the same weights unsharded."""
    digest, total, count = hashlib.sha256(), 0.0, 0
    with _fsdp_full_params(model):
        named = sorted((name.replace("_fsdp_wrapped_module.", ""), param) for name, param in model.named_parameters())
        for name, param in named:
            with gathered([param]):
                data = param.detach().to("cpu", copy=True).reshape(-1)  # a copy: FSDP frees the gathered storage
                digest.update(name.encode())
                digest.update(data.view(torch.uint8).numpy().tobytes())
                total += data.double().abs().sum().item()
                count += data.numel()
    return total, digest.hexdigest(), count


def gathered_state_dict(trainer) -> dict[str, torch.Tensor]:
    """The full state dict of the trained model (under ZeRO-3 on the main process only; empty on the others).
    Every rank must call it: `accelerator.get_state_dict` gathers the slices."""
    return trainer.accelerator.get_state_dict(trainer.model_wrapped)


def whole_copy(model, state_dict: dict[str, torch.Tensor]):
    """A whole (unpartitioned) model of the same class and config as `model` (a PEFT model: the same adapters on a
    whole base), holding `state_dict`: evaluation and `save_pretrained` on one rank then need no other rank.
    Raises if a weight is missing or unexpected."""
    dtype = next(iter(state_dict.values())).dtype
    base = model.get_base_model() if hasattr(model, "peft_config") else model
    with outside_zero3_init():  # whole (PEFT too: its own ZeRO-3 path is CUDA-only)
        copy = type(base)._from_config(base.config, dtype=dtype)
        copy.generation_config = base.generation_config
        if hasattr(model, "peft_config"):
            from peft import get_peft_model

            copy = get_peft_model(copy, model.peft_config[model.active_adapter])
    missing, unexpected = copy.load_state_dict(state_dict, strict=False)
    tied = _tied_names(copy)
    missing = [key for key in missing if key not in tied]
    if missing or unexpected:
        raise RuntimeError(f"the gathered state dict does not fit {type(model).__name__}: missing {missing[:5]}, "
                           f"unexpected {unexpected[:5]}")
    return copy.train(model.training)


def _tied_names(model) -> set[str]:
    """The names of the parameters that share their storage with another one (tied embeddings)."""
    names: dict[int, list[str]] = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        names.setdefault(param.data_ptr(), []).append(name)
    return {name for group in names.values() if len(group) > 1 for name in group}


def empty_tensors(state_dict: dict[str, torch.Tensor]) -> list[str]:
    """Names of the tensors with no values (what a state dict of ZeRO-3 slices holds)."""
    return [name for name, tensor in state_dict.items() if tensor.numel() == 0]
