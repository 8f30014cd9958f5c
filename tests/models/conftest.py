import pytest
import torch


@pytest.fixture(autouse=True, scope='module')
def _one_cpu_thread():
    """These tests run many tiny CPU ops, for which intra-op threads only add overhead (several-fold on 2 cores)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
