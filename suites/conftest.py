"""The built-in suites import torch and jax at module level: collect them only under --equiv."""


def pytest_ignore_collect(collection_path, config):
    if not config.getoption("equiv", default=False):
        return True
    return None


def pytest_configure(config):
    if config.getoption("equiv", default=False):
        import torch

        # The suites run tiny tensors, where torch's intra-op thread pool costs far more than it
        # saves: a (2, 2, 5, 6) conv's forward+backward took 60 ms with 2 threads on the loaded
        # 2-core CI box and 0.6 ms with one.
        torch.set_num_threads(1)
