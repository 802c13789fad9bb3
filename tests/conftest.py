import pytest
import torch


@pytest.fixture(autouse=True)
def _seed_and_threads():
    torch.manual_seed(0)
    yield


@pytest.fixture
def tiny_batch():
    g = torch.Generator().manual_seed(0)
    return torch.randn(6, 1, 8, 8, generator=g), torch.randint(0, 10, (6,), generator=g)
