"""VedasTrainer: curriculum across a stage boundary, logged losses and router stats, resume, gradient checkpointing,
LoRA (trained router and special-token rows, frozen vision tower, adapter round trip, merge)."""

import logging
import math

import numpy as np
import pytest
import torch
from transformers import TrainerState

from conftest import load_vedas
from vedas_trainer.checkpoint import check_checkpoint_folder, save_vedas_checkpoint
from vedas_trainer.collator import VedasCollator
from vedas_trainer.synthetic import build_synthetic_dataset
from vedas_trainer.trainer import CurriculumCallback, VedasTrainer, VedasTrainingArguments, lora_config_for

# 2 samples, batch 1: 2 steps per epoch, one epoch per stage -> steps 1-2 at stage 0, steps 3-4 at stage 1
STEPS = 4


@pytest.fixture(scope="module")
def dataset():
    return build_synthetic_dataset(2, seed=0, split="train")


def make_trainer(model, processor, dataset, output_dir, trainer_kwargs=None, **overrides):
    settings = dict(
        output_dir=str(output_dir), per_device_train_batch_size=1, max_steps=STEPS, epochs_per_stage=1,
        max_latent_stage=2, learning_rate=5e-3, lr_scheduler_type="constant", logging_steps=1, save_strategy="no",
        report_to=[], use_cpu=True, dataloader_num_workers=0, seed=0, disable_tqdm=True,
    )
    args = VedasTrainingArguments(**{**settings, **overrides})
    collator = VedasCollator(processor, model.config, **args.collator_kwargs())
    return VedasTrainer(model=model, args=args, train_dataset=dataset, data_collator=collator, **(trainer_kwargs or {}))


def training_logs(trainer):
    return [entry for entry in trainer.state.log_history if "loss" in entry]


def vedas_parameters(model):
    return {name: p.detach().clone() for name, p in model.named_parameters()
            if any(key in name for key in ("depth_router", "depth_step_embed", "token_sr"))}


@pytest.fixture(scope="module")
def full_run(vedas_dirs, dataset, tmp_path_factory):
    model, processor = load_vedas(vedas_dirs["qwen2_vl"])
    before = vedas_parameters(model)
    out = tmp_path_factory.mktemp("full")
    trainer = make_trainer(model, processor, dataset, out, save_strategy="steps", save_steps=3)
    trainer.train()
    return trainer, before, out


def test_training_across_a_stage_boundary(full_run):
    trainer, before, _ = full_run
    logs = training_logs(trainer)
    assert [entry["step"] for entry in logs] == [1, 2, 3, 4]
    assert [entry["stage"] for entry in logs] == [0, 0, 1, 1]
    assert trainer.data_collator.stage == 1
    for entry in logs:
        assert math.isfinite(entry["loss"]) and math.isfinite(entry["ce_loss"])
        for layer in trainer.model.config.routing_layers:
            for name in ("selected", "score", "threshold"):
                assert math.isfinite(entry[f"router/L{layer}/{name}"])
    # the self-distillation loss exists only with latent steps, and the total is CE + λ recon
    assert all("recon_loss" not in entry for entry in logs[:2])
    for entry in logs[2:]:
        assert entry["recon_loss"] > 0
        recon_weight = trainer.model.config.recon_weight
        assert entry["loss"] == pytest.approx(entry["ce_loss"] + recon_weight * entry["recon_loss"], rel=1e-4)
    after = vedas_parameters(trainer.model)
    for key in ("depth_router", "depth_step_embed", "token_sr"):
        names = [name for name in before if key in name]
        assert names and all(not torch.equal(before[name], after[name]) for name in names), key


def test_resume_mid_epoch_continues_the_stage(full_run, vedas_dirs, dataset):
    """Killed at step 3 (epoch 1.5, stage 1) and resumed: same stage, same step count, same loss as the
    uninterrupted run."""
    trainer, _, out = full_run
    model, processor = load_vedas(vedas_dirs["qwen2_vl"])
    resumed = make_trainer(model, processor, dataset, out / "resumed")
    resumed.train(resume_from_checkpoint=str(out / "checkpoint-3"))
    (last,) = [entry for entry in training_logs(resumed) if entry["step"] > 3]
    reference = training_logs(trainer)[-1]
    assert last["step"] == reference["step"] == STEPS and last["stage"] == reference["stage"] == 1
    assert last["loss"] == pytest.approx(reference["loss"], rel=1e-4)
    assert last["recon_loss"] == pytest.approx(reference["recon_loss"], rel=1e-4)


