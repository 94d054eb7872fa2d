"""Small, realistic results for the analysis tests: run directories as dit/train.py writes them, and a leaderboard.

Digits demo: baseline, rope, rope_swiglu x seeds 0 and 1 (fd_digits every 200 of 1000 steps). Two of them
are damaged as real runs get damaged: baseline seed 1 was killed while writing the line of step 700 and
resumed from its step-500 checkpoint (step 600 is logged twice, and the resumed session's first line is
glued onto the partial one); rope_swiglu seed 1 was killed while writing step 800 and never finished (a
truncated last line, no summary.json). ImageNet-100: baseline and rope_swiglu, FID-10K every 20k steps.
"""

from __future__ import annotations

import csv
import hashlib
import json
from pathlib import Path

import numpy as np
from PIL import Image

LEADERBOARD_COLUMNS = [
    "date", "run_id", "variant", "params", "gflops", "preset", "dataset", "resolution", "objective", "sampler",
    "sampling_steps", "cfg_scale", "step", "batch_size", "metric", "value", "num_samples", "seed", "img_per_s",
    "hardware", "git_commit",
]
DIGITS_VARIANTS = ["baseline", "rope", "rope_swiglu"]
IMAGENET_VARIANTS = ["baseline", "rope_swiglu"]
# Per variant: (demo params, DiT-S params, DiT-S GFLOPs, how much better than baseline, CPU img/s). As the
# launcher records them, config.json's model_params is the trained model's count, and its budget_params and
# gflops, like the leaderboard's params and gflops, are the variant's at DiT-S size whatever the preset.
_VARIANTS = {
    "baseline": (1_207_562, 32_519_456, 6.06, 1.0, 120.0),
    "rope": (1_207_562, 32_519_456, 6.06, 0.9, 115.0),
    "rope_swiglu": (1_208_330, 32_525_600, 6.06, 0.8, 110.0),
}
_DEMO = {"steps": 1000, "log_every": 100, "eval_every": 200, "batch_size": 32, "metric": "fd_digits",
         "num_samples": 500, "dataset": "digits", "preset": "demo", "resolution": 16}
_IN100 = {"steps": 100_000, "log_every": 10_000, "eval_every": 20_000, "batch_size": 256, "metric": "fid",
          "num_samples": 10_000, "dataset": "imagenet100", "preset": "in100", "resolution": 256}


def _run_id(variant: str, preset: str, seed: int) -> str:
    return f"{variant}-{preset}-{hashlib.sha1(f'{variant}{preset}{seed}'.encode()).hexdigest()[:6]}"


def _config(variant: str, spec: dict, seed: int) -> dict:
    demo_params, params, gflops, _, _ = _VARIANTS[variant]
    demo = spec["preset"] == "demo"
    model = {"input_size": 16 if demo else 32, "in_channels": 3 if demo else 4, "patch_size": 2,
             "hidden_size": 128 if demo else 384, "depth": 4 if demo else 12, "num_heads": 4 if demo else 6,
             "mlp_ratio": 4.0, "num_classes": 10 if demo else 100, "pos_embed": "rope" if "rope" in variant else
             "sincos", "mlp": "swiglu" if "swiglu" in variant else "gelu"}
    return {
        "variant": variant, "preset": spec["preset"], "model": model,
        "train": {"steps": spec["steps"], "batch_size": spec["batch_size"], "seed": seed, "objective": "ddpm",
                  "lr": 1e-4, "log_every": spec["log_every"]},
        "eval": {"every": spec["eval_every"], "num_samples": spec["num_samples"], "sampling_steps": 50,
                 "cfg_scale": 1.0, "sampler": ""},
        "data": {"cache": "data/digits-cache" if demo else "data/in100-latents"},
        "model_params": demo_params if demo else params, "budget_params": params,
        "gflops": gflops, "git_commit": "abc1234", "run_id": _run_id(variant, spec["preset"], seed),
        "dataset": spec["dataset"], "metric": spec["metric"],
    }


def _record(variant: str, spec: dict, seed: int, step: int, session: int, first: bool) -> dict:
    """One metrics.jsonl line: the loss falls with steps, the metric falls faster for better variants."""
    _, _, _, quality, speed = _VARIANTS[variant]
    rng = np.random.default_rng([seed, step, session])
    progress = step / spec["steps"]
    loss = (0.12 + 0.03 * quality) + 0.3 * np.exp(-4 * progress) + 0.005 * rng.standard_normal()
    record = {"step": step, "loss": float(loss), **{f"loss_q{i}": float(loss * (0.5 + 0.4 * i)) for i in range(4)},
              "grad_norm": float(0.5 + rng.random()), "lr": 1e-4,
              "img_per_s": float(speed * (1 + 0.05 * rng.standard_normal()) * (1 if spec["preset"] == "demo" else 30)),
              "step_ms": 0.0}
    record["step_ms"] = 1000 * spec["batch_size"] / record["img_per_s"]
    if first:
        record["compile_s"] = 25.0
    if step % spec["eval_every"] == 0:
        base = 60.0 if spec["metric"] == "fd_digits" else 150.0
        value = base * quality * (0.15 + np.exp(-3 * progress)) * (1 + 0.03 * rng.standard_normal())
        record.update({spec["metric"]: float(value), f"{spec['metric']}_samples": spec["num_samples"],
                       "eval_s": 20.1, "sample_s": 15.0, "decode_s": 0.1, "features_s": 2.0})
    return record


