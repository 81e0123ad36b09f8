"""Entry points in examples/: make_tiny_base, convert_base, push_to_hub, evaluate (and the APIs behind them).

The CLIs run in-process through their `main(argv)` (fast), except `examples/evaluate.py`, which also runs as a real
subprocess, the way users start it. Hub uploads are intercepted at the huggingface_hub boundary.
"""

import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from huggingface_hub import ModelCard
from huggingface_hub.hf_api import DEFAULT_IGNORE_PATTERNS
from huggingface_hub.utils import filter_repo_objects
from safetensors.torch import load_file, save_file
from transformers import AutoModel, AutoProcessor

from vedas_trainer.checkpoint import VEDAS_MODULE_KEYS, CheckpointError, convert_base
from vedas_trainer.evaluation import (
    count_generated_tokens,
    evaluate_checkpoint,
    load_model_and_processor,
    load_samples,
    save_results,
)
from vedas_trainer.hub import push_checkpoint


REPO = Path(__file__).resolve().parents[1]
EXAMPLES = REPO / "examples"
BACKBONES = ("qwen2_vl", "qwen2_5_vl")
CHECKPOINT_FILES = {
    "README.md", "chat_template.jinja", "config.json", "generation_config.json", "model.safetensors",
    "processor_config.json", "tokenizer.json", "tokenizer_config.json",
    "configuration_vedas.py", "modeling_vedas.py", "routing_vedas.py", "replay_vedas.py",
}


