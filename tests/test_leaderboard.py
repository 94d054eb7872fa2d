"""The leaderboard: concurrent appends stay whole, nothing is rewritten, bad rows are refused; the summary."""

import csv
import multiprocessing

import pytest

from ablations.leaderboard import COLUMNS, append_rows, read_rows
from analysis.leaderboard import best_per_variant, load, main
from dit.errors import UserError

WRITERS, ROWS_EACH = 8, 50


def make_row(**changes) -> dict:
    row = dict(
        date="2026-12-01T12:00:00+00:00", run_id="baseline-in100", variant="baseline", params=32_519_456,
        gflops=6.06, preset="in100", dataset="imagenet100", resolution=256, objective="ddpm", sampler="ddpm",
        sampling_steps=250, cfg_scale=1.0, step=50_000, batch_size=256, metric="fid", value=50.0,
        num_samples=10_000, seed=0, img_per_s=1234.5, hardware="1x H200", git_commit="0" * 40,
    )
    return {**row, **changes}


def _append_many(path: str, writer: int) -> None:
    for step in range(ROWS_EACH):  # one call per row, to interleave with the other writers as much as possible
        append_rows([make_row(run_id=f"run{writer}", step=step, hardware="x" * 500)], path)


def test_concurrent_appends_leave_every_row_intact(tmp_path):
    path = tmp_path / "leaderboard.csv"
    context = multiprocessing.get_context("spawn")
    processes = [context.Process(target=_append_many, args=(str(path), w)) for w in range(WRITERS)]
    for process in processes:
        process.start()
    for process in processes:
        process.join(60)
        assert process.exitcode == 0
    lines = path.read_text().splitlines()
    assert lines.count(",".join(COLUMNS)) == 1 and lines[0] == ",".join(COLUMNS)
    rows = list(csv.reader(lines[1:]))
    assert len(rows) == WRITERS * ROWS_EACH and all(len(r) == len(COLUMNS) for r in rows)
    assert len(read_rows(path)) == WRITERS * ROWS_EACH
    pairs = {(r["run_id"], int(r["step"])) for r in read_rows(path)}
    assert pairs == {(f"run{w}", s) for w in range(WRITERS) for s in range(ROWS_EACH)}


def test_append_never_rewrites(tmp_path):
    path = tmp_path / "leaderboard.csv"
    append_rows([make_row(step=1), make_row(step=2)], path)
    before = path.read_bytes()
    append_rows([make_row(step=3, run_id='a "quoted", run')], path)
    after = path.read_bytes()
    assert after.startswith(before) and len(after) > len(before)
    assert [r["run_id"] for r in read_rows(path)][-1] == 'a "quoted", run'


@pytest.mark.parametrize("row, message", [
    ({**make_row(), "fid10k": 3.0}, "unknown columns ['fid10k']"),
    ({k: v for k, v in make_row().items() if k != "seed"}, "missing columns ['seed']"),
    (make_row(hardware="H200\nrow2"), "line break"),
    (make_row(step="50k"), "not an integer"),
    (make_row(gflops="six"), "not a number"),
    (make_row(value=None), "required"),
])
def test_bad_row_is_refused_and_file_unchanged(tmp_path, row, message):
    path = tmp_path / "leaderboard.csv"
    append_rows([make_row()], path)
    before = path.read_bytes()
    with pytest.raises(ValueError, match=message.replace("[", r"\[").replace("]", r"\]")):
        append_rows([make_row(step=7), row], path)  # one bad row refuses the whole call
    assert path.read_bytes() == before


def test_bad_row_does_not_create_the_file(tmp_path):
    with pytest.raises(ValueError):
        append_rows([{"variant": "baseline"}], tmp_path / "leaderboard.csv")
    assert list(tmp_path.iterdir()) == []


def test_different_header_is_refused_and_unchanged(tmp_path):
    path = tmp_path / "leaderboard.csv"
    path.write_text("date,run_id,variant,step,fid\n2026-01-01,r,baseline,1,3.0\n")
    before = path.read_bytes()
    with pytest.raises(UserError, match=r"missing columns \['params'.*unknown columns \['fid'\].*migrate"):
        append_rows([make_row()], path)
    assert path.read_bytes() == before


def test_floats_round_trip_exactly(tmp_path):
    path = tmp_path / "leaderboard.csv"
    value, rate = 0.1 + 0.2, 1 / 3
    append_rows([make_row(value=value, img_per_s=rate, gflops=6.0)], path)
    (row,) = read_rows(path)
    assert float(row["value"]) == value == 0.30000000000000004 and float(row["img_per_s"]) == rate
    assert row["gflops"] == "6.0"
    assert load(path)["value"].iloc[0] == value


def test_partial_last_line_is_never_glued_to_a_new_row(tmp_path):
    path = tmp_path / "leaderboard.csv"
    append_rows([make_row(step=1)], path)
    with open(path, "a") as file:
        file.write("2026-12-01,torn-ro")  # a writer killed mid-write
    append_rows([make_row(step=2)], path)
    lines = path.read_text().splitlines()
    assert lines[2] == "2026-12-01,torn-ro" and lines[3].split(",")[12] == "2"
    with pytest.raises(UserError, match="line 3: 2 fields"):
        read_rows(path)


