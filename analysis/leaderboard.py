"""The leaderboard summary: `python -m analysis.leaderboard [--path CSV] [--step S | --equal-flops | --flops F] ...`.

Rows are compared only within one group (dataset, resolution, metric, num_samples), so the demo's
Frechet distance on digits features is never ranked against ImageNet-100 FID-10K, and only within one
recipe (preset, objective, sampler, sampling steps, guidance), so different recipes are not merged.

Variants are compared at one point of training, never at each one's best checkpoint: by default the last
step every compared run of the group and recipe reached (`--step S` picks one), or, with `--equal-flops`,
the last training FLOPs every run reached (`--flops F` picks a budget), where a variant that costs more
per step (patch1: about 5x) is compared at fewer steps. Each run contributes its last evaluation at or
before that point; runs that stopped short of it are left out. `best_any_step` (the lowest value over
every checkpoint and seed) is shown, labelled, beside the headline, never as it. `--all` prints every
row of each group instead.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import pandas as pd

from dit.leaderboard import DEFAULT_PATH
from analysis.runs import read_leaderboard
from dit.errors import UserError, report

GROUP = ["dataset", "resolution", "metric", "num_samples"]
RECIPE = ["preset", "objective", "sampler", "sampling_steps", "cfg_scale", "guided_channels", "guidance_low",
          "guidance_high", "timestep_shift"]
KEY = GROUP + ["variant"] + RECIPE
SUMMARY = ["value", "step", "train_flops", "seeds", "std", "vs_baseline", "best_any_step", "best_any_step_at",
           "params", "gflops", "runs"]
NO_RESULTS = "`python ablations/run.py --variant baseline --preset demo` records the first"


def compare(df: pd.DataFrame, step: int | None = None, flops: float | None = None,
            equal_flops: bool = False) -> pd.DataFrame:
    """Each variant per group and recipe at one point of training (see the module docstring): `value` is the mean
    over its runs (seeds) of each one's last evaluation at or before that point, `std` their spread (ddof 1,
    2 or more seeds), `vs_baseline` the baseline's value minus this one's (positive: better than the baseline),
    `best_any_step` the lowest value of any of its evaluations and `best_any_step_at` its step. Works on
    leaderboard rows (read_leaderboard) and on the run directories' evaluations (metrics_frame) alike."""
    axis = "train_flops" if equal_flops or flops is not None else "step"
    at = flops if flops is not None else step
    key = [c for c in KEY if c in df.columns]
    setting = [c for c in key if c != "variant"]
    rows = df.dropna(subset=["value", axis])
    if "date" in rows:
        # A run started again for the same variant and seed replaces the earlier one (as in the figures), so an
        # abandoned attempt neither counts as a seed nor holds the common step back; and a step evaluated twice
        # with one recipe (a sweep repeating it) counts once, its later row.
        started = df.groupby("run_id")["date"].min()
        rows = rows.assign(started=rows["run_id"].map(started)).sort_values(["started", "date"], kind="stable")
        latest = rows.groupby(key + ["seed"], dropna=False)["run_id"].transform("last")
        rows = rows[rows["run_id"] == latest].drop_duplicates(key + ["run_id", "step"], keep="last")
    parts = []
    for _, group in rows.groupby(setting, dropna=False, sort=False):
        last = group.groupby("run_id")[axis].max()
        target = last.min() if at is None else at
        # Runs that got there (all of them at the default point), each at its last evaluation up to it.
        reached = group[group["run_id"].isin(last.index[last >= target]) & (group[axis] <= target)]
        chosen = reached.sort_values(axis, kind="stable").groupby("run_id").tail(1)
        for variant, own in chosen.groupby("variant"):
            everything = group[group["variant"] == variant]
            best = everything.loc[everything["value"].idxmin()]
            parts.append({**own.iloc[0][key].to_dict(), "value": own["value"].mean(), "step": own["step"].min(),
                          "train_flops": own["train_flops"].min(), "seeds": own["run_id"].nunique(),
                          "std": own["value"].std(),  # NaN for one seed (ddof 1)
                          "best_any_step": best["value"], "best_any_step_at": best["step"],
                          "params": own["params"].iloc[0], "gflops": own["gflops"].iloc[0],
                          "runs": ", ".join(sorted(own["run_id"]))})
    compared = pd.DataFrame(parts, columns=key + [c for c in SUMMARY if c != "vs_baseline"])
    baseline = compared.loc[compared["variant"] == "baseline", setting + ["value"]]
    compared = compared.merge(baseline.rename(columns={"value": "baseline_value"}), on=setting, how="left")
    compared["vs_baseline"] = compared["baseline_value"] - compared["value"]
    compared = compared.sort_values([c for c in GROUP if c in key] + ["value"], na_position="last", kind="stable")
    return compared.reset_index(drop=True)[key + SUMMARY]


