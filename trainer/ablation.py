"""Retrained ablations (``examples/ablate.py``): the variants, the statistics over seeds and test samples, and the
reports (Markdown, JSON, a PNG bar chart).

Every variant is a set of ``train.py`` options: VedasConfig overrides (``--vedas_overrides``) and, for the curriculum,
a training option. All variants share the base, the data, the training budget and the seeds, so for one seed two
variants differ only in what the variant changes (the tiny base of the embedded default is built from the seed).
Most variants change the latent phase only: the CoT warm-up (stage 0) runs no latent step, so with a shared warm-up
it is trained once per seed (by ``full``, which keeps its checkpoint) and those variants continue from it. The RDS
variants (``no_rds``, ``literal_eq11``, the α sweep) change stage 0 too, since routing depth scaling runs in every
forward pass (the router statistics of stage 0 show it): they are trained from scratch (``Variant.shares_warmup``).

Statistics, per variant:

* accuracy: mean and sample standard deviation over the seeds;
* the paired difference against ``full``: per test sample i and seed s, d(s, i) = correct_variant(s, i) -
  correct_full(s, i) over the seeds both ran; the estimate is the mean of d, its 95% interval the 2.5 / 97.5
  percentiles of that mean over bootstrap resamples of the test samples (the same resample for every seed, so a
  sample's seeds stay together);
* replay grounding (synthetic data): replay and crop-window hit rates with their chance levels, averaged over seeds.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

__all__ = [
    "Variant",
    "build_variants",
    "select_variants",
    "paired_bootstrap",
    "summarize_runs",
    "warmup_summary",
    "ablation_markdown",
    "plot_ablation",
    "write_reports",
]


@dataclass(frozen=True)
class Variant:
    """One retrained variant: VedasConfig ``overrides`` and extra ``train.py`` options, applied over the shared
    options of every run. ``shares_warmup``: the variant trains the same CoT warm-up as ``full`` (it changes the
    latent phase only), so it can continue ``full``'s warm-up; tests/test_ablate.py checks this for every variant."""

    name: str
    description: str
    overrides: Mapping[str, Any] = field(default_factory=dict)
    train_options: tuple[str, ...] = ()
    shares_warmup: bool = True


CORE = (
    Variant("full", "everything on (the shared options)"),
    Variant("no_rds", "without RDS: no routing layers", {"routing_layers": []}, shares_warmup=False),
    Variant("no_scfvr", "without SCF-VR: no replay (K = 0), λ = 0", {"num_replay_tokens": 0, "recon_weight": 0.0}),
    Variant("no_distill", "without self-distillation: replay kept, λ = 0", {"recon_weight": 0.0}),
    Variant("no_curriculum", "without the curriculum: all steps latent from the first latent epoch", {},
            ("--skip_curriculum", "True")),
    Variant("sequential_positions", "replay slots at sequential positions", {"replay_positions": "sequential"}),
    Variant("soft_mix", "replay as one soft-mixed token", {"replay_mode": "soft_mix"}),
    Variant("literal_eq11", "Eq. 11 as printed: every token scaled by 1 + e(d)", {"depth_residual": "literal"},
            shares_warmup=False),
)


def _number(value: float) -> str:
    return f"{value:g}"


def build_variants(sweep_k: Sequence[int] = (1, 4), sweep_window: Sequence[int] = (1, 3),
                   sweep_alpha: Sequence[float] = (0.125, 0.5)) -> dict[str, Variant]:
    """The core variants, then the sweeps over K (``K1``...), the window W (``W3``...) and α (``alpha0.5``...)."""
    variants = {v.name: v for v in CORE}
    sweeps = [Variant(f"K{k}", f"K = {k} replayed tokens", {"num_replay_tokens": int(k)}) for k in sweep_k]
    sweeps += [Variant(f"W{w}", f"crop window W = {w}", {"window_size": int(w)}) for w in sweep_window]
    sweeps += [Variant(f"alpha{_number(a)}", f"α = {_number(a)} routed tokens",
                       {"routing_topk": int(a) if float(a).is_integer() and a >= 1 else float(a)}, shares_warmup=False)
               for a in sweep_alpha]
    variants.update((v.name, v) for v in sweeps)
    return variants


