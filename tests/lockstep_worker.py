"""One rank of tests/test_deepspeed.py's lockstep checks: `torchrun --nproc_per_node 2 lockstep_worker.py FOLDER OUT
[--zero3 | --fsdp]`.

Rank r trains on a batch of 1 + 2r latent steps, so the two ranks' batches need different numbers of latent passes
(and rank 0's columns run out before rank 1's last pass: it gains masked columns).
Each rank records, in call order, every module its training forward runs (what ZeRO-3 gathers weights for), the
parameters its backward reaches, and its loss, alone (before joining the group) and in the group; it writes them
to OUT/rank{r}.json. With --zero3 the group step is 2 training steps of a DeepSpeed ZeRO-3 engine instead (the
weights partitioned across the ranks): their losses are recorded; with --fsdp 2 forward/backward passes of the
model wrapped in torch FSDP (one unit per decoder layer), their losses and the full-weight checksum.
"""

import json
import sys
from pathlib import Path

import numpy
import torch
import torch.distributed as dist

from vedas_trainer.checkpoint import load_vedas
from vedas_trainer.testing import make_inputs, perturb_vedas, quadrant_image


def training_batch(model, processor, steps, seed):
    """A two-sample latent-layout batch with `steps` latent steps, a supervised answer and crop images."""
    cfg = model.config
    images = [quadrant_image((112, 84), seed=seed), quadrant_image((84, 84), seed=seed + 1)]
    inputs = make_inputs(processor, ["what colour ?", "which one is it ?"], images)
    ids, mask, types = model.build_latent_layout(
        inputs["input_ids"], inputs["attention_mask"], inputs["mm_token_type_ids"], steps, cfg.num_replay_tokens)
    answer = processor.tokenizer(" answer : red", add_special_tokens=False)["input_ids"]
    tail = torch.tensor([cfg.end_latent_token_id] + answer)[None].expand(ids.shape[0], -1)
    ids = torch.cat([ids, tail], 1)
    labels = torch.full_like(ids, -100)
    labels[:, -len(answer):] = ids[:, -len(answer):]
    crops = [[torch.from_numpy(numpy.array(image)).permute(2, 0, 1)] for image in images]
    return dict(input_ids=ids, attention_mask=torch.cat([mask, torch.ones_like(tail)], 1),
                mm_token_type_ids=torch.cat([types, torch.zeros_like(tail).int()], 1), labels=labels,
                pixel_values=inputs["pixel_values"], image_grid_thw=inputs["image_grid_thw"], crop_images=crops)


def traced_step(model, batch):
    """(modules run by the forward in call order, parameters with a gradient, loss, logits shape)."""
    calls, handles = [], []
    for name, module in model.named_modules():
        handles.append(module.register_forward_pre_hook(lambda mod, args, name=name: calls.append(name)))
    model.zero_grad(set_to_none=True)
    out = model(**batch)
    out.loss.backward()
    for handle in handles:
        handle.remove()
    reached = sorted(name for name, param in model.named_parameters() if param.grad is not None)
    return calls, reached, out.loss.item(), list(out.logits.shape)


def zero3_steps(model, batch, steps=2):
    """`steps` training steps of a ZeRO-3 engine (SGD with lr 0: the weights, and so the losses, stay put)."""
    import deepspeed

    deepspeed.init_distributed(dist_backend="gloo")
    config = {"train_micro_batch_size_per_gpu": 1, "gradient_accumulation_steps": 1, "zero_allow_untested_optimizer": True,
              "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0}}
    engine, *_ = deepspeed.initialize(model=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.0),
                                      config=config)
    assert any(hasattr(p, "ds_id") and p.numel() == 0 for p in model.parameters()), "weights not partitioned"
    losses = []
    for _ in range(steps):
        loss = engine(**batch).loss
        engine.backward(loss)
        engine.step()
        losses.append(loss.item())
    return losses


def fsdp_steps(model, batch, steps=2):
    """`steps` forward/backward passes of the model in FSDP (FULL_SHARD over gloo, on the CPU)."""
    import functools

    from torch.distributed.fsdp import FullyShardedDataParallel
    from torch.distributed.fsdp.wrap import transformer_auto_wrap_policy

    from vedas.routing_vedas import Vedas25DecoderLayer, VedasDecoderLayer
    from vedas_trainer.distributed import full_parameter_checksum

    dist.init_process_group("gloo")
    model.zero_grad(set_to_none=True)  # the gradients of the step alone: FSDP shards parameters, not them
    policy = functools.partial(transformer_auto_wrap_policy,
                               transformer_layer_cls={VedasDecoderLayer, Vedas25DecoderLayer})
    wrapped = FullyShardedDataParallel(model, auto_wrap_policy=policy, device_id=torch.device("cpu"),
                                       use_orig_params=True)
    losses = []
    for _ in range(steps):
        loss = wrapped(**batch).loss
        loss.backward()
        losses.append(loss.item())
    return losses, full_parameter_checksum(wrapped)[1]


def main(folder, out, zero3=False, fsdp=False):
    rank, world = int(__import__("os").environ["RANK"]), int(__import__("os").environ["WORLD_SIZE"])
    torch.manual_seed(0)
    model, processor = load_vedas(folder)
    perturb_vedas(model, check_init=False)
    model.train()
    batch = training_batch(model, processor, steps=1 + 2 * rank, seed=3 + rank)
    alone = traced_step(model, batch)
    record = {"alone": dict(zip(("calls", "reached", "loss", "logits"), alone))}
    if zero3:
        record["zero3_losses"] = zero3_steps(model, batch)
    elif fsdp:
        from vedas_trainer.distributed import full_parameter_checksum

        record["checksum"] = full_parameter_checksum(model)[1]
        record["fsdp_losses"], record["fsdp_checksum"] = fsdp_steps(model, batch)
    else:
        dist.init_process_group("gloo", rank=rank, world_size=world)
        record["together"] = dict(zip(("calls", "reached", "loss", "logits"), traced_step(model, batch)))
    dist.barrier()
    dist.destroy_process_group()
    Path(out, f"rank{rank}.json").write_text(json.dumps(record))


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], zero3="--zero3" in sys.argv[3:], fsdp="--fsdp" in sys.argv[3:])
