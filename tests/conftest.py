import os

import torch

# On a machine shared with other jobs, two spinning OpenMP threads per test
# process slow every op down by an order of magnitude; one thread stays fast.
if hasattr(os, "getloadavg") and os.getloadavg()[0] > (os.cpu_count() or 1):
    torch.set_num_threads(1)
