"""Runs a tiny training in this process, as one of several `jax.distributed` processes or alone.

Used by tests/test_distributed.py: python tests/multiprocess_train.py WORKDIR STEPS [COORD N ID]
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dit.distributed import initialize  # noqa: E402


def main(workdir, steps, coordinator=None, num_processes=None, process_id=None):
    initialize(coordinator, None if num_processes is None else int(num_processes),
               None if process_id is None else int(process_id))
    import jax

    from dit.batches import ArrayBatches
    from dit.objectives import make_objective
    from dit.train import train
    from tests.test_train import run_config, toy_data

    run = run_config(steps=int(steps))
    x, y = toy_data()
    source = ArrayBatches(x, y, run.train.batch_size, seed=0, process_index=jax.process_index(),
                          process_count=jax.process_count())
    summary = train(run, Path(workdir), source, make_objective(run), progress=False)
    print("SHA", summary["params_sha256"])


if __name__ == "__main__":
    main(*sys.argv[1:])
