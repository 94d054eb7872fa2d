"""The analysis: reading run directories, the figures, the report command and the notebooks, on fixture results."""

import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402
import pytest  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402

from analysis import plots, report  # noqa: E402
from analysis.leaderboard import compare  # noqa: E402
from analysis.runs import load_runs, metrics_frame, read_leaderboard, read_metrics  # noqa: E402
from dit import rundir  # noqa: E402
from tests.fixtures_results import _DEMO, _IN100, _config, _write_run, write_fixture_results  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
KINDS = ("{metric}_vs_steps", "{metric}_vs_train_flops", "loss_curves", "throughput", "metric_vs_cost",
         "sample_grids")


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    return write_fixture_results(tmp_path_factory.mktemp("results"))


@pytest.fixture(scope="module")
def runs(results):
    with pytest.warns(UserWarning, match="partially written"):
        return load_runs(results["runs"])


@pytest.fixture(scope="module")
def frame(runs):
    return metrics_frame(runs)


@pytest.fixture(autouse=True)
def close_figures():
    yield
    plt.close("all")


def digits(df):
    return df[df["dataset"] == "digits"]


def test_load_runs_dedups_steps_and_tolerates_partial_lines(results, runs):
    assert len(runs) == results["num_runs"]  # runs/notes has no config.json: not a run
    by_path = {run.path: run for run in runs}
    resumed = by_path[results["resumed_run"]]
    steps = list(resumed.metrics["step"])
    assert steps == sorted(set(steps)) == list(range(100, 1001, 100))
    # Step 600 was logged twice; the lines are merged, the resumed session's (glued onto the partial one) winning.
    lines = (resumed.path / "metrics.jsonl").read_text().splitlines()
    resumed_600 = json.loads(lines[6][lines[6].rfind('{"step"'):])
    first_600 = json.loads(lines[5])
    assert first_600["step"] == resumed_600["step"] == 600 and first_600["loss"] != resumed_600["loss"]
    assert resumed.metrics.set_index("step").loc[600, "loss"] == resumed_600["loss"]
    assert "compile_s" in resumed_600 and resumed.summary is not None

    killed = by_path[results["killed_run"]]
    assert list(killed.metrics["step"]) == list(range(100, 701, 100))  # the partial step-800 line is dropped
    assert killed.summary is None
    assert [step for step, _ in killed.samples] == [200, 400, 600]


def test_read_metrics_of_absent_or_empty_file(tmp_path):
    assert read_metrics(tmp_path / "missing.jsonl").empty
    (tmp_path / "partial.jsonl").write_text('{"step": 10, "lo')
    with pytest.warns(UserWarning):
        assert read_metrics(tmp_path / "partial.jsonl").empty


def test_metrics_frame_long_form(results, runs, frame):
    assert set(frame.columns) >= {"run_id", "variant", "preset", "seed", "dataset", "metric", "step", "loss",
                                  "img_per_s", "value", "num_samples"}
    assert set(zip(frame["dataset"], frame["metric"])) == {("digits", "fd_digits"), ("imagenet100", "fid")}
    fid = frame[frame["metric"] == "fid"].dropna(subset=["value"])
    assert (fid["num_samples"] == 10_000).all() and len(fid) == 2 * 5
    assert sorted(digits(frame)["variant"].unique()) == results["digits_variants"]
    assert not frame.duplicated(["run_id", "step"]).any()
    # The first logged line of each session (with compile_s) is marked: two sessions in the resumed run.
    resumed = frame[frame["run_id"] == results["resumed_run"].name]
    assert list(resumed.loc[resumed["includes_compile"], "step"]) == [100, 600]


def test_metric_vs_steps_one_line_per_variant_with_seed_bands(results, frame):
    fig = plots.metric_vs_steps(digits(frame), "fd_digits")
    assert isinstance(fig, Figure)
    ax = fig.axes[0]
    assert sorted(line.get_label().split(" ")[0] for line in ax.lines) == results["digits_variants"]
    assert len(ax.collections) == 3  # every digits variant has two seeds: a min-max band each
    assert ax.get_yscale() == "log" and "training step" in ax.get_xlabel()
    # The line is the mean over seeds.
    baseline = digits(frame).query("variant == 'baseline' and step == 1000")["value"]
    line = next(line for line in ax.lines if line.get_label().startswith("baseline"))
    assert line.get_ydata()[-1] == pytest.approx(baseline.mean())

    fig = plots.metric_vs_steps(frame[frame["dataset"] == "imagenet100"], "fid")
    assert len(fig.axes[0].lines) == 2 and len(fig.axes[0].collections) == 0  # one seed each: no band
    assert "FID-10K" in fig.axes[0].get_title()