def fixture(path) -> None:
    """Two seeds of baseline, one of rope and swiglu, another recipe of rope, and demo rows."""
    append_rows([
        make_row(run_id="base-s0", seed=0, step=50_000, value=60.0),
        make_row(run_id="base-s0", seed=0, step=100_000, value=40.0),
        make_row(run_id="base-s1", seed=1, step=100_000, value=44.0),
        make_row(run_id="rope-s0", variant="rope", step=50_000, value=45.0),
        make_row(run_id="rope-s0", variant="rope", step=100_000, value=35.5),
        make_row(run_id="swiglu-s0", variant="swiglu", params=32_525_600, step=100_000, value=41.0),
        make_row(run_id="rope-flow", variant="rope", objective="flow", sampler="euler", value=30.0),
        make_row(run_id="base-demo", dataset="digits", resolution=8, metric="fd_digits", num_samples=500,
                 preset="demo", value=2.5, step=2_000),
        make_row(run_id="rope-demo", variant="rope", dataset="digits", resolution=8, metric="fd_digits",
                 num_samples=500, preset="demo", value=2.0, step=2_000),
    ], path)


def test_best_per_variant(tmp_path):
    path = tmp_path / "leaderboard.csv"
    fixture(path)
    best = best_per_variant(load(path))
    fid = best[(best["metric"] == "fid") & (best["objective"] == "ddpm")]
    assert list(fid["variant"]) == ["rope", "baseline", "swiglu"]
    assert list(fid["value"]) == [35.5, 40.0, 41.0] and list(fid["step"]) == [100_000] * 3
    assert list(fid["vs_baseline"]) == [4.5, 0.0, -1.0]
    baseline = fid[fid["variant"] == "baseline"].iloc[0]
    assert baseline["seeds"] == 2 and baseline["mean"] == 42.0 and baseline["std"] == pytest.approx(2 ** 1.5)
    assert baseline["run_id"] == "base-s0"
    assert fid[fid["variant"] == "rope"]["mean"].isna().all()
    # Another recipe is its own row, with no baseline to compare to.
    flow = best[best["objective"] == "flow"].iloc[0]
    assert flow["value"] == 30.0 and flow["vs_baseline"] != flow["vs_baseline"]
    demo = best[best["dataset"] == "digits"]
    assert set(demo["metric"]) == {"fd_digits"} and list(demo["variant"]) == ["rope", "baseline"]
    assert list(demo["vs_baseline"]) == [0.5, 0.0]


def test_command_prints_each_group_apart(tmp_path, capsys):
    path = tmp_path / "leaderboard.csv"
    fixture(path)
    assert main(["--path", str(path)]) == 0
    out = capsys.readouterr().out
    digits = out.index("digits 8px fd_digits (500 samples)")
    imagenet = out.index("imagenet100 256px fid (10,000 samples)")
    assert digits < imagenet
    assert "base-demo" in out[digits:imagenet] and "base-demo" not in out[imagenet:]
    assert "base-s0" in out[imagenet:] and "base-s0" not in out[digits:imagenet]
    assert "+4.500" in out and "42.000" in out

    assert main(["--path", str(path), "--dataset", "imagenet100", "--metric", "fid", "--num-samples", "10000"]) == 0
    out = capsys.readouterr().out
    assert "digits" not in out and "imagenet100 256px fid" in out

    assert main(["--path", str(path), "--dataset", "digits", "--all"]) == 0
    out = capsys.readouterr().out
    assert out.count("-demo") == 2 and "recipe: preset demo" in out


@pytest.mark.parametrize("content", [None, ""])
def test_command_without_results_says_how_to_make_them(tmp_path, capsys, content):
    path = tmp_path / "leaderboard.csv"
    if content is not None:
        path.write_text(content)
    assert main(["--path", str(path)]) == 0
    out = capsys.readouterr().out
    assert out.count("\n") == 1 and "python ablations/run.py --variant baseline --preset demo" in out


@pytest.mark.parametrize("content, message", [
    ("date,fid\n2026,3\n", "different header"),
    (",".join(COLUMNS) + "\n" + ",".join(["x"] * len(COLUMNS)) + "\n", "'params' holds 'x'"),
])
def test_command_on_malformed_file_exits_2(tmp_path, capsys, content, message):
    path = tmp_path / "leaderboard.csv"
    path.write_text(content)
    assert main(["--path", str(path)]) == 2
    assert message in capsys.readouterr().err


def test_command_with_filters_matching_nothing_exits_2(tmp_path, capsys):
    path = tmp_path / "leaderboard.csv"
    fixture(path)
    assert main(["--path", str(path), "--metric", "FID"]) == 2
    assert "imagenet100 256px fid (10,000 samples)" in capsys.readouterr().err
