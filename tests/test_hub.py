"""The Hub and checkpoint files: pushing what train.py and convert_base write, offline behaviour, Hub ids as bases,
generation defaults, checks on the AutoModel loading path and atomic saves.

The Hub is never reached: uploads are intercepted at huggingface_hub's HfApi (`hub_calls`), "no network" is a real
connection refused on a closed loopback port, and Hub ids resolve from a real HF cache layout built in a temp folder.
"""

import json
import logging
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import huggingface_hub
import pytest
import torch
from huggingface_hub import HfApi, ModelCard
from safetensors.torch import load_file
from transformers import AutoModel

from vedas.modeling_vedas import Vedas25ForConditionalGeneration, VedasForConditionalGeneration
from vedas_trainer.checkpoint import (
    ANSWER_MAX_NEW_TOKENS,
    CheckpointError,
    card_base_model,
    convert_base,
    load_vedas,
    save_vedas_checkpoint,
)
from vedas_trainer.hub import (
    HubError,
    push_after_training,
    push_checkpoint,
    resolve_model_folder,
    training_push_target,
    validate_for_push,
)
from vedas_trainer.trainer import VedasTrainingArguments

# examples/<name>.py imported, and its main(argv) run in-process: (exit code, stdout, stderr)
from test_cli import load_example, run_main as run_example


REPO = Path(__file__).resolve().parents[1]
EXAMPLES = REPO / "examples"
MODEL_CLASSES = {"qwen2_vl": VedasForConditionalGeneration, "qwen2_5_vl": Vedas25ForConditionalGeneration}


def error_lines(err: str) -> list[str]:
    return [line for line in err.splitlines() if line.strip()]


@pytest.fixture
def checkpoint_copy(vedas_dirs, tmp_path):
    folder = tmp_path / "checkpoint"
    shutil.copytree(vedas_dirs["qwen2_vl"], folder)
    return folder


@pytest.fixture(scope="module")
def tiny_model(vedas_dirs):
    return load_vedas(vedas_dirs["qwen2_vl"])


def edit_json(path, **changes):
    data = json.loads(Path(path).read_text())
    for key, value in changes.items():
        if isinstance(value, dict) and isinstance(data.get(key), dict):
            data[key].update(value)
        else:
            data[key] = value
    Path(path).write_text(json.dumps(data))


def fake_hub_cache(hub_cache: Path, repo_id: str, source: Path, commit: str = "0" * 40) -> Path:
    """The layout huggingface_hub writes for a downloaded model: refs/main names the commit of a snapshot folder."""
    repo = hub_cache / f"models--{repo_id.replace('/', '--')}"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    shutil.copytree(source, repo / "snapshots" / commit)
    return repo / "snapshots" / commit


# ------------------------------------------------------------------------------------ card metadata of a local base
def test_checkpoint_trained_from_a_local_base_is_pushable(tiny_model, base_dirs, tmp_path, hub_calls):
    """What train.py writes at the end of a run on `--base_model <local folder>` (its save_vedas_checkpoint call)."""
    model, processor = tiny_model
    final = tmp_path / "checkpoint-final"
    save_vedas_checkpoint(model, processor, final, card_context={"setup": "x", "base_model": str(base_dirs["qwen2_vl"])})
    card = ModelCard.load(final / "README.md")
    assert "base_model" not in card.data.to_dict()
    assert "the local folder `qwen2_vl`" in card.text  # the origin, by folder name only
    assert str(base_dirs["qwen2_vl"].parent) not in (final / "README.md").read_text()  # no machine paths
    files = push_checkpoint(final, "someone/vedas-tiny")
    assert "README.md" in files and [name for name, _, _ in hub_calls] == ["create_repo", "upload_folder"]


def test_card_base_model_rules(base_dirs, tmp_path):
    local = tmp_path / "my-base"
    shutil.copytree(base_dirs["qwen2_vl"], local)
    assert card_base_model(local)[0] is None
    edit_json(local / "config.json", _name_or_path="Qwen/Qwen2-VL-2B-Instruct")  # recorded by from_pretrained
    assert card_base_model(local) == ("Qwen/Qwen2-VL-2B-Instruct", None)
    edit_json(local / "config.json", _name_or_path=str(tmp_path / "elsewhere"))  # a recorded local path is no id
    assert card_base_model(local)[0] is None
    snapshot = tmp_path / "models--Org--Base" / "snapshots" / "abc"
    snapshot.mkdir(parents=True)
    assert card_base_model(snapshot) == ("Org/Base", None)
    assert card_base_model("Qwen/Qwen2-VL-7B-Instruct") == ("Qwen/Qwen2-VL-7B-Instruct", None)  # given as a Hub id
    assert card_base_model(None) == (None, None)