def test_figures_refuse_mixed_datasets(frame, runs):
    with pytest.raises(ValueError, match="one figure per dataset"):
        plots.loss_curves(frame)
    with pytest.raises(ValueError, match="one figure per dataset"):
        plots.sample_grids(runs)


def test_loss_curves_raw_and_smoothed_per_variant(frame):
    fig = plots.loss_curves(digits(frame))
    lines = fig.axes[0].lines
    assert len(lines) == 2 * 3  # raw and smoothed per variant
    assert sorted(line.get_label() for line in lines if not line.get_label().startswith("_")) == [
        "baseline", "rope", "rope_swiglu"]


def test_metric_vs_cost_points_and_budget_line(results):
    table = read_leaderboard(results["leaderboard"])
    fig = plots.metric_vs_cost(compare(table[table["dataset"] == "imagenet100"]), "fid")
    by_flops, by_params = fig.axes
    assert len(by_flops.collections) == len(by_params.collections) == 2
    assert len(by_params.lines) == 1 and by_params.lines[0].get_xdata()[0] == pytest.approx(33.0)
    assert "parameters" in by_params.get_xlabel() and "GFLOPs" in by_flops.get_xlabel()
    # Demo runs are placed at their variant's DiT-S size, as the launcher records them: the budget applies there.
    fig = plots.metric_vs_cost(compare(digits(table)), "fd_digits")
    assert len(fig.axes[0].collections) == 3 and len(fig.axes[1].lines) == 1
    assert [c.get_offsets()[0][0] for c in fig.axes[1].collections] == pytest.approx([32.519456, 32.519456, 32.5256])
    assert "at step 600" in fig.axes[0].get_ylabel()  # where the killed run's last evaluation is


def test_metric_vs_cost_tells_apart_two_recipes_of_one_variant(results):
    # rope_swiglu's runs again under another recipe (guidance off on the last 11% of the noise levels); the
    # rows recorded before the guidance columns existed read with those columns empty.
    table = digits(read_leaderboard(results["leaderboard"]))
    again = table[table["variant"] == "rope_swiglu"].assign(run_id=lambda d: d["run_id"] + "-again",
                                                            guidance_high=0.89)
    old = table.assign(guidance_high=float("nan"))
    fig = plots.metric_vs_cost(compare(pd.concat([old, again])), "fd_digits")
    labels = sorted(text.get_text() for text in fig.axes[0].texts)
    assert labels == ["baseline", "rope", "rope_swiglu (guidance_high -)", "rope_swiglu (guidance_high 0.89)"]


def test_runs_are_compared_at_the_last_step_all_reached(frame):
    compared = compare(frame)
    assert len(compared) == 3 + 2
    fid = compared[compared["metric"] == "fid"]
    assert fid["value"].tolist() == sorted(fid["value"]) and fid["step"].eq(100_000).all()
    # rope_swiglu's seed 1 was killed after its evaluation at step 600: every digits variant is compared there,
    # the mean over its seeds, with its best checkpoint (1,000 steps) beside it, labelled as such.
    demo = compared[compared["metric"] == "fd_digits"].set_index("variant")
    assert demo["step"].eq(600).all() and demo["seeds"].eq(2).all()
    values = digits(frame).query("variant == 'baseline' and step == 600")["value"]
    assert demo.loc["baseline", "value"] == pytest.approx(values.mean())
    assert (demo["best_any_step"] < demo["value"]).all() and demo["best_any_step_at"].eq(1000).all()
    assert demo["train_flops"].tolist() == pytest.approx([600 * 32 * 6 * 6.06e9] * 3)


def test_metric_against_training_flops(frame):
    fig = plots.metric_vs_steps(frame[frame["dataset"] == "imagenet100"], "fid", x="train_flops")
    line = fig.axes[0].lines[0]
    assert list(line.get_xdata()) == pytest.approx([s * 256 * 6 * 6.06e9 for s in range(20_000, 100_001, 20_000)])
    assert "FLOPs" in fig.axes[0].get_xlabel() and "FLOPs" in fig.axes[0].get_title()


