"""`convert_base` holds one copy of the model, not two (issue 16), and converts exactly as before.

The Vedas model is built on the meta device and takes the base's own tensors (`_vedas_from_base`); building it for
real and copying the base in peaked at about twice the model (2.17x on the 100 MB base below, 13.3 GiB for a 2-layer
7B geometry). The peak is measured in a child process, so that nothing the test session holds counts: its resident
set grows by less than 1.5x the model's bytes during the conversion (`VmHWM` against the resident set before it;
the mapped weight file counts, as the kernel counts it). The outputs are checked against the base: every base
weight unchanged, the new token rows at the mean embedding, the Vedas modules at their initial values, and the same
logits over the base's vocabulary.
"""

import json
import subprocess
import sys
import textwrap

import pytest
import torch

from conftest import load_vedas, make_inputs, quadrant_image
from vedas_trainer.checkpoint import VEDAS_MODULE_KEYS, convert_base, load_base
from vedas_trainer.testing import child_env
from vedas_trainer.tiny_base import TinySizes, build_tiny_base

# ~100 MB of fp32 weights (8 layers of hidden 512), untied head like the 7B checkpoints: large enough that the
# interpreter's own noise (a few MB) cannot hide a second copy
MID = TinySizes(hidden_size=512, intermediate_size=1536, num_hidden_layers=8, num_attention_heads=8,
                num_key_value_heads=4, mrope_section=[16, 8, 8], tie_word_embeddings=False)

CHILD = textwrap.dedent(
    """
    import json, sys
    from vedas_trainer.checkpoint import convert_base

    def status():  # kB values; VmHWM is this process's peak resident set since its exec
        with open("/proc/self/status") as lines:
            return {line.split(":")[0]: int(line.split()[1]) * 1024 for line in lines
                    if line.startswith(("VmRSS", "VmHWM", "RssAnon", "RssFile"))}

    before = status()["VmRSS"]
    model, _ = convert_base(sys.argv[1], sys.argv[2])
    size = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    print(json.dumps({"before": before, "size": size, **status()}))
    """
)
# VmHWM, not getrusage's ru_maxrss: Linux carries the high-water mark of the forked copy of the parent (this whole
# test session) across exec into ru_maxrss, so a large parent would set the child's peak


@pytest.fixture(scope="module")
def mid_base(tmp_path_factory):
    folder = tmp_path_factory.mktemp("mid-base")
    build_tiny_base("qwen2_vl", str(folder), seed=0, sizes=MID)
    return folder


@pytest.mark.skipif(sys.platform != "linux", reason="reads /proc/self/statm")
def test_conversion_peak_memory_is_under_one_and_a_half_models(mid_base, tmp_path):
    result = subprocess.run([sys.executable, "-c", CHILD, str(mid_base), str(tmp_path / "out")], check=True,
                            capture_output=True, text=True, env=child_env(tmp_path))
    numbers = json.loads(result.stdout.strip().splitlines()[-1])
    growth = (numbers["VmHWM"] - numbers["before"]) / numbers["size"]
    assert numbers["size"] > 80 * 2**20
    assert growth < 1.5, f"conversion grew the process by {growth:.2f}x the model's bytes: {numbers}"


def check_converted(base_dir, vedas_dir):
    """Every base weight unchanged but the new token rows (at the mean embedding of the base's vocabulary); e(d) at
    depth_gate_init, router and token_sr ~ N(0, initializer_range) with zero biases; the base's logits."""
    base, base_processor = load_base(base_dir)
    model, processor = load_vedas(vedas_dir)
    cfg, vocab = model.config, len(base_processor.tokenizer)
    new_rows = [getattr(cfg, f"{name}_token_id") for name in ("start_latent", "end_latent", "latent", "replay")]
    converted = model.state_dict()
    for name, tensor in base.state_dict().items():
        if name.endswith(("embed_tokens.weight", "lm_head.weight")):
            assert torch.equal(converted[name][:vocab], tensor[:vocab]), name
            mean = tensor[:vocab].mean(0)
            assert all(torch.equal(converted[name][row], mean) for row in new_rows), name
        else:
            assert torch.equal(converted[name], tensor), name
    std = cfg.text_config.initializer_range
    for name, tensor in converted.items():
        if not any(key in name for key in VEDAS_MODULE_KEYS):
            continue
        if "depth_step_embed" in name:
            assert torch.equal(tensor, torch.full_like(tensor, cfg.depth_gate_init)), name
        elif name.endswith("bias"):
            assert torch.equal(tensor, torch.zeros_like(tensor)), name
        else:
            assert 0.5 * std < float(tensor.std()) < 2 * std, (name, float(tensor.std()))
    inputs = make_inputs(processor, ["what colour is it ?"], [quadrant_image((112, 84), seed=3)])
    with torch.no_grad():
        torch.testing.assert_close(model(**inputs).logits[..., :vocab], base.eval()(**inputs).logits[..., :vocab],
                                   rtol=0, atol=0)


def test_conversion_of_an_untied_base_is_unchanged(mid_base, tmp_path):
    model, _ = convert_base(mid_base, tmp_path / "out")
    assert not any(t.is_meta for t in [*model.parameters(), *model.buffers()])
    assert model.lm_head.weight is not model.get_input_embeddings().weight
    check_converted(mid_base, tmp_path / "out")


def test_conversion_without_spare_rows_grows_the_embedding(tmp_path):
    """A base whose embedding has no spare rows: the matrices grow (multiple of 64) and stay tied."""
    build_tiny_base("qwen2_vl", str(tmp_path / "base"), seed=0, sizes=TinySizes(spare_embedding_rows=0))
    model, processor = convert_base(tmp_path / "base", tmp_path / "out")
    assert model.get_input_embeddings().weight.shape[0] % 64 == 0
    assert model.get_input_embeddings().weight.shape[0] >= len(processor.tokenizer)
    assert model.lm_head.weight is model.get_input_embeddings().weight
    check_converted(tmp_path / "base", tmp_path / "out")
