"""Kill and resume: SIGKILL a 2-process CPU training run at random points, resume it from its last checkpoint, and
check what is left behind and where the resumed run ends.

    python benchmarks/kill_resume.py --kills 12 [--seed 0] [--n_train 64] [--keep DIR]

Every trial starts a fresh run of `examples/train.py --quick` under `accelerate launch` with
`examples/configs/multi_cpu_gloo.yaml` (2 processes, gloo), a checkpoint every optimizer step and the last two kept
(`save_total_limit 2`, so rotation runs at every save). The run is killed one or more times; after every kill the
next launch resumes from `transformers.trainer_utils.get_last_checkpoint(output_dir)`, as `--resume_from_checkpoint`
users do, until a launch runs to the end. Kill points, drawn at random:

* `mid-step`: a random step and a random moment within it (which can fall into that step's save: the kill is then
  classified from what the frozen run was doing);
* `mid-save`: while a checkpoint folder is being written (the run is frozen with SIGSTOP as soon as a save shows up
  in the output folder, and killed only if the save is really incomplete, otherwise it is let go and the next save
  is tried);
* `stage-boundary`: just after the curriculum moved to a new stage and before that stage's first checkpoint, so
  the resumed run must cross the boundary again.

A kill freezes the whole process tree (the launcher, torchrun's agent and the workers, which torchrun starts in
sessions of their own, so killing the launcher's process group alone would leave them running) and then SIGKILLs
every process group in it. After each kill it checks that no process of the run survived and that the checkpoint
`get_last_checkpoint` picks is complete (trainer state, weights, optimizer, scheduler and both ranks' RNG states all
load, and its step matches its name). At the end of a trial it compares the final checkpoint with an uninterrupted
reference run of the same seed: same global step, epoch and logged stages, and weights bit-identical ("exact") or
within rtol 1e-4 / atol 1e-5.

`tests/test_kill_resume.py` drives the same harness with two fixed kills. docs/kill_resume.md has a reference run.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file
from transformers.trainer_utils import get_last_checkpoint

from vedas_trainer.testing import child_env, free_port


REPO = Path(__file__).resolve().parents[1]
TRAIN = REPO / "examples" / "train.py"
GLOO_CONFIG = REPO / "examples" / "configs" / "multi_cpu_gloo.yaml"
WORLD_SIZE = 2
PER_DEVICE_BATCH = 8  # what train.py --quick uses
QUICK_EPOCHS = 3  # --quick: one CoT warm-up epoch, then two latent stages of one epoch each
RTOL, ATOL = 1e-4, 1e-5
LAUNCH_TIMEOUT = 600
KILL_KINDS = ("mid-step", "mid-save", "stage-boundary")

CHECKPOINT_NAME = re.compile(r"^checkpoint-(\d+)$")
STAGE_LINE = re.compile(r"Curriculum: epoch (\d+) \(global step (\d+)\) trains at stage (\d+)\.")
CHECKSUM_LINE = re.compile(r"rank (\d+) parameter checksum ([0-9.]+) sha256 ([0-9a-f]{64}) \(global step (\d+)\)")
# what train.py itself writes into the output folder besides Trainer checkpoints
TRAIN_PY_OUTPUTS = {"base", "init", "checkpoint-final", "report.json", "loss_curve.png"}


def train_args(n_train: int, seed: int) -> list[str]:
    return ["--quick", "--evaluate_after", "false", "--n_train", str(n_train), "--seed", str(seed),
            "--save_strategy", "steps", "--save_steps", "1", "--save_total_limit", "2"]


def steps_per_epoch(n_train: int) -> int:
    return -(-n_train // (PER_DEVICE_BATCH * WORLD_SIZE))






# ------------------------------------------------------------------------------------------------ process trees


def _proc_table() -> dict[int, tuple[int, int, str]]:
    """pid -> (parent pid, process group, state) for every process, from /proc."""
    table = {}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            stat = Path("/proc", entry.name, "stat").read_text()
        except OSError:  # exited meanwhile
            continue
        # the command name may hold spaces and parentheses: the fields after it start after the last ")"
        state, ppid, pgrp = stat[stat.rindex(")") + 2:].split()[:3]
        table[int(entry.name)] = (int(ppid), int(pgrp), state)
    return table


def process_tree(root: int) -> dict[int, tuple[int, int, str]]:
    """The root process and all its descendants."""
    table = _proc_table()
    tree, frontier = {}, [root]
    while frontier:
        pid = frontier.pop()
        if pid in table and pid not in tree:
            tree[pid] = table[pid]
            frontier.extend(child for child, (ppid, _, _) in table.items() if ppid == pid)
    return tree


def alive(pids) -> list[int]:
    """The pids that still run (zombies, dead but not yet reaped by their new parent, do not count)."""
    table = _proc_table()
    return [pid for pid in pids if pid in table and table[pid][2] not in ("Z", "X")]


# --------------------------------------------------------------------------------------------------- one launch


@dataclass
class Launch:
    """One `accelerate launch examples/train.py` in a session of its own; its output is read line by line."""

    out: Path
    args: list[str]
    scratch: Path
    name: str
    resume_from: Path | None = None
    lines: list[tuple[float, str]] = field(default_factory=list)
    killed_pids: list[int] = field(default_factory=list)

    def __post_init__(self):
        command = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(GLOO_CONFIG),
                   "--main_process_port", str(free_port()), str(TRAIN), "--output_dir", str(self.out), *self.args]
        if self.resume_from is not None:
            command += ["--resume_from_checkpoint", str(self.resume_from)]
        self.stale = leftovers(self.out)
        self.log_path = self.scratch / f"{self.name}.log"
        self.started = time.monotonic()
        # a session (and process group) of its own: the kill below must not reach the caller
        self.proc = subprocess.Popen(command, cwd=REPO, env=child_env(self.scratch), stdout=subprocess.PIPE,
                                     stderr=subprocess.STDOUT, text=True, errors="replace", start_new_session=True)
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self):
        with open(self.log_path, "w") as log:
            for line in self.proc.stdout:
                self.lines.append((time.monotonic(), line))
                log.write(line)

    @property
    def output(self) -> str:
        return "".join(line for _, line in self.lines)

    def finished(self) -> bool:
        return self.proc.poll() is not None

    def wait(self, timeout: float = LAUNCH_TIMEOUT) -> str:
        """Waits for the launch to end by itself; raises with the output's tail if it failed."""
        try:
            self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            raise RuntimeError(f"{self.name}: no end after {timeout} s:\n{self.output[-4000:]}")
        self._reader.join()
        if self.proc.returncode != 0:
            raise RuntimeError(f"{self.name} exited {self.proc.returncode}:\n{self.output[-6000:]}")
        return self.output

    # ---- where the run is
    def stage_lines(self) -> list[tuple[float, int, int, int]]:
        """(time, epoch, global step, stage) of each curriculum line (one per process and stage change)."""
        return [(t, *map(int, m.groups())) for t, line in list(self.lines) if (m := STAGE_LINE.search(line))]

    def training_started(self) -> bool:
        return bool(self.stage_lines())

    def saves_in_progress(self) -> list[str]:
        return saves_in_progress(self.out, ignore=self.stale)

    # ---- freezing and killing
    def freeze(self) -> dict[int, tuple[int, int, str]]:
        """SIGSTOPs every process group of the tree until no new process shows up; returns the tree."""
        seen: dict[int, tuple[int, int, str]] = {}
        while True:
            tree = process_tree(self.proc.pid)
            new = set(tree) - set(seen)
            seen.update(tree)
            if not new:
                return seen
            for group in self._groups(tree):
                os.killpg(group, signal.SIGSTOP)

    def resume_running(self, tree) -> None:
        for group in self._groups(tree):
            os.killpg(group, signal.SIGCONT)

    def kill(self, tree=None) -> list[int]:
        """SIGKILL the whole (frozen) tree; returns the pids that were killed. Every one of them must be gone."""
        tree = tree if tree is not None else self.freeze()
        for group in self._groups(tree):
            os.killpg(group, signal.SIGKILL)
        self.proc.wait(timeout=60)
        self._reader.join(timeout=60)
        deadline = time.monotonic() + 30
        while alive(tree) and time.monotonic() < deadline:
            time.sleep(0.05)
        survivors = alive(tree)
        if survivors:
            raise RuntimeError(f"{self.name}: processes {survivors} survived SIGKILL of their process groups")
        self.killed_pids = sorted(tree)
        return self.killed_pids

    def stop(self) -> None:
        """Kills the launch if it still runs (cleanup after an error; never raises)."""
        if self.proc.poll() is None:
            try:
                self.kill()
            except Exception as error:  # the caller's error matters more
                print(f"{self.name}: cleanup failed: {error}", file=sys.stderr)

    def __enter__(self):
        return self

    def __exit__(self, *exc_info):
        self.stop()

    def _groups(self, tree) -> list[int]:
        # every process group led by a process of this tree: the launcher's session and one per torchrun worker
        # (a group led by something else, which should not happen, is never signalled)
        return sorted({pgrp for pid, (_, pgrp, _) in tree.items() if pgrp in tree})


