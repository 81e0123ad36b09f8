"""Data-parallel ranks in lockstep, and real 2-process DeepSpeed ZeRO-2 / ZeRO-3 training runs.

* Lockstep (no DeepSpeed needed): two gloo ranks whose batches need 1 and 3 latent steps run the same modules in
  the same order (what ZeRO-3 gathers weights for), reach the same parameters in backward, and keep the loss each
  computes alone; the same under torch FSDP (over gloo) and under a DeepSpeed ZeRO-3 engine.
* ZeRO-2 and ZeRO-3: `accelerate launch` of examples/train.py with 2 processes, across the curriculum's stage
  boundaries (CoT warm-up, stage 1, stage 2), each checked for: the same full-weight checksum on both ranks, one
  optimizer shard per rank, a `checkpoint-final` without an empty tensor whose weights have that checksum, and an
  `AutoModel` load (trust_remote_code) that generates. DeepSpeed JIT-compiles its CPU communication op at the first
  run (a C++ compiler and ninja are needed, 2-3.5 minutes once, cached under ~/.cache/torch_extensions).
* Two machines: examples/configs/multi_node.yaml as two one-process machines on 127.0.0.1.
"""

import importlib.util
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from vedas_trainer.checkpoint import load_vedas
from vedas_trainer.testing import child_env, free_port

REPO = Path(__file__).resolve().parent.parent
TRAIN = REPO / "examples" / "train.py"
CONFIGS = REPO / "examples" / "configs"
CHECKSUM_LINE = re.compile(r"rank (\d+) parameter checksum ([0-9.]+) sha256 ([0-9a-f]{64}) \(global step (\d+)\)")
# a hang (ranks out of step) ends the test instead of the CI job
TIMEOUT = 600






def _run(command, tmp_path, log_name):
    try:
        result = subprocess.run([str(c) for c in command], cwd=REPO, env=child_env(tmp_path, DS_ACCELERATOR="cpu"),
                                capture_output=True, text=True, timeout=TIMEOUT)
    except subprocess.TimeoutExpired as err:
        pytest.fail(f"{log_name} did not finish in {TIMEOUT} s (ranks out of step?):\n{str(err.output)[-4000:]}")
    output = result.stdout + result.stderr
    (tmp_path / f"{log_name}.log").write_text(output)
    assert result.returncode == 0, f"{' '.join(map(str, command))} exited {result.returncode}:\n{output[-6000:]}"
    return output


# ------------------------------------------------------------------------------------------------------- lockstep


def _lockstep_ranks(vedas_dirs, tmp_path, *options):
    out = tmp_path / "ranks"
    out.mkdir()
    _run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", free_port(),
          REPO / "tests" / "lockstep_worker.py", vedas_dirs["qwen2_vl"], out, *options], tmp_path, "lockstep")
    return [json.loads((out / f"rank{r}.json").read_text()) for r in range(2)]


def test_ranks_with_different_latent_step_counts_run_the_same_modules(vedas_dirs, tmp_path):
    ranks = _lockstep_ranks(vedas_dirs, tmp_path)
    alone, together = [r["alone"] for r in ranks], [r["together"] for r in ranks]
    # alone, the batch of 2 latent steps runs more passes: under ZeRO-3 these ranks would hang
    assert len(alone[0]["calls"]) < len(alone[1]["calls"])
    assert together[0]["calls"] == together[1]["calls"]
    assert together[0]["reached"] == together[1]["reached"]
    for rank in range(2):  # lockstep changes nothing a rank computes
        assert together[rank]["loss"] == pytest.approx(alone[rank]["loss"], rel=1e-6, abs=1e-6)
        assert together[rank]["logits"] == alone[rank]["logits"]
    assert together[0]["logits"][1] < together[1]["logits"][1]  # the batches really differ in length


def test_fsdp_ranks_with_different_latent_step_counts_agree(vedas_dirs, tmp_path):
    """torch FSDP (FULL_SHARD, a unit per decoder layer) over gloo on the CPU: batches of 1 and 3 latent steps run
    without a hang and keep their losses; the full-weight checksum taken through FSDP is the unsharded model's."""
    ranks = _lockstep_ranks(vedas_dirs, tmp_path, "--fsdp")
    for rank in ranks:
        assert rank["fsdp_losses"] == pytest.approx([rank["alone"]["loss"]] * 2, rel=1e-5)
        assert rank["fsdp_checksum"] == rank["checksum"]


# ------------------------------------------------------------------------------------------------- DeepSpeed runs


def _deepspeed_missing() -> str | None:
    if importlib.util.find_spec("deepspeed") is None:
        return "deepspeed is not installed (pip install -e '.[deepspeed]')"
    if not (shutil.which("c++") or shutil.which("g++")) or not shutil.which("ninja"):
        return "DeepSpeed compiles its CPU communication op at run time: it needs a C++ compiler (c++/g++) and ninja"
    return None


needs_deepspeed = pytest.mark.skipif(_deepspeed_missing() is not None, reason=str(_deepspeed_missing()))