def heading(dataset: str, resolution: int, metric: str, num_samples: int) -> str:
    return f"{dataset} {int(resolution)}px {metric} ({int(num_samples):,} samples)"


def format_value(column: str, value: object) -> str:
    """A leaderboard value as the tables print it ('-' where it is missing)."""
    if pd.isna(value):
        return "-"
    if column in ("params", "step", "best_any_step_at", "num_samples", "batch_size", "sampling_steps",
                  "guided_channels", "seed", "seeds", "resolution"):
        return f"{int(value):,}"
    if column in ("value", "std", "best_any_step"):
        return f"{value:.3f}"
    if column == "vs_baseline":
        return f"{value:+.3f}"
    if column in ("gflops", "img_per_s"):
        return f"{value:.2f}"
    if column == "train_flops":
        return f"{value:.3g}"
    if column in ("cfg_scale", "guidance_low", "guidance_high", "timestep_shift"):
        return f"{value:g}"
    return str(value)


def table(rows: pd.DataFrame, columns: list[str]) -> str:
    """Aligned plain text; recipe columns that are the same on every row move to one line above the table."""
    constant = [c for c in RECIPE if c in columns and rows[c].astype(str).nunique(dropna=False) == 1]
    given = [(c, rows[c].iloc[0]) for c in constant]
    recipe = ", ".join(f"{c} {format_value(c, v)}" for c, v in given if not pd.isna(v) and v != "")
    shown = rows[[c for c in columns if c not in constant]]
    shown = shown.apply(lambda series: series.map(lambda v: format_value(series.name, v)))
    return (f"recipe: {recipe}\n" if recipe else "") + shown.to_string(index=False)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m analysis.leaderboard", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--path", type=Path, default=DEFAULT_PATH, help="the leaderboard CSV (default %(default)s)")
    parser.add_argument("--metric", help="only this metric, e.g. fid or fd_digits")
    parser.add_argument("--dataset", help="only this dataset, e.g. imagenet100 or digits")
    parser.add_argument("--num-samples", type=int, help="only evaluations with this many samples, e.g. 10000")
    when = parser.add_mutually_exclusive_group()
    when.add_argument("--step", type=int, help="compare at this step (default the last every compared run reached)")
    when.add_argument("--equal-flops", action="store_true",
                      help="compare at the last training FLOPs every compared run reached")
    when.add_argument("--flops", type=float, help="compare at this many training FLOPs, e.g. 1e18")
    parser.add_argument("--all", action="store_true", help="every row of each group instead of the comparison")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        df = read_leaderboard(args.path)
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
            columns = ["variant", *RECIPE, "source", "run_id", "seed", "step", "value", "train_flops", "params",
                       "gflops", "batch_size", "img_per_s", "hardware", "date", "git_commit"]
            rows = selected.sort_values(["variant", "run_id", "step"], kind="stable")
        else:
            columns = ["variant", *RECIPE, *SUMMARY]
            rows = compare(selected, args.step, args.flops, args.equal_flops)
            at = (f"{args.flops:.3g} training FLOPs" if args.flops is not None else "the last training FLOPs every "
                  "compared run reached" if args.equal_flops else f"step {args.step:,}" if args.step is not None
                  else "the last step every compared run reached")
            print(f"each variant at {at}, per group and recipe\n")
        for index, (key, group) in enumerate(rows.groupby(GROUP, sort=True)):
            print(("\n" if index else "") + heading(*key))
            print(table(group, columns))
        if not args.all:
            print("\nvalue: the mean over seeds (each seed's last evaluation at or before that point); std over seeds, "
                  "with 2 or more; vs_baseline: the baseline's value minus this one's, same group and recipe "
                  "(positive: better); train_flops: steps x batch x 6 x GFLOPs of a forward at DiT-S size. "
                  "best_any_step: the lowest value over all checkpoints and seeds, at step best_any_step_at: a "
                  "selection over checkpoints, not a fair comparison.")
        return 0
    except UserError as error:
        return report(error)


if __name__ == "__main__":
    sys.exit(main())
