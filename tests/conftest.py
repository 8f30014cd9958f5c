import pytest
import torch
from hypothesis import settings

settings.register_profile('ci', deadline=None, derandomize=True, print_blob=True)
settings.load_profile('ci')


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs CUDA")
    for item in items:
        if 'gpu' in item.keywords:
            item.add_marker(skip)
