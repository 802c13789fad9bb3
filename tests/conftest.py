import pytest
import torch


@pytest.fixture(autouse=True)
def _seed_and_isolated_data_root(tmp_path, monkeypatch):
    """Seed torch, and point the default data root at a temporary folder so no test writes to ./data."""
    torch.manual_seed(0)
    monkeypatch.setenv("RESPROBE_DATA", str(tmp_path / "data"))
    yield


@pytest.fixture
def tiny_batch():
    g = torch.Generator().manual_seed(0)
    return torch.randn(6, 1, 8, 8, generator=g), torch.randint(0, 10, (6,), generator=g)
