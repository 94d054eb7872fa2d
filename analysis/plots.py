"""The figures: each function takes results as DataFrames (or runs) and returns a matplotlib Figure.

No backend is chosen here, so notebooks draw inline; `analysis/report.py` picks Agg before importing this.
Colours come from one palette keyed by the sorted variant names, so a variant has the same colour in
every figure drawn with the same palette.
"""

from __future__ import annotations

from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import seaborn as sns
from matplotlib.figure import Figure
from matplotlib.ticker import FuncFormatter, LogLocator
from PIL import Image

from analysis.leaderboard import RECIPE, format_value
from analysis.runs import Run
from variants.budget import BUDGET

# fd_digits is a Frechet distance in a digits classifier's feature space: never comparable with FID.
METRIC_NAMES = {"fid": "FID", "fd_digits": "Frechet distance"}


def palette(variants) -> dict[str, tuple]:
    """One colour per variant, fixed by its position among the sorted names."""
    names = sorted(set(variants))
    colors = sns.color_palette("tab10" if len(names) <= 10 else "husl", max(len(names), 1))
    return dict(zip(names, colors))


def metric_label(metric: str, num_samples=None) -> str:
    """`fid` with 10000 samples reads FID-10K, the number the leaderboard compares."""
    name = METRIC_NAMES.get(metric, metric)
    if metric == "fid" and num_samples is not None and not pd.isna(num_samples):
        n = int(num_samples)
        name += f"-{n // 1000}K" if n % 1000 == 0 else f"-{n}"
    return name


def _samples_of(frame: pd.DataFrame):
    counts = frame["num_samples"].dropna().unique() if "num_samples" in frame else []
    return counts[0] if len(counts) == 1 else None


def _series_key(frame: pd.DataFrame) -> str | list[str]:
    # One line per variant; presets are told apart only when the frame holds several (demo next to smoke).
    return ["variant", "preset"] if "preset" in frame and frame["preset"].nunique() > 1 else "variant"


def _label(key) -> str:
    return key if isinstance(key, str) else f"{key[0]} ({key[1]})"


def _dataset(frame: pd.DataFrame) -> str:
    """' (digits)' for a title; several datasets in one figure are refused, their numbers do not compare."""
    names = frame["dataset"].dropna().unique() if "dataset" in frame else []
    if len(names) > 1:
        raise ValueError(f"one figure per dataset: these rows hold {sorted(names)}; select one dataset first")
    return f" ({names[0]})" if len(names) else ""


def _colors(frame: pd.DataFrame, colors: dict | None) -> dict:
    return colors if colors is not None else palette(frame["variant"])


def _series_colors(keys: list, colors: dict) -> dict:
    """A colour per series key: its variant's, unless two series share a variant (two recipes of one variant,
    say): then one colour per series, so the legend tells them apart."""
    variants = [key if isinstance(key, str) else key[0] for key in keys]
    if len(set(variants)) == len(variants):
        return {key: colors.get(variant) for key, variant in zip(keys, variants)}
    return dict(zip(keys, sns.color_palette("tab10" if len(keys) <= 10 else "husl", len(keys))))


def _log_y(ax) -> None:
    """Log y with plain tick labels (20, 30, 50) rather than 2x10^1; FID spans decades over training."""
    ax.set_yscale("log")
    plain = FuncFormatter(lambda value, _: f"{value:g}")
    ax.yaxis.set_major_formatter(plain)
    ax.yaxis.set_minor_locator(LogLocator(subs=(2.0, 3.0, 5.0)))
    ax.yaxis.set_minor_formatter(plain)


def _steps_x(ax) -> None:
    ax.set_xlabel("training step")
    ax.xaxis.set_major_formatter(FuncFormatter(lambda value, _: f"{value:,.0f}"))


def _flops_x(ax) -> None:
    ax.set_xlabel("training FLOPs (steps x batch x 6 x GFLOPs of one forward at DiT-S size)")
    ax.xaxis.set_major_formatter(FuncFormatter(lambda value, _: f"{value:.2g}"))


def _empty(ax, message: str) -> None:
    ax.text(0.5, 0.5, message, ha="center", va="center", transform=ax.transAxes)


