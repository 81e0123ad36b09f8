"""Reproducibility of the embedded default: run README's main command for several seeds and thread counts and
tabulate what each run reached.

    python benchmarks/repro_runs.py --seeds 0 1 2 --threads 1 2 --out docs/reproducibility [--parallel 2]

Every run is exactly README's command plus a seed and an output folder,
``accelerate launch examples/train.py --seed S --output_dir OUT/runs/seed{S}-t{N}``, started with
``OMP_NUM_THREADS=N`` in its environment (a thread count the user chose, which train.py keeps). The default run of
README, with no OMP_NUM_THREADS, uses every core: on a 2-core machine that is the ``t2`` run.

Runs whose ``report.json`` exists are not run again (the script resumes). 1-thread runs may run side by side
(``--parallel 2`` on a 2-core machine: one core each); runs with more threads than ``cores // parallel`` run alone,
so no run gets fewer cores than its threads. The load average is sampled every 10 s while a run is going and its
mean is recorded: on a shared machine the wall time depends on it.

Outputs in ``--out``: ``runs.json`` (per run: seed, threads, CoT warm-up accuracy, No-CoT warm-up accuracy, latent
accuracy, T = 0 accuracy, wall time, mean load, cores), ``table.md`` and ``accuracy.png`` (the accuracies of every
run) and ``warmup_ce.png`` (every run's training CE curve). The runs' folders stay under ``OUT/runs`` (not meant to
be committed: each holds checkpoints).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
TRAIN = REPO / "examples" / "train.py"


def cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def run_name(seed: int, threads: int) -> str:
    return f"seed{seed}-t{threads}"


def launch(seed: int, threads: int, runs_dir: Path, extra: list[str], nice: int = 0) -> dict:
    """One run of README's command (plus seed, output folder and the user's thread count); its summary."""
    out = runs_dir / run_name(seed, threads)
    out.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    command = ["accelerate", "launch", str(TRAIN), "--seed", str(seed), "--output_dir", str(out), *extra]
    loads, done = [], threading.Event()

    def sample_load():
        while not done.wait(10.0):
            loads.append(os.getloadavg()[0])

    sampler = threading.Thread(target=sample_load, daemon=True)
    started = time.time()
    sampler.start()
    print(f"[{time.strftime('%H:%M:%S')}] start {run_name(seed, threads)}: {' '.join(command)}", flush=True)
    with open(out / "train.log", "w") as log:
        code = subprocess.call(command, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT,
                               preexec_fn=(lambda: os.nice(nice)) if nice else None)
    done.set()
    wall = time.time() - started
    summary = summarise(out, seed, threads, wall, loads)
    summary["exit_code"] = code
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    print(f"[{time.strftime('%H:%M:%S')}] done {run_name(seed, threads)} (exit {code}): "
          f"{json.dumps({k: summary.get(k) for k in ('cot', 'latent', 't0', 'wall_seconds')})}", flush=True)
    return summary


def summarise(out: Path, seed: int, threads: int, wall: float | None, loads: list[float]) -> dict:
    report_path = out / "report.json"
    summary = {"run": run_name(seed, threads), "seed": seed, "threads": threads, "cores": cores(),
               "launcher_wall_seconds": wall, "mean_load": sum(loads) / len(loads) if loads else None,
               "max_load": max(loads) if loads else None}
    if not report_path.is_file():
        return summary
    report = json.loads(report_path.read_text())
    warm = report.get("warmup_results", {})
    results = report.get("results", {})
    summary.update({
        "cot": warm.get("cot", {}).get("accuracy"),
        "nocot_warmup": warm.get("nocot", {}).get("accuracy"),
        "latent": results.get("latent", {}).get("accuracy"),
        "t0": results.get("nocot", {}).get("accuracy"),
        "wall_seconds": report.get("wall_seconds"),
        "global_steps": report.get("global_steps"),
    })
    state = sorted((path for path in out.glob("checkpoint-*/trainer_state.json") if path.parent.name[11:].isdigit()),
                   key=lambda path: int(path.parent.name[11:]))
    history = report.get("log_history")
    if history is None and state:
        history = json.loads(state[-1].read_text()).get("log_history", [])
    summary["ce_curve"] = curve = [(r["step"], r["ce_loss"], r.get("stage")) for r in history or [] if "ce_loss" in r]
    warm = [ce for _, ce, stage in curve if stage == 0]
    summary["warmup_final_ce"] = warm[-1] if warm else None
    # the CE jump at each curriculum boundary: first log of the new stage (a mean over its first logging_steps
    # steps) over the last log of the previous one
    summary["stage_jumps"] = [
        {"step": step, "stage": stage, "ce_before": before, "ce_after": ce, "ratio": ce / before}
        for (_, before, previous), (step, ce, stage) in zip(curve, curve[1:]) if stage != previous and before > 0]
    return summary


def table_markdown(rows: list[dict]) -> str:
    def pct(value):
        return "n/a" if value is None else f"{100 * value:.1f}"

    lines = ["| Run | Seed | Threads | CoT (warm-up) | No-CoT (warm-up) | Vedas latent (T = 4) | T = 0 (final) | "
             "Warm-up CE (last log) | Wall (s) | Mean load |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        load = "n/a" if r.get("mean_load") is None else f"{r['mean_load']:.1f}"
        wall = "n/a" if r.get("wall_seconds") is None else f"{r['wall_seconds']:.0f}"
        ce = "n/a" if r.get("warmup_final_ce") is None else f"{r['warmup_final_ce']:.3f}"
        lines.append(f"| {r['run']} | {r['seed']} | {r['threads']} | {pct(r.get('cot'))} | {pct(r.get('nocot_warmup'))} "
                     f"| {pct(r.get('latent'))} | {pct(r.get('t0'))} | {ce} | {wall} | {load} |")
    done = [r for r in rows if r.get("latent") is not None]
    if done:
        def span(key):
            values = [100 * r[key] for r in done if r.get(key) is not None]
            return f"{min(values):.1f}-{max(values):.1f}" if values else "n/a"

        lines.append(f"| **range ({len(done)} runs)** | | | {span('cot')} | {span('nocot_warmup')} | {span('latent')} | "
                     f"{span('t0')} | | | |")
    return "\n".join(lines) + "\n"


def plot(rows: list[dict], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    done = [r for r in rows if r.get("latent") is not None]
    if done:
        fig, ax = plt.subplots(figsize=(8, 3.8))
        keys = [("cot", "CoT (warm-up)"), ("latent", "Vedas latent T=4"), ("t0", "T=0 (final)")]
        width = 0.8 / len(keys)
        for k, (key, label) in enumerate(keys):
            ax.bar([i + (k - 1) * width for i in range(len(done))], [100 * (r.get(key) or 0) for r in done], width,
                   label=label)
        ax.axhline(25, color="grey", ls="--", lw=0.8, label="chance")
        ax.set_xticks(range(len(done)), [r["run"] for r in done])
        ax.set_ylabel("test accuracy (%)")
        ax.set_ylim(0, 100)
        ax.legend(loc="lower right", fontsize=8)
        ax.set_title("Embedded default: accuracy per run")
        fig.tight_layout()
        fig.savefig(out / "accuracy.png", dpi=110)
        plt.close(fig)
    curves = [r for r in rows if r.get("ce_curve")]
    if curves:
        fig, ax = plt.subplots(figsize=(8, 3.8))
        for r in curves:
            ax.plot([c[0] for c in r["ce_curve"]], [c[1] for c in r["ce_curve"]], lw=0.9, label=r["run"])
        ax.set_yscale("log")
        ax.set_xlabel("step")
        ax.set_ylabel("training CE")
        ax.legend(fontsize=8)
        ax.set_title("Embedded default: training CE per run")
        fig.tight_layout()
        fig.savefig(out / "ce_curves.png", dpi=110)
        plt.close(fig)


def write(rows: list[dict], out: Path) -> None:
    rows = sorted(rows, key=lambda r: (r["threads"], r["seed"]))
    public = [{k: v for k, v in r.items() if k != "ce_curve"} for r in rows]
    (out / "runs.json").write_text(json.dumps(public, indent=2) + "\n")
    (out / "table.md").write_text(table_markdown(rows))
    plot(rows, out)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--out", default="docs/reproducibility")
    parser.add_argument("--parallel", type=int, default=1, help="runs at a time (only runs with threads <= "
                                                                 "cores // parallel share the machine)")
    parser.add_argument("--nice", type=int, default=0, help="scheduling priority change for the runs (negative: "
                                                             "raised, needs the right to; for a machine shared with "
                                                             "other jobs)")
    parser.add_argument("--only-table", action="store_true", help="rebuild the table and figures from the runs")
    parser.add_argument("extra", nargs="*", help="after --: more train.py options (the table is then not README's)")
    args = parser.parse_args(argv)
    out = (REPO / args.out) if not Path(args.out).is_absolute() else Path(args.out)
    runs_dir = out / "runs"
    runs_dir.mkdir(parents=True, exist_ok=True)
    plan = [(s, t) for t in args.threads for s in args.seeds]

    def existing(seed, threads):
        path = runs_dir / run_name(seed, threads) / "summary.json"
        return json.loads(path.read_text()) if path.is_file() else None

    todo = [(s, t) for s, t in plan if not (existing(s, t) or {}).get("latent") is not None]
    if not args.only_table:
        shared = [(s, t) for s, t in todo if t <= max(cores() // max(args.parallel, 1), 1)]
        alone = [(s, t) for s, t in todo if (s, t) not in shared]
        threads = []
        lock = threading.Lock()

        def worker():
            while True:
                with lock:
                    if not shared:
                        return
                    seed, n = shared.pop(0)
                launch(seed, n, runs_dir, args.extra, args.nice)

        for _ in range(max(args.parallel, 1)):
            thread = threading.Thread(target=worker)
            thread.start()
            threads.append(thread)
        for thread in threads:
            thread.join()
        for seed, n in alone:
            launch(seed, n, runs_dir, args.extra, args.nice)
    rows = []
    for seed, n in plan:
        summary = existing(seed, n)
        if summary is not None:
            folder = runs_dir / run_name(seed, n)
            fresh = summarise(folder, seed, n, summary.get("launcher_wall_seconds"), [])
            fresh.update({k: summary[k] for k in ("mean_load", "max_load", "exit_code") if k in summary})
            rows.append(fresh)
    write(rows, out)
    print(table_markdown(sorted(rows, key=lambda r: (r["threads"], r["seed"]))))
    return 0


if __name__ == "__main__":
    sys.exit(main())