def test_throughput_median_without_compile_steps(frame):
    rows = digits(frame)
    fig = plots.throughput(rows)
    bars = fig.axes[0].patches
    assert len(bars) == 3
    steady = rows[~rows["includes_compile"]].groupby("variant")["img_per_s"].median()
    assert [bar.get_height() for bar in bars] == pytest.approx(list(steady.sort_index()))


def test_sample_grids_latest_per_variant(runs):
    fig = plots.sample_grids([run for run in runs if run.dataset == "digits"])
    assert len(fig.axes) == 3
    assert all(len(ax.images) == 1 for ax in fig.axes)
    assert [ax.get_title() for ax in fig.axes] == [f"{v}\nstep 1,000" for v in ("baseline", "rope", "rope_swiglu")]


def test_palette_is_fixed_by_sorted_names():
    assert plots.palette(["rope", "baseline"])["baseline"] == plots.palette(["baseline", "rope"])["baseline"]


def test_report_writes_every_figure_per_group(results, tmp_path, capsys):
    out = tmp_path / "figures"
    code = report.main(["--runs", str(results["runs"]), "--leaderboard", str(results["leaderboard"]),
                        "--out", str(out)])
    assert code == 0
    expected = {f"{kind.format(metric=metric)}-{dataset}-{metric}.{ext}"
                for dataset, metric in (("digits", "fd_digits"), ("imagenet100", "fid"))
                for kind in KINDS for ext in ("png", "pdf")}
    assert {p.name for p in out.iterdir()} == expected
    assert all((out / name).stat().st_size > 1000 for name in expected)
    printed = capsys.readouterr()
    assert all(name in printed.out for name in expected)
    assert "note:" in printed.err and "partially written" in printed.err


def test_report_from_the_leaderboard_alone(results, tmp_path):
    out = tmp_path / "figures"
    empty_runs = tmp_path / "runs"
    empty_runs.mkdir()
    assert report.main(["--runs", str(empty_runs), "--leaderboard", str(results["leaderboard"]),
                        "--out", str(out)]) == 0
    assert {p.name for p in out.glob("*.png")} == {
        "fd_digits_vs_steps-digits-fd_digits.png", "fid_vs_steps-imagenet100-fid.png",
        "fd_digits_vs_train_flops-digits-fd_digits.png", "fid_vs_train_flops-imagenet100-fid.png",
        "throughput-digits-fd_digits.png", "throughput-imagenet100-fid.png",
        "metric_vs_cost-digits-fd_digits.png", "metric_vs_cost-imagenet100-fid.png"}


def test_guidance_sweeps_are_drawn_against_the_scale(results, tmp_path):
    import shutil

    from dit.leaderboard import append_rows, read_rows
    board = tmp_path / "lb.csv"
    shutil.copy(results["leaderboard"], board)
    # Sweeps of each ImageNet-100 run's last checkpoint, as `python -m dit.eval.fid --run ... --cfg-scale` writes them.
    last = [r for r in read_rows(board) if r["dataset"] == "imagenet100" and r["step"] == "100000"]
    append_rows([{**r, "source": "sweep", "cfg_scale": scale, "value": float(r["value"]) * factor, "img_per_s": None,
                  "guided_channels": 3, "guidance_low": 0.0, "guidance_high": 1.0, "timestep_shift": 0.0,
                  "reference_sha256": "ab" * 32}
                 for r in last for scale, factor in ((1.0, 1.0), (1.5, 0.7), (2.0, 0.8))], board)
    table = read_leaderboard(board)
    lines = plots.guidance_lines(table)
    assert [key[0] for key, _ in lines] == sorted(r["run_id"] for r in last)
    assert all(list(per_scale.index) == [1.0, 1.5, 2.0] for _, per_scale in lines)
    fig = plots.metric_vs_cfg_scale(table[table["dataset"] == "imagenet100"], "fid")
    ax = fig.axes[0]
    assert len(ax.lines) == 2 and all("step 100,000" in line.get_label() for line in ax.lines)
    assert "guidance scale" in ax.get_xlabel() and "FID-10K" in ax.get_title()

    out = tmp_path / "figures"
    (tmp_path / "runs").mkdir()
    assert report.main(["--runs", str(tmp_path / "runs"), "--leaderboard", str(board), "--out", str(out)]) == 0
    assert {p.name for p in out.glob("*cfg_scale*")} == {"fid_vs_cfg_scale-imagenet100-fid.png",
                                                         "fid_vs_cfg_scale-imagenet100-fid.pdf"}


