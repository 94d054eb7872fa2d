"""Run several variants and seeds: `python ablations/sweep.py --variants baseline,rope,swiglu --seeds 0,1`.

Each (variant, seed) gets a fixed run directory, `runs/<variant>-<preset>-seed<seed>/`, so a sweep
started again skips the runs that are complete (summary.json), resumes the ones that were cut off
(config.json but no summary) and starts the rest. `--print` prints the commands instead, one per
line, for a cluster scheduler (each line is safe to run again: it resumes or skips in the same way).
"""

from __future__ import annotations

import argparse
import shlex
import subprocess
import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make the project importable without an install
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ablations.presets import PRESETS
from dit.errors import UserError, report
from variants import check_budget, resolve

RUN = Path(__file__).resolve().parent / "run.py"


def plan(variants: list[str], seeds: list[int], preset: str, runs: Path, overrides: list[str],
         leaderboard: str | None, passed: list[str] = ()) -> list[tuple[str, list[str] | None]]:
    """(run directory, command) per run; the command is None for a complete run. `passed` are further
    run.py options given to every run (--figures DIR, --no-progress)."""
    steps = []
    for variant in variants:
        for seed in seeds:
            workdir = runs / f"{variant}-{preset}-seed{seed}"
            if (workdir / "summary.json").exists():
                steps.append((str(workdir), None))
                continue
            command = [sys.executable, str(RUN), "--variant", variant, "--preset", preset,
                       "--set", f"train.seed={seed}", "--workdir", str(workdir)]
            for override in overrides:
                command += ["--set", override]
            if leaderboard:
                command += ["--leaderboard", leaderboard]
            command += list(passed)
            if (workdir / "config.json").is_file():  # started: resumed, even if killed before its first checkpoint
                command.append("--resume")
            steps.append((str(workdir), command))
    return steps


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python ablations/sweep.py", description=__doc__.splitlines()[0])
    parser.add_argument("--variants", required=True, help="comma-separated variant names")
    parser.add_argument("--seeds", default="0", help="comma-separated seeds (default 0)")
    parser.add_argument("--preset", default="in100", help=f"one of {', '.join(PRESETS)} (default in100)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="passed to every run")
    parser.add_argument("--runs", default="runs", help="where the run directories go (default runs)")
    parser.add_argument("--leaderboard", help="the leaderboard CSV (default results/leaderboard.csv)")
    parser.add_argument("--figures", help="where report figures go (default results/figures)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars in the runs (logs only)")
    parser.add_argument("--print", dest="print_only", action="store_true",
                        help="print the commands, one per line, instead of running them")
    args = parser.parse_args(argv)
    try:
        variants = [v.strip() for v in args.variants.split(",") if v.strip()]
        try:
            seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
        except ValueError:
            raise UserError(f"--seeds {args.seeds!r} must be comma-separated integers, e.g. 0,1,2.") from None
        if not variants or not seeds:
            raise UserError("give at least one variant (--variants a,b) and one seed (--seeds 0,1).")
        if args.preset not in PRESETS:
            raise UserError(f"unknown preset {args.preset!r}; presets are {', '.join(PRESETS)}.")
        for variant in variants:  # every name and budget checked before the first run starts
            check_budget(variant, resolve(variant))
    except UserError as error:
        return report(error)

    passed = (["--figures", args.figures] if args.figures else []) + (["--no-progress"] if args.no_progress else [])
    steps = plan(variants, seeds, args.preset, Path(args.runs), args.overrides, args.leaderboard, passed)
    if args.print_only:
        for workdir, command in steps:
            print(f"# {workdir}: complete" if command is None else shlex.join(command))
        return 0
    failed = []
    for i, (workdir, command) in enumerate(steps, 1):
        if command is None:
            print(f"[{i}/{len(steps)}] {workdir}: complete, skipped")
            continue
        print(f"[{i}/{len(steps)}] {shlex.join(command)}", flush=True)
        if subprocess.run(command).returncode != 0:
            failed.append(workdir)
    if failed:
        print(f"{len(failed)} of {len(steps)} runs failed: {', '.join(failed)}; run the sweep again to resume them.",
              file=sys.stderr)
        return 1
    print(f"sweep complete: {len(steps)} runs; `python -m analysis.leaderboard` compares them.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
