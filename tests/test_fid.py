"""End to end on the CPU: reference statistics, FID during training, and `python -m dit.eval.fid`."""

import json

import numpy as np
import pytest
from PIL import Image

from dit.config import DataConfig, EvalConfig, ModelConfig, RunConfig, TrainConfig
from dit.data.extract import extract
from dit.autoencoder import PixelAutoencoder
from dit.data.source import training_data
from dit.data.pipeline import CacheBatches
from dit.eval.evaluator import FrechetEvaluator
from dit.errors import UserError
from dit.eval.fid import evaluate_images, main
from dit.eval.reference import load_reference
from dit.eval.ref_stats import reference_statistics
from dit.eval.inception import load_inception
from dit.objectives import make_objective
from dit.run import train_run
from tests.fake_imagenet import make_class_folders
from tests.helpers import write_random_inception

RES = 8


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("fid")
    make_class_folders(root / "images", classes=3, per_class=8, size=(20, 16))
    extract(root / "images", PixelAutoencoder(), root / "cache", resolution=RES, batch_size=8, shard_size=16,
            dtype="float32", progress=False)
    weights = write_random_inception(root / "inception.safetensors")
    inception = load_inception(weights)
    # Every Inception call here runs batches of 8 images: one compilation for the whole module.
    reference_statistics(root / "images", inception, root / "ref.npz", resolution=RES, batch_size=8, progress=False)
    return root, inception


