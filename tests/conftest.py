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