def load_example(name):
    """Import examples/<name>.py under a private module name (so that evaluate.py does not shadow `evaluate`)."""
    spec = importlib.util.spec_from_file_location(f"vedas_example_{name}", EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def run_main(name, argv, capsys):
    """`main(argv)` of an example; returns (exit code, stdout, stderr). argparse errors exit with code 2."""
    try:
        code = load_example(name).main([str(a) for a in argv])
    except SystemExit as exit_:
        code = exit_.code
    out = capsys.readouterr()
    return code, out.out, out.err


def weights(folder):
    return load_file(str(Path(folder) / "model.safetensors"))


# ------------------------------------------------------------------------------------------------ make_tiny_base
@pytest.mark.parametrize("backbone", BACKBONES)
def test_make_tiny_base_cli_writes_a_loadable_base(backbone, base_dirs, tmp_path, capsys):
    from transformers import AutoModelForImageTextToText

    out = tmp_path / "base"
    code, stdout, _ = run_main("make_tiny_base", ["--backbone", backbone, "--out", out, "--seed", 1], capsys)
    assert code == 0 and str(out) in stdout
    assert json.loads((out / "config.json").read_text())["model_type"] == backbone
    model, info = AutoModelForImageTextToText.from_pretrained(out, output_loading_info=True)
    assert type(model).__module__.startswith("transformers.models.")  # a plain backbone, no remote code
    assert not any(info.values()), info
    assert AutoProcessor.from_pretrained(out).tokenizer.chat_template
    # --seed reaches the initialisation: seed 1 differs from the fixture's seed 0, with identical shapes
    ours, fixture = weights(out), weights(base_dirs[backbone])
    assert ours.keys() == fixture.keys()
    assert any(not torch.equal(ours[k], fixture[k]) for k in ours)


def test_make_tiny_base_cli_rejects_unknown_backbone(tmp_path, capsys):
    code, _, err = run_main("make_tiny_base", ["--backbone", "llama", "--out", tmp_path / "x"], capsys)
    assert code == 2 and "qwen2_vl" in err
    assert not (tmp_path / "x").exists()


# ------------------------------------------------------------------------------------------------ convert_base
@pytest.mark.parametrize("backbone", BACKBONES)
def test_convert_cli_applies_set_overrides_and_loads_cleanly(backbone, base_dirs, tmp_path, capsys):
    out = tmp_path / "vedas"
    argv = ["--base", base_dirs[backbone], "--out", out,
            "--set", "num_replay_tokens=16", "routing_topk=8", "routing_layers=[1,3]", "replay_mode=soft_mix",
            "--set", "recon_weight=0.2"]
    code, stdout, err = run_main("convert_base", argv, capsys)
    assert code == 0, err
    assert "parameters" in stdout and "%" in stdout  # the added-parameter count and its fraction of the base
    config = json.loads((out / "config.json").read_text())
    assert config["num_replay_tokens"] == 16
    assert config["routing_topk"] == 8
    assert config["routing_layers"] == [1, 3]
    assert config["replay_mode"] == "soft_mix"
    assert config["recon_weight"] == 0.2
    model, info = AutoModel.from_pretrained(out, trust_remote_code=True, output_loading_info=True)
    assert {k: v for k, v in info.items() if v} == {}
    assert model.config.routing_layers == [1, 3]
    # the override shaped the model, not just the config: routers exist on layers 1 and 3 only
    routed = {name.split(".layers.")[1].split(".")[0] for name in weights(out) if "depth_router" in name}
    assert routed == {"1", "3"}


def test_convert_cli_parses_literal_values():
    convert = load_example("convert_base")
    assert convert.parse_overrides(["routing_layers=[1, 3]", "routing_topk=0.5", "num_latent_steps=2",
                                    "replay_positions=sequential", "routing_topk=[64,16]"]) == {
        "routing_layers": [1, 3], "routing_topk": [64, 16], "num_latent_steps": 2, "replay_positions": "sequential"}
    assert convert.parse_value("true") is True and convert.parse_value("None") is None


@pytest.mark.parametrize("pair, needle", [("num_replay_token=4", "'num_replay_token'"),
                                          ("latent_token_id=3", "assigned by the conversion"),
                                          ("num_replay_tokens", "key=value")])
def test_convert_cli_rejects_unknown_set_keys(pair, needle, base_dirs, tmp_path, capsys):
    code, _, err = run_main("convert_base", ["--base", base_dirs["qwen2_vl"], "--out", tmp_path / "o", "--set", pair],
                            capsys)
    assert code == 2 and needle in err
    if "key=value" not in needle:
        assert "Valid fields:" in err and "num_replay_tokens" in err and "routing_topk" in err
    assert not (tmp_path / "o").exists()


def test_convert_cli_reports_invalid_values(base_dirs, tmp_path, capsys):
    code, _, err = run_main("convert_base", ["--base", base_dirs["qwen2_vl"], "--out", tmp_path / "o",
                                             "--set", "routing_layers=[0,99]"], capsys)
    assert code == 1 and "routing_layers" in err and "Traceback" not in err


@pytest.mark.parametrize("kind", ["llama", "empty", "missing"])
def test_convert_cli_refuses_a_folder_that_is_not_qwen2_vl(kind, tmp_path, capsys):
    base = tmp_path / f"not-a-qwen-{kind}"
    if kind != "missing":
        base.mkdir()
    if kind == "llama":
        (base / "config.json").write_text(json.dumps({"model_type": "llama"}))
    code, _, err = run_main("convert_base", ["--base", base, "--out", tmp_path / "out"], capsys)
    assert code == 1
    assert str(base) in err  # the message names the folder
    assert ("llama" in err) == (kind == "llama")
    assert not (tmp_path / "out").exists()


def test_convert_cli_needs_overwrite_for_a_non_empty_output(base_dirs, tmp_path, capsys):
    out = tmp_path / "busy"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    code, _, err = run_main("convert_base", ["--base", base_dirs["qwen2_vl"], "--out", out], capsys)
    assert code == 1 and "--overwrite" in err and str(out) in err
    assert (out / "notes.txt").read_text() == "keep me"
    code, _, err = run_main("convert_base", ["--base", base_dirs["qwen2_vl"], "--out", out, "--overwrite"], capsys)
    assert code == 0, err
    assert not (out / "notes.txt").exists() and (out / "model.safetensors").is_file()


@pytest.mark.parametrize("damage", ["truncated", "garbage"])
def test_convert_names_a_corrupt_safetensors_file(damage, base_dirs, tmp_path, capsys):
    base = tmp_path / "broken"
    shutil.copytree(base_dirs["qwen2_vl"], base)
    path = base / "model.safetensors"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 3] if damage == "truncated" else b"\x00not a safetensors file" * 50)
    with pytest.raises(CheckpointError, match=r"model\.safetensors"):
        convert_base(base, tmp_path / "api-out")
    code, _, err = run_main("convert_base", ["--base", base, "--out", tmp_path / "cli-out"], capsys)
    assert code == 1 and "model.safetensors" in err and str(base) in err and "Traceback" not in err