# ------------------------------------------------------------------------------------------ checkpoints on disk


def trainer_checkpoints(out: Path) -> dict[int, Path]:
    """Completely written checkpoint-N folders directly in `out`, by step."""
    found = {}
    for entry in (os.scandir(out) if out.is_dir() else ()):
        match = CHECKPOINT_NAME.match(entry.name)
        if match and entry.is_dir() and os.path.exists(os.path.join(entry.path, "trainer_state.json")):
            found[int(match.group(1))] = Path(entry.path)
    return found


def _entry_id(entry: os.DirEntry) -> tuple[str, int, int]:
    stat = entry.stat(follow_symlinks=False)
    return entry.name, stat.st_ino, stat.st_mtime_ns


def saves_in_progress(out: Path, ignore: frozenset = frozenset()) -> list[str]:
    """What shows a Trainer save under way: a checkpoint-N folder without its trainer state (the Trainer writes it
    last), or any other entry naming a checkpoint (e.g. a staging folder). It does not depend on how saves work.
    `ignore` holds `(name, inode, mtime)` of entries that a killed launch left behind and nothing has touched since."""
    busy = []
    try:
        entries = list(os.scandir(out))
    except FileNotFoundError:
        return busy
    for entry in entries:
        if entry.name in TRAIN_PY_OUTPUTS or "checkpoint" not in entry.name:
            continue
        if CHECKPOINT_NAME.match(entry.name) and os.path.exists(os.path.join(entry.path, "trainer_state.json")):
            continue
        try:
            if _entry_id(entry) in ignore:
                continue
            # a staging folder holding checkpoint-N folders: name those, they say which step is being saved
            inner = [f"{entry.name}/{name}" for name in os.listdir(entry.path) if "checkpoint-" in name] \
                if entry.is_dir() and not CHECKPOINT_NAME.match(entry.name) else []
        except FileNotFoundError:  # removed meanwhile
            continue
        busy.extend(inner or [entry.name])
    return sorted(busy)


