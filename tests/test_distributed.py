"""Two `jax.distributed` processes on localhost (gloo on CPU) train like one process on the same data."""

import json
import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np

SCRIPT = Path(__file__).resolve().parent / "multiprocess_train.py"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def env(devices: int) -> dict:
    # The suite's compiler settings (see conftest), with this many devices per process.
    flags = re.sub(r"--xla_force_host_platform_device_count=\d+", "", os.environ["XLA_FLAGS"])
    return {**os.environ, "JAX_PLATFORMS": "cpu",
            "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices} {flags}"}


def losses(workdir: Path) -> list[float]:
    return [json.loads(l)["loss"] for l in (workdir / "metrics.jsonl").read_text().splitlines()]


def run_two(workdir: Path, steps: int, *flags: str):
    coordinator = f"127.0.0.1:{free_port()}"
    procs = [subprocess.Popen([sys.executable, str(SCRIPT), str(workdir), str(steps), "--coordinator", coordinator,
                               "--num-processes", "2", "--process-id", str(i), *flags],
                              env=env(2), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for i in range(2)]
    return procs, [p.communicate(timeout=300) for p in procs]


def test_two_processes_match_one_process(tmp_path):
    single = subprocess.run([sys.executable, str(SCRIPT), str(tmp_path / "one"), "6"], env=env(4),
                            capture_output=True, text=True, timeout=300)
    assert single.returncode == 0, single.stderr[-3000:]
    procs, outs = run_two(tmp_path / "two", 6)
    for p, (out, err) in zip(procs, outs):
        assert p.returncode == 0, err[-3000:]
    # Same global batch, 4 devices either way: the loss trajectories agree to float32 rounding.
    one, two = losses(tmp_path / "one"), losses(tmp_path / "two")
    assert len(one) == len(two) == 3
    for a, b in zip(one, two):
        assert abs(a - b) <= 1e-5 * abs(a)
    # Both processes hold the same parameters; only process 0 wrote the logs.
    shas = {line for out, _ in outs for line in out.splitlines() if line.startswith("SHA")}
    assert len(shas) == 1
    assert (tmp_path / "two" / "checkpoints").is_dir()


def test_local_checkpoints_per_process_and_resume_agreement(tmp_path):
    procs, outs = run_two(tmp_path / "run", 4, "--local")
    assert all(p.returncode == 0 for p in procs), outs[1][1][-3000:]
    for i in range(2):
        assert (tmp_path / "run" / "checkpoints" / f"process_{i}" / "4").is_dir()
    # Process 1 loses its newest checkpoint: resuming must refuse rather than train out of step.
    import shutil
    shutil.rmtree(tmp_path / "run" / "checkpoints" / "process_1" / "4")
    (tmp_path / "run" / "summary.json").unlink()  # as if cut off after the last checkpoint: a finished run is final
    procs, outs = run_two(tmp_path / "run", 6, "--local", "--resume")
    assert [p.returncode for p in procs] == [2, 2]
    assert "process 0: 4, process 1: none" in outs[0][1] or "process 0: 4, process 1: 2" in outs[0][1]


def test_samples_are_made_and_embedded_once_across_processes(tmp_path):
    script = str(Path(__file__).resolve().parent / "multiprocess_sample.py")
    single = subprocess.run([sys.executable, script, str(tmp_path / "one.npz")], env=env(4),
                            capture_output=True, text=True, timeout=300)
    assert single.returncode == 0, single.stderr[-3000:]
    coordinator = f"127.0.0.1:{free_port()}"
    procs = [subprocess.Popen([sys.executable, script, str(tmp_path / "two.npz"), "--coordinator", coordinator,
                               "--num-processes", "2", "--process-id", str(i)],
                              env=env(2), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for i in range(2)]
    outs = [p.communicate(timeout=300) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs[1][1][-3000:]
    # 2 batches of 8 rows: one process makes all 16 (13 kept), each of two processes half of them.
    assert "ROWS 16" in single.stdout
    assert all("ROWS 8" in out for out, _ in outs)
    one, two = np.load(tmp_path / "one.npz"), np.load(tmp_path / "two.npz")
    assert one["images"].shape == two["images"].shape == (13, 8, 8, 4)
    # The same 4 devices either way: the same samples in the same order, up to a rounding step.
    assert np.abs(one["images"].astype(int) - two["images"].astype(int)).max() <= 1
    np.testing.assert_allclose(two["features"], two["images"].reshape(13, -1).mean(-1), rtol=1e-6)
    np.testing.assert_allclose(one["features"], one["images"].reshape(13, -1).mean(-1), rtol=1e-6)
