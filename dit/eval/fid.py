"""`python -m dit.eval.fid`: FID (with Inception Score, precision and recall) of samples or of a run.

Samples come from an ADM-style `.npz` (`arr_0`, uint8 NHWC), a folder of images, or a run directory:
then `eval.num_samples` class-balanced images (10,000 by default: FID-10K) are sampled with the EMA
parameters of a checkpoint and the run's sampler and guidance (changeable with --set eval.*), decoded,
and quantised to uint8 as a saved PNG would be. The result is JSON with everything needed to reproduce it.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Callable

import jax
import numpy as np
from flax import nnx

from dit.errors import UserError, report
from dit.eval.inception import FEATURES
from dit.eval.metrics import frechet_distance, inception_score, precision_recall, statistics
from dit.files import write_json_atomic
from dit.rundir import read_json

if TYPE_CHECKING:
    from dit.sample import Samples

__all__ = ["frechet_distance", "evaluate_images", "sample_run", "main"]

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".webp")


def evaluate_images(images: np.ndarray, inception, reference, batch_size: int = 200,
                    gather: Callable[[np.ndarray], np.ndarray] | None = None) -> dict:
    """FID, Inception Score and precision/recall of uint8 images against a Reference. With `gather`
    (`Samples.gather`), `images` are this process's share and the features of all shares are gathered."""
    reference.check(FEATURES)
    started = time.perf_counter()
    features, logits = inception.features_and_logits(images, batch_size=batch_size)
    if gather is not None:
        features, logits = gather(features), gather(logits)
    _check_count(len(features), "the samples to evaluate")  # all processes' together
    features_s = time.perf_counter() - started
    mu, sigma = statistics(features)
    result = {"fid": frechet_distance(mu, sigma, reference.mu, reference.sigma), "num_samples": len(images)}
    result["inception_score"], result["inception_score_std"] = inception_score(logits)
    if reference.features is not None and len(reference.features) > 3 and len(features) > 3:
        result["precision"], result["recall"] = precision_recall(reference.features, features[:len(reference.features)])
    result["features_s"] = features_s
    return result


def read_npz(path: Path) -> np.ndarray:
    try:
        images = np.load(path)["arr_0"]
    except Exception as error:
        raise UserError(f"{path} is not a sample batch .npz with arr_0 ({error}).") from None
    if images.dtype != np.uint8 or images.ndim != 4:
        raise UserError(f"{path}: arr_0 must be uint8 NHWC images, got {images.dtype} {images.shape}.")
    _check_count(len(images), str(path))
    return images


def read_folder(folder: Path) -> np.ndarray:
    from PIL import Image
    if not folder.is_dir():
        raise UserError(f"--images {folder} is not a folder; give the folder that holds the sample images.")
    files = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise UserError(f"no images ({', '.join(IMAGE_SUFFIXES)}) in {folder}.")
    _check_count(len(files), str(folder))
    images = []
    for p in files:
        try:
            with Image.open(p) as image:
                images.append(np.asarray(image.convert("RGB")))
        except Exception as error:  # PIL raises OSError, SyntaxError, ValueError ... for broken files
            raise UserError(f"{p} is not a readable image ({error}); remove or replace it.") from None
    if len({im.shape for im in images}) > 1:
        raise UserError(f"the images in {folder} differ in size; FID needs samples of one size.")
    return np.stack(images)


def _check_count(n: int, source: str) -> None:
    if n < 2:  # a covariance needs 2 samples
        raise UserError(f"{source}: {n} sample image{'' if n == 1 else 's'}, but FID needs at least 2, and a "
                        f"meaningful FID thousands (10,000 for FID-10K, 50,000 for FID-50K).")


