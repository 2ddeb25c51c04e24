"""Test-wide set-up: 8 fake CPU devices (for sharding tests) and the shared real data."""

import os
import pathlib

# Must happen before jax is imported anywhere: every test process sees 8 CPU devices, so sharded and
# unsharded computations can be compared in one run. Unsharded code simply uses device 0.
os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import sys  # noqa: E402

import pytest  # noqa: E402

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
# Test modules share helpers across folders (tests/train reuses tests/rl/test_train_step's compiled step):
# every test folder is importable by module name, whichever folder pytest imports first.
sys.path[:0] = [str(d) for d in sorted(pathlib.Path(__file__).parent.iterdir()) if d.is_dir() and d.name != "__pycache__"]
SHARED_DATA = REPO_ROOT.parent / "shared" / "data"


@pytest.fixture(scope="session")
def shared_data() -> pathlib.Path:
    """`../shared/data` beside the repository; tests that need it skip when it is absent."""
    if not SHARED_DATA.is_dir():
        pytest.skip(f"real data not found at {SHARED_DATA} (see README: Tests)")
    return SHARED_DATA
