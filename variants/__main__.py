"""`python -m variants [--json]`: every registered variant with its parameters, GFLOPs and budget status."""

from __future__ import annotations

import argparse
import json
import sys

from variants.budget import BUDGET, measure
from variants.registry import REGISTERED, resolve


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m variants", description=__doc__)
    parser.add_argument("--json", action="store_true", help="print a JSON list instead of a table")
    args = parser.parse_args(argv)
    costs = [measure(name, resolve(name)) for name in REGISTERED]
    if args.json:
        rows = [dict(name=c.name, params=c.params, gflops=round(c.gflops, 4), within_budget=c.within_budget,
                     repa_training_only_params=c.repa_params) for c in costs]
        print(json.dumps(rows, indent=1))
    else:
        print(f"{'variant':<24}{'params':>14}{'GFLOPs':>9}  {'budget ' + format(BUDGET, ','):<20}"
              f"{'+ REPA projector (training only)':>34}")
        for c in costs:
            print(f"{c.name:<24}{c.params:>14,}{c.gflops:>9.2f}  {'ok' if c.within_budget else 'OVER':<20}"
                  f"{c.repa_params:>34,}")
    over = [c.name for c in costs if not c.within_budget]
    if over:
        print(f"error: over the {BUDGET:,}-parameter budget: {', '.join(over)}; shrink them or remove them "
              f"from variants.registry.REGISTERED.", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
