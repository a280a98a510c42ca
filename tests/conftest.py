import gc
import os

# The suite runs in two worker processes (pytest-xdist, pyproject.toml) on a 2-core machine. Idle
# OpenMP threads sleep instead of spinning, so that one worker's parallel regions do not wait on
# the other's spinning threads. The OpenMP runtime reads this when torch loads it, so it is set
# before the import (the scripts the tests start inherit it). It changes no result.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import pytest  # noqa: E402
import torch  # noqa: E402

from helpers import order_for_workers  # noqa: E402

# Fixed thread counts, whatever the machine's load: one intra-op thread per worker
# (GKG_PYG_TEST_THREADS), and two for the tests of the paths that depend on the count (the oneDNN
# routing of the linear maps, the compiled kernels' threading), which ask for the `two_threads`
# fixture. The small tensors of the other tests only lose time to a second thread.
torch.set_num_threads(int(os.environ.get("GKG_PYG_TEST_THREADS", "1")))


@pytest.fixture
def two_threads():
    """Two intra-op threads for the test: the library's oneDNN routing needs at least two."""
    previous = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(previous)


def pytest_collection_finish(session):
    """What collection imported (torch, the library, the test modules) lives to the end of the run:
    frozen out of the garbage collector's generations, its full collections during the tests look
    only at what the tests make (several seconds less in the quick run)."""
    gc.collect()
    gc.freeze()


# About how long the longest test files take on this machine (seconds, summed per file from
# `pytest --durations=0`): the full suite shares them out among the workers.
LONG_FILES = {
    "test_train.py": 86,
    "test_model.py": 79,
    "test_export.py": 50,
    "test_fake_cuda.py": 37,
    "test_benchmark_scripts.py": 36,
    "test_gpu_script.py": 28,
}


@pytest.hookimpl(trylast=True)  # after the deselection of -m and -k: the blocks are those of the tests that run
def pytest_collection_modifyitems(config, items):
    """The order for pytest-xdist's work stealing (``helpers.order_for_workers``). Each xdist worker
    collects and orders the tests itself, and there pytest-xdist has set the -n option to None: the
    worker count comes with the worker's input."""
    workers = getattr(config, "workerinput", {}).get("workercount", 1)
    items[:] = order_for_workers(items, workers, LONG_FILES)
