"""CoT warm-up probe: the embedded default's tiny base trained on explicit CoT only (stage 0), with the training CE
every 20 steps and the greedy CoT accuracy on held-out puzzles every --eval_every steps. A cheap way to compare
warm-up recipes (the warm-up is where the embedded default learns, or fails, to read the tiles).

    OMP_NUM_THREADS=1 python benchmarks/warmup_probe.py --seed 0 --steps 800 --out probe.json \
        [--n_train 3200 | --n_train 0 (new puzzles every step)] [--sizes '{"rope_theta": 10.0, "mrope_section": [4, 6, 6]}'] \
        [--task '{"coordinate_tints": true}'] [--lr 2e-3 --warmup 100]

The defaults are the embedded recipe before docs/reproducibility.md's changes (rope_theta 1e4, mrope_section
[6, 5, 5], 3,200 fixed puzzles). The optimizer is the Trainer's: AdamW (betas 0.9 / --beta2, weight decay on
matrices), gradient clipping 1.0, linear warm-up then cosine to --min_lr_rate.
"""
import argparse, json, math, os, sys, time, random, tempfile
import torch

p = argparse.ArgumentParser()
p.add_argument("--seed", type=int, default=0)
p.add_argument("--steps", type=int, default=1200)
p.add_argument("--lr", type=float, default=2e-3)
p.add_argument("--warmup", type=int, default=100)
p.add_argument("--beta2", type=float, default=0.98)
p.add_argument("--wd", type=float, default=0.05)
p.add_argument("--min_lr_rate", type=float, default=0.1)
p.add_argument("--bs", type=int, default=32)
p.add_argument("--n_train", type=int, default=3200)   # unique puzzles; 0 = fresh every step
p.add_argument("--eval_every", type=int, default=200)
p.add_argument("--n_eval", type=int, default=200)
p.add_argument("--task", default="{}")
p.add_argument("--sizes", default="{}")
p.add_argument("--vedas", default='{"num_replay_tokens": 2, "routing_topk": 0.25, "crop_resolution": 56, "window_size": 2, "num_latent_steps": 4}')
p.add_argument("--out", required=True)
p.add_argument("--seed_data", type=int, default=0)
a = p.parse_args()

from transformers import set_seed, get_scheduler
from vedas_trainer.tiny_base import TinySizes, build_tiny_base
from vedas_trainer.checkpoint import convert_base, load_vedas
from vedas_trainer.collator import VedasCollator
from vedas_trainer.synthetic import build_synthetic_dataset
from vedas_trainer.evaluation import evaluate_checkpoint

t0 = time.time()
task = json.loads(a.task)
sizes = dict(hidden_size=128, intermediate_size=512, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
             mrope_section=[6, 5, 5], vision_depth=2, vision_embed_dim=128, vision_heads=4, vision_mlp_ratio=2)
sizes.update(json.loads(a.sizes))
tmp = tempfile.mkdtemp()
set_seed(a.seed)
build_tiny_base("qwen2_vl", tmp + "/base", seed=a.seed, sizes=TinySizes(**sizes))
convert_base(tmp + "/base", tmp + "/init", overrides=json.loads(a.vedas), overwrite=True)
model, processor = load_vedas(tmp + "/init")
model.train()
n_train = a.n_train if a.n_train > 0 else a.steps * a.bs
train = build_synthetic_dataset(n_train, seed=a.seed_data, split="train", **task)
test = build_synthetic_dataset(a.n_eval, seed=a.seed_data, split="test", **task)
test = [test[i] for i in range(len(test))]
print(f"built in {time.time()-t0:.0f}s, n_train {n_train}, threads {torch.get_num_threads()}", flush=True)
coll = VedasCollator(processor, model.config, max_latent_stage=4)
coll.set_stage(0)

decay = [p_ for n, p_ in model.named_parameters() if p_.requires_grad and p_.ndim >= 2 and "norm" not in n]
nodecay = [p_ for n, p_ in model.named_parameters() if p_.requires_grad and not (p_.ndim >= 2 and "norm" not in n)]
opt = torch.optim.AdamW([{"params": decay, "weight_decay": a.wd}, {"params": nodecay, "weight_decay": 0.0}],
                        lr=a.lr, betas=(0.9, a.beta2))
sched = get_scheduler("cosine_with_min_lr", opt, num_warmup_steps=a.warmup, num_training_steps=a.steps,
                      scheduler_specific_kwargs={"min_lr_rate": a.min_lr_rate})
g = torch.Generator().manual_seed(a.seed)
order = []
log = {"args": vars(a), "ce": [], "evals": []}
ce_acc, t_train = 0.0, time.time()
for step in range(1, a.steps + 1):
    if not order:
        order = torch.randperm(n_train, generator=g).tolist()
    idx, order = order[:a.bs], order[a.bs:]
    batch = coll([train[i] for i in idx])
    out = model(**batch)
    out["loss"].backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step(); sched.step(); opt.zero_grad(set_to_none=True)
    ce_acc += float(out["ce_loss"].detach())
    if step % 20 == 0:
        log["ce"].append((step, ce_acc / 20)); ce_acc = 0.0
        print(f"step {step} ce {log['ce'][-1][1]:.4f} lr {sched.get_last_lr()[0]:.2e} t {time.time()-t_train:.0f}s", flush=True)
    if step % a.eval_every == 0 or step == a.steps:
        model.eval()
        r = evaluate_checkpoint(model, processor, test, modes=("cot",), batch_size=32)
        model.train()
        acc = r["modes"]["cot"]["accuracy"]
        log["evals"].append((step, acc, time.time() - t_train))
        print(f"EVAL step {step} cot {acc:.3f}", flush=True)
log["train_seconds"] = time.time() - t_train
json.dump(log, open(a.out, "w"))
print("DONE", json.dumps(log["evals"]))