def test_convert_accepts_a_legacy_layout_base(base_dirs, vedas_dirs, tmp_path, capsys):
    legacy = tmp_path / "legacy"
    shutil.copytree(base_dirs["qwen2_vl"], legacy)
    state = weights(legacy)
    renamed = {}
    for key, tensor in state.items():  # the transformers 4.x layout: visual.* and model.* at the top
        key = key.replace("model.language_model.", "model.", 1).replace("model.visual.", "visual.", 1)
        renamed[key] = tensor.clone()
    assert any(k.startswith("visual.") for k in renamed) and not any("language_model" in k for k in renamed)
    save_file(renamed, str(legacy / "model.safetensors"), metadata={"format": "pt"})

    code, _, err = run_main("convert_base", ["--base", legacy, "--out", tmp_path / "vedas"], capsys)
    assert code == 0, err
    _, info = AutoModel.from_pretrained(tmp_path / "vedas", trust_remote_code=True, output_loading_info=True)
    assert {k: v for k, v in info.items() if v} == {}
    # the renamed weights landed where the modern-layout conversion puts them
    ours, reference = weights(tmp_path / "vedas"), weights(vedas_dirs["qwen2_vl"])
    base_keys = [k for k in reference if not any(part in k for part in VEDAS_MODULE_KEYS)]
    assert base_keys and all(torch.equal(ours[k], reference[k]) for k in base_keys)


# ------------------------------------------------------------------------------------------------ push_to_hub
def would_upload(folder, kwargs):
    """The files `upload_folder(folder_path=..., allow_patterns=..., ignore_patterns=...)` selects, as the Hub
    client selects them (its own filter plus its default ignores)."""
    folder = Path(folder)
    files = [p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file()]
    ignore = list(kwargs.get("ignore_patterns") or []) + DEFAULT_IGNORE_PATTERNS
    return set(filter_repo_objects(files, allow_patterns=kwargs.get("allow_patterns"), ignore_patterns=ignore))


@pytest.fixture
def checkpoint_copy(vedas_dirs, tmp_path):
    folder = tmp_path / "checkpoint"
    shutil.copytree(vedas_dirs["qwen2_vl"], folder)
    return folder


def test_push_uploads_exactly_the_checkpoint_files(checkpoint_copy, hub_calls, capsys):
    # clutter a real folder collects: bytecode from importing the remote code, a stale lock
    (checkpoint_copy / "__pycache__").mkdir()
    (checkpoint_copy / "__pycache__" / "modeling_vedas.cpython-311.pyc").write_bytes(b"\x00")
    (checkpoint_copy / "model.safetensors.lock").write_text("")
    code, stdout, err = run_main("push_to_hub", [checkpoint_copy, "--repo-id", "someone/vedas-tiny", "--private",
                                                 "--token", "hf_fake"], capsys)
    assert code == 0, err
    names = [name for name, _, _ in hub_calls]
    assert names == ["create_repo", "upload_folder"]
    _, args, kwargs = hub_calls[0]
    assert (args[0] if args else kwargs["repo_id"]) == "someone/vedas-tiny"
    assert kwargs["exist_ok"] is True and kwargs["private"] is True
    _, _, upload = hub_calls[1]
    assert upload["repo_id"] == "someone/vedas-tiny" and Path(upload["folder_path"]) == checkpoint_copy
    assert would_upload(checkpoint_copy, upload) == CHECKPOINT_FILES
    assert all(name in stdout for name in CHECKPOINT_FILES)


def test_push_api_returns_the_uploaded_files(checkpoint_copy, hub_calls):
    files = push_checkpoint(checkpoint_copy, "someone/vedas-tiny")
    assert set(files) == CHECKPOINT_FILES == would_upload(checkpoint_copy, hub_calls[-1][2])
    assert hub_calls[0][2]["private"] is False


@pytest.mark.parametrize("remove", [("modeling_vedas.py",), ("model.safetensors", "tokenizer.json"),
                                    ("processor_config.json",)])
def test_push_refuses_an_incomplete_folder_before_any_upload(remove, checkpoint_copy, hub_calls, capsys):
    for name in remove:
        (checkpoint_copy / name).unlink()
    with pytest.raises(CheckpointError) as error:
        push_checkpoint(checkpoint_copy, "someone/vedas-tiny")
    assert all(name in str(error.value) for name in remove)
    code, _, err = run_main("push_to_hub", [checkpoint_copy, "--repo-id", "someone/vedas-tiny"], capsys)
    assert code == 1 and all(name in err for name in remove)
    assert hub_calls == []  # not even create_repo