def test_gradient_checkpointing_trains_the_same(full_run, vedas_dirs, dataset, tmp_path):
    trainer, before, _ = full_run
    model, processor = load_vedas(vedas_dirs["qwen2_vl"])
    checkpointed = make_trainer(model, processor, dataset, tmp_path, max_steps=3, activation_checkpointing=True)
    checkpointed.train()
    assert model.model.language_model.gradient_checkpointing
    # the latent forward recomputes its passes instead of reusing the KV cache: same numbers
    for entry, reference in zip(training_logs(checkpointed), training_logs(trainer)[:3], strict=True):
        assert entry["stage"] == reference["stage"]
        assert entry["loss"] == pytest.approx(reference["loss"], rel=1e-4)
    after = vedas_parameters(model)
    assert all(not torch.equal(before[name], after[name]) for name in before)


def test_lora_trains_router_and_special_tokens_and_round_trips(vedas_dirs, dataset, tmp_path):
    from peft import PeftModel, get_peft_model

    # Qwen2.5-VL: its vision MLP also has gate/up/down_proj, which the LoRA targets must not catch
    folder = vedas_dirs["qwen2_5_vl"]
    model, processor = load_vedas(folder)
    base = {name: p.detach().clone() for name, p in model.state_dict().items()}
    token_ids = sorted(model.config.special_token_ids().values())
    peft_model = get_peft_model(model, lora_config_for(model, r=4, alpha=8))
    trainable = [name for name, p in peft_model.named_parameters() if p.requires_grad]
    assert not [name for name in trainable if "visual" in name]
    for key in ("depth_router", "depth_step_embed", "token_sr", "trainable_tokens_delta", "lora_A"):
        assert any(key in name for name in trainable), key
    assert not any("lora_" in name and "visual" in name for name, _ in peft_model.named_parameters())
    initial = {name: p.detach().clone() for name, p in peft_model.named_parameters() if p.requires_grad}

    # batch 2: one step per epoch. Step 1 (stage 0) moves e(d) off zero, which gives the router a gradient at step 2
    # (stage 1), where the latent tokens and token_sr (self-distillation) also get their first gradient
    trainer = make_trainer(peft_model, processor, dataset, tmp_path / "run", max_steps=2, per_device_train_batch_size=2)
    trainer.train()
    assert [entry["stage"] for entry in training_logs(trainer)] == [0, 1]
    current = dict(peft_model.named_parameters())
    for key in ("depth_router", "depth_step_embed", "token_sr", "trainable_tokens_delta"):
        names = [name for name in initial if key in name]
        assert names and all(not torch.equal(initial[name], current[name]) for name in names), key

    collator = trainer.data_collator
    collator.set_stage(2)
    batch = collator([dataset[0], dataset[1]])
    peft_model.eval()
    with torch.no_grad():
        reference = peft_model(**batch).logits

    # adapter -> fresh base -> same outputs
    peft_model.save_pretrained(tmp_path / "adapter")
    fresh, _ = load_vedas(folder)
    reloaded = PeftModel.from_pretrained(fresh, tmp_path / "adapter").eval()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(**batch).logits, reference, atol=1e-5, rtol=1e-5)

    # merge -> a plain Vedas model with the same outputs, saved as a normal checkpoint
    merged = peft_model.merge_and_unload().eval()
    assert type(merged).__name__ == "Vedas25ForConditionalGeneration"
    with torch.no_grad():
        torch.testing.assert_close(merged(**batch).logits, reference, atol=1e-5, rtol=1e-5)
    state = merged.state_dict()
    assert set(state) == set(base)
    for name, value in base.items():
        if "visual" in name:
            assert torch.equal(state[name], value), f"vision tower changed: {name}"
    embeddings = "model.language_model.embed_tokens.weight"
    changed_rows = (state[embeddings] != base[embeddings]).any(-1).nonzero().flatten().tolist()
    assert changed_rows == token_ids  # only the special-token rows were trained
    save_vedas_checkpoint(merged, processor, tmp_path / "merged")
    assert check_checkpoint_folder(tmp_path / "merged") == []
    loaded, _ = load_vedas(tmp_path / "merged")
    with torch.no_grad():
        torch.testing.assert_close(loaded(**batch).logits, reference, atol=1e-5, rtol=1e-5)


