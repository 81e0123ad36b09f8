"""Supported transformers versions.

The range is one constant (configuration_vedas.TRANSFORMERS_RANGE), checked when the remote code is imported (a
one-line ImportError naming both versions) and stated by setup.py's requirement and by every checkpoint's card.

The core equivalences, through the remote code as a user meets it (`AutoModel.from_pretrained(...,
trust_remote_code=True)`), on every backbone (Qwen2-VL, Qwen2.5-VL, Qwen3-VL, Chameleon: Qwen3-VL's DeepStack,
interleaved M-RoPE and decoder layer, Chameleon's VQ-VAE and decoder layer come from the installed transformers):
converted == base, cache == no cache, batch == singles, save -> load, latent generate with its trace, beam search
with latent steps, and a latent training step under gradient checkpointing (the KV cache kept, the gradients
unchanged).

In the main suite the checkpoints are the session's (tests/conftest.py). The CI compatibility job (`.ci/compat`)
writes them once with the main environment (tests/compat/write_checkpoints.py) and runs this file in one venv per
other transformers version of the supported range, with `VEDAS_COMPAT_CHECKPOINTS` naming that folder: a checkpoint
on the Hub meeting a user's other transformers.
"""

import ast
import os
import shutil
import sys
import warnings
from pathlib import Path

import pytest
import torch
import transformers
from transformers import AutoConfig, AutoModel, AutoModelForImageTextToText, AutoProcessor

from conftest import (
    ALL_BACKBONES, answer_log_probs, base_positions, make_inputs, no_eos, perturb_vedas, quadrant_image, two_prompts,
    with_image_args,
)
from vedas import configuration_vedas
from vedas.configuration_vedas import TRANSFORMERS_RANGE, check_transformers_version, transformers_requirement
from vedas_trainer.checkpoint import remote_code_files

CHECKPOINTS_ENV = "VEDAS_COMPAT_CHECKPOINTS"


@pytest.fixture(scope="session")
def compat_dirs(request):
    """backbone -> (base folder, Vedas folder)."""
    root = os.environ.get(CHECKPOINTS_ENV)
    if not root:
        bases, vedas = request.getfixturevalue("all_base_dirs"), request.getfixturevalue("all_vedas_dirs")
        return {b: (Path(bases[b]), Path(vedas[b])) for b in ALL_BACKBONES}
    dirs = {b: (Path(root) / f"base-{b}", Path(root) / f"vedas-{b}") for b in ALL_BACKBONES}
    missing = [str(p) for pair in dirs.values() for p in pair if not (p / "config.json").is_file()]
    assert not missing, f"{CHECKPOINTS_ENV}={root} lacks {missing} (tests/compat/write_checkpoints.py writes them)"
    return dirs


def load_remote(folder):
    model = AutoModel.from_pretrained(folder, trust_remote_code=True).eval()
    processor = AutoProcessor.from_pretrained(folder, trust_remote_code=True)
    processor.tokenizer.padding_side = "left"
    if processor.chat_template is None:  # ChameleonProcessor does not load its own: the tokenizer's is the one
        processor.chat_template = processor.tokenizer.chat_template
    return model, processor


@pytest.fixture(scope="module", params=ALL_BACKBONES)
def remote(request, compat_dirs):
    """(perturbed model, processor) of one backbone, loaded as remote code: routing really changes the numbers."""
    model, processor = load_remote(compat_dirs[request.param][1])
    assert type(model).__module__.startswith("transformers_modules."), type(model).__module__
    return perturb_vedas(model), processor


def test_this_transformers_is_the_one_under_test():
    """The job names the minor version it installed in VEDAS_COMPAT_TRANSFORMERS: the venv runs that release, from
    its own site-packages (not the reference transformers the venv is layered over)."""
    expected = os.environ.get("VEDAS_COMPAT_TRANSFORMERS")
    if not expected:
        pytest.skip("outside the compatibility job (VEDAS_COMPAT_TRANSFORMERS unset)")
    assert transformers.__version__.startswith(f"{expected}."), (transformers.__version__, expected)
    assert Path(transformers.__file__).resolve().is_relative_to(Path(sys.prefix).resolve()), transformers.__file__


@pytest.mark.parametrize("backbone", ALL_BACKBONES)
def test_converted_equals_base(backbone, compat_dirs):
    """At e(d) = 0 the converted checkpoint computes its base's logits exactly, under this transformers."""
    base_dir, vedas_dir = compat_dirs[backbone]
    base = AutoModelForImageTextToText.from_pretrained(base_dir).eval()
    model, processor = load_remote(vedas_dir)
    assert type(model).__module__.startswith("transformers_modules.")
    vocab = len(AutoProcessor.from_pretrained(base_dir).tokenizer)
    inputs = two_prompts(processor)
    inputs = {**inputs, **base_positions(model, inputs)}
    with torch.no_grad():
        expected = base(**inputs).logits
        got = model(**inputs).logits
    torch.testing.assert_close(got[..., :vocab], expected[..., :vocab], rtol=0, atol=0)


