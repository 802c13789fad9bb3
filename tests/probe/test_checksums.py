"""Fletcher-32 checksums on every dataset: bit rot in the data is an error naming the dataset,
found by ``probe inspect --verify`` and by any read, never a number."""

import h5py
import pytest
import torch
from click.testing import CliRunner

import probe
from probe.cli.main import cli
from probe.errors import ProbeError


def _capture(path, compression=None):
    torch.manual_seed(0)
    model = probe.zoo.create("resnet8", in_channels=1, width=4)
    probe.capture(
        model, [torch.randn(6, 1, 8, 8)], probes=["residual", "activations"], out=path,
        compression=compression,
    ).close()  # fmt: skip


def _flip_a_data_byte(path, dataset):
    with h5py.File(path, "r") as f:
        d = f[dataset]
        info = d.id.get_chunk_info(0)
        offset, size = info.byte_offset, info.size
    with open(path, "r+b") as fh:
        fh.seek(offset + size // 2)
        b = fh.read(1)
        fh.seek(offset + size // 2)
        fh.write(bytes([b[0] ^ 0x10]))


@pytest.mark.parametrize("compression", [None, "gzip"])
def test_every_dataset_carries_a_checksum_and_verifies(tmp_path, compression):
    path = tmp_path / "c.h5"
    _capture(path, compression)
    with h5py.File(path, "r") as f:
        names = ["sample_index", "labels"] + [
            f"layers/{l}/{q}" for l in f["layers"] for q in f["layers"][l]
        ]
        assert all(f[n].fletcher32 for n in names)
    res = CliRunner().invoke(cli, ["inspect", "--verify", str(path)])
    assert res.exit_code == 0 and "verified" in res.output, res.output


def test_a_flipped_bit_is_found_by_verify_and_by_a_read(tmp_path):
    path = tmp_path / "c.h5"
    _capture(path)
    key = "layers/stages.1.0/output"
    _flip_a_data_byte(path, key)
    res = CliRunner().invoke(cli, ["inspect", "--verify", str(path)])
    assert res.exit_code == 1 and "damaged" in res.output and "stages.1.0/output" in res.output
    assert "Traceback" not in res.output
    with probe.open(path) as cap:
        assert cap.read("stages.0.0", "output").shape[0] == 6  # other datasets still read
        with pytest.raises(ProbeError, match="stages.1.0/output is damaged"):
            cap.read("stages.1.0", "output")


def test_a_flipped_byte_in_an_attribute_is_refused_on_open(tmp_path):
    path = tmp_path / "c.h5"
    _capture(path)
    with h5py.File(path, "r+") as f:  # a provenance text that still parses as JSON
        f.attrs["provenance"] = f.attrs["provenance"].replace('"resprobe"', '"resprobf"')
    with pytest.raises(ProbeError, match="attrs_sha256"):
        probe.open(path)


def test_attributes_read_once_are_h5pys_own(tmp_path):
    """read_attrs reads through bare object ids, not h5py's wrappers: every value, of every type
    a capture or a user's edit stores, is what ``dict(obj.attrs)`` gives, and so is the digest."""
    import numpy as np

    from probe.store.schema import attrs_digest, read_attrs

    path = tmp_path / "c.h5"
    _capture(path)
    with h5py.File(path, "r+") as f:
        g = f.create_group("extra/ünïcode ✓")
        g.attrs.update(
            {
                "text": "naïve", "bytes": np.bytes_(b"raw"), "int": 3, "float": 0.5,
                "flag": True, "vector": np.arange(4, dtype=np.int16), "empty": h5py.Empty("f4"),
                "strings": np.array(["a", "bc"], dtype=h5py.string_dtype()),
            }
        )  # fmt: skip
        d = g.create_dataset("d", data=np.ones(3))
        d.attrs["matrix"] = np.eye(2, dtype=np.float32)
        f["extra/second link"] = d  # one object, two names: read once, under one of them
        want = {"/": dict(f.attrs.items())}
        f.visititems(lambda name, obj: want.__setitem__(name, dict(obj.attrs.items())))
        got = read_attrs(f)
    assert got.keys() == want.keys() and len(got) > 20
    for path_, attrs in want.items():
        assert got[path_].keys() == attrs.keys(), path_
        for k, v in attrs.items():
            assert type(got[path_][k]) is type(v), (path_, k)
            if isinstance(v, np.ndarray):
                assert got[path_][k].dtype == v.dtype and np.array_equal(got[path_][k], v)
            elif not isinstance(v, h5py.Empty):
                assert got[path_][k] == v, (path_, k)
    assert attrs_digest(got) == attrs_digest(want)
