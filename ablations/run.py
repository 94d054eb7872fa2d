"""Train, evaluate and record one DiT-S variant: `python ablations/run.py --variant NAME [--preset P] ...`.

Order matters: the variant is resolved and its parameter budget checked before anything else is
created, so an over-budget variant exits 2 having written nothing; then every input (data, reference
statistics, weights) is checked, and only then is the run directory made.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import uuid
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make the project importable without an install
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import jax

from ablations.presets import PRESETS, prepare_data
from dit.config import RunConfig, apply_overrides, from_dict, to_dict
from dit.counting import count_params
from dit.data.source import training_data
from dit.distributed import from_process_zero, initialize
from dit.errors import UserError, report
from dit.eval.evaluator import build_evaluator
from dit.leaderboard import git_commit, utc_now
from dit.objectives import make_objective
from dit.run import record_results, train_run
from dit.rundir import CONFIG, SUMMARY, holds_run, read_json
from variants import BUDGET, REGISTERED, check_budget, measure, resolve
from variants.budget import VariantCost, repa_projector_params
from variants.registry import ALIASES

REPO = Path(__file__).resolve().parents[1]


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python ablations/run.py", description=__doc__.splitlines()[0])
    parser.add_argument("--variant", help="variant name; features compose with '_' (see --list)")
    parser.add_argument("--preset", help=f"one of {', '.join(PRESETS)} (default in100; on --resume, the run's)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override any config field, e.g. --set model.depth=13 --set train.steps=1000")
    parser.add_argument("--workdir", help="run directory (default runs/VARIANT-PRESET-ID, new)")
    parser.add_argument("--resume", action="store_true",
                        help="continue the run in --workdir, with its own settings (or the latest unfinished "
                             "runs/VARIANT-PRESET-*); only train.steps, train.lr and train.grad_clip may change")
    parser.add_argument("--dry-run", action="store_true", help="stop after the budget check; print the resolved config")
    parser.add_argument("--list", action="store_true", help="list the variants and presets, one line each")
    parser.add_argument("--leaderboard", default=None, help="the leaderboard CSV (default results/leaderboard.csv)")
    parser.add_argument("--figures", default=None, help="where report figures go (default results/figures)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars (logs only)")
    parser.add_argument("--coordinator", help="HOST:PORT of process 0, for multi-process runs")
    parser.add_argument("--num-processes", type=int, help="number of processes in a multi-process run")
    parser.add_argument("--process-id", type=int, help="this process's index in a multi-process run")
    return parser.parse_args(argv)


def list_all() -> None:
    for name in REGISTERED:
        cost = measure(name, resolve(name))
        alias = f"  (= {ALIASES[name]})" if name in ALIASES else ""
        print(f"variant {name:<24} {cost.params:>12,} params  {cost.gflops:6.2f} GFLOPs{alias}")
    for name, preset in PRESETS.items():
        print(f"preset  {name:<24} {preset.__doc__.splitlines()[0]}")


def resolve_run(args: argparse.Namespace):
    """The run's config and the variant's cost at DiT-S size; raises UserError (exit 2) before creating anything."""
    if not args.variant:
        raise UserError("no variant given: pass --variant NAME (see --list for the names).")
    if args.preset not in PRESETS:
        raise UserError(f"unknown preset {args.preset!r}; presets are {', '.join(PRESETS)}.")
    variant = RunConfig(variant=args.variant, preset=args.preset, model=resolve(args.variant))
    # The budget holds for the variant at full size with the user's own changes, whatever the preset.
    model_overrides = [o for o in args.overrides if o.strip().startswith("model.")]
    cost = check_budget(args.variant, apply_overrides(variant, model_overrides).model)
    config = apply_overrides(PRESETS[args.preset](variant), args.overrides)
    return config, cost


def choose_workdir(args, config: RunConfig) -> Path:
    """A new run directory (never an existing one), or with --resume the run to continue."""
    if args.workdir:
        return Path(args.workdir)
    runs = Path("runs")
    if args.resume:
        unfinished = sorted((p for p in runs.glob(f"{config.variant}-{config.preset}-*")
                             if (p / CONFIG).is_file() and not (p / SUMMARY).exists()),
                            key=lambda p: p.stat().st_mtime)
        if not unfinished:
            raise UserError(f"--resume: no unfinished run of {config.variant} with preset {config.preset} under "
                            f"{runs.absolute()}; pass --workdir DIR to name the run to continue.")
        return unfinished[-1]
    return runs / f"{config.variant}-{config.preset}-{_shared_run_id()}"


def _shared_run_id() -> str:
    """Six hex digits, drawn by process 0 and shared, so every process names the same directory."""
    return f"{from_process_zero(uuid.uuid4().int % 16**6):06x}"


# What a resume may change: more steps, and the recovery from a diverged run that the NaN message advises.
RESUME_MAY_CHANGE = ("train.steps", "train.lr", "train.grad_clip")


def resumed_config(workdir: Path, args) -> tuple[RunConfig, VariantCost, dict]:
    """A resumed run's config: its config.json with the --set options applied on top; returns it, the
    budget cost recorded at its start and the changes made now. Other changes are an error."""
    saved = read_json(workdir / CONFIG)
    if saved is None:
        raise UserError(f"--resume: {workdir} has no config.json; it is not a run directory made by this command "
                        f"(or it was killed before it began: start it again without --resume).")
    run = from_dict(saved)
    for given, name in ((args.variant, "variant"), (args.preset, "preset")):
        if given is not None and given != getattr(run, name):
            raise UserError(f"--resume: {workdir} is a run of {name} {getattr(run, name)!r}, not {given!r}; leave "
                            f"--{name} out (a resume reads it from config.json) or choose another --workdir.")
    config = apply_overrides(run, args.overrides)
    ours, theirs = to_dict(config), to_dict(run)
    changes = {f"{section}.{key}": [theirs[section][key], value]
               for section in ours if isinstance(ours[section], dict)
               for key, value in ours[section].items() if theirs[section].get(key) != value}
    refused = [f"{key}: {old!r} in the run, {new!r} now" for key, (old, new) in changes.items()
               if key not in RESUME_MAY_CHANGE]
    if refused:
        raise UserError(f"--resume: {workdir} was started with other settings ({'; '.join(refused)}). A resume "
                        f"keeps the run's settings (only {', '.join(RESUME_MAY_CHANGE)} may change): resume with "
                        f"just `--resume --workdir {workdir}`, or start a new run for other settings.")
    cost = VariantCost(run.variant, saved.get("budget_params") or 0, saved.get("gflops") or 0.0)
    return config, cost, changes


def existing_folder(path: Path) -> Path:
    """The folder that holds `path` (or will, once made): itself or its nearest existing parent."""
    target = path if path.is_dir() else path.parent
    while not target.exists():
        target = target.parent
    return target


def check_writable(path: Path, what: str, flag: str) -> None:
    """Refuses a path that cannot be written (read-only disk, no permission) before the run starts, by
    creating and removing a file in it or in its nearest existing parent."""
    target = existing_folder(path)
    try:
        if path.is_file():
            open(path, "a").close()
        tempfile.TemporaryFile(dir=target).close()
    except OSError as error:
        raise UserError(f"cannot write {what} {path} ({error.strerror}: {target}); choose a writable place (pass "
                        f"another {flag}) or fix the permissions. Nothing was started.") from None


def check_room(config: RunConfig, workdir: Path) -> None:
    """Refuses a run whose checkpoints cannot fit on the disk: keep_checkpoints + 1 (one being written) of
    the float32 state (parameters, EMA and Adam's two moments)."""
    needed = 4 * 4 * count_params(config.model) * (config.train.keep_checkpoints + 1)
    free = shutil.disk_usage(existing_folder(workdir)).free
    if free < needed:
        raise UserError(f"the disk holding {workdir} has {free / 1e9:.2f} GB free, and this run's checkpoints need "
                        f"about {needed / 1e9:.2f} GB ({config.train.keep_checkpoints} kept + 1 being written); free "
                        f"some space, choose another --workdir, or lower train.keep_checkpoints. Nothing was started.")


def training_only(config: RunConfig) -> str:
    """What a run trains besides the model (outside the budget, dropped by samplers and exports), as a clause."""
    if not config.train.repa_weight:
        return ""
    return f", plus {repa_projector_params(config.model, config.train):,} training-only in REPA's projector"


def check_data(config: RunConfig, progress: bool):
    """The training data (the latent cache, built here for the built-in digits, or images on the fly),
    checked against the model; returns its TrainingData."""
    if not config.data.images:
        prepare_data(config, progress)
    data = training_data(config.data)
    data.check_model(config.model, f"data.images={config.data.images}" if data.cache is None
                     else f"the cache {config.data.cache}", repa=config.train.repa_weight > 0)
    return data


def write_figures(workdir: Path, leaderboard: Path, figures: Path) -> None:
    try:
        from analysis.report import main as report
        report(["--runs", str(workdir.parent), "--leaderboard", str(leaderboard), "--out", str(figures)])
    except Exception as error:  # figures are a convenience: a plotting problem must not fail a finished run
        print(f"warning: the report figures could not be written ({error}); run `python analysis/report.py`.")


def train_and_record(args, config: RunConfig, cost, changes: dict | None = None) -> int:
    """Trains and records the run; `changes` are those of a resume whose config.json main already read
    (--resume --workdir); a --resume that finds its run here reads it now."""

    initialize(args.coordinator, args.num_processes, args.process_id)
    lead = jax.process_index() == 0
    progress = not args.no_progress and lead
    workdir = choose_workdir(args, config)
    leaderboard = Path(args.leaderboard) if args.leaderboard else REPO / "results" / "leaderboard.csv"
    figures = Path(args.figures) if args.figures else REPO / "results" / "figures"
    if args.resume and changes is None:
        config, cost, changes = resumed_config(workdir, args)
    if args.resume:
        finished = read_json(workdir / SUMMARY)
        if finished is not None:
            return finished_run(config, workdir, finished, leaderboard, lead)
    elif holds_run(workdir):
        raise UserError(f"the run directory {workdir} already exists and is not empty; pass --resume to continue "
                        f"that run, or choose another --workdir. Nothing was changed.")
    for path, what, flag in ((workdir, "the run directory", "--workdir"), (leaderboard, "the leaderboard",
                              "--leaderboard"), (figures, "the figures", "--figures")):
        check_writable(path, what, flag)
    check_room(config, workdir)
    data = check_data(config, progress)
    # Loads the weights and statistics: a missing one fails before the run starts.
    evaluator = build_evaluator(config, data, sample_dir=workdir / "samples")
    record = {
        "run_id": workdir.name, "budget_params": cost.params, "gflops": cost.gflops,
        "dataset": data.dataset, "resolution": data.resolution,
        "metric": config.eval.metric, "reference_sha256": evaluator.reference.sha256,
        "git_commit": git_commit(), "command": sys.argv,
        "hardware": f"{jax.device_count()}x {jax.devices()[0].device_kind}",
        "started": utc_now(),
    }
    if lead:
        print(f"run {workdir} ({'resuming' if args.resume else 'new'}): {config.variant}, preset {config.preset}, "
              f"{count_params(config.model):,} parameters in this run's model" + training_only(config))
    source = data.batches(config.data, config.train)
    summary = train_run(config, workdir, source, make_objective(config), resume=args.resume, record=record,
                        progress=progress, evaluate=evaluator, resume_changes=changes or {})
    if summary["preempted"]:
        if lead:
            print(f"stopped at step {summary['final_step']} on SIGTERM, checkpoint saved; continue with "
                  f"`python ablations/run.py --resume --workdir {workdir}`")
        return 0
    if lead:
        rows = record_results(config, workdir, record, leaderboard)
        write_figures(workdir, leaderboard, figures)
        print(f"done: step {summary['final_step']}, {describe_metric(config, summary)}; {len(rows)} leaderboard "
              f"rows added to {leaderboard}; samples in {workdir / 'samples'}; figures in {figures}")
    return 0


def describe_metric(config: RunConfig, summary: dict) -> str:
    metric, last = config.eval.metric, summary.get("last_metrics") or {}
    if last.get(metric) is None:
        return f"no {metric} at the last step"
    return f"{metric} {last[metric]:.3f} on {last.get(metric + '_samples')} samples"


def finished_run(config: RunConfig, workdir: Path, summary: dict, leaderboard: Path, lead: bool) -> int:
    """--resume of a complete run: nothing in it is touched; its leaderboard rows are added if a crash
    after its summary lost them."""
    if config.train.steps > summary.get("final_step", 0):
        raise UserError(f"--resume: {workdir} is complete at step {summary.get('final_step')}, and its summary and "
                        f"leaderboard rows are final; a finished run is not extended. Start a new run with "
                        f"--set train.steps={config.train.steps}.")
    if lead:
        rows = record_results(config, workdir, read_json(workdir / CONFIG), leaderboard)
        print(f"{workdir} is complete (step {summary.get('final_step')}, {describe_metric(config, summary)}); nothing "
              f"to do{f', {len(rows)} missing leaderboard rows added' if rows else ''}.")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        if args.list:
            list_all()
            return 0
        changes = None
        if args.resume and args.workdir:  # everything else is read from the run's config.json
            config, cost, changes = resumed_config(Path(args.workdir), args)
        else:
            args.preset = args.preset or "in100"
            config, cost = resolve_run(args)
        if args.dry_run:
            print(json.dumps(to_dict(config), indent=2))
            print(f"variant {config.variant}: {cost.params:,} trainable parameters at DiT-S scale "
                  f"(budget {BUDGET:,}: within)" + training_only(config))
            if config.preset != "in100":
                print(f"this {config.preset} run's model: {count_params(config.model):,} trainable parameters")
            return 0
        return train_and_record(args, config, cost, changes)
    except UserError as error:
        return report(error)


if __name__ == "__main__":
    sys.exit(main())
