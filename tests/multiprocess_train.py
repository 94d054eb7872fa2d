"""Runs a tiny training in this process, as one of several `jax.distributed` processes or alone.

Used by tests/test_distributed.py:
python tests/multiprocess_train.py WORKDIR STEPS [--coordinator C --num-processes N --process-id I] [--local] [--resume]
"""

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dit.distributed import initialize  # noqa: E402


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("workdir")
    parser.add_argument("steps", type=int)
    parser.add_argument("--coordinator")
    parser.add_argument("--num-processes", type=int)
    parser.add_argument("--process-id", type=int)
    parser.add_argument("--local", action="store_true")
    parser.add_argument("--resume", action="store_true")
    args = parser.parse_args()
    initialize(args.coordinator, args.num_processes, args.process_id)
    import jax

    from dit.batches import ArrayBatches
    from dit.errors import UserError
    from dit.objectives import make_objective
    from dit.run import train_run
    from tests.test_train import run_config, toy_data

    # The state split over the devices (auto keeps it whole on CPUs): local checkpoints then gather it.
    run = run_config(steps=args.steps, local_checkpoints=args.local, split_state=True)
    x, y = toy_data()
    source = ArrayBatches(x, y, run.train.batch_size, seed=0, process_index=jax.process_index(),
                          process_count=jax.process_count())
    try:
        summary = train_run(run, Path(args.workdir), source, make_objective(run), resume=args.resume, progress=False)
    except UserError as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)
    print("SHA", summary["params_sha256"])


if __name__ == "__main__":
    main()