def leftovers(out: Path) -> frozenset:
    """Identities of the entries `saves_in_progress` reports now (what an earlier, killed launch left)."""
    found = set()
    busy = {name.split("/")[0] for name in saves_in_progress(out)}
    for entry in (os.scandir(out) if out.is_dir() else ()):
        if entry.name in busy:
            try:
                found.add(_entry_id(entry))
            except FileNotFoundError:
                pass
    return frozenset(found)


def check_checkpoint(folder: Path, world_size: int = WORLD_SIZE) -> dict:
    """Loads everything a resume loads from a Trainer checkpoint; raises AssertionError naming what is wrong."""
    step = int(CHECKPOINT_NAME.match(folder.name).group(1))
    try:
        state = json.loads((folder / "trainer_state.json").read_text())
    except (OSError, ValueError) as error:
        raise AssertionError(f"{folder.name}: unreadable trainer_state.json ({error})") from error
    assert state["global_step"] == step, f"{folder.name}: trainer state at step {state['global_step']}"
    try:
        weights = load_file(folder / "model.safetensors")
    except Exception as error:  # safetensors raises its own error types on truncated files
        raise AssertionError(f"{folder.name}: model.safetensors does not load ({error})") from error
    assert weights and all(torch.isfinite(t).all() for t in weights.values()), f"{folder.name}: non-finite weights"
    for name in ("optimizer.pt", "scheduler.pt", *(f"rng_state_{rank}.pth" for rank in range(world_size))):
        try:
            torch.load(folder / name, weights_only=False)
        except Exception as error:
            raise AssertionError(f"{folder.name}: {name} does not load ({error})") from error
    assert (folder / "training_args.bin").is_file(), f"{folder.name}: no training_args.bin"
    return state


def check_latest(out: Path) -> Path | None:
    """The checkpoint a resume would pick, after checking that it is complete."""
    latest = get_last_checkpoint(str(out)) if out.is_dir() else None
    if latest is not None:
        check_checkpoint(Path(latest))
    return None if latest is None else Path(latest)