def test_push_messages_say_what_is_wrong(checkpoint_copy, hub_calls):
    readme = checkpoint_copy / "README.md"
    readme.write_text(readme.read_text().replace("license: apache-2.0", "license: apache-2.0\nbase_model: /data/base"))
    with pytest.raises(CheckpointError) as error:
        validate_for_push(checkpoint_copy)
    message = str(error.value)
    assert "'/data/base' is a local path, not a Hub repo id" in message
    assert "complete" not in message and len(message.splitlines()) == 1  # one problem, one line
    (checkpoint_copy / "tokenizer.json").unlink()
    with pytest.raises(CheckpointError) as error:
        push_checkpoint(checkpoint_copy, "someone/vedas-tiny")
    lines = str(error.value).splitlines()
    assert lines[0] == f"Refusing to push {str(checkpoint_copy)!r} (2 problems):" and len(lines) == 3
    assert lines[1] == "  - incomplete checkpoint: missing tokenizer.json"
    assert lines[2].startswith("  - README.md metadata base_model '/data/base' is a local path")
    assert hub_calls == []


# ------------------------------------------------------------------------------------ auto_map and repo id checks
@pytest.mark.parametrize("target, needle", [
    ("modeling_vedas.VedasForConditionalGenerashun",
     "modeling_vedas.py defines no 'VedasForConditionalGenerashun' (did you mean 'VedasForConditionalGeneration'?)"),
    ("modelling_vedas.VedasForConditionalGeneration", "modelling_vedas.py is not one of the checkpoint's remote-code"),
    ("someone/other--modeling_vedas.VedasForConditionalGeneration", "points at code in another repository"),
])
def test_push_dry_run_refuses_a_broken_auto_map(target, needle, checkpoint_copy, hub_calls, capsys):
    edit_json(checkpoint_copy / "config.json", auto_map={"AutoModel": target})
    code, stdout, err = run_example("push_to_hub", [checkpoint_copy, "--repo-id", "someone/vedas-tiny", "--dry-run"],
                                    capsys)
    assert code == 1 and stdout == ""
    assert f"config.json auto_map['AutoModel'] = {target!r}: {needle}" in err
    assert len(error_lines(err)) == 1 and hub_calls == []


def test_auto_map_check_parses_without_importing(checkpoint_copy):
    # a remote-code file that would fail when imported still only gets parsed
    modeling = checkpoint_copy / "modeling_vedas.py"
    modeling.write_text("raise SystemExit('imported!')\n" + modeling.read_text())
    validate_for_push(checkpoint_copy)  # the class is still defined at top level: no problem
    modeling.write_text("class Broken(:\n")
    with pytest.raises(CheckpointError, match="modeling_vedas.py does not parse as Python"):
        validate_for_push(checkpoint_copy)


@pytest.mark.parametrize("repo_id", ["someone/vedas tiny", "a/b/c", "someone/vedas--tiny", "someone/vedas-"])
def test_push_refuses_an_invalid_repo_id(repo_id, checkpoint_copy, hub_calls, capsys):
    for extra in (["--dry-run"], []):
        code, stdout, err = run_example("push_to_hub", [checkpoint_copy, "--repo-id", repo_id, *extra], capsys)
        assert code == 1 and stdout == ""
        assert f"--repo-id {repo_id!r} is not a valid Hub repo id" in err and len(error_lines(err)) == 1
    assert hub_calls == []


# ------------------------------------------------------------------------------------ offline / no network
def test_push_offline_is_one_line_and_uploads_nothing(checkpoint_copy, hub_calls, monkeypatch, capsys):
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)  # HF_HUB_OFFLINE=1
    code, stdout, err = run_example("push_to_hub", [checkpoint_copy, "--repo-id", "someone/vedas-tiny"], capsys)
    assert code == 1 and stdout == "" and hub_calls == []
    (line,) = error_lines(err)
    assert "HF_HUB_OFFLINE=1" in line and "nothing was uploaded" in line
    assert f"python examples/push_to_hub.py {checkpoint_copy} --repo-id someone/vedas-tiny" in line


