import torch


def pytest_configure(config):
    # Keep runs reproducible and the 2-core CI machine from oversubscribing.
    torch.manual_seed(0)
    torch.set_num_threads(min(torch.get_num_threads(), 2))
