"""Train, evaluate and record one DiT-S variant: `python ablations/run.py --variant NAME [--preset P] ...`.

Order matters: the variant is resolved and its parameter budget checked before anything else is
created, so an over-budget variant exits 2 having written nothing.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make the project importable without an install
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ablations.presets import PRESETS
from dit.config import RunConfig, apply_overrides, to_dict
from dit.counting import count_params
from dit.errors import UserError
from variants import BUDGET, REGISTERED, check_budget, measure, resolve
from variants.registry import ALIASES


class NotAvailable(UserError):
    exit_code = 3


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python ablations/run.py", description=__doc__)
    parser.add_argument("--variant", help="variant name; features compose with '_' (see --list)")
    parser.add_argument("--preset", default="in100", help=f"one of {', '.join(PRESETS)} (default in100)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override any config field, e.g. --set model.depth=13 --set train.steps=1000")
    parser.add_argument("--workdir", help="run directory (default runs/VARIANT-PRESET)")
    parser.add_argument("--resume", action="store_true", help="continue the run in --workdir from its latest checkpoint")
    parser.add_argument("--dry-run", action="store_true", help="stop after the budget check; print the resolved config")
    parser.add_argument("--list", action="store_true", help="list the variants and presets, one line each")
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


def resolve_run(args: argparse.Namespace) -> tuple[RunConfig, int]:
    """The run's config and the variant's budget count; raises UserError (exit 2) before creating anything."""
    if not args.variant:
        raise UserError("no variant given: pass --variant NAME (see --list for the names).")
    if args.preset not in PRESETS:
        raise UserError(f"unknown preset {args.preset!r}; presets are {', '.join(PRESETS)}.")
    variant = RunConfig(variant=args.variant, preset=args.preset, model=resolve(args.variant))
    # The budget holds for the variant at full size with the user's own changes, whatever the preset.
    model_overrides = [o for o in args.overrides if o.strip().startswith("model.")]
    cost = check_budget(args.variant, apply_overrides(variant, model_overrides).model)
    config = apply_overrides(PRESETS[args.preset](variant), args.overrides)
    return config, cost.params


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        if args.list:
            list_all()
            return 0
        config, budget_params = resolve_run(args)
        if args.dry_run:
            print(json.dumps(to_dict(config), indent=2))
            print(f"variant {config.variant}: {budget_params:,} trainable parameters at DiT-S scale "
                  f"(budget {BUDGET:,}: within)")
            if config.preset != "in100":
                print(f"this {config.preset} run's model: {count_params(config.model):,} trainable parameters")
            return 0
        raise NotAvailable(
            "training is not available yet in this version of the harness (it lands with the training "
            "core); use --dry-run to check a variant's budget and see its resolved config."
        )
    except UserError as error:
        print(f"error: {error}", file=sys.stderr)
        return error.exit_code


if __name__ == "__main__":
    sys.exit(main())