def metric_vs_steps(frame: pd.DataFrame, metric: str, colors: dict | None = None, x: str = "step") -> Figure:
    """The eval metric against training steps (or, with x="train_flops", against the training FLOPs spent: the
    equal-compute view, where a costlier variant's line is stretched to the right), one line per variant: the
    mean over seeds, min-max band.

    `frame`: rows with variant, run_id, step, train_flops, metric, value (metrics_frame or leaderboard rows).
    """
    rows = frame[(frame["metric"] == metric) & frame["value"].notna() & frame[x].notna()]
    where = _dataset(rows)
    colors = _colors(frame, colors)
    label = metric_label(metric, _samples_of(rows))
    fig, ax = plt.subplots(figsize=(7, 4.5), layout="constrained")
    several_seeds = False
    series = list(rows.groupby(_series_key(rows), sort=True))
    series_colors = _series_colors([key for key, _ in series], colors)
    for key, group in series:
        per_step = group.groupby(x)["value"].agg(["mean", "min", "max"])
        seeds = group["run_id"].nunique()
        ax.plot(per_step.index, per_step["mean"], marker="o", markersize=3, color=series_colors[key],
                label=f"{_label(key)} ({seeds} seeds)" if seeds > 1 else _label(key))
        if seeds > 1:
            several_seeds = True
            ax.fill_between(per_step.index, per_step["min"], per_step["max"], color=series_colors[key], alpha=0.2)
    if rows.empty:
        _empty(ax, f"no {label} evaluations yet")
    else:
        _log_y(ax)
        ax.legend(title="variant (band: seeds' min-max)" if several_seeds else "variant", fontsize=8,
                  title_fontsize=8)
    ax.set_title(f"{label} against training {'steps' if x == 'step' else 'FLOPs'}{where}")
    _steps_x(ax) if x == "step" else _flops_x(ax)
    ax.set_ylabel(f"{label} (log scale, lower is better)")
    ax.grid(True, which="both", alpha=0.3)
    return fig


# One guidance line: a checkpoint of a run, sampled one way, at several guidance scales.
GUIDANCE_LINE = ["run_id", "variant", "step", "sampler", "sampling_steps", "guided_channels", "guidance_low",
                 "guidance_high", "timestep_shift", "num_samples", "seed"]


def guidance_lines(rows: pd.DataFrame) -> list[tuple[tuple, pd.Series]]:
    """(line key, value per cfg scale) for every checkpoint and setting evaluated at 2 or more guidance scales
    (a sweep of `python -m dit.eval.fid --run`, and the training-time row of the same setting); a scale
    evaluated twice is averaged (the same noise: the same number, up to the code that made it)."""
    rows = rows[rows["value"].notna()]
    lines = []
    for key, group in rows.groupby(GUIDANCE_LINE, dropna=False, sort=True):
        per_scale = group.groupby("cfg_scale")["value"].mean()
        if len(per_scale) >= 2:
            lines.append((key, per_scale))
    return lines


def metric_vs_cfg_scale(frame: pd.DataFrame, metric: str, colors: dict | None = None) -> Figure:
    """The eval metric against the guidance scale, one line per run and checkpoint (and sampling setting):
    leaderboard rows, drawn where a checkpoint has 2 or more scales (`guidance_lines`)."""
    rows = frame[frame["metric"] == metric]
    where = _dataset(rows)
    colors = _colors(frame, colors)
    label = metric_label(metric, _samples_of(rows))
    lines = guidance_lines(rows)
    # The settings that differ between lines go into the labels; those shared by all go into the title.
    varying = [c for i, c in enumerate(GUIDANCE_LINE[3:], start=3) if len({str(key[i]) for key, _ in lines}) > 1]
    # A run's colour is its variant's, unless runs of one variant differ (say, in their recipe): then each run
    # has its own (`_series_colors`). Checkpoints are told apart by the line: the latest solid.
    steps = sorted({key[2] for key, _ in lines}, reverse=True)
    run_colors = _series_colors(sorted({(key[1], key[0]) for key, _ in lines}), colors)  # (variant, run_id)
    styles = ["-", "--", ":", "-."]
    fig, ax = plt.subplots(figsize=(7, 5), layout="constrained")
    for key, per_scale in lines:
        line = dict(zip(GUIDANCE_LINE, key))
        extra = "".join(f", {c} {line[c]:g}" if isinstance(line[c], float) else f", {c} {line[c]}" for c in varying)
        ax.plot(per_scale.index, per_scale.values, marker="o", markersize=4,
                color=run_colors[(line["variant"], line["run_id"])],
                linestyle=styles[steps.index(line["step"]) % len(styles)],
                label=f"{line['variant']} ({line['run_id']}) step {int(line['step']):,}{extra}")
    if lines:
        _log_y(ax)
        ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.15))  # below: labels are long
    else:
        _empty(ax, "no checkpoint evaluated at 2 or more guidance scales")
    ax.set_title(f"{label} against the guidance scale{where}\n(one line per run and checkpoint; the same noise "
                 f"at every scale)", fontsize=10)
    ax.set_xlabel("classifier-free guidance scale (1: none)")
    ax.set_ylabel(f"{label} (log scale, lower is better)")
    ax.grid(True, which="both", alpha=0.3)
    return fig


