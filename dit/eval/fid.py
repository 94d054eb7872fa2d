"""`python -m dit.eval.fid`: FID (with Inception Score, precision and recall) of samples or of a run, or a
sweep of a run's guidance and sampler settings.

Samples come from an ADM-style `.npz` (`arr_0`, uint8 NHWC), a folder of images, or a run directory:
then `eval.num_samples` class-balanced images (10,000 by default: FID-10K) are sampled with the EMA
parameters of a checkpoint and the run's sampler and guidance (changeable with --set eval.*), decoded,
and quantised to uint8 as a saved PNG would be. The result is JSON with everything needed to reproduce it.

With --run and any of --cfg-scale, --guidance-interval, --guided-channels, --sampler, --sampling-steps or
--leaderboard, the checkpoint is evaluated with the run's own metric at every combination of the listed
settings (the same seed, so sample i starts from the same noise in every setting), each appended to the
leaderboard as a `sweep` row the moment it is done; settings the leaderboard already holds are skipped,
so a killed sweep continues where it stopped when run again.
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import math
import sys
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING

import jax
import numpy as np

from dit.config import SAMPLERS, RunConfig
from dit.distributed import from_process_zero
from dit.errors import UserError, report
from dit.eval.evaluator import check_count, evaluate_images
from dit.eval.inception import FEATURES
from dit.eval.metrics import frechet_distance
from dit.files import write_json_atomic
from dit.leaderboard import (DEFAULT_PATH, FLOAT_COLUMNS, INT_COLUMNS, append_rows, git_commit, read_rows,
                             run_row, utc_now)
from dit.rundir import read_json

if TYPE_CHECKING:
    from dit.sample import Samples

__all__ = ["frechet_distance", "evaluate_images", "sample_run", "sweep_settings", "main"]

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".webp")


def read_npz(path: Path) -> np.ndarray:
    try:
        images = np.load(path)["arr_0"]
    except Exception as error:
        raise UserError(f"{path} is not a sample batch .npz with arr_0 ({error}).") from None
    if images.dtype != np.uint8 or images.ndim != 4:
        raise UserError(f"{path}: arr_0 must be uint8 NHWC images, got {images.dtype} {images.shape}.")
    check_count(len(images), str(path))
    return images


def read_folder(folder: Path) -> np.ndarray:
    from PIL import Image
    if not folder.is_dir():
        raise UserError(f"--images {folder} is not a folder; give the folder that holds the sample images.")
    files = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise UserError(f"no images ({', '.join(IMAGE_SUFFIXES)}) in {folder}.")
    check_count(len(files), str(folder))
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


def read_run(run_dir: Path, overrides: list[str] = ()) -> tuple[RunConfig, dict]:
    """A run directory's config (with --set overrides) and its config.json as saved."""
    from dit.config import apply_overrides, from_dict
    saved = read_json(run_dir / "config.json")
    if saved is None:
        raise UserError(f"{run_dir} is not a run directory (no config.json); give the directory ablations/run.py made.")
    return apply_overrides(from_dict(saved), list(overrides)), saved


def sample_run(run_dir: Path, step: int | None, overrides: list[str], num_samples: int | None, seed: int | None,
               progress: bool = True) -> tuple[Samples, dict]:
    """Samples from a run's checkpoint with its EMA parameters; returns this process's share of the samples
    and the settings used."""
    from dit.data.source import training_data
    from dit.run import restore_ema
    from dit.sample import generate_shares, sampler_name

    run, _ = read_run(run_dir, overrides)
    step, graphdef, ema = restore_ema(run_dir, run, step)
    timings: dict = {}
    seed = run.train.seed if seed is None else seed
    samples = generate_shares(graphdef, ema, run.model, run.train, run.eval, seed=seed,
                              num_samples=num_samples, decoder=training_data(run.data).autoencoder, progress=progress,
                              timings=timings)
    settings = {"run": str(run_dir), "step": step, "variant": run.variant, "objective": run.train.objective,
                "sampler": sampler_name(run.train, run.eval),
                "sampling_steps": run.eval.sampling_steps, "cfg_scale": run.eval.cfg_scale,
                "guidance_interval": [run.eval.guidance_low, run.eval.guidance_high], "seed": seed, **timings}
    return samples, settings


