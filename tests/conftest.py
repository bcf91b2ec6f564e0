import os

import torch


def pytest_configure(config):
    # Keep runs reproducible and the 2-core CI machine from oversubscribing. MOLE_EXT_TEST_THREADS
    # raises the cap where the CPU references dominate (bench/gpu_check.sh on a 16-core GPU host).
    torch.manual_seed(0)
    torch.set_num_threads(min(torch.get_num_threads(), int(os.environ.get("MOLE_EXT_TEST_THREADS", "2"))))