def loss_curves(frame: pd.DataFrame, colors: dict | None = None, window: int = 5) -> Figure:
    """Training loss against steps per variant (mean over seeds): raw faint, rolling mean of `window` logs bold."""
    rows = frame.dropna(subset=["loss"])
    where = _dataset(rows)
    colors = _colors(frame, colors)
    fig, ax = plt.subplots(figsize=(7, 4.5), layout="constrained")
    series = list(rows.groupby(_series_key(rows), sort=True))
    series_colors = _series_colors([key for key, _ in series], colors)
    for key, group in series:
        loss = group.groupby("step")["loss"].mean()
        ax.plot(loss.index, loss.values, color=series_colors[key], alpha=0.25, linewidth=0.8)
        smooth = loss.rolling(window, min_periods=1, center=True).mean()
        ax.plot(smooth.index, smooth.values, color=series_colors[key], linewidth=1.8, label=_label(key))
    if rows.empty:
        _empty(ax, "no logged training steps yet")
    else:
        ax.legend(title="variant", fontsize=8)
    ax.set_title(f"training loss{where}\n(faint: as logged, mean over seeds; "
                 f"bold: centred rolling mean of {window} logs)", fontsize=10)
    _steps_x(ax)
    ax.set_ylabel("loss (mean per logged interval)")
    ax.grid(True, alpha=0.3)
    return fig


def point_labels(rows: pd.DataFrame) -> list[str]:
    """A label per row of a comparison: its variant, and for a variant compared in several recipes (a rerun of the
    demo under today's recipe next to rows recorded before the guidance columns existed, say) the recipe
    columns in which its rows differ, so that no two points read the same."""
    labels = []
    for _, row in rows.iterrows():
        same = rows[rows["variant"] == row["variant"]]
        differ = [c for c in RECIPE if c in rows and same[c].astype(str).nunique(dropna=False) > 1]
        recipe = ", ".join(f"{c} {format_value(c, row[c])}" for c in differ)
        labels.append(f"{row['variant']} ({recipe})" if recipe else str(row["variant"]))
    return labels


def metric_vs_cost(compared: pd.DataFrame, metric: str, colors: dict | None = None, budget: int = BUDGET) -> Figure:
    """Each variant's metric at the common point of training (`analysis.leaderboard.compare`, not its best
    checkpoint) against GFLOPs (left) and parameters (right), each point labelled, with the budget's line.

    Both are the variant's at DiT-S size (the leaderboard's `params` and `gflops`), whatever the preset
    trained: what the budget checks, and what a demo run stands in for.
    """
    rows = compared[(compared["metric"] == metric) & compared["value"].notna()].sort_values("variant", kind="stable")
    where = _dataset(rows)
    colors = _colors(compared, colors)
    label = metric_label(metric, _samples_of(rows))
    texts = point_labels(rows)
    fig, (by_flops, by_params) = plt.subplots(1, 2, figsize=(11, 4.5), layout="constrained", sharey=True)
    for ax, column, xlabel in ((by_flops, "gflops", "GFLOPs per image (one forward)"),
                               (by_params, "params", "trainable parameters (millions)")):
        scale = 1e6 if column == "params" else 1.0
        for (_, row), text in zip(rows.iterrows(), texts):
            x = float(row[column]) / scale
            ax.scatter([x], [row["value"]], s=50, color=colors.get(row["variant"]), edgecolor="black",
                       linewidth=0.5, zorder=3)
            ax.annotate(text, (x, row["value"]), xytext=(4, 4), textcoords="offset points", fontsize=8)
        ax.set_xlabel(xlabel)
        ax.margins(x=0.15)  # room for the labels of the outermost points
        ax.grid(True, which="both", alpha=0.3)
    by_params.axvline(budget / 1e6, color="red", linestyle="--", linewidth=1, label=f"budget {budget / 1e6:.0f}M")
    by_params.legend(fontsize=8)
    if rows.empty:
        _empty(by_flops, f"no {label} evaluations yet")
    else:
        _log_y(by_flops)
    steps = sorted(rows["step"].dropna().unique())
    at = f"step {int(steps[0]):,}" if len(steps) == 1 else "the last step all runs reached"
    by_flops.set_ylabel(f"{label} at {at} (log scale, lower is better)")
    fig.suptitle(f"{label} per variant at {at}, against compute and size{where}")
    return fig