# ---------------------------------------------------------------------------------------------------- kill points


class KillMissed(Exception):
    """The run ended before the kill point came."""


def _wait(launch: Launch, condition, what: str, poll: float = 0.001):
    while not condition():
        if launch.finished():
            _ended(launch, what)
        time.sleep(poll)


def _ended(launch: Launch, what: str):
    launch.wait()  # raises with the output's tail if the launch failed
    raise KillMissed(f"{launch.name} ended before {what}")


def kill_mid_save(launch: Launch, min_step: int) -> dict:
    """Freezes the run as soon as a save of step >= `min_step` shows up; kills it if the save is incomplete then,
    else lets it go on and tries the next save."""
    _wait(launch, launch.training_started, "training started")
    while True:
        def save_shows_up():
            return any(int(m.group(1)) >= min_step for name in launch.saves_in_progress()
                       if (m := re.search(r"checkpoint-(\d+)$", name)))
        _wait(launch, save_shows_up, f"a save of step >= {min_step}", poll=0.0005)
        tree = launch.freeze()
        busy = launch.saves_in_progress()
        if busy:
            launch.kill(tree)
            return {"kind": "mid-save", "in_progress": busy}
        launch.resume_running(tree)  # the save completed before the freeze landed: try the next one
        min_step = max(trainer_checkpoints(launch.out), default=min_step) + 1


def kill_after(launch: Launch, condition, what: str, delay: float, kind: str) -> dict:
    """Kills the run `delay` seconds after `condition` holds; says what the frozen run was doing."""
    _wait(launch, condition, what)
    deadline = time.monotonic() + delay
    while time.monotonic() < deadline:
        if launch.finished():
            _ended(launch, f"{what} + {delay:.2f} s")
        time.sleep(0.001)
    tree = launch.freeze()
    busy = launch.saves_in_progress()
    if launch.finished():
        _ended(launch, f"{what} + {delay:.2f} s")
    launch.kill(tree)
    # what the frozen run was doing: a Trainer save, train.py's work after training (checksums, the final
    # checkpoint-final folder), or else a training step
    observed = "mid-save" if busy else "after-training" if CHECKSUM_LINE.search(launch.output) else kind
    return {"kind": observed, "planned": kind, "in_progress": busy}


def kill_mid_step(launch: Launch, step: int, phase: float, step_seconds: float) -> dict:
    """Kills the run `phase` of a step after checkpoint `step - 1` is complete (or training started, for step 1)."""
    def previous_done():
        if step <= 1 or launch.resume_from is not None and step - 1 <= _step_of(launch.resume_from):
            return launch.training_started()
        return (step - 1) in trainer_checkpoints(launch.out)
    info = kill_after(launch, previous_done, f"checkpoint {step - 1}", phase * step_seconds, "mid-step")
    return {**info, "step": step, "phase": round(phase, 2)}


def kill_at_stage_boundary(launch: Launch, stage: int, phase: float, step_seconds: float) -> dict:
    """Kills the run `phase` of a step after the curriculum moved to `stage` (before its first checkpoint)."""
    def crossed():  # `stage` is past the one the launch started in, so its line marks a crossing
        return any(s == stage for _, _, _, s in launch.stage_lines())
    info = kill_after(launch, crossed, f"the move to stage {stage}", phase * step_seconds, "stage-boundary")
    return {**info, "stage": stage, "phase": round(phase, 2)}


def _step_of(checkpoint: Path | None) -> int:
    return 0 if checkpoint is None else int(CHECKPOINT_NAME.match(Path(checkpoint).name).group(1))


# ------------------------------------------------------------------------------------------------ whole runs


def reference_run(root: Path, args: list[str]) -> dict:
    """An uninterrupted run: its final checkpoint, state, logs and how long a training step takes."""
    out = root / "reference"
    with Launch(out, args, root, "reference") as launch:
        output = launch.wait()
    stages = launch.stage_lines()
    end = next(t for t, line in launch.lines if CHECKSUM_LINE.search(line))
    final_step = max(trainer_checkpoints(out))
    state = check_checkpoint(out / f"checkpoint-{final_step}")
    return {"out": out, "final_step": final_step, "state": state, "output": output,
            "step_seconds": (end - stages[0][0]) / final_step, "checksums": checksums(output)}