def select_variants(spec: str, variants: Mapping[str, Variant]) -> list[Variant]:
    """`--variants`: comma-separated names or groups (``all``, ``core``, ``sweeps``); ``full`` always comes first,
    added when missing, since every difference is taken against it."""
    core = [v.name for v in CORE]
    groups = {"all": list(variants), "core": core, "sweeps": [name for name in variants if name not in core]}
    names = []
    for item in (part.strip() for part in spec.split(",")):
        if not item:
            continue
        expanded = groups.get(item, [item])
        unknown = [name for name in expanded if name not in variants]
        if unknown:
            raise ValueError(f"unknown variant {unknown[0]!r}; expected all, core, sweeps or one of "
                             f"{', '.join(variants)}")
        names += [name for name in expanded if name not in names]
    if "full" in names:
        names.remove("full")
    return [variants["full"]] + [variants[name] for name in names]


# ----------------------------------------------------------------------------------------------------- statistics
def paired_bootstrap(full: Mapping[int, Sequence[bool]], variant: Mapping[int, Sequence[bool]],
                     n_boot: int = 10000, seed: int = 0, level: float = 0.95) -> dict | None:
    """Mean paired difference (variant - full, in accuracy units) over the seeds both ran and its bootstrap interval
    over test samples. ``full`` / ``variant`` map a seed to per-sample correctness on the same test samples."""
    seeds = sorted(set(full) & set(variant))
    if not seeds:
        return None
    lengths = {len(full[s]) for s in seeds} | {len(variant[s]) for s in seeds}
    if len(lengths) != 1:
        raise ValueError(f"paired runs must score the same test samples, got sample counts {sorted(lengths)}")
    diff = np.array([np.asarray(variant[s], float) - np.asarray(full[s], float) for s in seeds])  # (seeds, n)
    per_sample = diff.mean(0)
    rng = np.random.default_rng(seed)
    n = per_sample.shape[0]
    means = np.empty(n_boot)
    for begin in range(0, n_boot, 1000):  # chunks keep the index matrix small for large test sets
        idx = rng.integers(0, n, size=(min(1000, n_boot - begin), n))
        means[begin : begin + idx.shape[0]] = per_sample[idx].mean(1)
    tail = 100 * (1 - level) / 2
    low, high = np.percentile(means, [tail, 100 - tail])
    return {"diff": float(per_sample.mean()), "low": float(low), "high": float(high), "seeds": seeds,
            "num_samples": int(n), "level": level, "n_boot": int(n_boot)}


def _mean_std(values: Sequence[float]) -> tuple[float | None, float | None]:
    values = [v for v in values if v is not None]
    if not values:
        return None, None
    mean = sum(values) / len(values)
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1)) if len(values) > 1 else 0.0
    return mean, std


def summarize_runs(variants: Sequence[Variant], runs: Mapping[tuple[str, int], Mapping[str, Any]],
                   n_boot: int = 10000) -> dict:
    """Per variant: accuracy per seed, mean and std, the paired difference against ``full`` with its interval,
    grounding means and train time. ``runs`` maps (variant name, seed) to a run's result record."""
    full = {seed: run["correct"] for (name, seed), run in runs.items() if name == "full"}
    table = {}
    for variant in variants:
        mine = {seed: run for (name, seed), run in sorted(runs.items()) if name == variant.name}
        accuracy = {seed: run["accuracy"] for seed, run in mine.items()}
        mean, std = _mean_std(list(accuracy.values()))
        grounding = {}
        for key in ("replay_hit_rate", "replay_chance", "window_hit_rate", "window_chance"):
            grounding[key] = _mean_std([(run.get("grounding") or {}).get(key) for run in mine.values()])[0]
        table[variant.name] = {
            "description": variant.description, "overrides": dict(variant.overrides),
            "train_options": list(variant.train_options), "shares_warmup": variant.shares_warmup,
            "seeds": sorted(mine), "accuracy_per_seed": accuracy,
            "accuracy_mean": mean, "accuracy_std": std, **grounding,
            "vs_full": None if variant.name == "full" else paired_bootstrap(
                full, {seed: run["correct"] for seed, run in mine.items()}, n_boot),
            "train_seconds_mean": _mean_std([run.get("train_seconds") for run in mine.values()])[0],
        }
    return table