def test_cache_equals_no_cache(remote):
    model, processor = remote
    inputs = two_prompts(processor)
    for steps in (0, 2):
        args = dict(num_latent_steps=steps, max_new_tokens=4, do_sample=False, **no_eos(model))
        cached = model.generate(**inputs, **args)
        uncached = model.generate(**inputs, use_cache=False, **args)
        assert torch.equal(cached, uncached), steps


def test_batch_equals_singles(remote):
    model, processor = remote
    questions = ["what colour is the arrow in the last cell ?", "which ?"]
    images = [quadrant_image((112, 84), seed=1), quadrant_image((56, 112), seed=2)]
    args = dict(num_latent_steps=2, max_new_tokens=4, do_sample=False, return_dict_in_generate=True,
                output_latent_trace=True, **no_eos(model))
    batch = model.generate(**two_prompts(processor), **args)
    for row, (question, image) in enumerate(zip(questions, images)):
        single = model.generate(**make_inputs(processor, [question], [image]), **args)
        width = single.sequences.shape[1]
        assert batch.sequences[row, -width:].tolist() == single.sequences[0].tolist()
        for step_batch, step_single in zip(batch.latent_trace, single.latent_trace):
            assert step_batch["replay_indices"][row].tolist() == step_single["replay_indices"][0].tolist()
            assert step_batch["crop_window"][row] == step_single["crop_window"][0]


def test_save_then_load(remote, tmp_path):
    """save_pretrained of the remote-code model writes a folder that loads back (remote code included) and
    computes the same logits."""
    model, processor = remote
    inputs = two_prompts(processor)
    with torch.no_grad():
        before = model(**inputs).logits
    model.save_pretrained(tmp_path)
    code = remote_code_files(model.config.model_type)
    assert "modeling_vedas.py" in code and all((tmp_path / name).is_file() for name in code)
    reloaded = AutoModel.from_pretrained(tmp_path, trust_remote_code=True).eval()
    with torch.no_grad():
        after = reloaded(**inputs).logits
    torch.testing.assert_close(after, before, rtol=0, atol=0)


def test_latent_generate_with_trace(remote):
    """Latent generate's layout, its trace, and its answer scores equal a teacher-forced latent forward."""
    model, processor = remote
    cfg = model.config
    inputs = two_prompts(processor)
    out = model.generate(**inputs, num_latent_steps=2, max_new_tokens=4, do_sample=False, output_logits=True,
                         return_dict_in_generate=True, output_latent_trace=True, **no_eos(model))
    prompt = inputs["input_ids"].shape[1]
    assert out.sequences[:, prompt].tolist() == [cfg.start_latent_token_id] * 2
    assert out.sequences[:, prompt + 1 : prompt + 3].tolist() == [[cfg.latent_token_id] * 2] * 2
    assert out.sequences[:, prompt + 3].tolist() == [cfg.end_latent_token_id] * 2
    assert len(out.latent_trace) == 2
    for step in out.latent_trace:
        assert step["replay_indices"].shape == (2, cfg.num_replay_tokens)
        assert bool((step["replay_indices"] >= 0).any()) and len(step["crop_window"]) == 2
    chosen = torch.cat([s["replay_indices"] for s in out.latent_trace], 1)
    for row in chosen.tolist():  # replay never revisits a token
        picked = [i for i in row if i >= 0]
        assert len(picked) == len(set(picked))
    forced = answer_log_probs(model, with_image_args(model, inputs), out.sequences, 4)
    generated = torch.stack(out.logits, 1).float().log_softmax(-1)  # the raw logits (before suppress_tokens)
    expected = generated.gather(-1, out.sequences[:, -4:, None]).squeeze(-1)
    torch.testing.assert_close(forced, expected, atol=1e-4, rtol=1e-4)