def checksums(output: str) -> dict[int, tuple[str, int]]:
    return {int(rank): (digest, int(step)) for rank, _, digest, step in CHECKSUM_LINE.findall(output)}


def compare_with_reference(out: Path, final_output: str, reference: dict) -> dict:
    """Same step, epoch, stage sequence and (within tolerance or exactly) the same weights as the reference."""
    step = reference["final_step"]
    folder = out / f"checkpoint-{step}"
    state = check_checkpoint(folder)
    ref_state = reference["state"]
    assert state["global_step"] == ref_state["global_step"] == state["max_steps"], (state["global_step"], step)
    assert abs(state["epoch"] - ref_state["epoch"]) < 1e-9, (state["epoch"], ref_state["epoch"])

    def stages(s):
        return [(e["step"], e["stage"]) for e in s["log_history"] if "loss" in e]
    assert stages(state) == stages(ref_state), (stages(state), stages(ref_state))
    # the final launch ends in the reference's last stage (each launch logs its stage at start and at every change)
    assert last_stage(final_output) == last_stage(reference["output"]), (last_stage(final_output),
                                                                        last_stage(reference["output"]))
    # both ranks of the final launch end with the same weights, at the same step as the reference
    sums = checksums(final_output)
    assert sorted(sums) == list(range(WORLD_SIZE)), sums
    assert len({digest for digest, _ in sums.values()}) == 1 and {s for _, s in sums.values()} == {step}, sums

    weights, ref_weights = load_file(folder / "model.safetensors"), load_file(
        reference["out"] / f"checkpoint-{step}" / "model.safetensors")
    assert weights.keys() == ref_weights.keys()
    exact = all(torch.equal(weights[name], ref_weights[name]) for name in ref_weights)
    max_diff = max((weights[n].double() - ref_weights[n].double()).abs().max().item() for n in ref_weights)
    close = all(torch.allclose(weights[n], ref_weights[n], rtol=RTOL, atol=ATOL) for n in ref_weights)
    return {"exact": exact, "close": close, "max_abs_diff": max_diff,
            "digest_equal": sums[0][0] == reference["checksums"][0][0]}


def last_stage(output: str) -> int | None:
    stages = [int(match.group(3)) for match in STAGE_LINE.finditer(output)]
    return stages[-1] if stages else None


def resume_point(out: Path) -> Path | None:
    """The checkpoint the next launch resumes from (checked complete), None to start over."""
    return check_latest(out) if out.is_dir() else None


def run_trial(root: Path, args: list[str], reference: dict, kills: list[dict], n_train: int, name: str,
              record: dict) -> dict:
    """Launches, kills at each planned point, resumes from the latest checkpoint, and compares the end with the
    reference. Fills `record` as it goes (so that a failure keeps what happened before it) and returns it."""
    out = root / name
    per_epoch = steps_per_epoch(n_train)
    record["kills"] = []
    for index, plan in enumerate(kills):
        resume = resume_point(out)
        start = _step_of(resume)
        with Launch(out, args, root, f"{name}-{index}", resume_from=resume) as launch:
            info = _kill_as_planned(launch, plan, start, per_epoch, reference)
        if info is None:
            record["kills"].append({"kind": "missed", "planned": plan["kind"]})
            break
        info["resumed_from"] = resume and resume.name
        info["killed_processes"] = len(launch.killed_pids)
        record["kills"].append(info)
        latest = resume_point(out)  # raises if the checkpoint a resume would pick is incomplete
        info["latest"] = latest and latest.name
    resume = resume_point(out)
    record["final_resumed_from"] = resume and resume.name
    with Launch(out, args, root, f"{name}-final", resume_from=resume) as final:
        final_output = final.wait()
    left = saves_in_progress(out)
    assert not left, f"{name}: left over after a complete run: {left}"
    record.update(compare_with_reference(out, final_output, reference))
    return record


def _kill_as_planned(launch: Launch, plan: dict, start: int, per_epoch: int, reference: dict) -> dict | None:
    """Kills `launch` at the planned point, moved past its start step; None when the run ended first."""
    # stages ahead of this launch's start (stage s starts after step s * steps per epoch in --quick)
    ahead = [s for s in range(1, QUICK_EPOCHS) if s * per_epoch > start]
    try:
        if plan["kind"] == "stage-boundary" and ahead:
            stage = plan["stage"] if plan["stage"] in ahead else ahead[0]
            return kill_at_stage_boundary(launch, stage, plan["phase"], reference["step_seconds"])
        if plan["kind"] == "mid-save":
            return kill_mid_save(launch, min_step=max(plan["step"], start + 1))
        return kill_mid_step(launch, max(plan["step"], start + 1), plan["phase"], reference["step_seconds"])
    except KillMissed:
        return None


