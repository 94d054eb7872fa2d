"""Draw every report figure: `python -m analysis [--runs runs] [--leaderboard CSV] [--out results/figures]`
(also `python analysis/report.py`).

One set of figures per (dataset, metric), so the digits demo's Frechet distance never shares a figure
with ImageNet-100's FID-10K: `<metric>_vs_steps`, `<metric>_vs_train_flops` (the equal-compute view),
`loss_curves`, `throughput`, `metric_vs_cost` (each variant at the last step all its runs reached),
`<metric>_vs_cfg_scale` (guidance sweeps of saved checkpoints, from the leaderboard) and `sample_grids`,
each named `<figure>-<dataset>-<metric>` and written as PNG and PDF.
"""

from __future__ import annotations

import argparse
import sys
import warnings
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # headless: before pyplot is imported (by analysis.plots)

if __package__ in (None, ""):  # run as a script: make the project importable without an install
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import pandas as pd  # noqa: E402

from analysis import plots  # noqa: E402
from analysis.leaderboard import compare  # noqa: E402
from analysis.runs import latest_rows, load_runs, metrics_frame, read_leaderboard  # noqa: E402
from dit.errors import UserError, report  # noqa: E402

NOTHING_YET = ("no results yet: no run directories and no leaderboard rows. Train and evaluate a variant first, "
               "e.g. `python ablations/run.py --variant baseline --preset demo`, then run this again.")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m analysis", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", help="directory of run directories (default runs/)")
    parser.add_argument("--leaderboard", help="leaderboard CSV (default results/leaderboard.csv)")
    parser.add_argument("--out", default="results/figures", help="where the figures go (default results/figures)")
    return parser.parse_args(argv)


def check_paths(args: argparse.Namespace) -> tuple[Path, Path, Path]:
    """The three paths; the defaults may be absent (nothing run yet), paths the user names must exist."""
    runs = Path(args.runs or "runs")
    leaderboard = Path(args.leaderboard or "results/leaderboard.csv")
    out = Path(args.out)
    if runs.exists() and not runs.is_dir():
        raise UserError(f"--runs {runs} is a file; pass the directory that holds the run directories "
                        f"(runs/, where ablations/run.py writes them).")
    if args.runs and not runs.exists():
        raise UserError(f"--runs {runs} does not exist; pass the directory that holds the run directories "
                        f"(runs/, where ablations/run.py writes them), or leave --runs out.")
    if leaderboard.is_dir():
        raise UserError(f"--leaderboard {leaderboard} is a directory; pass the CSV file (results/leaderboard.csv).")
    if args.leaderboard and not leaderboard.exists():
        raise UserError(f"--leaderboard {leaderboard} does not exist; pass results/leaderboard.csv or leave "
                        f"--leaderboard out.")
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} is a file; pass a directory for the figures (it is created if absent).")
    return runs, leaderboard, out


def _group(frame: pd.DataFrame, dataset: str, metric: str) -> pd.DataFrame:
    if frame.empty:
        return frame
    return frame[(frame["dataset"] == dataset) & (frame["metric"] == metric)]


def draw_all(runs_dir: Path, leaderboard_path: Path, out: Path) -> list[Path]:
    """Every figure the results allow; returns exactly the files written (none when there are no results)."""
    runs = load_runs(runs_dir)
    frame = metrics_frame(runs)
    table = read_leaderboard(leaderboard_path)
    groups = sorted(set(zip(frame["dataset"], frame["metric"])) | set(zip(table["dataset"], table["metric"])))
    colors = plots.palette(list(frame["variant"]) + list(table["variant"]))
    written: list[Path] = []
    for dataset, metric in groups:
        suffix = f"{dataset}-{metric}"
        in_runs = _group(frame, dataset, metric)
        in_table = _group(table, dataset, metric)
        trained = in_table[in_table["source"] == "train"]  # the evaluations made during training, at its recipe
        latest_in_table = latest_rows(trained)  # as load_runs: a rerun of a seed replaces it in the curves
        group_runs = [r for r in runs if (r.dataset, r.metric) == (dataset, metric)]
        # Each figure is drawn only when the rows it draws exist: a figure of no data is skipped, not written.
        # The run directories hold every evaluation; the leaderboard stands in where they are not at hand.
        steps = in_runs if in_runs["value"].notna().any() else latest_in_table
        if steps["value"].notna().any():
            written += plots.save(plots.metric_vs_steps(steps, metric, colors), out, f"{metric}_vs_steps-{suffix}")
        if (steps["value"].notna() & steps["train_flops"].notna()).any():
            written += plots.save(plots.metric_vs_steps(steps, metric, colors, x="train_flops"), out,
                                  f"{metric}_vs_train_flops-{suffix}")
        if plots.guidance_lines(in_table):
            written += plots.save(plots.metric_vs_cfg_scale(in_table, metric, colors), out,
                                  f"{metric}_vs_cfg_scale-{suffix}")
        if in_runs["loss"].notna().any():
            written += plots.save(plots.loss_curves(in_runs, colors), out, f"loss_curves-{suffix}")
        speed = plots.steady_rows(in_runs)
        if speed.empty and "img_per_s" in latest_in_table:  # e.g. runs that logged only their compiling line
            speed = plots.steady_rows(latest_in_table)
        if not speed.empty:
            written += plots.save(plots.throughput(speed, colors), out, f"throughput-{suffix}")
        # The leaderboard's comparison (per recipe) where it has rows, so figure and table agree.
        compared = compare(trained if not trained.empty else in_runs)
        compared = compared.dropna(subset=["value"])  # a recipe never evaluated, or diverged, has no point to draw
        if not compared.empty and compared[["params", "gflops"]].notna().all().all():
            written += plots.save(plots.metric_vs_cost(compared, metric, colors), out, f"metric_vs_cost-{suffix}")
        if any(r.samples for r in group_runs):
            written += plots.save(plots.sample_grids(group_runs), out, f"sample_grids-{suffix}")
    return written


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        runs_dir, leaderboard, out = check_paths(args)
        with warnings.catch_warnings(record=True) as notes:
            warnings.simplefilter("always", UserWarning)
            written = draw_all(runs_dir, leaderboard, out)
        for note in notes:  # such as a partial line of a killed run's metrics.jsonl: worth a line, not a trace
            if issubclass(note.category, UserWarning):
                print(f"note: {note.message}", file=sys.stderr)
    except UserError as error:
        return report(error)
    if not written:
        print(NOTHING_YET)
        return 0
    print(f"wrote {len(written)} files to {out}:")
    for path in written:
        print(f"  {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
