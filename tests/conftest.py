import os
import tempfile
from pathlib import Path

import pytest

# Tests run on the CPU; 8 host devices lets sharding tests see a mesh.
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# Most of the suite's time is compiling tiny programs that run a few steps, so the CPU compiler is set for
# compile time: LLVM's optimisation off (a smoke run's training step: 28 s to compile at the default level,
# 13 s at 0 on CI's 2 cores) and XLA's older elementwise code emitters, not its MLIR fusion emitters (that
# step: 4.2 -> 1.8 s at level 0 on this project's 2-core machine, 2026-12-07).
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8 --xla_backend_optimization_level=0 "
                                   "--xla_cpu_use_fusion_emitters=false")
# Several tests compile the same training step; a persistent cache (shared with the subprocesses the
# tests start) compiles each once per session.
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", tempfile.mkdtemp(prefix="jax-cache-"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.5")

# CI installs every test extra, so there a skipped test is a missing dependency, not an option:
# with DIT_NO_SKIPS=1 (set by .ci/run) any skip fails the session.
_skipped = []


def pytest_runtest_logreport(report):
    if report.skipped:
        _skipped.append(report.nodeid)


def pytest_sessionfinish(session, exitstatus):
    if os.environ.get("DIT_NO_SKIPS") == "1" and _skipped:
        print(f"\nDIT_NO_SKIPS=1 but {len(_skipped)} tests were skipped: {', '.join(_skipped[:5])}")
        session.exitstatus = 1


# The built-in digits data (the 8x8 cache of the demo and smoke presets, the 16x16 one of demo_cache's default,
# and the feature classifier fd_digits uses for each), built once per session and copied where tests need them.
_DIGITS_BUILD = """
import sys
from dit.data.demo import demo_cache
from dit.eval.digits_classifier import load_or_train
for resolution in (8, 16):
    load_or_train(demo_cache(sys.argv[1], resolution=resolution, progress=False))
"""


@pytest.fixture(scope="session")
def digits_data(tmp_path_factory):
    """A directory `data/digits` as first runs at 8x8 and 16x16 leave it. Built in a child process at XLA's default
    optimisation level (the classifier's 200 training steps take 80 s at the suite's -O0, 8 s at the
    default), under a lock so that the xdist workers build it once between them."""
    import fcntl
    import subprocess
    import sys

    base = tmp_path_factory.getbasetemp()
    shared = base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base  # workers share their parent
    root = shared / "digits-data"
    with open(shared / "digits-data.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (root / "done").exists():
            env = {**os.environ, "XLA_FLAGS": os.environ["XLA_FLAGS"].replace("--xla_backend_optimization_level=0", "")}
            subprocess.run([sys.executable, "-c", _DIGITS_BUILD, str(root / "data" / "digits")], env=env, check=True,
                           cwd=Path(__file__).resolve().parents[1])
            (root / "done").touch()
    return root / "data"