def test_push_refuses_a_folder_whose_auto_map_is_gone(checkpoint_copy, hub_calls):
    config = json.loads((checkpoint_copy / "config.json").read_text())
    del config["auto_map"]
    (checkpoint_copy / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="auto_map"):
        push_checkpoint(checkpoint_copy, "someone/vedas-tiny")
    assert hub_calls == []


def test_readme_metadata_parses_with_model_card(vedas_dirs):
    data = ModelCard.load(vedas_dirs["qwen2_vl"] / "README.md").data.to_dict()
    assert data["library_name"] == "transformers"
    assert data["pipeline_tag"] == "image-text-to-text"
    assert data["license"] == "apache-2.0"
    assert "vedas" in data["tags"]
    assert "base_model" not in data  # built from scratch: no Hub base to link


def test_card_links_the_hub_base_of_a_cached_snapshot(base_dirs, tmp_path):
    snapshot = tmp_path / "models--Qwen--Qwen2-VL-2B-Instruct" / "snapshots" / "0123abcd"
    shutil.copytree(base_dirs["qwen2_vl"], snapshot)
    convert_base(snapshot, tmp_path / "out")
    assert ModelCard.load(tmp_path / "out" / "README.md").data.to_dict()["base_model"] == "Qwen/Qwen2-VL-2B-Instruct"


@pytest.mark.parametrize("card, needle", [
    ("---\nlibrary_name: transformers\npipeline_tag: image-text-to-text\nbase_model: a/b\ntags: [vedas]\n---\n# x",
     "'license'"),
    ("---\nlicense: apache-2.0\n  bad: [indent\n---\n# x", "does not parse"),
    ("---\nlicense: apache-2.0\nlibrary_name: transformers\npipeline_tag: image-text-to-text\n"
     "base_model: /tmp/local/folder\ntags: [vedas]\n---\n# x", "not a Hub repo id"),
])
def test_push_refuses_bad_card_metadata(card, needle, checkpoint_copy, hub_calls):
    (checkpoint_copy / "README.md").write_text(card)
    with pytest.raises(CheckpointError, match=needle):
        push_checkpoint(checkpoint_copy, "someone/vedas-tiny")
    assert hub_calls == []


# ------------------------------------------------------------------------------------------------ evaluate
def test_count_generated_tokens_stops_at_and_includes_eos():
    eos, pad = 2, 0
    new_tokens = torch.tensor([[5, eos, pad, pad], [5, 6, 7, 8], [eos, pad, pad, pad], [pad, 9, eos, eos]])
    assert count_generated_tokens(new_tokens, {eos}) == [2, 4, 1, 3]
    assert count_generated_tokens(new_tokens, {eos, 9}) == [2, 4, 1, 2]


@pytest.fixture(scope="module")
def tiny_eval(vedas_dirs):
    """The converted tiny checkpoint, loaded the way evaluate.py loads it, and a few synthetic test samples."""
    model, processor = load_model_and_processor(vedas_dirs["qwen2_vl"])
    return model, processor, load_samples("synthetic", n=3)


def test_evaluate_checkpoint_structure_and_ar_steps(tiny_eval, tmp_path):
    model, processor, samples = tiny_eval
    assert type(model).__module__.startswith("transformers_modules.")  # loaded through the checkpoint's code
    budgets = {"nocot": 3, "cot": 5, "latent": 4}
    results = evaluate_checkpoint(model, processor, samples, batch_size=2, max_new_tokens=budgets, progress=False,
                                  warmup=False)
    T = model.config.num_latent_steps
    assert T == 2 and results["num_latent_steps"] == T and results["num_samples"] == 3
    assert set(results["modes"]) == {"nocot", "cot", "latent"}
    assert processor.tokenizer.padding_side == "left"
    for mode, m in results["modes"].items():
        steps = T if mode == "latent" else 0
        assert m["latent_steps"] == steps and m["max_new_tokens"] == budgets[mode]
        assert 0.0 <= m["accuracy"] <= 1.0 and m["avg_seconds_per_sample"] > 0
        records = m["predictions"]
        assert [r["id"] for r in records] == [s["id"] for s in samples]
        assert all(r["ar_steps"] == steps + r["generated_tokens"] for r in records)
        assert all(1 <= r["generated_tokens"] <= budgets[mode] for r in records)
        assert m["avg_ar_steps"] == pytest.approx(sum(r["ar_steps"] for r in records) / 3)
        assert m["accuracy"] == pytest.approx(sum(r["correct"] for r in records) / 3)
        assert m["num_truncated"] == sum(r["generated_tokens"] == budgets[mode] for r in records)
    assert all(r["prediction"].startswith("answer :") for r in results["modes"]["nocot"]["predictions"])

    paths = save_results(results, tmp_path / "out", title="tiny")
    saved = json.loads(paths["json"].read_text())
    assert saved["modes"]["latent"]["avg_ar_steps"] == results["modes"]["latent"]["avg_ar_steps"]
    assert "predictions" not in saved["modes"]["cot"]
    table = paths["markdown"].read_text()
    assert "| Mode | Accuracy (%) | AR steps" in table
    for name in ("| No-CoT |", "| CoT |", "| Vedas latent |"):
        assert name in table
    assert len(paths["predictions"].read_text().splitlines()) == 3 * 3