# The flags that make `--run` a sweep, and what each takes.
SWEEP_FLAGS = {"cfg_scale": "--cfg-scale", "guidance_interval": "--guidance-interval",
               "guided_channels": "--guided-channels", "sampler": "--sampler", "sampling_steps": "--sampling-steps",
               "leaderboard": "--leaderboard"}
# A sweep row is the same evaluation as another sweep row when these agree: it is skipped, never written twice.
SAME_EVALUATION = ("run_id", "step", "metric", "sampler", "sampling_steps", "cfg_scale", "guided_channels",
                   "guidance_low", "guidance_high", "timestep_shift", "num_samples", "seed", "reference_sha256")
DDPM_STEPS = 1000  # DiT's diffusion (dit.diffusion): a sampler can respace it to at most this many steps


def _split(text: str | None, kind, flag: str, example: str) -> list | None:
    """'1,1.5,2' -> [1.0, 1.5, 2.0]; None when the flag was not given."""
    if text is None:
        return None
    try:
        return [kind(part.strip()) for part in text.split(",")]
    except ValueError:
        raise UserError(f"{flag} {text}: give values separated by commas, such as {flag} {example}.") from None


def sweep_settings(run: RunConfig, cfg_scale: str | None = None, guidance_interval: list[str] | None = None,
                   guided_channels: str | None = None, sampler: str | None = None,
                   sampling_steps: str | None = None) -> list[RunConfig]:
    """The run's config at every combination of the listed settings (the run's own value where a flag is
    absent), each checked; a bad value is a UserError naming its flag, raised before anything is sampled."""
    from dit.sample import sampler_name
    cfg = run.eval
    scales = _split(cfg_scale, float, "--cfg-scale", "1,1.5,2") or [cfg.cfg_scale]
    bad = [s for s in scales if not (math.isfinite(s) and s >= 0)]
    if bad:
        raise UserError(f"--cfg-scale {cfg_scale}: {bad[0]:g} is not a guidance scale; scales are finite numbers "
                        f">= 0 (1: no guidance, 1.5: DiT's for FID), such as --cfg-scale 1,1.5,2.")
    intervals = [_split(text, float, "--guidance-interval", "0.1,0.9") for text in guidance_interval or []]
    for text, interval in zip(guidance_interval or [], intervals):
        if len(interval) != 2 or not (0.0 <= interval[0] < interval[1] <= 1.0):
            raise UserError(f"--guidance-interval {text}: give LO,HI with 0 <= LO < HI <= 1, the noise levels where "
                            f"guidance acts (0 the clean image, 1 pure noise), such as 0,1 (everywhere) or 0.1,0.9; "
                            f"repeat the flag for several intervals.")
    intervals = intervals or [[cfg.guidance_low, cfg.guidance_high]]
    channels = _split(guided_channels, int, "--guided-channels", "0,3") or [cfg.guided_channels]
    latent = run.model.in_channels
    bad = [c for c in channels if not 0 <= c <= latent]
    if bad:
        raise UserError(f"--guided-channels {guided_channels}: {bad[0]} is not a count of this run's {latent} latent "
                        f"channels; give 0 (all of them, as SiT) to {latent} (DiT guides the first 3).")
    samplers = _split(sampler, str, "--sampler", ",".join(SAMPLERS[run.train.objective])) or [
        sampler_name(run.train, cfg)]
    allowed = SAMPLERS[run.train.objective]
    bad = [name for name in samplers if name not in allowed]
    if bad:
        raise UserError(f"--sampler {sampler}: {bad[0]!r} does not fit this run's objective, "
                        f"{run.train.objective}, whose samplers are {', '.join(allowed)}.")
    steps = _split(sampling_steps, int, "--sampling-steps", "50,250") or [cfg.sampling_steps]
    most = DDPM_STEPS if run.train.objective == "ddpm" else None
    bad = [n for n in steps if n < 1 or most is not None and n > most]
    if bad:
        raise UserError(f"--sampling-steps {sampling_steps}: {bad[0]} steps; give whole numbers from 1"
                        + (f" to {most} (DDPM respaces DiT's {most} steps)" if most else "") + ", such as 50,250.")
    settings = []
    for name, n, c, (low, high), scale in itertools.product(samplers, steps, channels, intervals, scales):
        # The time shift belongs to the ODE samplers: a sweep onto another sampler drops it.
        shift = cfg.timestep_shift if (name or SAMPLERS[run.train.objective][0]) in ("euler", "heun") else 0.0
        changed = dataclasses.replace(cfg, sampler=name, sampling_steps=n, guided_channels=c, guidance_low=low,
                                      guidance_high=high, cfg_scale=scale, timestep_shift=shift)
        settings.append(dataclasses.replace(run, eval=changed))  # RunConfig checks the combination as a whole
    return settings


