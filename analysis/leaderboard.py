"""The leaderboard summary: `python -m analysis.leaderboard [--path CSV] [--metric M] [--dataset D] [--num-samples N]`.

Rows are compared only within one group (dataset, resolution, metric, num_samples), so the demo's
Frechet distance on digits features is never ranked against ImageNet-100 FID-10K, and only within one
recipe (preset, objective, sampler, sampling steps, CFG scale), so different recipes are not merged.
`--all` prints every row of each group instead of the best per variant.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import pandas as pd

from ablations.leaderboard import COLUMNS, DEFAULT_PATH, FLOAT_COLUMNS, INT_COLUMNS, read_rows
from dit.errors import UserError, report

GROUP = ["dataset", "resolution", "metric", "num_samples"]
RECIPE = ["preset", "objective", "sampler", "sampling_steps", "cfg_scale"]
KEY = GROUP + ["variant"] + RECIPE
SUMMARY = ["value", "step", "params", "gflops", "seeds", "mean", "std", "vs_baseline", "run_id"]
NO_RESULTS = "`python ablations/run.py --variant baseline --preset demo` records the first"


def load(path: Path | str = DEFAULT_PATH) -> pd.DataFrame:
    """The leaderboard as a typed frame (nullable ints, float64, strings); empty if there is none yet."""
    frame = pd.DataFrame(read_rows(path), columns=list(COLUMNS), dtype=object)
    for column in INT_COLUMNS + FLOAT_COLUMNS:
        kind = int if column in INT_COLUMNS else float
        values = []
        for row, text in enumerate(frame[column], start=1):
            try:
                # Python's float() reads our repr-written values back exactly; pandas' parser need not.
                values.append(kind(text) if text != "" else None)
            except ValueError:
                raise UserError(f"{path}, row {row}: column {column!r} holds {text!r}, not a number; "
                                f"repair that row.") from None
        frame[column] = pd.array(values, dtype="Int64" if kind is int else "float64")
    return frame


def best_per_variant(df: pd.DataFrame) -> pd.DataFrame:
    """The best (lowest value) row per group, variant and recipe, with its seed statistics and baseline gap.

    seeds counts the distinct seeds under the key; mean and std (ddof 1) are over each seed's best value,
    only where there are 2 or more seeds; vs_baseline is the baseline's best minus this one's in the same
    group and recipe (positive: better than the baseline). Sorted by group, then best first.
    """
    ordered = df.sort_values("value", na_position="last", kind="stable")
    best = ordered.groupby(KEY, dropna=False, sort=False).head(1)
    per_seed = df.groupby(KEY + ["seed"], dropna=False)["value"].min().groupby(KEY, dropna=False)
    stats = pd.DataFrame({"seeds": per_seed.size(), "mean": per_seed.mean(), "std": per_seed.std()}).reset_index()
    stats.loc[stats["seeds"] < 2, ["mean", "std"]] = float("nan")
    best = best.merge(stats, on=KEY, how="left")
    baseline = best.loc[best["variant"] == "baseline", GROUP + RECIPE + ["value"]]
    best = best.merge(baseline.rename(columns={"value": "baseline_value"}), on=GROUP + RECIPE, how="left")
    best["vs_baseline"] = best["baseline_value"] - best["value"]
    best = best.sort_values(GROUP + ["value"], na_position="last", kind="stable").reset_index(drop=True)
    return best[KEY + SUMMARY]


def heading(dataset: str, resolution: int, metric: str, num_samples: int) -> str:
    return f"{dataset} {resolution}px {metric} ({num_samples:,} samples)"


def _format(column: str, value: object) -> str:
    if pd.isna(value):
        return "-"
    if column in ("params", "step", "num_samples", "batch_size"):
        return f"{int(value):,}"
    if column in ("value", "mean", "std"):
        return f"{value:.3f}"
    if column == "vs_baseline":
        return f"{value:+.3f}"
    if column in ("gflops", "img_per_s"):
        return f"{value:.2f}"
    if column == "cfg_scale":
        return f"{value:g}"
    return str(value)


def table(rows: pd.DataFrame, columns: list[str]) -> str:
    """Aligned plain text; recipe columns that are the same on every row move to one line above the table."""
    constant = [c for c in RECIPE if c in columns and rows[c].astype(str).nunique(dropna=False) == 1]
    given = [(c, rows[c].iloc[0]) for c in constant]
    recipe = ", ".join(f"{c} {_format(c, v)}" for c, v in given if not pd.isna(v) and v != "")
    shown = rows[[c for c in columns if c not in constant]]
    shown = shown.apply(lambda series: series.map(lambda v: _format(series.name, v)))
    return (f"recipe: {recipe}\n" if recipe else "") + shown.to_string(index=False)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m analysis.leaderboard", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--path", type=Path, default=DEFAULT_PATH, help="the leaderboard CSV (default %(default)s)")
    parser.add_argument("--metric", help="only this metric, e.g. fid or fd_digits")
    parser.add_argument("--dataset", help="only this dataset, e.g. imagenet100 or digits")
    parser.add_argument("--num-samples", type=int, help="only evaluations with this many samples, e.g. 10000")
    parser.add_argument("--all", action="store_true", help="every row of each group instead of the best per variant")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        df = load(args.path)
        if df.empty:
            print(f"no results in {args.path} yet: {NO_RESULTS}.")
            return 0
        wanted = {"dataset": args.dataset, "metric": args.metric, "num_samples": args.num_samples}
        selected = df
        for column, value in wanted.items():
            if value is not None:
                selected = selected[selected[column] == value]
        if selected.empty:
            groups = sorted({heading(*key) for key in df[GROUP].itertuples(index=False)})
            raise UserError(f"no rows in {args.path} match the filters; its groups are: {'; '.join(groups)}.")
        if args.all:
            columns = ["variant", *RECIPE, "run_id", "seed", "step", "value", "params", "gflops", "batch_size",
                       "img_per_s", "hardware", "date", "git_commit"]
            rows = selected.sort_values(["variant", "run_id", "step"], kind="stable")
        else:
            columns = ["variant", *RECIPE, *SUMMARY]
            rows = best_per_variant(selected)
        for index, (key, group) in enumerate(rows.groupby(GROUP, sort=True)):
            print(("\n" if index else "") + heading(*key))
            print(table(group, columns))
        if not args.all:
            print("\nvs_baseline: the baseline's best minus this one's, same group and recipe (positive: better); "
                  "mean and std over seeds, each seed's best, where there are 2 or more seeds.")
        return 0
    except UserError as error:
        return report(error)


if __name__ == "__main__":
    sys.exit(main())
