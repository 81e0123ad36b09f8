"""The floor loop of `benchmarks/bench_latent.py` (the least work of routing depth scaling, which the benchmark's
"latent / ideal + RDS passes" ratio divides by) re-runs exactly what Vedas's RDS second passes re-ran: the same
routing layers, after the same main passes, over the same numbers of tokens."""

import contextlib
import importlib.util
import io
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _bench():
    spec = importlib.util.spec_from_file_location("vedas_bench_latent", REPO / "benchmarks" / "bench_latent.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


bench = _bench()


def test_floor_loop_reruns_what_the_second_passes_ran(tmp_path):
    with contextlib.redirect_stderr(io.StringIO()):
        base, _, vedas, _, processor = bench.build_models("qwen2_vl", bench.SIZES["tiny"], tmp_path)
    inputs = bench.make_inputs(processor, [bench.QUESTION], [bench.quadrant_image((448, 448))])
    latent = bench.make_variants(base, vedas, vedas, inputs, cot_tokens=4)["latent (T=4, K=32, cached)"]
    widths = bench.second_pass_widths(latent)

    # the recorded widths are the tokens each routing layer selected in the pass (the generate's own trace)
    trace = vedas.generate(**inputs, num_latent_steps=bench.STEPS, num_replay_tokens=bench.REPLAY, do_sample=False,
                           min_new_tokens=bench.ANSWER, max_new_tokens=bench.ANSWER, return_dict_in_generate=True,
                           output_latent_trace=True).latent_trace
    for call, step in enumerate(trace):
        for (layer, depth), (_, selected) in step["router_scores"].items():
            expected = [(depth, int(selected.sum()))] if int(selected.sum()) else []
            assert [w for w in widths.get((layer, call), []) if w[0] == depth] == expected, (layer, call, depth)
    assert widths[(0, 0)] and widths[(0, 0)][0][1] > 1  # the prefill re-runs several tokens

    # the floor loop runs each recorded second pass once, over that many tokens, after the same main pass
    layers = base.model.language_model.layers
    runs = {}

    def counting(index, forward):
        def wrapper(hidden_states, *args, **kwargs):
            runs.setdefault(index, []).append(hidden_states.shape[1])
            return forward(hidden_states, *args, **kwargs)
        return wrapper

    routing = sorted({layer for layer, _ in widths})
    for index in routing:
        layers[index].forward = counting(index, layers[index].forward)
    try:
        calls = bench.floor_loop(base, inputs, bench.STEPS, bench.REPLAY + 1, bench.ANSWER, widths)
    finally:
        for index in routing:
            del layers[index].forward
    prompt = inputs["input_ids"].shape[1]
    for index in routing:
        expected, main = [], [prompt] + [bench.REPLAY + 1] * bench.STEPS + [1] * bench.ANSWER
        for call, tokens in enumerate(main):
            expected += [tokens] + [width for _, width in widths.get((index, call), [])]
        assert runs[index] == expected, index
        assert calls[index] == len(main) - 1