@needs_deepspeed
def test_outside_zero3_init_turns_zero3_off_and_back():
    """What accelerate registers under ZeRO-3 (transformers' HfDeepSpeedConfig) makes every model built inside
    transformers' init an empty partition; `outside_zero3_init` turns it off for the block and back on after."""
    from transformers.integrations import HfDeepSpeedConfig, is_deepspeed_zero3_enabled

    from vedas_trainer.distributed import outside_zero3_init, param_shape

    registered = HfDeepSpeedConfig({"zero_optimization": {"stage": 3}, "train_micro_batch_size_per_gpu": 1})
    try:
        assert is_deepspeed_zero3_enabled()
        with outside_zero3_init():
            assert not is_deepspeed_zero3_enabled()
            layer = torch.nn.Linear(3, 2)
        assert is_deepspeed_zero3_enabled()
    finally:
        from transformers.integrations import unset_hf_deepspeed_config

        unset_hf_deepspeed_config()
        del registered
    assert param_shape(layer.weight) == (2, 3)


@needs_deepspeed
def test_zero3_ranks_with_different_latent_step_counts_train(vedas_dirs, tmp_path):
    """Two ZeRO-3 steps on batches of 1 and 3 latent steps: no hang (without the lockstep, gloo aborts on a
    collective mismatch, NCCL hangs), and each rank's loss is the one it computes alone on the whole model."""
    ranks = _lockstep_ranks(vedas_dirs, tmp_path, "--zero3")
    for rank in ranks:
        assert rank["zero3_losses"] == pytest.approx([rank["alone"]["loss"]] * 2, rel=1e-5)
    assert len(ranks[0]["alone"]["calls"]) < len(ranks[1]["alone"]["calls"])


def _deepspeed_run(tmp_path_factory, stage, *options):
    name = f"zero{stage}" + "".join(o.strip("-") for o in options)
    tmp = tmp_path_factory.mktemp(name)
    out = tmp / "run"
    # 32 samples, 8 per rank: 2 steps per epoch; the CoT warm-up, then stages 1 and 2 (6 steps)
    output = _run(["accelerate", "launch", "--config_file", CONFIGS / f"deepspeed_zero{stage}.yaml",
                   "--num_processes", "2", "--main_process_port", free_port(), TRAIN, "--quick", "--n_train", "32",
                   "--output_dir", out, "--save_total_limit", "3", *options], tmp, name)
    return out, output


@pytest.fixture(scope="module")
def zero2_run(tmp_path_factory):
    return _deepspeed_run(tmp_path_factory, 2)


@pytest.fixture(scope="module")
def zero3_run(tmp_path_factory):
    return _deepspeed_run(tmp_path_factory, 3)


def _check_run(out, output):
    checksums = {int(rank): (digest, int(step)) for rank, _, digest, step in CHECKSUM_LINE.findall(output)}
    assert sorted(checksums) == [0, 1], output[-3000:]
    assert checksums[0] == checksums[1]  # both ranks hold the same full weights
    digest, steps = checksums[0]
    assert steps == 6
    report = json.loads((out / "report.json").read_text())
    assert report["world_size"] == 2 and report["last_stage"] == 2 and report["curriculum_complete"]
    # every epoch's checkpoint holds one optimizer shard per rank
    for checkpoint in (out / f"checkpoint-{step}" for step in (2, 4, 6)):
        shards = sorted(p.name for p in checkpoint.glob("global_step*/*optim_states.pt"))
        assert {re.search(r"pp_rank_(\d+)_", name).group(1) for name in shards} == {"0", "1"} and len(shards) == 2, (
            checkpoint, shards)
    final = out / "checkpoint-final"
    with safe_open(final / "model.safetensors", framework="pt") as weights:
        empty = [name for name in weights.keys() if weights.get_slice(name).get_shape().count(0)]
        assert not empty and len(list(weights.keys())) > 80, empty
    model, processor = load_vedas(final)
    spec = importlib.util.spec_from_file_location("vedas_example_train", TRAIN)
    train = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(train)
    assert train.parameter_checksum(model)[1] == digest  # the saved weights are the trained ones, full size
    return model, processor


def _generates(final, tmp_path):
    """An AutoModel load of the folder with trust_remote_code, then latent generation of a few new tokens."""
    script = (
        "import sys, torch\n"
        "from transformers import AutoModel, AutoProcessor\n"
        "from vedas_trainer.testing import make_inputs, quadrant_image\n"
        "model = AutoModel.from_pretrained(sys.argv[1], trust_remote_code=True).eval()\n"
        "processor = AutoProcessor.from_pretrained(sys.argv[1])\n"
        "inputs = make_inputs(processor, ['which way ?'], [quadrant_image((112, 112), seed=1)])\n"
        "out = model.generate(**inputs, max_new_tokens=4, do_sample=False)\n"
        "print('generated', type(model).__module__, out.shape[1] - inputs['input_ids'].shape[1])\n"
    )
    output = _run([sys.executable, "-c", script, final], tmp_path, "generate")
    match = re.search(r"generated (\S+) (\d+)", output)
    assert match and match.group(1).endswith("modeling_vedas") and int(match.group(2)) > 0, output[-2000:]