def test_beam_search_with_latent_steps(remote):
    """Beam search with T > 0 and num_return_sequences: cached == uncached, and each returned beam's score is the
    teacher-forced sum of its answer tokens' log-probabilities."""
    model, processor = remote
    inputs = two_prompts(processor)
    args = dict(num_latent_steps=2, max_new_tokens=3, num_beams=3, num_return_sequences=2, do_sample=False,
                length_penalty=0.0, return_dict_in_generate=True, output_scores=True, **no_eos(model))
    cached = model.generate(**inputs, **args)
    uncached = model.generate(**inputs, use_cache=False, **args)
    assert cached.sequences.shape[0] == 4
    assert torch.equal(cached.sequences, uncached.sequences)
    forced = answer_log_probs(model, with_image_args(model, inputs), cached.sequences, 3)
    torch.testing.assert_close(cached.sequences_scores, forced.sum(-1), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("reentrant", [False, True])
def test_gradient_checkpointing_keeps_the_cache_and_the_gradients(remote, reentrant):
    """Each transformers version checkpoints its decoder layers its own way (5.22 wraps `__call__`, 5.23 and 5.24
    `forward`): under each, a latent training step with checkpointing runs each column once in forward and once in
    backward (the KV cache is kept), and its gradients equal those without checkpointing."""
    from test_latent import _training_gradients, training_batch

    model, processor = remote
    batch = training_batch(model, processor, steps=3)
    width = batch["input_ids"].shape[1]
    reference, ref_losses, _ = _training_gradients(model, batch)
    grads, losses, tokens = _training_gradients(model, batch, checkpointing={"use_reentrant": reentrant})
    assert tokens == {"forward": width, "backward": width}
    torch.testing.assert_close(losses, ref_losses, atol=1e-5, rtol=1e-5)
    assert sorted(grads) == sorted(reference)
    for name, expected in reference.items():
        scale = expected.abs().max().clamp(min=1e-12)
        assert float((grads[name] - expected).abs().max() / scale) <= 1e-4, name


def test_no_deprecated_cache_name(remote):
    """The remote code passes the KV cache under the installed version's name: no deprecation warning about
    `past_key_values` (transformers 5.24 warns on every call that still uses it)."""
    model, processor = remote
    inputs = two_prompts(processor)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with torch.no_grad():
            model(**inputs)
        model.generate(**inputs, num_latent_steps=2, max_new_tokens=2, num_beams=2, do_sample=False)
        model.generate(**inputs, num_latent_steps=0, max_new_tokens=2, do_sample=False)
    deprecated = [str(w.message) for w in caught if "past_key_values" in str(w.message)]
    assert not deprecated, deprecated[:3]

# ---------------------------------------------------------------- the declared range

def test_the_range_covers_at_least_5_22_to_5_24():
    assert TRANSFORMERS_RANGE[0] <= "5.22" and TRANSFORMERS_RANGE[1] >= "5.24"
    assert transformers_requirement() == f">={TRANSFORMERS_RANGE[0]},<5.25"


@pytest.mark.parametrize("version", ["5.22.0", "5.22.2", "5.23.0", "5.24.0", "5.24.3", "5.23.0rc1", "5.24.1+local"])
def test_versions_inside_the_range_pass(version):
    check_transformers_version(version)


@pytest.mark.parametrize("version", ["5.21.1", "5.25.0", "5.25.0.dev0", "4.57.1", "6.0.0", "5.3.0", "55.22.0"])
def test_versions_outside_the_range_get_one_line_naming_both(version):
    with pytest.raises(ImportError) as info:
        check_transformers_version(version)
    message = str(info.value)
    assert "\n" not in message
    assert f"transformers {version} is installed" in message
    low, high = TRANSFORMERS_RANGE
    assert f"transformers {low} to {high}" in message and f"transformers>={low},<5.25" in message


def test_the_installed_transformers_is_in_the_range():
    check_transformers_version(transformers.__version__)


def test_setup_requirement_is_the_range():
    """setup.py's install_requires entry comes from its `transformers_requirement()`, which reads the constant."""
    setup_py = Path(configuration_vedas.__file__).with_name("setup.py")
    tree = ast.parse(setup_py.read_text())
    (function,) = [n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == "transformers_requirement"]
    namespace = {"ast": ast, "Path": Path, "__file__": str(setup_py)}
    exec(compile(ast.Module(body=[function], type_ignores=[]), str(setup_py), "exec"), namespace)
    assert namespace["transformers_requirement"]() == f"transformers{transformers_requirement()}"
    (call,) = [n for n in ast.walk(tree) if isinstance(n, ast.Call) and getattr(n.func, "id", None) == "setup"]
    (requires,) = [k.value for k in call.keywords if k.arg == "install_requires"]
    named = [e for e in requires.elts if isinstance(e, ast.Call) and e.func.id == "transformers_requirement"]
    assert len(named) == 1 and not any("transformers" in getattr(e, "value", "") for e in requires.elts)


def test_model_card_states_the_range(compat_dirs):
    low, high = TRANSFORMERS_RANGE
    card = (compat_dirs["qwen2_vl"][1] / "README.md").read_text()
    assert f"transformers {low} to {high}" in card and f"transformers{transformers_requirement()}" in card


def test_a_checkpoint_refuses_an_unsupported_transformers_in_one_line(compat_dirs, tmp_path, monkeypatch):
    """Through AutoConfig's remote-code import (the first module transformers loads): a checkpoint whose range
    excludes the installed transformers stops there, naming both versions."""
    folder = tmp_path / "checkpoint"
    shutil.copytree(compat_dirs["qwen2_vl"][1], folder)
    source = (folder / "configuration_vedas.py").read_text()
    declared = 'TRANSFORMERS_RANGE = ("{}", "{}")'.format(*TRANSFORMERS_RANGE)
    assert declared in source
    (folder / "configuration_vedas.py").write_text(source.replace(declared, 'TRANSFORMERS_RANGE = ("4.50", "4.57")'))
    monkeypatch.setenv("HF_MODULES_CACHE", str(tmp_path / "modules"))
    with pytest.raises(ImportError) as info:
        AutoConfig.from_pretrained(folder, trust_remote_code=True)
    message = str(info.value)
    assert "\n" not in message
    assert f"transformers {transformers.__version__} is installed" in message
    assert "transformers 4.50 to 4.57" in message


def test_cache_argument_name_follows_the_installed_version():
    major, minor = (int(p) for p in transformers.__version__.split(".")[:2])
    assert configuration_vedas.CACHE_ARG == ("cache" if (major, minor) >= (5, 24) else "past_key_values")