def sample_run(run_dir: Path, step: int | None, overrides: list[str], num_samples: int | None, seed: int | None,
               progress: bool = True) -> tuple[Samples, dict]:
    """Samples from a run's checkpoint with its EMA parameters; returns this process's share of the samples
    and the settings used."""
    from dit.autoencoder import decoder_for
    from dit.checkpoint import Checkpoints
    from dit.config import apply_overrides, from_dict
    from dit.mesh import data_mesh, replicated
    from dit.model import DiT
    from dit.sample import generate_shares, sampler_name
    from dit.train import create_optimizer, init_state

    config_path = run_dir / "config.json"
    if not config_path.is_file():
        raise UserError(f"{run_dir} is not a run directory (no config.json); give the directory ablations/run.py made.")
    run = apply_overrides(from_dict(read_json(config_path)), overrides)
    checkpoints = Checkpoints(run_dir / "checkpoints", run.train)
    steps = checkpoints.manager.all_steps()
    if not steps:
        raise UserError(f"{run_dir} holds no finished checkpoint to evaluate.")
    if step is not None and step not in steps:
        raise UserError(f"{run_dir} has no checkpoint at step {step}; it has {', '.join(map(str, sorted(steps)))}.")
    optimizer, _ = create_optimizer(run.train)
    abstract = jax.eval_shape(lambda: init_state(run.model, run.train, optimizer)[1])  # shapes only
    graphdef = nnx.split(nnx.eval_shape(lambda: DiT(run.model, rngs=nnx.Rngs(0))))[0]
    sharding = replicated(data_mesh())
    abstract = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=sharding), abstract)
    # The training resume's restore: checked against the seal, newer damaged checkpoints skipped (left in place).
    found, state, _, skipped = checkpoints.restore_newest_intact(abstract, newest=step)
    checkpoints.close()
    if found is None:
        raise UserError(f"no intact checkpoint of {run_dir} to evaluate: " +
                        "; ".join(f"step {s}: {problem}" for s, problem in skipped) + ".")
    if step is not None and found != step:
        raise UserError(f"the checkpoint at step {step} of {run_dir} is damaged ({skipped[0][1]}); evaluate another "
                        f"--step (the newest intact one before it is {found}).")
    for bad, problem in skipped:
        print(f"warning: checkpoint step {bad} is damaged ({problem}); evaluating step {found} instead",
              file=sys.stderr)
    step = found
    timings: dict = {}
    seed = run.train.seed if seed is None else seed
    samples = generate_shares(graphdef, state["ema"], run.model, run.train, run.eval, seed=seed,
                              num_samples=num_samples, decoder=decoder_for(run.data), progress=progress,
                              timings=timings)
    settings = {"run": str(run_dir), "step": step, "variant": run.variant, "objective": run.train.objective,
                "sampler": sampler_name(run.train, run.eval),
                "sampling_steps": run.eval.sampling_steps, "cfg_scale": run.eval.cfg_scale,
                "guidance_interval": [run.eval.guidance_low, run.eval.guidance_high], "seed": seed, **timings}
    return samples, settings


def write_json_new(path: Path, content: dict) -> None:
    """Results are never overwritten: a new file, written atomically."""
    if path.exists():
        raise UserError(f"{path} already exists; choose another --out (results are never overwritten).")
    path.parent.mkdir(parents=True, exist_ok=True)
    write_json_atomic(path, content)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m dit.eval.fid", description=__doc__.splitlines()[0])
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--samples", type=Path, help="an ADM-style .npz with arr_0 (uint8 NHWC)")
    source.add_argument("--images", type=Path, help="a folder of sample images")
    source.add_argument("--run", type=Path, help="a run directory: sample from its checkpoint's EMA parameters")
    parser.add_argument("--ref", required=True, type=Path, help="reference statistics (python -m dit.eval.ref_stats)")
    parser.add_argument("--step", type=int, help="with --run: the checkpoint step (default the latest)")
    parser.add_argument("--num-samples", type=int, help="with --run: default eval.num_samples (10,000)")
    parser.add_argument("--seed", type=int, help="with --run: default the run's train.seed")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="with --run: change the sampling, e.g. --set eval.cfg_scale=1.5")
    parser.add_argument("--inception", help="FID Inception weights (default: the cached pytorch-fid download)")
    parser.add_argument("--out", type=Path, help="write the result JSON here (a new file)")
    parser.add_argument("--batch", type=int, default=200, help="images per Inception batch")
    parser.add_argument("--save-samples", type=Path, help="with --run: also write the samples as an ADM .npz")
    args = parser.parse_args(argv)
    try:
        from dit.eval.inception import load_inception
        from dit.eval.reference import load_reference
        if args.out is not None and args.out.exists():
            raise UserError(f"{args.out} already exists; choose another --out (results are never overwritten).")
        inception = load_inception(args.inception)
        reference = load_reference(args.ref, inception)
        reference.check(FEATURES)  # now, not after sampling, which can take an hour
        settings: dict = {}
        gather = None
        if args.run is not None:
            samples, settings = sample_run(args.run, args.step, args.overrides, args.num_samples, args.seed)
            images, gather = samples.images, samples.gather
            if args.save_samples is not None:
                everything = samples.gather(samples.images)  # every process takes part in the gather
                if jax.process_index() == 0:
                    from dit.sample import save_npz
                    save_npz(everything, args.save_samples)
        elif args.samples is not None:
            images, settings = read_npz(args.samples), {"samples": str(args.samples)}
        else:
            images, settings = read_folder(args.images), {"images": str(args.images)}
        result = evaluate_images(images, inception, reference, args.batch, gather)
        record = {**result, **settings, "reference": reference.source, "reference_sha256": reference.sha256,
                  "reference_count": reference.count, "inception_sha256": inception.sha256,
                  "backend": jax.default_backend(), "device_kind": jax.devices()[0].device_kind,
                  "date": datetime.now(timezone.utc).isoformat(timespec="seconds")}
        if jax.process_index() == 0:
            print(json.dumps(record, indent=2))
            if args.out is not None:
                write_json_new(args.out, record)
    except UserError as error:
        return report(error)
    return 0


if __name__ == "__main__":
    sys.exit(main())
