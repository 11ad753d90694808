"""The built-in suites import torch and jax at module level: collect them only under --equiv."""


def pytest_ignore_collect(collection_path, config):
    if not config.getoption("equiv", default=False):
        return True
    return None
