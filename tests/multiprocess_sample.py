"""Samples and embeds in this process, as one of several `jax.distributed` processes or alone.

Used by tests/test_distributed.py:
python tests/multiprocess_sample.py OUT.npz [--coordinator C --num-processes N --process-id I]
Writes (process 0) every sample, gathered, and the gathered per-image "features", and prints how many rows
this process made.
"""

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dit.distributed import initialize  # noqa: E402


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("out")
    parser.add_argument("--coordinator")
    parser.add_argument("--num-processes", type=int)
    parser.add_argument("--process-id", type=int)
    args = parser.parse_args()
    initialize(args.coordinator, args.num_processes, args.process_id)
    import jax
    import numpy as np
    from flax import nnx

    from dit.config import EvalConfig, TrainConfig
    from dit.sample import generate, generate_shares
    from tests.helpers import TINY, randomized
    from tests.test_sample import Shrink

    graphdef, params = nnx.split(randomized(TINY))  # the same seed: the same model on every process
    # 13 samples in batches of 8: the last batch is padded, so the gather must drop rows.
    eval_cfg = EvalConfig(num_samples=13, sampling_steps=3, batch_size=8)
    samples = generate_shares(graphdef, params, TINY, TrainConfig(), eval_cfg, seed=5, decoder=Shrink(),
                              progress=False)
    features = samples.gather(samples.images.reshape(len(samples.images), -1).astype(np.float32).mean(-1))
    everything = generate(graphdef, params, TINY, TrainConfig(), eval_cfg, seed=5, decoder=Shrink(), progress=False)
    print("ROWS", len(samples.images), flush=True)
    if jax.process_index() == 0:
        np.savez(args.out, images=everything, features=features)


if __name__ == "__main__":
    main()