@pytest.fixture
def unreachable_hub(monkeypatch):
    """Online mode, with the Hub endpoint on a loopback port nothing listens on: every request is refused."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(huggingface_hub.constants, "ENDPOINT", f"http://127.0.0.1:{port}")
    return port


def test_push_without_network_is_one_line(checkpoint_copy, unreachable_hub, capsys):
    code, stdout, err = run_example("push_to_hub", [checkpoint_copy, "--repo-id", "someone/vedas-tiny",
                                                    "--token", "hf_fake"], capsys)
    assert code == 1 and stdout == "" and "Traceback" not in err
    (line,) = error_lines(err)
    assert "Could not create or open the Hub repository someone/vedas-tiny (ConnectError" in line
    assert "nothing was uploaded" in line and "push it later with: python examples/push_to_hub.py" in line


def test_upload_failure_after_create_repo_is_one_line(checkpoint_copy, unreachable_hub, monkeypatch):
    created = []
    monkeypatch.setattr(HfApi, "create_repo", lambda self, *a, **k: created.append(a))
    with pytest.raises(HubError) as error:
        push_checkpoint(checkpoint_copy, "someone/vedas-tiny", token="hf_fake")
    assert created == [("someone/vedas-tiny",)]
    message = str(error.value)
    assert message.startswith(f"Could not upload {str(checkpoint_copy)!r} to someone/vedas-tiny (")
    assert "no commit was made" in message and len(message.splitlines()) == 1


def test_train_push_is_checked_first_and_skipped_offline(tiny_model, tmp_path, capsys, caplog):
    """train.py --push_to_hub offline: the Trainer is built and could train (its own pushes, which contact the Hub
    when it is built, are off); at the end the push is skipped with one line and the command to push later."""
    from vedas_trainer.trainer import VedasTrainer

    def arguments(**kwargs):
        return VedasTrainingArguments(output_dir=str(tmp_path / "run"), report_to="none", use_cpu=True, **kwargs)

    with pytest.raises(HubError, match="--push_to_hub needs --hub_model_id"):
        training_push_target(arguments(push_to_hub=True))
    with pytest.raises(HubError, match="--hub_model_id 'me/my model' is not a valid Hub repo id"):
        training_push_target(arguments(push_to_hub=True, hub_model_id="me/my model"))
    assert training_push_target(arguments()) is None

    args = arguments(push_to_hub=True, hub_model_id="me/vedas-run")
    with caplog.at_level(logging.WARNING, logger="vedas_trainer.hub"):
        assert training_push_target(args) == "me/vedas-run"
    assert args.push_to_hub is False and "HF_HUB_OFFLINE=1" in caplog.text
    model, processor = tiny_model
    VedasTrainer(model=model, args=args)  # offline, with push_to_hub=True this raised OfflineModeIsEnabled

    final = tmp_path / "run" / "checkpoint-final"
    save_vedas_checkpoint(model, processor, final)
    capsys.readouterr()
    assert push_after_training(final, "me/vedas-run") is False
    (line,) = error_lines(capsys.readouterr().err)
    assert line.startswith("Not pushed: ") and f"examples/push_to_hub.py {final} --repo-id me/vedas-run" in line


@pytest.mark.parametrize("argv, needle", [
    (["--push_to_hub", "--hub_model_id", "me/my model"], "--hub_model_id 'me/my model' is not a valid Hub repo id"),
    (["--push_to_hub"], "--push_to_hub needs --hub_model_id NAME"),
    (["--base_model", "someone/not-cached"], "'someone/not-cached' is not a local folder, and as a Hub model id"),
])
def test_train_entry_point_refuses_before_any_model_work(argv, needle, tmp_path, capsys):
    train = load_example("train")
    out = tmp_path / "run"
    extra = ["--dataset", "synthetic"] if "--base_model" in argv else []
    code = train.run(["--quick", "--output_dir", str(out), *extra, *argv])
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err
    (line,) = [x for x in error_lines(err) if x.startswith("train.py: error:")]
    assert needle in line
    assert not (out / "base").exists() and not (out / "init").exists()  # nothing built or converted


def test_train_push_after_training_pushes_when_online(tiny_model, tmp_path, hub_calls):
    model, processor = tiny_model
    final = save_vedas_checkpoint(model, processor, tmp_path / "checkpoint-final")
    assert push_after_training(final, "me/vedas-run", private=True) is True
    assert [name for name, _, _ in hub_calls] == ["create_repo", "upload_folder"]
    assert hub_calls[0][2]["private"] is True


# ------------------------------------------------------------------------------------ generation_config defaults
def test_checkpoints_carry_max_new_tokens(vedas_dirs, tiny_model, tmp_path):
    for folder in vedas_dirs.values():  # converted
        assert json.loads((folder / "generation_config.json").read_text())["max_new_tokens"] == ANSWER_MAX_NEW_TOKENS
    model, processor = tiny_model  # trained (train.py's final save)
    save_vedas_checkpoint(model, processor, tmp_path / "final")
    saved = json.loads((tmp_path / "final" / "generation_config.json").read_text())
    assert saved["max_new_tokens"] == ANSWER_MAX_NEW_TOKENS == 32
    assert AutoModel.from_pretrained(tmp_path / "final", trust_remote_code=True).generation_config.max_new_tokens == 32
    model.generation_config.max_new_tokens = 7  # a value the user set is kept
    try:
        save_vedas_checkpoint(model, processor, tmp_path / "final")
    finally:
        model.generation_config.max_new_tokens = ANSWER_MAX_NEW_TOKENS
    assert json.loads((tmp_path / "final" / "generation_config.json").read_text())["max_new_tokens"] == 7


# ------------------------------------------------------------------------------------ Hub ids as bases
def test_convert_base_accepts_a_hub_id_from_the_local_cache(base_dirs, tmp_path, monkeypatch):
    cache = tmp_path / "hf" / "hub"
    snapshot = fake_hub_cache(cache, "someone/tiny-qwen2-vl", base_dirs["qwen2_vl"])
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    assert resolve_model_folder("someone/tiny-qwen2-vl") == snapshot.resolve()
    assert resolve_model_folder(base_dirs["qwen2_vl"]) == base_dirs["qwen2_vl"]  # a folder stays a folder
    convert_base("someone/tiny-qwen2-vl", tmp_path / "out")
    assert ModelCard.load(tmp_path / "out" / "README.md").data.to_dict()["base_model"] == "someone/tiny-qwen2-vl"
    reference = load_file(str(base_dirs["qwen2_vl"] / "model.safetensors"))
    converted = load_file(str(tmp_path / "out" / "model.safetensors"))
    key = next(k for k in reference if k.endswith("layers.0.self_attn.q_proj.weight"))
    assert torch.equal(converted[key], reference[key])


def test_convert_cli_resolves_a_hub_id_through_hf_home(base_dirs, tmp_path):
    """The real thing: a fresh process whose HF_HOME holds the snapshot, with HF_HUB_OFFLINE=1."""
    fake_hub_cache(tmp_path / "hf" / "hub", "someone/tiny-qwen2-vl", base_dirs["qwen2_vl"])
    env = {**os.environ, "HF_HOME": str(tmp_path / "hf"), "HF_HUB_OFFLINE": "1"}
    env.pop("HF_HUB_CACHE", None)
    out = tmp_path / "vedas"
    command = [sys.executable, str(EXAMPLES / "convert_base.py"), "--base", "someone/tiny-qwen2-vl", "--out", str(out)]
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert json.loads((out / "config.json").read_text())["model_type"] == "vedas"
    missing = subprocess.run([*command[:3], "someone/not-cached", "--out", str(tmp_path / "x")], env=env,
                             capture_output=True, text=True, timeout=300)
    assert missing.returncode == 1 and "Traceback" not in missing.stderr
    (line,) = error_lines(missing.stderr)
    assert "'someone/not-cached' is not a local folder" in line and "HF_HUB_OFFLINE=1" in line
    assert not (tmp_path / "x").exists()


def test_hub_id_without_network_names_the_cause(unreachable_hub, tmp_path, monkeypatch):
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    with pytest.raises(CheckpointError) as error:
        resolve_model_folder("someone/not-cached")
    message = str(error.value)
    assert "'someone/not-cached' is not a local folder" in message and "could not be fetched" in message
    assert len(message.splitlines()) == 1


# ------------------------------------------------------------------------------------ the AutoModel loading path
@pytest.mark.parametrize("backbone", MODEL_CLASSES)
def test_from_pretrained_names_a_truncated_safetensors_file(backbone, vedas_dirs, tmp_path):
    folder = tmp_path / "truncated"
    shutil.copytree(vedas_dirs[backbone], folder)
    weights = folder / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 3])
    for load in (lambda: AutoModel.from_pretrained(folder, trust_remote_code=True),
                 lambda: MODEL_CLASSES[backbone].from_pretrained(folder)):
        with pytest.raises(OSError) as error:
            load()
        message = str(error.value)
        assert f"{str(weights)!r} is truncated or corrupt" in message and len(message.splitlines()) == 1
        assert type(error.value).__name__ != "SafetensorError"


def test_from_pretrained_names_the_broken_shard(tiny_model, tmp_path):
    model, _ = tiny_model
    folder = tmp_path / "sharded"
    model.save_pretrained(folder, max_shard_size="300KB")
    shards = sorted(folder.glob("model-*.safetensors"))
    assert len(shards) >= 3
    shards[1].write_bytes(shards[1].read_bytes()[:1000])
    with pytest.raises(OSError) as error:
        VedasForConditionalGeneration.from_pretrained(folder)
    assert f"Cannot load the weights: {str(shards[1])!r} is truncated" in str(error.value)
    assert all(str(shard) not in str(error.value) for shard in shards if shard != shards[1])


@pytest.mark.parametrize("backbone", MODEL_CLASSES)
def test_from_pretrained_refuses_pickle_weights(backbone, vedas_dirs, tmp_path):
    folder = tmp_path / "pickled"
    shutil.copytree(vedas_dirs[backbone], folder)
    torch.save(load_file(str(folder / "model.safetensors")), folder / "pytorch_model.bin")
    (folder / "model.safetensors").unlink()
    for load in (lambda **kw: AutoModel.from_pretrained(folder, trust_remote_code=True, **kw),
                 lambda **kw: MODEL_CLASSES[backbone].from_pretrained(folder, **kw)):
        with pytest.raises(OSError) as error:
            load()
        message = str(error.value)
        assert message.startswith(f"{str(folder)!r} has no model.safetensors or model.safetensors.index.json")
        assert "pytorch_model.bin" in message and len(message.splitlines()) == 1
        with pytest.raises(ValueError, match="use_safetensors=False is refused"):
            load(use_safetensors=False)


def test_load_vedas_loads_a_folder_without_remote_code_and_warns(vedas_dirs, tmp_path, caplog):
    folder = tmp_path / "no-code"
    shutil.copytree(vedas_dirs["qwen2_vl"], folder)
    (folder / "modeling_vedas.py").unlink()
    with caplog.at_level(logging.WARNING, logger="vedas_trainer.checkpoint"):
        model, _ = load_vedas(folder)
    assert type(model) is VedasForConditionalGeneration  # the installed class: no code from the folder runs
    assert "lacks the remote-code files modeling_vedas.py" in caplog.text and str(folder) in caplog.text
    with pytest.raises(CheckpointError, match="incomplete checkpoint: missing modeling_vedas.py"):
        validate_for_push(folder)


# ------------------------------------------------------------------------------------ atomic saves
def test_save_is_atomic_and_replaces_the_previous_folder(tiny_model, tmp_path, monkeypatch):
    model, processor = tiny_model
    final = tmp_path / "run" / "checkpoint-final"
    save_vedas_checkpoint(model, processor, final)
    (final / "notes.txt").write_text("from the previous run")
    before = {p.name: p.read_bytes() for p in final.iterdir()}

    gate = next(p for n, p in model.named_parameters() if "depth_step_embed" in n)
    original = gate.detach().clone()
    with torch.no_grad():
        gate.add_(1.0)  # the new weights differ from the saved ones
    try:
        def fail(*args, **kwargs):
            assert {p.name: p.read_bytes() for p in final.iterdir()} == before  # nothing written in place
            raise OSError("disk full")

        monkeypatch.setattr(processor, "save_pretrained", fail)
        with pytest.raises(OSError, match="disk full"):
            save_vedas_checkpoint(model, processor, final)
        assert {p.name: p.read_bytes() for p in final.iterdir()} == before  # the previous folder, untouched
        monkeypatch.undo()
        save_vedas_checkpoint(model, processor, final)
    finally:
        with torch.no_grad():
            gate.copy_(original)
    assert not (final / "notes.txt").exists()  # replaced as a whole
    assert (final / "model.safetensors").read_bytes() != before["model.safetensors"]
    assert sorted(p.name for p in final.parent.iterdir()) == ["checkpoint-final"]  # no staging folder left
