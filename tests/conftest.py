import os

import pytest
import torch
from hypothesis import settings

settings.register_profile('ci', deadline=None, derandomize=True, print_blob=True)
settings.load_profile('ci')


@pytest.fixture(scope='module')
def one_cpu_thread():
    """For test modules of many tiny CPU ops, where intra-op threads only add overhead (several-fold on 2 cores)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs CUDA")
    for item in items:
        if 'gpu' in item.keywords:
            item.add_marker(skip)


def pytest_configure(config):
    if os.environ.get('FLA_MESA_TEST_FIRST_CONFIG') == '1':
        _first_configs_only()


def _first_configs_only():
    """Every autotuned Triton kernel (fla's) runs its first configuration, unsearched: each configuration computes
    the same function up to rounding, and a test process that compiles everything anew (test_fp32_under_ieee) would
    spend minutes compiling fla's full searches."""
    from triton.runtime.autotuner import Autotuner
    prune = Autotuner.prune_configs
    Autotuner.prune_configs = lambda self, kwargs: prune(self, kwargs)[:1]