def warmup_summary(records: Mapping[int, Mapping[str, Any]]) -> dict:
    """Per seed, the shared warm-up's steps and its No-CoT / CoT accuracy (from its evaluation record)."""
    return {seed: {"global_steps": record["global_steps"], "nocot_accuracy": record["nocot"]["accuracy"],
                   "cot_accuracy": record["cot"]["accuracy"], "num_samples": record["cot"]["num_samples"]}
            for seed, record in sorted(records.items())}


# ----------------------------------------------------------------------------------------------------- reports
def _pct(value, digits=1) -> str:
    return "n/a" if value is None else f"{100 * value:.{digits}f}"


def _row(name: str, row: Mapping[str, Any]) -> str:
    accuracy = "n/a" if row["accuracy_mean"] is None else f"{_pct(row['accuracy_mean'])} ± {_pct(row['accuracy_std'])}"
    vs = row["vs_full"]
    diff = "—" if name == "full" else ("n/a" if vs is None else f"{100 * vs['diff']:+.1f}")
    interval = "—" if name == "full" else ("n/a" if vs is None else f"[{100 * vs['low']:+.1f}, {100 * vs['high']:+.1f}]")
    chance = f"{_pct(row['replay_chance'])} / {_pct(row['window_chance'])}"
    seconds = "n/a" if row["train_seconds_mean"] is None else f"{row['train_seconds_mean']:.0f}"
    return (f"| {name} | {row['description']} | {len(row['seeds'])} | {accuracy} | {diff} | {interval} | "
            f"{_pct(row['replay_hit_rate'])} | {_pct(row['window_hit_rate'])} | {chance} | {seconds} |")


def _warmup_lines(table: Mapping[str, Mapping[str, Any]], setup: Mapping[str, Any]) -> list[str]:
    """What the shared warm-up is, which variants continue it, and its No-CoT / CoT accuracy per seed."""
    if not setup.get("shared_warmup"):
        return []
    scratch = [name for name, row in table.items() if not row.get("shares_warmup", True)]
    lines = ["", "## Shared CoT warm-up", "",
             "Stage 0 (explicit CoT) runs no latent step, so a variant that changes only the latent phase trains the "
             "same model there as full: full keeps its checkpoint at the end of the warm-up, and those variants "
             "continue from it (weights, optimizer, learning-rate schedule of the whole run, RNG), exactly as if "
             "they had trained the warm-up themselves. Their Train s / run is the latent phase only."
             + (f" Trained from scratch, since routing depth scaling runs in every forward pass, stage 0 included: "
                f"{', '.join(scratch)}." if scratch else ""),
             "", "The warm-up model of each seed on the same test samples (its CoT baseline):", "",
             "| Seed | Warm-up steps | No-CoT (%) | CoT (%) |", "|---|---|---|---|"]
    for seed, row in setup.get("warmup", {}).items():
        lines.append(f"| {seed} | {row['global_steps']} | {_pct(row['nocot_accuracy'])} | "
                     f"{_pct(row['cot_accuracy'])} |")
    return lines