def _typed(column: str, value) -> object:
    """A leaderboard cell as a comparable value, whether written here (a number) or read back (text)."""
    if value is None or value == "":
        return None
    return int(value) if column in INT_COLUMNS else float(value) if column in FLOAT_COLUMNS else str(value)


def evaluation_key(row: dict) -> tuple:
    return tuple(_typed(column, row[column]) for column in SAME_EVALUATION)


def sweep(args: argparse.Namespace) -> None:
    """Evaluates a run's checkpoint at every combination of the listed settings; one leaderboard row each."""
    from dit.data.source import training_data
    from dit.eval.evaluator import build_evaluator
    from dit.run import checkpoint_steps, restore_ema

    refused = [flag for flag, given in (("--out", args.out), ("--save-samples", args.save_samples),
                                        ("--set", args.overrides)) if given]
    if refused:
        raise UserError(f"{', '.join(refused)} belong to the evaluation of one setting; a sweep takes its settings "
                        f"from --cfg-scale, --guidance-interval, --guided-channels, --sampler and --sampling-steps "
                        f"and records each on the leaderboard (--leaderboard). Leave {', '.join(refused)} out.")
    run, saved = read_run(args.run)
    # Everything that can be wrong is found before the first sample: the settings, the step, the leaderboard's
    # header, the data (the decoder, and the digits that fd_digits needs), the reference and the weights.
    settings = sweep_settings(run, args.cfg_scale, args.guidance_interval, args.guided_channels, args.sampler,
                              args.sampling_steps)
    checkpoint_steps(args.run, run, args.step)
    leaderboard = Path(args.leaderboard) if args.leaderboard else DEFAULT_PATH
    held = {evaluation_key(r) for r in read_rows(leaderboard) if r["source"] == "sweep"}
    data = training_data(run.data)
    evaluator = build_evaluator(run, data, reference=str(args.ref or ""), inception=args.inception or "")
    step, _, ema = restore_ema(args.run, run, args.step)
    seed = run.train.seed if args.seed is None else args.seed
    lead = jax.process_index() == 0
    num_samples = args.num_samples or run.eval.num_samples
    # The run's record, but this sweep's data reading, machine, commit and reference.
    recorded = {**saved, "run_id": saved.get("run_id") or args.run.name, "dataset": data.dataset,
                "resolution": data.resolution, "hardware": f"{jax.device_count()}x {jax.devices()[0].device_kind}",
                "git_commit": git_commit(), "reference_sha256": evaluator.reference.sha256}
    added = 0
    for setting in settings:
        row = run_row(setting, recorded, step=step, metric=evaluator.name, num_samples=num_samples, seed=seed,
                      source="sweep")
        described = (f"step {step}, {row['sampler']} {row['sampling_steps']} steps, cfg {row['cfg_scale']:g}, "
                     f"interval {row['guidance_low']:g}-{row['guidance_high']:g}, guided channels "
                     f"{row['guided_channels'] or 'all'}")
        if from_process_zero(evaluation_key(row) in held):  # each setting sampled by all processes or none
            if lead:
                print(f"{described}: already in {leaderboard}, skipped")
            continue
        evaluate = dataclasses.replace(evaluator, run=dataclasses.replace(
            setting, eval=dataclasses.replace(setting.eval, num_samples=num_samples)), seed=seed, progress=lead)
        result = evaluate(step, ema)
        if lead:  # appended the moment it is known: a killed sweep loses only the setting it was evaluating
            append_rows([{**row, "date": utc_now(), "value": result[evaluator.name]}], leaderboard)
            print(f"{described}: {evaluator.name} {result[evaluator.name]:.4f} ({num_samples:,} samples, "
                  f"{result['eval_s']:.0f} s)", flush=True)
        added += 1
    if lead:
        print(f"{added} rows added to {leaderboard}, {len(settings) - added} already there")


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
    parser.add_argument("--ref", type=Path, help="reference statistics (python -m dit.eval.ref_stats); with --run, "
                                                 "default the run's own (eval.reference)")
    parser.add_argument("--step", type=int, help="with --run: the checkpoint step (default the latest)")
    parser.add_argument("--num-samples", type=int, help="with --run: default eval.num_samples (10,000)")
    parser.add_argument("--seed", type=int, help="with --run: default the run's train.seed")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="with --run: change the sampling, e.g. --set eval.cfg_scale=1.5")
    parser.add_argument("--inception", help="FID Inception weights (default: the run's eval.inception, else the "
                                            "cached pytorch-fid download)")
    parser.add_argument("--out", type=Path, help="write the result JSON here (a new file)")
    parser.add_argument("--batch", type=int, default=200, help="images per Inception batch")
    parser.add_argument("--save-samples", type=Path, help="with --run: also write the samples as an ADM .npz")
    sweep_options = parser.add_argument_group("sweeps of a run (--run): each setting becomes a leaderboard row")
    sweep_options.add_argument("--cfg-scale", metavar="S,S,...", help="guidance scales, e.g. 1,1.5,2 (1: none)")
    sweep_options.add_argument("--guidance-interval", action="append", metavar="LO,HI",
                               help="noise levels where guidance acts, 0 <= LO < HI <= 1 (1 = pure noise); "
                                    "repeat for several")
    sweep_options.add_argument("--guided-channels", metavar="C,C,...",
                               help="latent channels guided, from the first (0: all; DiT guides 3)")
    sweep_options.add_argument("--sampler", metavar="NAME,...", help="samplers of the run's objective: ddpm, ddim "
                                                                     "(ddpm); sde, euler, heun (flow)")
    sweep_options.add_argument("--sampling-steps", metavar="N,N,...", help="sampling steps, e.g. 50,250")
    sweep_options.add_argument("--leaderboard", help="the leaderboard CSV (default results/leaderboard.csv)")
    args = parser.parse_args(argv)
    try:
        given = [flag for name, flag in SWEEP_FLAGS.items() if getattr(args, name) is not None]
        if given and args.run is None:
            raise UserError(f"{', '.join(given)} sweep the settings of a run's checkpoint: give --run DIR.")
        if given:
            sweep(args)
            return 0
        evaluate_one(args)
    except UserError as error:
        return report(error)
    return 0


