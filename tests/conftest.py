import os

import torch

# One fixed thread count for every test run (GKG_PYG_TEST_THREADS, default 2), whatever the
# machine's load: the library's CPU paths (oneDNN routing, kernel threading) depend on it.
torch.set_num_threads(int(os.environ.get("GKG_PYG_TEST_THREADS", "2")))