def _grid(path: Path, variant: str, step: int) -> None:
    """A 34x34 PNG standing in for a sample grid: 2x2 tiles of 16 px with a 1 px border, coloured per variant."""
    image = np.zeros((34, 34, 3), np.uint8)
    shade = int(255 * min(1.0, 0.3 + step / 1000))
    channel = DIGITS_VARIANTS.index(variant)
    for row in range(2):
        for col in range(2):
            tile = image[1 + 17 * row: 17 + 17 * row, 1 + 17 * col: 17 + 17 * col]
            tile[4:12, 6:10, channel] = shade
            tile[4:12, 6:10, (channel + 1) % 3] = 255 - shade
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(image).save(path)


def _write_run(runs: Path, variant: str, spec: dict, seed: int, damage: str = "") -> tuple[Path, list[dict]]:
    """Writes one run directory; returns it and the records of its evaluations (for the leaderboard)."""
    config = _config(variant, spec, seed)
    path = runs / config["run_id"]
    path.mkdir(parents=True)
    (path / "config.json").write_text(json.dumps(config, indent=2))
    steps = list(range(spec["log_every"], spec["steps"] + 1, spec["log_every"]))
    lines = []
    if damage == "resumed":
        lines += [json.dumps(_record(variant, spec, seed, s, 0, s == steps[0])) + "\n" for s in steps if s <= 600]
        lines.append(json.dumps(_record(variant, spec, seed, 700, 0, False))[:25])  # killed mid-write
        # Resumed from the step-500 checkpoint: 600 again, its line glued onto the partial one.
        lines += [json.dumps(_record(variant, spec, seed, s, 1, s == 600)) + "\n" for s in steps if s >= 600]
    elif damage == "killed":
        lines += [json.dumps(_record(variant, spec, seed, s, 0, s == steps[0])) + "\n" for s in steps if s <= 700]
        lines.append(json.dumps(_record(variant, spec, seed, 800, 0, False))[:30])  # killed mid-write
    else:
        lines += [json.dumps(_record(variant, spec, seed, s, 0, s == steps[0])) + "\n" for s in steps]
    (path / "metrics.jsonl").write_text("".join(lines))
    # The records as the reader should see them: each step's last complete line.
    records = {}
    for line in "".join(lines).splitlines():
        start = line.rfind('{"step"')
        try:
            record = json.loads(line[start:])
        except json.JSONDecodeError:
            continue
        records[record["step"]] = record
    evaluations = [r for _, r in sorted(records.items()) if spec["metric"] in r]
    for record in evaluations:
        _grid(path / "samples" / f"step_{record['step']:07d}.png", variant, record["step"] * 1000 // spec["steps"])
    if damage != "killed":
        last = records[max(records)]
        (path / "summary.json").write_text(json.dumps(
            {"final_step": spec["steps"], "preempted": False, "params_sha256": "0" * 64, "last_metrics": last}))
    return path, [{**r, "config": config} for r in evaluations]


def _leaderboard_row(record: dict, spec: dict) -> dict:
    config = record["config"]
    return {
        "date": "2026-11-29", "run_id": config["run_id"], "variant": config["variant"], "params": config["budget_params"],
        "gflops": config["gflops"], "preset": config["preset"], "dataset": config["dataset"],
        "resolution": spec["resolution"], "objective": "ddpm", "sampler": "ddpm", "sampling_steps": 50,
        "cfg_scale": 1.0, "step": record["step"], "batch_size": spec["batch_size"], "metric": spec["metric"],
        "value": record[spec["metric"]], "num_samples": spec["num_samples"], "seed": config["train"]["seed"],
        "img_per_s": record["img_per_s"], "hardware": "cpu" if spec["preset"] == "demo" else "1x H200",
        "git_commit": config["git_commit"],
    }


def write_fixture_results(root: str | Path) -> dict:
    """Writes root/runs/ and root/leaderboard.csv; returns their paths and what the tests check against."""
    root = Path(root)
    runs = root / "runs"
    runs.mkdir(parents=True)
    rows, paths = [], {}
    for variant in DIGITS_VARIANTS:
        for seed in (0, 1):
            damage = {("baseline", 1): "resumed", ("rope_swiglu", 1): "killed"}.get((variant, seed), "")
            path, evaluations = _write_run(runs, variant, _DEMO, seed, damage)
            rows += [_leaderboard_row(r, _DEMO) for r in evaluations]
            if damage:
                paths[damage] = path
    for variant in IMAGENET_VARIANTS:
        _, evaluations = _write_run(runs, variant, _IN100, 0)
        rows += [_leaderboard_row(r, _IN100) for r in evaluations]
    (runs / "notes").mkdir()  # a directory without config.json is not a run
    leaderboard = root / "leaderboard.csv"
    with open(leaderboard, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=LEADERBOARD_COLUMNS)
        writer.writeheader()
        writer.writerows(rows)
    return {"root": root, "runs": runs, "leaderboard": leaderboard, "resumed_run": paths["resumed"],
            "killed_run": paths["killed"], "digits_variants": DIGITS_VARIANTS,
            "imagenet_variants": IMAGENET_VARIANTS, "num_runs": len(DIGITS_VARIANTS) * 2 + len(IMAGENET_VARIANTS)}