def plan_kills(rng: random.Random, count: int, n_train: int, kinds=KILL_KINDS) -> list[dict]:
    per_epoch = steps_per_epoch(n_train)
    total = per_epoch * QUICK_EPOCHS
    plans = []
    for _ in range(count):
        kind = rng.choice(list(kinds))
        plans.append({"kind": kind, "step": rng.randint(1, total), "phase": rng.random(),
                      "stage": rng.randint(1, QUICK_EPOCHS - 1)})
    return plans


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--kills", type=int, default=10, help="How many kills to try in all.")
    parser.add_argument("--max_kills_per_trial", type=int, default=2,
                        help="A trial kills a run, resumes it, possibly kills the resumed run again, ...")
    parser.add_argument("--points", nargs="+", choices=KILL_KINDS, default=list(KILL_KINDS),
                        help="The kinds of kill points to draw from.")
    parser.add_argument("--n_train", type=int, default=64, help="Training samples (64: 4 steps per epoch).")
    parser.add_argument("--seed", type=int, default=0, help="Seed of the kill points (the training seed is fixed).")
    parser.add_argument("--keep", type=Path, default=None, help="Keep the runs and logs in this folder.")
    parser.add_argument("--json", type=Path, default=None, help="Write the results as JSON here.")
    options = parser.parse_args(argv)

    rng = random.Random(options.seed)
    args = train_args(options.n_train, seed=7)
    scratch = tempfile.TemporaryDirectory(prefix="kill_resume_") if options.keep is None else None
    root = Path(scratch.name) if scratch else options.keep
    root.mkdir(parents=True, exist_ok=True)
    started = time.time()
    print(f"load average {os.getloadavg()[0]:.1f}; runs in {root}", flush=True)
    reference = reference_run(root, args)
    print(f"reference: {reference['final_step']} steps, {reference['step_seconds']:.2f} s per step", flush=True)

    trials, tried = [], 0
    while tried < options.kills and len(trials) < 3 * options.kills:  # (a trial whose kills all miss tries nothing)
        count = min(rng.randint(1, options.max_kills_per_trial), options.kills - tried)
        record = {"planned": plan_kills(rng, count, options.n_train, options.points)}
        try:
            run_trial(root, args, reference, record["planned"], options.n_train, f"trial{len(trials)}", record)
        except (AssertionError, RuntimeError) as error:
            record["error"] = f"{type(error).__name__}: {str(error)[-3000:]}"
        trials.append(record)
        tried += sum(kill["kind"] != "missed" for kill in record.get("kills", []))
        print(f"trial{len(trials) - 1}: {json.dumps({k: v for k, v in record.items() if k != 'planned'})}",
              flush=True)

    kills = [(kill, trial) for trial in trials for kill in trial.get("kills", []) if kill["kind"] != "missed"]
    summary = {
        "kills_tried": len(kills),
        "kills_by_point": dict(Counter(kill["kind"] for kill, _ in kills)),
        "kills_resumed_exactly": sum(bool(trial.get("exact")) for _, trial in kills),
        "kills_resumed_within_tolerance": sum(bool(trial.get("close")) for _, trial in kills),
        "kills_leaving_an_incomplete_latest_checkpoint_or_failing": sum("error" in trial for _, trial in kills),
        "trials": len(trials),
        "trials_exact": sum(bool(trial.get("exact")) for trial in trials),
        "trial_errors": [trial["error"] for trial in trials if "error" in trial],
        "n_train": options.n_train,
        "steps": reference["final_step"],
        "seconds_per_step": round(reference["step_seconds"], 3),
        "wall_seconds": round(time.time() - started),
    }
    print(json.dumps(summary, indent=2))
    if options.json:
        options.json.write_text(json.dumps({"summary": summary, "trials": trials}, indent=2, default=str))
    if scratch:
        scratch.cleanup()
    return 0 if not summary["trial_errors"] and summary["kills_resumed_within_tolerance"] == len(kills) else 1


if __name__ == "__main__":
    sys.exit(main())