def test_reference_statistics_are_those_of_the_cropped_images(setup):
    root, inception = setup
    ref = load_reference(root / "ref.npz")
    from dit.data.images import find_images, load_images
    image_set = find_images(root / "images")
    images, _, _ = load_images(image_set, np.arange(len(image_set)), RES)
    features = inception.features(images, batch_size=8)
    np.testing.assert_allclose(ref.mu, features.mean(0), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(ref.sigma, np.cov(features.astype(np.float64), rowvar=False), rtol=1e-4, atol=1e-6)
    assert ref.count == 24 and ref.features.shape == (24, 2048) and ref.meta["resolution"] == RES
    with pytest.raises(Exception, match="never overwritten"):
        reference_statistics(root / "images", inception, root / "ref.npz", resolution=RES, progress=False)


def test_fid_of_the_reference_images_themselves_is_zero(setup, tmp_path, capsys):
    root, inception = setup
    from dit.data.images import find_images, load_images
    image_set = find_images(root / "images")
    images, _, _ = load_images(image_set, np.arange(len(image_set)), RES)
    np.savez(tmp_path / "same.npz", arr_0=images)
    assert main(["--samples", str(tmp_path / "same.npz"), "--ref", str(root / "ref.npz"),
                 "--inception", str(root / "inception.safetensors"), "--out", str(tmp_path / "r.json"),
                 "--batch", "8"]) == 0
    result = json.loads((tmp_path / "r.json").read_text())
    assert abs(result["fid"]) < 1e-3 and result["num_samples"] == 24
    assert result["precision"] == 1.0 and result["recall"] == 1.0
    # A second evaluation never overwrites the first.
    assert main(["--samples", str(tmp_path / "same.npz"), "--ref", str(root / "ref.npz"),
                 "--inception", str(root / "inception.safetensors"), "--out", str(tmp_path / "r.json")]) == 2
    assert "already exists" in capsys.readouterr().err


@pytest.fixture(scope="module")
def trained(setup, tmp_path_factory):
    """A tiny run trained with FID every 3 steps (checkpoints at 2, 3 and 4), whose config names its reference
    and Inception weights; its metrics.jsonl records and summary. Tests that damage it work on a copy.
    A large learning rate and no EMA averaging, so that 4 steps make the labels, and guidance, matter."""
    root, inception = setup
    workdir = tmp_path_factory.mktemp("trained") / "run"
    run = RunConfig(
        model=ModelConfig(input_size=RES, in_channels=3, hidden_size=32, depth=2, num_heads=2, num_classes=3),
        train=TrainConfig(steps=4, batch_size=8, ckpt_every=2, log_every=1, lr=1e-2, ema_decay=0.0),
        eval=EvalConfig(every=3, num_samples=8, sampling_steps=2, batch_size=8, reference=str(root / "ref.npz"),
                        inception=str(root / "inception.safetensors")),
        data=DataConfig(cache=str(root / "cache")))
    from flax import nnx
    from dit.model import DiT
    graphdef = nnx.split(DiT(run.model, rngs=nnx.Rngs(0)))[0]
    reference = load_reference(root / "ref.npz")
    evaluator = FrechetEvaluator("fid", inception, reference, training_data(run.data).autoencoder, run, graphdef,
                                 sample_dir=workdir / "samples")
    record = {"run_id": "tiny-run", "budget_params": 32_519_456, "gflops": 6.06, "dataset": "images",
              "resolution": RES, "metric": "fid"}
    summary = train_run(run, workdir, CacheBatches(root / "cache", 8, seed=0), make_objective(run), progress=False,
                        evaluate=evaluator, record=record)
    from dit.rundir import read_metrics
    return workdir, read_metrics(workdir), summary


@pytest.fixture(scope="module")
def single(trained, tmp_path_factory):
    """`python -m dit.eval.fid --run` of the trained run at its own settings: the reference and the Inception
    are the run's own (no --ref, no --inception)."""
    out = tmp_path_factory.mktemp("single") / "fid.json"
    assert main(["--run", str(trained[0]), "--num-samples", "8", "--out", str(out), "--batch", "8"]) == 0
    return json.loads(out.read_text())


def test_fid_during_training_then_from_the_run_directory(setup, trained, single, tmp_path, capsys):
    import shutil
    from dit.files import sha256_of
    root, _ = setup
    workdir, records, summary = trained
    evals = [r for r in records if "fid" in r]
    assert [r["step"] for r in evals] == [3, 4] and [r["step"] for r in records] == [1, 2, 3, 4]
    for r in evals:
        assert np.isfinite(r["fid"]) and r["fid"] > 0 and r["fid_samples"] == 8
        assert r["eval_s"] >= r["sample_s"] + r["features_s"] and "img_per_s" in r
    assert (workdir / "samples" / "step_0000004.png").is_file()
    assert summary["last_metrics"]["fid"] == evals[-1]["fid"]

    result = single
    # The checkpoint's EMA with the run's sampling settings and seed: the number the loop logged.
    assert result["fid"] == pytest.approx(evals[-1]["fid"], rel=1e-4)
    assert result["reference_sha256"] == sha256_of(root / "ref.npz")  # the run's own reference, by default
    for key in ("step", "seed", "sampler", "sampling_steps", "cfg_scale", "num_samples", "reference_sha256",
                "inception_sha256", "inception_score", "sample_s", "decode_s", "features_s"):
        assert key in result, key
    assert result["step"] == 4 and result["num_samples"] == 8 and result["sampler"] == "ddpm"

    # A damaged newest checkpoint: --run samples from the newest intact one and says so; --step of it is refused.
    from dit.eval.fid import sample_run
    damaged = tmp_path / "damaged"
    shutil.copytree(workdir, damaged)
    (damaged / "checkpoints" / "4" / "state" / "_METADATA").write_text("")
    capsys.readouterr()
    _, settings = sample_run(damaged, None, [], num_samples=8, seed=None, progress=False)
    assert settings["step"] == 3  # saved before its evaluation
    assert "checkpoint step 4 is damaged (state/_METADATA differs" in capsys.readouterr().err
    with pytest.raises(UserError, match="the checkpoint at step 4 .* is damaged"):
        sample_run(damaged, 4, [], num_samples=8, seed=None, progress=False)
    assert (damaged / "checkpoints" / "4").is_dir()  # evaluation never moves or deletes checkpoints


def test_a_sweep_writes_a_row_per_setting_and_a_killed_one_continues(setup, trained, single, tmp_path, capsys):
    from dit.leaderboard import read_rows
    from dit.files import sha256_of
    root, _ = setup
    workdir, records, _ = trained
    board = tmp_path / "lb.csv"
    sweep = ["--run", str(workdir), "--num-samples", "8", "--leaderboard", str(board)]
    assert main([*sweep, "--cfg-scale", "1,2"]) == 0
    rows = read_rows(board)
    assert [float(r["cfg_scale"]) for r in rows] == [1.0, 2.0]
    for row in rows:  # the setting and its provenance in every row
        assert (row["source"], row["run_id"], row["step"], row["metric"], row["num_samples"], row["seed"]) == (
            "sweep", "tiny-run", "4", "fid", "8", "0")
        assert (row["sampler"], row["sampling_steps"], row["guided_channels"]) == ("ddpm", "2", "3")
        assert (float(row["guidance_low"]), float(row["guidance_high"])) == (0.0, 1.0)
        assert row["reference_sha256"] == sha256_of(root / "ref.npz") and row["git_commit"] and row["date"]
    assert rows[0]["value"] != rows[1]["value"]

    # Scale 1 is the run's own setting, and a sweep gives sample i the noise any other evaluation gives it:
    # its row is the single evaluation at scale 1 and the training-time evaluation of step 4.
    assert single["cfg_scale"] == 1.0 and single["step"] == 4
    assert float(rows[0]["value"]) == pytest.approx(single["fid"], rel=1e-5)
    assert float(rows[0]["value"]) == pytest.approx([r for r in records if "fid" in r][-1]["fid"], rel=1e-5)

    # Killed after scales 1 and 2: the same sweep with 3 added evaluates only 3, leaving the rows there as they are.
    before = board.read_bytes()
    capsys.readouterr()
    assert main([*sweep, "--cfg-scale", "1,2,3"]) == 0
    out = capsys.readouterr().out
    assert out.count("skipped") == 2 and "1 rows added" in out
    assert board.read_bytes().startswith(before)
    assert [float(r["cfg_scale"]) for r in read_rows(board)] == [1.0, 2.0, 3.0]


@pytest.mark.parametrize("flags, message", [
    (["--cfg-scale", "1,-1"], "-1 is not a guidance scale"),
    (["--cfg-scale", "1,x"], "give values separated by commas"),
    (["--guidance-interval", "0.5,0.2"], "0 <= LO < HI <= 1"),
    (["--guidance-interval", "0,1.5"], "0 <= LO < HI <= 1"),
    (["--guided-channels", "4"], "4 is not a count of this run's 3 latent channels"),
    (["--sampler", "ddim,euler"], "'euler' does not fit this run's objective, ddpm"),
    (["--sampling-steps", "0"], "0 steps"),
    (["--cfg-scale", "1.5", "--step", "5"], "no checkpoint at step 5; it has 2, 3, 4"),
    (["--cfg-scale", "1.5", "--set", "eval.batch_size=4"], "--set belong to the evaluation of one setting"),
])
def test_bad_sweep_settings_fail_before_anything_is_sampled(trained, tmp_path, capsys, monkeypatch, flags, message):
    import dit.eval.evaluator
    monkeypatch.setattr(dit.eval.evaluator, "generate_shares", lambda *a, **k: pytest.fail("sampled"))
    err = fid_error(capsys, ["--run", str(trained[0]), "--leaderboard", str(tmp_path / "lb.csv"), *flags])
    assert message in err
    assert not (tmp_path / "lb.csv").exists()


def test_sweep_options_need_a_run(weights_and_reference, capsys):
    err = fid_error(capsys, ["--samples", "x.npz", "--cfg-scale", "1,2"])
    assert "--cfg-scale sweep the settings of a run's checkpoint: give --run DIR" in err


def test_the_runner_trains_on_images_encoded_on_the_fly_and_records_fid(setup, tmp_path):
    import csv
    import subprocess
    import sys
    from pathlib import Path
    root, _ = setup
    runner = Path(__file__).resolve().parents[1] / "ablations" / "run.py"
    common = ["--variant", "baseline", "--preset", "smoke", "--set", f"data.images={root / 'images'}",
              "--set", "data.vae=pixels", "--set", f"data.resolution={RES}", "--set", "model.num_classes=3",
              "--leaderboard", "lb.csv", "--figures", "figures", "--no-progress"]
    # The digits' metric needs their cache: on images it is refused before any run directory exists.
    refused = subprocess.run([sys.executable, str(runner), *common, "--workdir", "runs/x"], cwd=tmp_path,
                             capture_output=True, text=True)
    assert refused.returncode == 2 and "eval.metric=fid" in refused.stderr and "Traceback" not in refused.stderr
    assert not (tmp_path / "runs").exists()
    out = subprocess.run([sys.executable, str(runner), *common, "--workdir", "runs/a", "--set", "eval.metric=fid",
                          "--set", f"eval.reference={root / 'ref.npz'}",
                          "--set", f"eval.inception={root / 'inception.safetensors'}"],
                         cwd=tmp_path, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-3000:]
    rows = list(csv.DictReader(open(tmp_path / "lb.csv")))
    assert [(r["step"], r["metric"], r["dataset"], r["resolution"]) for r in rows] == [("4", "fid", "images", "8")]
    assert float(rows[0]["value"]) > 0


@pytest.fixture(scope="module")
def weights_and_reference(tmp_path_factory):
    """Inception weights and a reference of the right shape, without the module's slower setup."""
    root = tmp_path_factory.mktemp("fid_errors")
    np.savez(root / "ref.npz", mu=np.zeros(2048), sigma=np.eye(2048), count=100)
    return write_random_inception(root / "inception.safetensors"), root / "ref.npz"


def fid_error(capsys, argv) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("error:") and "Traceback" not in err and len(err.strip().splitlines()) == 1
    return err


@pytest.mark.parametrize("count", [0, 1])
def test_fewer_than_two_samples_is_a_clear_error(weights_and_reference, tmp_path, capsys, count):
    weights, ref = weights_and_reference
    np.savez(tmp_path / "few.npz", arr_0=np.zeros((count, 8, 8, 3), np.uint8))
    err = fid_error(capsys, ["--samples", str(tmp_path / "few.npz"), "--ref", str(ref), "--inception", str(weights)])
    assert f"few.npz: {count} sample image" in err and "FID needs at least 2" in err
    (tmp_path / "one").mkdir()
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(tmp_path / "one" / "0.png")
    err = fid_error(capsys, ["--images", str(tmp_path / "one"), "--ref", str(ref), "--inception", str(weights)])
    assert "one: 1 sample image," in err


def test_fewer_than_two_samples_after_the_gather_is_a_clear_error(weights_and_reference):
    # The --run path: each process holds a share, and only the gathered count says whether there are two.
    class NoNetwork:
        def features_and_logits(self, images, batch_size):
            return np.zeros((len(images), 2048), np.float32), np.zeros((len(images), 1008), np.float32)

    reference = load_reference(weights_and_reference[1])
    with pytest.raises(UserError, match="the samples to evaluate: 1 sample image, but FID needs at least 2"):
        evaluate_images(np.zeros((1, 8, 8, 3), np.uint8), NoNetwork(), reference, gather=lambda a: a)


def test_the_count_leaves_out_the_padding_the_gather_drops(weights_and_reference):
    # A run's samples come in whole batches: 6 samples in batches of 8 leave 2 padding rows, which the gather
    # drops; they are neither scored nor counted.
    class RowNumbers:  # distinct features per row, so the statistics are defined
        def features_and_logits(self, images, batch_size):
            rows = np.arange(len(images), dtype=np.float32)[:, None]
            return np.repeat(rows, 2048, axis=1), np.zeros((len(images), 1008), np.float32)

    reference = load_reference(weights_and_reference[1])
    result = evaluate_images(np.zeros((8, 8, 8, 3), np.uint8), RowNumbers(), reference, gather=lambda a: a[:6])
    assert result["num_samples"] == 6


def test_a_reference_of_the_wrong_shape_is_a_clear_error(weights_and_reference, tmp_path, capsys):
    weights, _ = weights_and_reference
    np.savez(tmp_path / "ref10.npz", mu=np.zeros(10), sigma=np.eye(10))  # another network's features
    np.savez(tmp_path / "samples.npz", arr_0=np.zeros((4, 8, 8, 3), np.uint8))
    err = fid_error(capsys, ["--samples", str(tmp_path / "samples.npz"), "--ref", str(tmp_path / "ref10.npz"),
                             "--inception", str(weights)])
    assert "mu has shape (10,)" in err and "(2048,)" in err and "dit.eval.ref_stats" in err


def test_ref_stats_refuses_sizes_below_one(tmp_path, capsys):
    from dit.eval.ref_stats import main as ref_stats_main
    assert ref_stats_main(["--data", str(tmp_path), "--out", str(tmp_path / "r.npz"), "--resolution", "0",
                           "--batch", "0"]) == 2
    err = capsys.readouterr().err
    assert err == ("error: --resolution 0 and --batch 0: sizes must be positive whole numbers, such as "
                   "--resolution 256 --batch 250.\n")
    assert not (tmp_path / "r.npz").exists()
