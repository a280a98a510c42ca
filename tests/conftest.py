import gc
import os

# The suite runs in two worker processes (pytest-xdist, pyproject.toml) on a 2-core machine. Idle
# OpenMP threads sleep instead of spinning, so that one worker's parallel regions do not wait on
# the other's spinning threads. The OpenMP runtime reads this when torch loads it, so it is set
# before the import (the scripts the tests start inherit it). It changes no result.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import pytest  # noqa: E402
import torch  # noqa: E402

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


def pytest_collection_modifyitems(config, items):
    """The slow tests first, in their order, then the rest: the two workers start on the long
    end-to-end runs and finish on short tests instead of one worker running a long test alone at the end."""
    items.sort(key=lambda item: item.get_closest_marker("slow") is None)
