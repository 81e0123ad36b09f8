"""Kill and resume (issue 7): a real 2-process CPU run of `examples/train.py --quick` (gloo through torchrun) is
SIGKILLed twice, each time resumed from `transformers.trainer_utils.get_last_checkpoint`:

1. mid-step, half a step after the first checkpoint;
2. mid-save, while the checkpoint at the end of stage 1 is being written (the run is frozen with SIGSTOP as soon as
   the save shows up in the output folder, and killed only if the save is still incomplete then), so the resumed
   run redoes the last step of stage 1 and crosses into stage 2.

After each kill no process of the run survives and the checkpoint a resume picks is complete. The resumed run ends
at the same step, epoch and stage as an uninterrupted run with the same seed, with the same weights.

The harness is `benchmarks/kill_resume.py`, which does the same at random kill points (docs/kill_resume.md).
"""

import importlib.util
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file


pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads the process tree from /proc")

REPO = Path(__file__).resolve().parents[1]
# 32 samples, 8 per process x 2 processes: 2 steps per epoch; steps 1-2 at stage 0, 3-4 at stage 1, 5-6 at stage 2
N_TRAIN = 32
FINAL_STEP = 6


def _harness():
    spec = importlib.util.spec_from_file_location("vedas_kill_resume", REPO / "benchmarks" / "kill_resume.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


kr = _harness()
ARGS = kr.train_args(N_TRAIN, seed=7)


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    return kr.reference_run(tmp_path_factory.mktemp("kill_resume"), ARGS)


def _latest(out):
    """The checkpoint a resume picks right after a kill, and its trainer state; `check_latest` loads all its files
    (later saves rotate it away)."""
    latest = kr.check_latest(out)
    return {"latest": latest, "state": latest and kr.check_checkpoint(latest)}


@pytest.fixture(scope="module")
def killed_twice(reference):
    root = reference["out"].parent
    out = root / "killed"
    runs = {}

    with kr.Launch(out, ARGS, root, "mid-step") as first:
        info = kr.kill_mid_step(first, step=2, phase=0.5, step_seconds=reference["step_seconds"])
    runs["mid-step"] = {"launch": first, "info": info, **_latest(out)}

    with kr.Launch(out, ARGS, root, "mid-save", resume_from=runs["mid-step"]["latest"]) as second:
        info = kr.kill_mid_save(second, min_step=4)  # the save at the end of stage 1, or the next one
    runs["mid-save"] = {"launch": second, "info": info, **_latest(out)}

    with kr.Launch(out, ARGS, root, "final", resume_from=runs["mid-save"]["latest"]) as final:
        runs["final"] = {"launch": final, "output": final.wait()}
    return out, runs


def test_reference_run(reference):
    assert reference["final_step"] == FINAL_STEP
    assert reference["state"]["global_step"] == reference["state"]["max_steps"] == FINAL_STEP
    assert kr.last_stage(reference["output"]) == 2


def test_kills_leave_no_process_behind(killed_twice):
    _, runs = killed_twice
    for kind in ("mid-step", "mid-save"):
        launch = runs[kind]["launch"]
        # the launcher (torchrun's agent) and one worker per rank, each worker in a session of its own: killing
        # the launcher's process group alone would have left the workers running
        assert len(launch.killed_pids) >= 3, launch.killed_pids
        assert launch.proc.returncode == -9
        assert not kr.alive(launch.killed_pids)


def test_mid_step_kill_resumes_from_a_complete_checkpoint(killed_twice):
    _, runs = killed_twice
    run = runs["mid-step"]
    # half a step after checkpoint 1 (a busy machine can shift that by a step): a complete checkpoint to resume from
    assert run["latest"] is not None and 1 <= run["state"]["global_step"] <= 3, run
    assert "Curriculum: epoch 0 (global step 0) trains at stage 0." in run["launch"].output


def test_mid_save_kill_never_leaves_the_incomplete_save_as_latest(killed_twice):
    _, runs = killed_twice
    run = runs["mid-save"]
    assert run["info"]["kind"] == "mid-save", run["info"]
    in_progress = [int(name.rsplit("-", 1)[1]) for name in run["info"]["in_progress"] if name[-1].isdigit()]
    assert in_progress and min(in_progress) >= 4, run["info"]
    # the checkpoint a resume picks was complete (every file loaded) and is the one before the interrupted save
    assert run["latest"] is not None and run["state"]["global_step"] < min(in_progress), run


def test_resumed_run_matches_the_uninterrupted_run(killed_twice, reference):
    out, runs = killed_twice
    final = runs["final"]
    resumed_from = kr._step_of(runs["mid-save"]["latest"])
    if resumed_from < 2 * kr.steps_per_epoch(N_TRAIN):  # resumed in stage 1: the run crossed into stage 2 again
        assert "trains at stage 2." in final["output"]
    result = kr.compare_with_reference(out, final["output"], reference)  # step, epoch, stages, checksums
    assert result["close"], result
    weights = load_file(out / f"checkpoint-{FINAL_STEP}" / "model.safetensors")
    expected = load_file(reference["out"] / f"checkpoint-{FINAL_STEP}" / "model.safetensors")
    for name, value in expected.items():
        torch.testing.assert_close(weights[name], value, rtol=kr.RTOL, atol=kr.ATOL, msg=name)


def test_complete_run_cleans_up_what_the_kills_left(killed_twice):
    out, _ = killed_twice
    assert kr.saves_in_progress(out) == []
    # save_total_limit 2 still holds
    assert sorted(kr.trainer_checkpoints(out)) == [FINAL_STEP - 1, FINAL_STEP]