@needs_deepspeed
def test_zero2_two_processes_across_stages(zero2_run, tmp_path):
    out, output = zero2_run
    _check_run(out, output)
    _generates(out / "checkpoint-final", tmp_path)


@needs_deepspeed
def test_zero3_two_processes_across_stages(zero3_run, tmp_path):
    out, output = zero3_run
    _check_run(out, output)
    _generates(out / "checkpoint-final", tmp_path)


@needs_deepspeed
def test_zero3_lora_two_processes_across_stages(tmp_path_factory, tmp_path):
    """LoRA under ZeRO-3: PEFT wraps the whole model before the Trainer partitions it; both ranks end with the same
    full weights (adapters included), and `checkpoint-final` holds the merged model, full size, that loads with
    `AutoModel` and generates."""
    out, output = _deepspeed_run(tmp_path_factory, 3, "--lora", "--lora_r", "4")
    checksums = {int(rank): (digest, int(step)) for rank, _, digest, step in CHECKSUM_LINE.findall(output)}
    assert sorted(checksums) == [0, 1] and checksums[0] == checksums[1], output[-3000:]
    assert checksums[0][1] == 6
    report = json.loads((out / "report.json").read_text())
    assert report["world_size"] == 2 and report["curriculum_complete"]
    final = out / "checkpoint-final"
    with safe_open(final / "model.safetensors", framework="pt") as weights:
        names = list(weights.keys())
        empty = [name for name in names if weights.get_slice(name).get_shape().count(0)]
    assert not empty and len(names) > 80, empty
    assert not [name for name in names if "lora_" in name]  # merged: a plain Vedas checkpoint
    _generates(final, tmp_path)


# ------------------------------------------------------------------------------------- FSDP and multi-node configs


def test_fsdp_and_multi_node_configs_parse():
    """accelerate reads fsdp.yaml as FSDP1 wrapping the Vedas decoder layers (classes that exist), and
    multi_node.yaml as 2 machines of a 16-process job, machine 0 by default."""
    from accelerate.commands.config.config_args import load_config_from_file

    import vedas.routing_vedas as routing

    fsdp = load_config_from_file(str(CONFIGS / "fsdp.yaml"))
    assert fsdp.distributed_type.value == "FSDP" and fsdp.num_processes == 8
    assert str(fsdp.fsdp_config["fsdp_version"]) == "1"
    assert fsdp.fsdp_config["fsdp_auto_wrap_policy"] == "TRANSFORMER_BASED_WRAP"
    layers = fsdp.fsdp_config["fsdp_transformer_layer_cls_to_wrap"].split(",")
    assert layers and all(isinstance(getattr(routing, name, None), type) for name in layers), layers
    nodes = load_config_from_file(str(CONFIGS / "multi_node.yaml"))
    assert nodes.distributed_type.value == "MULTI_GPU" and nodes.num_machines == 2 and nodes.num_processes == 16
    assert nodes.machine_rank == 0 and nodes.rdzv_backend == "static"


# ------------------------------------------------------------------------------------------ two machines, simulated


def test_two_machines_on_loopback(tmp_path):
    """examples/configs/multi_node.yaml as two one-process "machines" (--machine_rank 0 and 1) on 127.0.0.1: they
    form one group of 2 (each its machine's local rank 0), train the same steps and end with the same weights."""
    out, port = tmp_path / "run", free_port()
    command = ["accelerate", "launch", "--config_file", CONFIGS / "multi_node.yaml", "--num_processes", "2",
               "--main_process_ip", "127.0.0.1", "--main_process_port", port, "--mixed_precision", "no", "--machine_rank"]
    options = [TRAIN, "--quick", "--n_train", "32", "--output_dir", out, "--evaluate_after", "False"]
    env = child_env(tmp_path, DS_ACCELERATOR="cpu")
    machines = [subprocess.Popen([str(c) for c in [*command, rank, *options]], cwd=REPO, env=env,
                                 stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for rank in (0, 1)]
    try:
        outputs = [machine.communicate(timeout=TIMEOUT)[0] for machine in machines]
    finally:
        for machine in machines:
            machine.kill()
    for rank, (machine, output) in enumerate(zip(machines, outputs)):
        assert machine.returncode == 0, f"machine {rank} exited {machine.returncode}:\n{output[-4000:]}"
        assert re.search(rf"rank {rank} of world size 2 \(local rank 0,", output), output[-3000:]
    checksums = {int(rank): (digest, int(step)) for output in outputs
                 for rank, _, digest, step in CHECKSUM_LINE.findall(output)}
    assert sorted(checksums) == [0, 1] and checksums[0] == checksums[1] and checksums[0][1] == 6
    assert (out / "checkpoint-final" / "model.safetensors").is_file()
