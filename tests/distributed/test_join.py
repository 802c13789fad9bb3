"""Joining shards: a copy is the capture one process writes (values, filters, checksums, axis
labels), non-finite counts of every shard survive the join, and a shard's last sample pairs with
the next shard's first."""

import warnings

import numpy as np
import pytest
import torch
from click.testing import CliRunner

import probe
from probe.cli.main import cli


def _model():
    torch.manual_seed(0)
    return probe.zoo.create("resnet8", in_channels=1, width=4).eval()


def _data(n=22):
    g = torch.Generator().manual_seed(0)
    return torch.randn(n, 1, 8, 8, generator=g), torch.randint(0, 10, (n,), generator=g)


def _shards(tmp_path, model, x, y, probes, cuts, **kw):
    """One capture per [a, b) of ``cuts``, as the ranks of a capture write them."""
    count = len(cuts) - 1
    return [
        _shard(tmp_path, model, x, y, probes, (a, b), (rank, count), **kw)
        for rank, (a, b) in enumerate(zip(cuts[:-1], cuts[1:]))
    ]


def _shard(tmp_path, model, x, y, probes, rows, shard, **kw):
    """Rank ``shard[0]``'s capture of ``rows`` [a, b) of the samples, of ``shard[1]`` ranks."""
    (a, b), path = rows, tmp_path / f"rank{shard[0]}.h5"
    after = x[b : b + 1] if b < len(x) else x[:1]
    probe.capture(
        model,
        [(x[a:b], y[a:b], torch.arange(a, b))],
        probes=probes,
        out=path,
        shard=shard,
        sample_offset=a,
        next_sample=after,
        **kw,
    ).close()
    return path


def _same(a, b, exact=True):
    assert a.layers == b.layers
    assert np.array_equal(a.sample_index(), b.sample_index())
    assert np.array_equal(a.labels(), b.labels())
    for layer in a.layers:
        assert a.layer_attrs(layer) == b.layer_attrs(layer), layer
        for q in a.quantities(layer):
            assert a.dim_labels(layer, q) == b.dim_labels(layer, q)
            x, y = a.read(layer, q), b.read(layer, q)
            if exact:
                assert np.array_equal(x, y, equal_nan=True), (layer, q)
            else:
                assert np.allclose(x, y, rtol=1e-5, atol=1e-6, equal_nan=True), (layer, q)


@pytest.mark.parametrize("compression", [None, "zstd"])
def test_a_copied_join_is_the_capture_of_one_process(tmp_path, compression):
    model, (x, y) = _model(), _data()
    probes = ["residual", "activations:dtype=bf16", "jacobian:n_probes=2,max_samples=9"]
    whole = probe.capture(
        model, [(x[:11], y[:11]), (x[11:], y[11:])], probes=probes, compression=compression,
        out=tmp_path / "whole.h5",
    )  # fmt: skip
    shards = _shards(tmp_path, model, x, y, probes, [0, 11, 22], compression=compression)
    res = CliRunner().invoke(
        cli, ["join", "--copy", str(tmp_path / "joined.h5"), *map(str, shards)]
    )
    assert res.exit_code == 0, res.output
    for s in shards:
        s.unlink()  # a copy needs nothing beside it
    with probe.open(tmp_path / "joined.h5") as joined:
        _same(whole, joined)
        assert joined.attrs["shard_count"] == 1 and "shards" not in joined.attrs
        assert joined.verify() == []  # every chunk carries a checksum that holds
        d = joined.dataset("stages.0.0", "output")
        assert d.fletcher32 and d.attrs["encoding"] == "bfloat16"
        filters = d.id.get_create_plist().get_nfilters()
        assert filters == whole.dataset("stages.0.0", "output").id.get_create_plist().get_nfilters()


def test_nonfinite_counts_of_every_shard_survive_the_join(tmp_path):
    model, (x, y) = _model(), _data()
    x = x.clone()
    x[15, 0, 0, 0] = float("nan")  # a sample of the second shard only
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", probe.NonFiniteWarning)
        whole = probe.capture(model, [(x, y)], probes=["residual"])
        shards = _shards(tmp_path, model, x, y, ["residual"], [0, 11, 22])
    counts = {l: whole.layer_attrs(l).get("nonfinite_samples", 0) for l in whole.layers}
    assert min(counts.values()) == 1
    for copy in (False, True):
        out = probe.join_shards(shards, tmp_path / f"j{copy}.h5", copy=copy)
        with probe.open(out) as joined:
            got = {l: joined.layer_attrs(l).get("nonfinite_samples", 0) for l in joined.layers}
            assert got == counts
            assert joined.attrs["nonfinite_layers"] == whole.attrs["nonfinite_layers"]


def test_a_shards_last_sample_pairs_with_the_next_shards_first(tmp_path):
    model, (x, y) = _model(), _data()
    probes = ["shattered:n_points=8,max_lag=4,max_samples=22,direction=next"]
    whole = probe.capture(
        model, [(x[:11], y[:11]), (x[11:], y[11:])], probes=probes, out=tmp_path / "whole.h5"
    )
    joined = probe.open(
        probe.join_shards(_shards(tmp_path, model, x, y, probes, [0, 11, 22]), tmp_path / "j.h5")
    )
    _same(whole, joined, exact=False)
    # without the next shard's first sample, sample 10 would pair with its own shard's first
    alone = probe.capture(model, [(x[:11], y[:11])], probes=probes)
    assert not np.allclose(alone.read("model", "acf")[10], whole.read("model", "acf")[10])


def test_the_statistics_formulas_of_every_shard_survive_the_join(tmp_path, monkeypatch):
    """A kernel that fails on one rank turns the kernels off on that rank alone: the joined
    capture says which formulas took each shard's numbers, not what the first shard took."""
    from probe.probes import onepass

    if onepass.mode() != "one-pass":
        pytest.skip("the CPU statistics kernels do not serve this process")
    model, (x, y) = _model(), _data()
    (tmp_path / "healthy").mkdir()
    first, healthy = _shards(tmp_path / "healthy", model, x, y, ["residual"], [0, 11, 22])
    monkeypatch.setattr(onepass, "_failed", False)
    entry = onepass._entry

    def broken(*key):
        raise RuntimeError("LLVM ERROR: out of registers")

    monkeypatch.setattr(onepass, "_entry", broken)
    with pytest.warns(onepass.OnePassWarning):
        failed = _shard(tmp_path, model, x, y, ["residual"], (11, 22), (1, 2))
    monkeypatch.setattr(onepass, "_entry", entry)
    monkeypatch.setattr(onepass, "_failed", False)
    mixed = "rank 0: one-pass; rank 1: one-pass, then torch"
    for copy in (False, True):
        for shards, want in (([first, healthy], "one-pass"), ([first, failed], mixed)):
            out = probe.join_shards(shards, tmp_path / f"j{copy}{len(want)}.h5", copy=copy)
            with probe.open(out) as joined:
                assert joined.provenance["runtime"]["cpu_statistics"] == want