def ablation_markdown(table: Mapping[str, Mapping[str, Any]], setup: Mapping[str, Any]) -> str:
    """The ablation table with a header that states the shared setup."""
    start = (" (a variant that changes only the latent phase continues the shared CoT warm-up of its seed, below)"
             if setup.get("shared_warmup") else " from scratch")
    lines = [
        "# Retrained ablations", "",
        f"Every variant is trained{start} with the same options, data and seeds ({setup['seeds']}) and "
        f"evaluated in the latent mode on the same {setup['num_test_samples']} test samples "
        f"({setup['test_data']}).", "",
        f"Shared `train.py` options: `{setup['train_options'] or '(the embedded default)'}`.", "",
        "Accuracy: mean ± standard deviation over seeds. Δ vs full: mean paired difference per test sample and seed, "
        f"in points; interval: {int(100 * setup['level'])}% bootstrap over test samples ({setup['n_boot']} "
        "resamples). Replay / window hit: share of latent steps whose replayed tokens / crop window hold the cell that "
        "the CoT step they replaced names; chance: K random tokens / the window's share of the grid.", "",
        "| Variant | Change | Seeds | Accuracy (%) | Δ vs full (pp) | 95% CI (pp) | Replay hit (%) | Window hit (%) "
        "| Chance replay / window (%) | Train s / run |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    lines += [_row(name, row) for name, row in table.items()]
    lines += _warmup_lines(table, setup)
    if setup.get("missing"):
        lines += ["", f"Runs missing (failed or not run): {', '.join(setup['missing'])}."]
    return "\n".join(lines) + "\n"


def plot_ablation(table: Mapping[str, Mapping[str, Any]], path, chance: float | None = None) -> Path:
    """Bars of mean accuracy with std error bars and per-seed dots; beside them Δ vs full with its interval."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(table)
    x = np.arange(len(names))
    fig, (left, right) = plt.subplots(1, 2, figsize=(max(8, 1.1 * len(names) + 4), 4.5))
    means = [100 * (table[n]["accuracy_mean"] or 0) for n in names]
    stds = [100 * (table[n]["accuracy_std"] or 0) for n in names]
    left.bar(x, means, yerr=stds, capsize=4, color="tab:blue", alpha=0.7)
    for i, name in enumerate(names):
        seeds = list(table[name]["accuracy_per_seed"].values())
        left.scatter([i] * len(seeds), [100 * a for a in seeds], color="black", s=10, zorder=3)
    if chance is not None:
        left.axhline(100 * chance, color="grey", linestyle=":", label="chance")
        left.legend(fontsize=8)
    left.set_ylabel("latent accuracy (%)")
    left.set_title("mean ± std over seeds (dots: seeds)", fontsize=9)
    others = [n for n in names if n != "full" and table[n]["vs_full"]]
    diffs = [100 * table[n]["vs_full"]["diff"] for n in others]
    errors = [[d - 100 * table[n]["vs_full"]["low"] for n, d in zip(others, diffs)],
              [100 * table[n]["vs_full"]["high"] - d for n, d in zip(others, diffs)]]
    right.bar(np.arange(len(others)), diffs, yerr=errors, capsize=4, color="tab:orange", alpha=0.7)
    right.axhline(0, color="black", linewidth=0.8)
    right.set_ylabel("Δ accuracy vs full (points)")
    right.set_title("paired difference, 95% bootstrap interval", fontsize=9)
    for ax, labels in ((left, names), (right, others)):
        ax.set_xticks(np.arange(len(labels)))
        ax.set_xticklabels(labels, rotation=40, ha="right", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return Path(path)


def write_reports(out_dir, table: Mapping[str, Any], setup: Mapping[str, Any],
                  chance: float | None = None) -> dict[str, Path]:
    """``ablation.md``, ``ablation.json`` and ``ablation.png`` in `out_dir`."""
    out_dir = Path(out_dir)
    paths = {"markdown": out_dir / "ablation.md", "json": out_dir / "ablation.json", "png": out_dir / "ablation.png"}
    paths["markdown"].write_text(ablation_markdown(table, setup))
    paths["json"].write_text(json.dumps({"setup": setup, "variants": table}, indent=2, default=str) + "\n")
    plot_ablation(table, paths["png"], chance)
    return paths
