import os
import tempfile

# Tests run on the CPU; 8 host devices lets sharding tests see a mesh.
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# LLVM's optimisation of the CPU code is off: most of the suite's time is compiling tiny programs that run a
# few steps (a smoke run's training step: 28 s to compile at the default level, 13 s at 0 on CI's 2 cores).
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8 --xla_backend_optimization_level=0")
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
