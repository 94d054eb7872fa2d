"""The leaderboard: concurrent appends stay whole, nothing is rewritten, bad rows are refused; the summary
compares variants at a common step or equal training FLOPs."""

import csv
import multiprocessing

import pytest

from dit.leaderboard import COLUMNS, LEGACY_COLUMNS, append_rows, read_rows
from analysis.leaderboard import compare, main
from analysis.runs import read_leaderboard
from dit.errors import UserError

WRITERS, ROWS_EACH = 8, 50


def make_row(**changes) -> dict:
    row = dict(
        date="2026-12-01T12:00:00+00:00", run_id="baseline-in100", variant="baseline", params=32_519_456,
        gflops=6.06, preset="in100", dataset="imagenet100", resolution=256, objective="ddpm", sampler="ddpm",
        sampling_steps=250, cfg_scale=1.0, step=50_000, batch_size=256, metric="fid", value=50.0,
        num_samples=10_000, seed=0, img_per_s=1234.5, hardware="1x H200", git_commit="0" * 40, source="train",
        guided_channels=3, guidance_low=0.0, guidance_high=1.0, timestep_shift=0.0, reference_sha256="ab" * 32,
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
    (make_row(source="eval"), "not one of train, sweep"),
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


def test_a_file_of_the_earlier_columns_is_read_and_upgraded_once(tmp_path):
    path = tmp_path / "leaderboard.csv"
    old = {c: v for c, v in make_row(step=1).items() if c in LEGACY_COLUMNS}
    with open(path, "w", newline="") as file:
        writer = csv.DictWriter(file, fieldnames=LEGACY_COLUMNS)
        writer.writeheader()
        writer.writerow(old)
    before = path.read_bytes()
    (row,) = read_rows(path)  # read as it is: only the training loop wrote rows then
    assert row["source"] == "train" and row["guided_channels"] == row["reference_sha256"] == "" and row["step"] == "1"
    assert path.read_bytes() == before
    append_rows([make_row(step=2, source="sweep")], path)
    lines = path.read_text().splitlines()
    assert lines[0] == ",".join(COLUMNS) and len(lines) == 3
    first, second = read_rows(path)
    assert first == row and (second["step"], second["source"]) == ("2", "sweep")
    append_rows([make_row(step=3)], path)  # upgraded once: from now on appended to
    assert path.read_text().startswith("\n".join(lines) + "\n")


def test_floats_round_trip_exactly(tmp_path):
    path = tmp_path / "leaderboard.csv"
    value, rate = 0.1 + 0.2, 1 / 3
    append_rows([make_row(value=value, img_per_s=rate, gflops=6.0)], path)
    (row,) = read_rows(path)
    assert float(row["value"]) == value == 0.30000000000000004 and float(row["img_per_s"]) == rate
    assert row["gflops"] == "6.0"
    assert read_leaderboard(path)["value"].iloc[0] == value


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
    """ImageNet-100, one recipe: baseline with two seeds and rope to 100k steps, swiglu stopped at 50k, patch1
    (5x the FLOPs a step) at 10k, 19k and 50k; another recipe of rope; demo rows."""
    append_rows([
        make_row(run_id="base-s0", seed=0, step=50_000, value=60.0),
        make_row(run_id="base-s0", seed=0, step=100_000, value=40.0),
        make_row(run_id="base-s1", seed=1, step=50_000, value=64.0),
        make_row(run_id="base-s1", seed=1, step=100_000, value=44.0),
        make_row(run_id="rope-s0", variant="rope", step=50_000, value=45.0),
        make_row(run_id="rope-s0", variant="rope", step=100_000, value=35.5),
        make_row(run_id="swiglu-s0", variant="swiglu", params=32_525_600, step=50_000, value=50.0),
        make_row(run_id="patch1-s0", variant="patch1", gflops=31.42, step=10_000, value=70.0),
        make_row(run_id="patch1-s0", variant="patch1", gflops=31.42, step=19_000, value=52.0),
        make_row(run_id="patch1-s0", variant="patch1", gflops=31.42, step=50_000, value=40.0),
        make_row(run_id="rope-flow", variant="rope", objective="flow", sampler="euler", value=30.0),
        make_row(run_id="base-demo", dataset="digits", resolution=8, metric="fd_digits", num_samples=500,
                 preset="demo", value=2.5, step=2_000),
        make_row(run_id="rope-demo", variant="rope", dataset="digits", resolution=8, metric="fd_digits",
                 num_samples=500, preset="demo", value=2.0, step=2_000),
    ], path)


def test_variants_are_compared_at_the_last_step_every_run_reached(tmp_path):
    path = tmp_path / "leaderboard.csv"
    fixture(path)
    table = read_leaderboard(path)
    same_recipe = table[(table["objective"] == "ddpm") & (table["dataset"] == "imagenet100")]
    compared = compare(same_recipe[same_recipe["variant"] != "patch1"])
    # swiglu stopped at 50k, so everyone is compared at 50k, not at each one's best checkpoint.
    assert list(compared["variant"]) == ["rope", "swiglu", "baseline"] and set(compared["step"]) == {50_000}
    assert list(compared["value"]) == [45.0, 50.0, 62.0] and list(compared["vs_baseline"]) == [17.0, 12.0, 0.0]
    baseline = compared.iloc[2]
    assert baseline["seeds"] == 2 and baseline["std"] == pytest.approx(2 ** 1.5)
    assert baseline["runs"] == "base-s0, base-s1"
    assert compared["std"].iloc[:2].isna().all()
    # The best checkpoint is there, labelled as such, beside the headline.
    assert list(compared["best_any_step"]) == [35.5, 50.0, 40.0]
    assert list(compared["best_any_step_at"]) == [100_000, 50_000, 100_000]
    # A step picked by hand: only the runs that got there.
    at_100k = compare(same_recipe, step=100_000)
    assert list(at_100k["variant"]) == ["rope", "baseline"] and list(at_100k["value"]) == [35.5, 42.0]
    # Another recipe is its own comparison, with no baseline to compare to.
    flow = compare(table[table["objective"] == "flow"]).iloc[0]
    assert flow["value"] == 30.0 and flow["vs_baseline"] != flow["vs_baseline"]
    demo = compare(table[table["dataset"] == "digits"])
    assert set(demo["metric"]) == {"fd_digits"} and list(demo["variant"]) == ["rope", "baseline"]
    assert list(demo["vs_baseline"]) == [0.5, 0.0]


def test_variants_are_compared_at_equal_training_flops(tmp_path):
    path = tmp_path / "leaderboard.csv"
    fixture(path)
    table = read_leaderboard(path)
    flops_per_step = 256 * 6 * 6.06e9  # batch x (2 FLOPs a multiply-add x 3 forwards) x GFLOPs of a forward
    assert table.loc[table["run_id"] == "base-s0", "train_flops"].tolist() == pytest.approx(
        [50_000 * flops_per_step, 100_000 * flops_per_step])
    rows = table[table["variant"].isin(["baseline", "patch1"]) & (table["objective"] == "ddpm")
                 & (table["dataset"] == "imagenet100")]
    # Ahead at equal steps (40 against 62 at 50k), patch1 is behind at equal compute: the baseline's 100k steps
    # cost what patch1's 19.3k do, where it stood at 52.
    compared = compare(rows, equal_flops=True).set_index("variant")
    assert compared.loc["patch1", "step"] == 19_000 and compared.loc["baseline", "step"] == 100_000
    assert compared.loc["patch1", "train_flops"] == pytest.approx(19_000 * 256 * 6 * 31.42e9)
    assert compared.loc["baseline", "value"] == 42.0 and compared.loc["patch1", "vs_baseline"] == 42.0 - 52.0
    # A budget beyond what the baseline spent leaves it out.
    assert list(compare(rows, flops=150_000 * flops_per_step)["variant"]) == ["patch1"]


def test_command_prints_each_group_apart(tmp_path, capsys):
    path = tmp_path / "leaderboard.csv"
    fixture(path)
    assert main(["--path", str(path)]) == 0
    out = capsys.readouterr().out
    assert out.startswith("each variant at the last step every compared run reached")
    digits = out.index("digits 8px fd_digits (500 samples)")
    imagenet = out.index("imagenet100 256px fid (10,000 samples)")
    assert digits < imagenet
    assert "base-demo" in out[digits:imagenet] and "base-demo" not in out[imagenet:]
    assert "base-s0" in out[imagenet:] and "base-s0" not in out[digits:imagenet]
    assert "+17.000" in out and "62.000" in out and "best_any_step" in out and "not a fair comparison" in out

    assert main(["--path", str(path), "--dataset", "imagenet100", "--metric", "fid", "--num-samples", "10000",
                 "--step", "100000"]) == 0
    out = capsys.readouterr().out
    assert "digits" not in out and "imagenet100 256px fid" in out and "each variant at step 100,000" in out
    assert "42.000" in out and "swiglu" not in out

    assert main(["--path", str(path), "--dataset", "imagenet100", "--equal-flops"]) == 0
    assert "the last training FLOPs every compared run reached" in capsys.readouterr().out

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