class FakeCollator:
    max_latent_stage = 2

    def __init__(self):
        self.stage, self.epoch = None, None

    def set_stage(self, stage):
        self.stage = stage

    def set_epoch(self, epoch):
        self.epoch = epoch


def test_curriculum_callback_stage_and_optimizer_reset():
    collator = FakeCollator()
    callback = CurriculumCallback(collator, epochs_per_stage=2, reset_optimizer=True)
    param = torch.nn.Parameter(torch.ones(2))
    optimizer = torch.optim.Adam([param])

    def epoch_begin(epoch):
        param.grad = torch.ones(2)
        optimizer.step()  # give the optimizer some state
        state = TrainerState(epoch=epoch)
        callback.on_epoch_begin(None, state, None, optimizer=optimizer)
        return collator.stage, len(optimizer.state)

    assert epoch_begin(0.0) == (0, 1)
    assert epoch_begin(1.0) == (0, 1)  # same stage: state kept
    assert epoch_begin(2.0) == (1, 0)  # a new stage begins: state reset
    assert epoch_begin(3.5) == (1, 1)  # resumed mid-epoch in stage 1: no reset
    assert epoch_begin(4.0) == (2, 0)
    assert epoch_begin(6.0) == (3, 1)  # past max_latent_stage the batches do not change: no reset
    assert epoch_begin(3 - 1e-12) == (1, 1)  # float noise in state.epoch: epoch 3, not a new stage
    assert collator.epoch == 3


def test_curriculum_callback_cot_warmup():
    collator = FakeCollator()
    callback = CurriculumCallback(collator, epochs_per_stage=2, warmup_epochs=3)
    stages = []
    for epoch in range(9):
        callback.on_epoch_begin(None, TrainerState(epoch=float(epoch)), None)
        stages.append(collator.stage)
    assert stages == [0, 0, 0, 1, 1, 2, 2, 3, 3]


def test_parameter_summary_under_lora_is_logged_and_matches_a_count(vedas_dirs, dataset, tmp_path, caplog):
    from peft import get_peft_model

    model, processor = load_vedas(vedas_dirs["qwen2_vl"])
    total = sum(p.numel() for p in model.parameters())
    vedas = sum(p.numel() for name, p in model.named_parameters()
                if any(key in name for key in ("depth_router", "depth_step_embed", "token_sr")))
    targets = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
    r = 4
    lora = sum(r * (module.in_features + module.out_features)
               for name, module in model.model.language_model.named_modules()
               if isinstance(module, torch.nn.Linear) and name.rsplit(".", 1)[-1] in targets)
    tokens = 4 * model.config.text_config.hidden_size  # the four special-token rows (trainable_token_indices)
    peft_model = get_peft_model(model, lora_config_for(model, r=r, alpha=8))
    trainer = make_trainer(peft_model, processor, dataset, tmp_path, max_steps=1)
    with caplog.at_level(logging.INFO, logger="vedas_trainer.trainer"):
        trainer.train()
    expected = {"trainable": lora + vedas + tokens, "vedas_trainable": vedas,
                # PEFT keeps the frozen original of each modules_to_save module beside its trained copy
                "total": total + lora + vedas + tokens, "vedas_total": 2 * vedas}
    assert trainer.parameter_summary == expected
    line = next(record.getMessage() for record in caplog.records if record.getMessage().startswith("Parameters:"))
    assert f"trainable {lora + vedas + tokens:,} of {total + lora + vedas + tokens:,}" in line
    assert f"{vedas:,} trainable of {2 * vedas:,}" in line