def test_evaluate_counts_eos_and_scores_forced_answers(tiny_eval, monkeypatch):
    """Steer the untrained model with a sequence bias: it writes " green" then the end token. AR steps must be
    T + 2 (latent) and 2 (No-CoT), and the metric must score the samples whose answer is green (and only those)."""
    model, processor, samples = tiny_eval
    tokenizer = processor.tokenizer
    (green,) = tokenizer.encode(" green", add_special_tokens=False)
    eos = model.generation_config.eos_token_id
    eos = eos[0] if isinstance(eos, list) else eos
    monkeypatch.setattr(model.generation_config, "sequence_bias", {(green,): 100.0, (green, eos): 200.0})
    questions = [dict(s, choices=None, answer=answer) for s, answer in zip(samples, ["green", "red", "green"])]
    results = evaluate_checkpoint(model, processor, questions, modes=("nocot", "latent"), batch_size=2,
                                  max_new_tokens=6, progress=False, warmup=False)
    T = model.config.num_latent_steps
    for mode, steps in (("nocot", 0), ("latent", T)):
        m = results["modes"][mode]
        assert [r["generated_tokens"] for r in m["predictions"]] == [2, 2, 2]
        assert m["avg_ar_steps"] == steps + 2 and m["num_truncated"] == 0
        assert [r["correct"] for r in m["predictions"]] == [True, False, True]
        assert m["accuracy"] == pytest.approx(2 / 3)
    assert results["modes"]["nocot"]["predictions"][0]["prediction"] == "answer : green<|im_end|>"


def test_evaluate_script_runs_on_a_tiny_checkpoint(vedas_dirs, tmp_path):
    out = tmp_path / "eval"
    command = [sys.executable, str(EXAMPLES / "evaluate.py"), str(vedas_dirs["qwen2_vl"]), "--data", "synthetic",
               "--n", "8", "--batch-size", "8", "--max-new-tokens", "4", "--max-cot-tokens", "8", "--out", str(out)]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    result = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    saved = json.loads((out / "results.json").read_text())
    assert set(saved["modes"]) == {"nocot", "cot", "latent"}
    assert all(m["num_samples"] == 8 for m in saved["modes"].values())
    latent = saved["modes"]["latent"]
    assert latent["avg_ar_steps"] == pytest.approx(latent["latent_steps"] + latent["avg_generated_tokens"])
    assert "| Vedas latent |" in (out / "results.md").read_text() and "| Vedas latent |" in result.stdout
    assert "eval CoT" in result.stderr  # the tqdm progress bar


def test_examples_evaluate_does_not_shadow_the_evaluate_library(monkeypatch):
    """Scripts in examples/ run with examples/ on sys.path, where evaluate.py would hide Hugging Face evaluate: an
    `import evaluate` there must still give the library (in-process; monkeypatch restores sys.modules/sys.path)."""
    import evaluate as library

    monkeypatch.delitem(sys.modules, "evaluate")
    monkeypatch.syspath_prepend(str(EXAMPLES))
    imported = importlib.import_module("evaluate")
    assert callable(imported.load) and Path(imported.__file__).resolve() == Path(library.__file__).resolve()
    assert str(EXAMPLES) in sys.path  # the guard restored the importer's path
