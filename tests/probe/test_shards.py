import numpy as np
import pytest
import torch
from click.testing import CliRunner

import probe
from probe.cli.main import cli
from probe.errors import ProbeError


def _setup():
    model = probe.zoo.create("resnet8", in_channels=1, width=4).eval()
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(10, 1, 8, 8, generator=g), torch.randint(0, 10, (10,), generator=g)
    return model, x, y


def test_joined_shards_read_like_one_capture(tmp_path):
    model, x, y = _setup()
    probes = [probe.ResidualNorms(), probe.ChannelStats(), probe.Activations(dtype="bf16")]
    whole = probe.capture(model, [(x, y)], probes=probes)
    parts = []
    for rank, idx in enumerate((torch.arange(0, 6), torch.arange(6, 10))):
        path = tmp_path / "shards" / f"rank{rank}.h5"
        probe.capture(
            model, [(x[idx], y[idx], idx)], probes=probes, out=path, shard=(rank, 2)
        ).close()
        parts.append(path)
    res = CliRunner().invoke(cli, ["join", str(tmp_path / "index.h5"), *map(str, parts)])
    assert res.exit_code == 0, res.output
    with probe.open(tmp_path / "index.h5") as cap:
        assert cap.sample_index().tolist() == list(range(10))
        assert cap.attrs["shard_count"] == 2
        for layer in whole.layers:
            for q in whole.quantities(layer):
                assert np.allclose(
                    cap.read(layer, q), whole.read(layer, q), rtol=1e-5, atol=1e-6
                ), (layer, q)
        assert np.allclose(
            cap.channel_moments("stages.1.0").var, whole.channel_moments("stages.1.0").var
        )


def test_index_with_a_missing_shard_is_refused(tmp_path):
    model, x, y = _setup()
    paths = []
    for rank in range(2):
        p = tmp_path / f"r{rank}.h5"
        probe.capture(
            model, [(x, y)], probes=[probe.ResidualNorms()], out=p, shard=(rank, 2)
        ).close()
        paths.append(p)
    probe.join_shards(paths, tmp_path / "index.h5")
    paths[1].unlink()
    with pytest.raises(ProbeError, match="missing or incomplete"):
        probe.open(tmp_path / "index.h5")


def test_shards_with_different_datasets_are_refused(tmp_path):
    model, x, y = _setup()
    a, b = tmp_path / "a.h5", tmp_path / "b.h5"
    probe.capture(model, [(x, y)], probes=[probe.ResidualNorms()], out=a).close()
    probe.capture(model, [(x, y)], probes=[probe.ChannelStats()], out=b).close()
    with pytest.raises(ProbeError, match="different datasets"):
        probe.join_shards([a, b], tmp_path / "index.h5")
    assert not (tmp_path / "index.h5").exists()