def test_evaluation_during_training_and_best_model_at_end(vedas_dirs, dataset, tmp_path):
    """eval_loss and the teacher-forced answer accuracy at every eval step, on the final (all-latent) layout; the
    best checkpoint is loaded at the end."""
    from safetensors.torch import load_file

    from vedas_trainer.trainer import answer_accuracy_metrics, preprocess_logits_for_metrics

    model, processor = load_vedas(vedas_dirs["qwen2_vl"])
    evaluation = build_synthetic_dataset(3, seed=0, split="test")
    metrics = {"eval_dataset": evaluation, "compute_metrics": answer_accuracy_metrics(processor.tokenizer),
               "preprocess_logits_for_metrics": preprocess_logits_for_metrics}
    trainer = make_trainer(model, processor, dataset, tmp_path, metrics, eval_strategy="steps", eval_steps=1,
                           save_strategy="steps", save_steps=1, load_best_model_at_end=True,
                           per_device_eval_batch_size=2)
    trainer.train()
    evals = [entry for entry in trainer.state.log_history if "eval_loss" in entry]
    assert [entry["step"] for entry in evals] == [1, 2, 3, 4]
    for entry in evals:
        assert math.isfinite(entry["eval_loss"]) and 0.0 <= entry["eval_answer_accuracy"] <= 1.0
        assert 0.0 <= entry["eval_token_accuracy"] <= 1.0
    assert trainer.data_collator.stage == 1  # evaluation ran at the final stage and restored the training stage
    best_step = min(evals, key=lambda entry: entry["eval_loss"])["step"]
    assert trainer.state.best_model_checkpoint == str(tmp_path / f"checkpoint-{best_step}")
    saved = load_file(str(tmp_path / f"checkpoint-{best_step}" / "model.safetensors"))
    current = trainer.model.state_dict()
    assert all(torch.equal(current[name], value) for name, value in saved.items() if name in current)
    # the eval loss is the mean loss of stage-2 (all latent) batches of 2, whatever stage training was at
    collator, expected = trainer.data_collator, []
    collator.set_stage(2)
    trainer.model.eval()
    with torch.no_grad():
        for rows in ([0, 1], [2]):
            expected += [trainer.model(**collator([evaluation[i] for i in rows])).loss.item()] * len(rows)
    collator.set_stage(1)
    assert trainer.evaluate()["eval_loss"] == pytest.approx(sum(expected) / 3, rel=1e-4)


def test_answer_accuracy_metrics_count_tokens_and_answers(vedas_dirs):
    from transformers import EvalPrediction

    from vedas_trainer.trainer import answer_accuracy_metrics

    _, processor = load_vedas(vedas_dirs["qwen2_vl"])
    tokenizer = processor.tokenizer
    prompt = tokenizer.encode("what colour ?", add_special_tokens=False)
    targets = [tokenizer.encode(text, add_special_tokens=False) for text in ("red box\n\nanswer : A", "answer : B")]
    width = len(prompt) + max(map(len, targets))
    labels = np.full((2, width), -100)
    for row, target in enumerate(targets):
        labels[row, len(prompt):len(prompt) + len(target)] = target
    perfect = np.roll(np.where(labels == -100, 0, labels), -1, axis=1)  # position t predicts the label at t + 1
    metrics = answer_accuracy_metrics(tokenizer)
    supervised = int((labels[:, 1:] != -100).sum())
    assert metrics(EvalPrediction(perfect, labels)) == {"token_accuracy": 1.0, "answer_accuracy": 1.0}
    wrong_step = perfect.copy()
    wrong_step[0, len(prompt) - 1] += 1  # the first rationale token of row 0
    assert metrics(EvalPrediction(wrong_step, labels)) == {
        "token_accuracy": pytest.approx(1 - 1 / supervised), "answer_accuracy": 1.0}
    wrong_answer = perfect.copy()
    last = int(np.flatnonzero(labels[1] != -100)[-1])
    wrong_answer[1, last - 1] += 1  # row 1's answer letter
    assert metrics(EvalPrediction(wrong_answer, labels))["answer_accuracy"] == 0.5