def steady_rows(frame: pd.DataFrame) -> pd.DataFrame:
    """The rows whose img_per_s is steady-state: logged, and not marked `includes_compile` (the first
    line of each training session, slowed by compilation). Leaderboard rows (no such mark) all count."""
    rows = frame.dropna(subset=["img_per_s"])
    if "includes_compile" in rows:
        rows = rows[~rows["includes_compile"].astype(bool)]
    return rows


def throughput(frame: pd.DataFrame, colors: dict | None = None) -> Figure:
    """Training images per second per variant: the median over the `steady_rows`."""
    rows = steady_rows(frame)
    where = _dataset(rows)
    colors = _colors(frame, colors)
    keys = _series_key(rows)
    medians = rows.groupby(keys, sort=True)["img_per_s"].median()
    fig, ax = plt.subplots(figsize=(max(6, 1.1 * len(medians) + 2), 4.5), layout="constrained")
    labels = [_label(k) for k in medians.index]
    variants = [k if isinstance(k, str) else k[0] for k in medians.index]
    bars = ax.bar(labels, medians.values, color=[colors.get(v) for v in variants], edgecolor="black", linewidth=0.5)
    ax.bar_label(bars, fmt="%.1f", fontsize=8)
    if medians.empty:
        _empty(ax, "no logged training steps yet")
    ax.set_title(f"training throughput{where}\n(median over logged steps; each session's first, compiling, left out)",
                 fontsize=10)
    ax.set_xlabel("variant")
    ax.set_ylabel("images / s")
    ax.tick_params(axis="x", rotation=30)
    ax.grid(True, axis="y", alpha=0.3)
    return fig


def sample_grids(runs: list[Run]) -> Figure:
    """The latest sample grid of each variant side by side (of its run with the latest grid)."""
    datasets = sorted({run.dataset for run in runs if run.samples})
    if len(datasets) > 1:
        raise ValueError(f"one figure per dataset: these runs hold {datasets}; select one dataset first")
    latest: dict[str, tuple[int, Path]] = {}
    for run in runs:
        if run.samples and run.samples[-1][0] > latest.get(run.variant, (-1, None))[0]:
            latest[run.variant] = run.samples[-1]
    names = sorted(latest)
    fig, axes = plt.subplots(1, max(len(names), 1), figsize=(max(5.0, 3 * len(names)), 3.4),
                             layout="constrained", squeeze=False)
    for ax, name in zip(axes[0], names):
        step, path = latest[name]
        with Image.open(path) as image:
            ax.imshow(np.asarray(image.convert("RGB")), interpolation="nearest")
        ax.set_title(f"{name}\nstep {step:,}", fontsize=10)
        ax.axis("off")
    if not names:
        _empty(axes[0][0], "no sample grids yet")
        axes[0][0].axis("off")
    fig.suptitle("latest samples per variant (EMA model)" + (f" ({datasets[0]})" if datasets else ""))
    return fig


def save(fig: Figure, out_dir: str | Path, name: str) -> list[Path]:
    """Writes `name`.png and `name`.pdf into out_dir; closes the figure and returns both paths."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = [out_dir / f"{name}.png", out_dir / f"{name}.pdf"]
    for path in paths:
        fig.savefig(path, dpi=150 if path.suffix == ".png" else None)
    plt.close(fig)
    return paths