def test_report_with_nothing_to_draw(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the default runs/ and results/leaderboard.csv are absent here
    assert report.main([]) == 0
    printed = capsys.readouterr().out
    assert len(printed.strip().splitlines()) == 1
    assert "python ablations/run.py --variant baseline --preset demo" in printed
    assert not (tmp_path / "results" / "figures").exists()


@pytest.mark.parametrize("flag", ["--runs", "--leaderboard", "--out"])
def test_report_bad_paths_exit_2(results, tmp_path, capsys, flag):
    paths = {"--runs": str(results["runs"]), "--leaderboard": str(results["leaderboard"]),
             "--out": str(tmp_path / "figures")}
    # A file where a directory belongs, a directory where the CSV belongs.
    paths[flag] = str(results["leaderboard"]) if flag != "--leaderboard" else str(results["runs"])
    assert report.main([part for pair in paths.items() for part in pair]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and flag in err and len(err.strip().splitlines()) == 1
    assert "Traceback" not in err


def test_report_missing_explicit_runs_dir_exits_2(tmp_path, capsys):
    assert report.main(["--runs", str(tmp_path / "nope"), "--out", str(tmp_path / "out")]) == 2
    assert "does not exist" in capsys.readouterr().err


@pytest.mark.parametrize("name", ["fid_vs_steps", "variants"])
def test_notebook_executes_on_fixtures(results, name, monkeypatch):
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    notebook = nbformat.read(ROOT / "analysis" / f"{name}.ipynb", as_version=4)
    assert all(not cell.get("outputs") for cell in notebook.cells if cell.cell_type == "code")  # stored clean
    monkeypatch.setenv("DIT_RUNS", str(results["runs"]))
    monkeypatch.setenv("DIT_LEADERBOARD", str(results["leaderboard"]))
    client = nbclient.NotebookClient(notebook, timeout=120, kernel_name="python3",
                                     resources={"metadata": {"path": str(ROOT)}})
    client.execute()  # raises CellExecutionError on any failing cell
    images = [output for cell in notebook.cells for output in cell.get("outputs", [])
              if "image/png" in output.get("data", {})]
    assert len(images) >= 4  # a figure per group and kind, drawn inline


def test_a_rerun_of_a_variant_and_seed_supersedes_the_earlier_run(tmp_path):
    import shutil

    from analysis.runs import latest_rows
    results = write_fixture_results(tmp_path / "r")
    with pytest.warns(UserWarning):
        first = load_runs(results["runs"])
    old = next(run for run in first if run.variant == "baseline" and run.config["train"]["seed"] == 0)
    again = results["runs"] / "baseline-demo-rerun"
    shutil.copytree(old.path, again)
    config = {**old.config, "run_id": again.name, "started": "2099-01-01T00:00:00+00:00"}
    (again / "config.json").write_text(json.dumps(config))
    with pytest.warns(UserWarning):
        latest, every = load_runs(results["runs"]), load_runs(results["runs"], superseded=True)
    assert len(every) == len(first) + 1 and len(latest) == len(first)
    assert again in {run.path for run in latest} and old.path not in {run.path for run in latest}
    # The leaderboard's rows likewise: the later run of (baseline, demo, seed 0) replaces the earlier one.
    table = read_leaderboard(results["leaderboard"])
    rerun = table[table["run_id"] == old.run_id].assign(run_id=again.name, date="2099-01-01T00:00:00+00:00")
    kept = latest_rows(pd.concat([table, rerun], ignore_index=True))
    assert again.name in set(kept["run_id"]) and old.run_id not in set(kept["run_id"])
    assert set(kept["run_id"]) == (set(table["run_id"]) - {old.run_id}) | {again.name}


def _write_diverged_results(root: Path) -> Path:
    """runs/ as the trainer writes it: baseline with 2 seeds; rope diverged (NaN, "NaN" and null values);
    rope_swiglu stopped after its first (compiling) line, with no evaluation; the same on ImageNet-100 alone."""
    runs = root / "runs"
    runs.mkdir(parents=True)
    for seed in (0, 1):
        _write_run(runs, "baseline", _DEMO, seed)

    def write(variant, spec, lines, summary=None):
        config = _config(variant, spec, 0)
        path = runs / config["run_id"]
        path.mkdir()
        (path / rundir.CONFIG).write_text(json.dumps(config, indent=2))
        (path / rundir.METRICS).write_text("".join(json.dumps(line) + "\n" for line in lines))
        if summary is not None:
            (path / rundir.SUMMARY).write_text(json.dumps(summary))

    nan = float("nan")
    write("rope", _DEMO, [
        {"step": 100, "loss": 0.4, "loss_q0": None, "img_per_s": 110.0, "compile_s": 25.0},
        {"step": 200, "loss": nan, "loss_q0": None, "img_per_s": 111.0},  # json.dumps writes NaN
        {"step": 200, "fd_digits": None, "fd_digits_samples": 500},  # its evaluation, on a line of its own
        {"step": 300, "loss": "NaN", "grad_norm": float("inf"), "img_per_s": 112.0},
    ])
    first_line = {"step": 100, "loss": 0.4, "img_per_s": 100.0, "compile_s": 25.0}
    stopped = {"final_step": 100, "preempted": True, "last_metrics": first_line}
    write("rope_swiglu", _DEMO, [first_line], stopped)
    write("rope_swiglu", _IN100, [{**first_line, "step": 10_000}], {**stopped, "final_step": 10_000})
    return runs


def test_diverged_and_stopped_runs_read_as_numbers(tmp_path):
    frame = metrics_frame(load_runs(_write_diverged_results(tmp_path)))
    for column in ("loss", "img_per_s", "value", "num_samples", "params"):
        assert frame[column].dtype.kind in "fi", column  # an object column is what numpy cannot draw
    rope = frame[frame["variant"] == "rope"].set_index("step")
    assert rope["loss"].isna().tolist() == [False, True, True] and rope["value"].isna().all()
    assert rope.loc[200, "num_samples"] == 500 and rope.loc[200, "img_per_s"] == 111.0  # two lines, merged


def _printed_paths(out: str) -> list[Path]:
    return [Path(line.strip()) for line in out.splitlines() if line.startswith("  ")]


def test_report_draws_a_diverged_run_beside_seeds_and_lists_only_what_it_wrote(tmp_path, capsys):
    runs = _write_diverged_results(tmp_path)
    out = tmp_path / "figures"
    out.mkdir()
    (out / "stale.png").write_bytes(b"from an earlier report")
    assert report.main(["--runs", str(runs), "--out", str(out)]) == 0
    printed = _printed_paths(capsys.readouterr().out)
    assert printed and all(path.is_file() for path in printed)
    assert {path.name for path in printed} == {p.name for p in out.iterdir()} - {"stale.png"}
    # The ImageNet-100 run logged one compiling line and nothing else: a loss curve, no empty placeholders.
    assert {path.name for path in printed if "imagenet100" in path.name} == {
        "loss_curves-imagenet100-fid.png", "loss_curves-imagenet100-fid.pdf"}
    assert {path.name for path in printed if path.suffix == ".png" and "digits" in path.name} == {
        f"{kind.format(metric='fd_digits')}-digits-fd_digits.png" for kind in KINDS}


def test_torn_and_glued_lines_read_as_the_launcher_reads_them(tmp_path):
    path = tmp_path / rundir.METRICS
    lines = [json.dumps({"step": 100, "loss": 0.5}) + "\n",
             json.dumps({"step": 200, "loss": 0.4, "img_per_s": 90.0}) + "\n",
             json.dumps({"step": 300, "loss": 0.3})[:12],  # killed mid-write, then resumed from step 200:
             json.dumps({"step": 200, "loss": 0.41, "compile_s": 20.0}) + "\n",  # glued onto the torn line
             json.dumps({"step": 200, "fd_digits": 7.5, "fd_digits_samples": 500}) + "\n",
             json.dumps({"step": 300, "loss": 0.3})[:20]]  # killed mid-write again: a torn last line
    path.write_text("".join(lines))
    with pytest.warns(UserWarning, match="partially written"):
        launcher = rundir.read_metrics(path)
    with pytest.warns(UserWarning, match="partially written"):
        frame = read_metrics(path)
    assert [r["step"] for r in launcher] == list(frame["step"]) == [100, 200]
    as_read = [{k: v for k, v in row.items() if v == v} for row in frame.to_dict("records")]  # drops NaN
    assert as_read == launcher
    assert launcher[1] == {"step": 200, "loss": 0.41, "img_per_s": 90.0, "compile_s": 20.0, "fd_digits": 7.5,
                           "fd_digits_samples": 500}