def evaluate_one(args: argparse.Namespace) -> None:
    """FID, Inception Score and precision/recall of one sample set, printed as JSON (and written to --out)."""
    from dit.eval.inception import load_inception
    from dit.eval.reference import load_reference
    if args.out is not None and args.out.exists():
        raise UserError(f"{args.out} already exists; choose another --out (results are never overwritten).")
    ref, inception_path = args.ref, args.inception
    if args.run is not None:  # the run's own reference and Inception, as its training-time evaluations used
        run, _ = read_run(args.run, args.overrides)
        ref = ref or (run.eval.reference if run.eval.metric == "fid" else None)
        inception_path = inception_path or run.eval.inception or None
        if not ref:
            why = ("its config names no reference statistics (eval.reference)" if run.eval.metric == "fid" else
                   f"it is evaluated by {run.eval.metric}, not FID")
            raise UserError(f"{args.run}: {why}, so --ref FILE.npz is needed for its FID (from `python -m "
                            f"dit.eval.ref_stats`); or give a sweep option (such as --cfg-scale "
                            f"{run.eval.cfg_scale:g}) to record the run's own {run.eval.metric} on the leaderboard.")
    elif ref is None:
        raise UserError("--ref FILE.npz is needed: the reference statistics of the real images (`python -m "
                        "dit.eval.ref_stats`), or an ADM reference batch.")
    inception = load_inception(inception_path)
    reference = load_reference(ref, inception)
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


if __name__ == "__main__":
    sys.exit(main())
