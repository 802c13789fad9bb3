"""Damaged or edited capture files are refused with a message naming what is wrong."""

import h5py
import numpy as np
import pytest
import torch

import probe
from probe.errors import ProbeError


@pytest.fixture
def capture_file(tmp_path):
    model = probe.zoo.create("resnet8", in_channels=1, width=4).eval()
    path = tmp_path / "c.h5"
    x, y = torch.randn(6, 1, 8, 8), torch.randint(0, 10, (6,))
    probe.capture(
        model, [(x, y)], probes=["residual", "activations:max_samples=3"], out=path
    ).close()
    return path


def _edit(path, fn):
    with h5py.File(path, "r+") as f:
        fn(f)


DAMAGE = {
    "complete as a string": (lambda f: f.attrs.__setitem__("complete", "False"), "not a boolean"),
    "layers group deleted": (lambda f: f.__delitem__("layers"), "have no group"),
    "labels of the wrong length": (
        lambda f: (f.__delitem__("labels"), f.create_dataset("labels", data=np.zeros(4, "i8"))),
        "/labels has shape (4,)",
    ),
    "sample_index missing": (lambda f: f.__delitem__("sample_index"), "/sample_index is missing"),
    "more rows than samples": (
        lambda f: (
            f.__delitem__("layers/stages.0.0/f_norm"),
            f.create_dataset("layers/stages.0.0/f_norm", data=np.zeros(9, "f4")),
        ),
        "expected at most 6 rows",
    ),
    "text instead of numbers": (
        lambda f: (
            f.__delitem__("layers/stages.0.0/f_norm"),
            f.create_dataset("layers/stages.0.0/f_norm", data=np.array([b"x"] * 6)),
        ),
        "expected numbers",
    ),
    "config not JSON": (lambda f: f.attrs.__setitem__("config", "{oops"), "'config' is '{oops'"),
    "a layer attribute of the wrong type": (
        lambda f: f["layers/stages.0.0"].attrs.__setitem__("is_block", "yes"),
        "/layers/stages.0.0 attribute 'is_block' is 'yes'",
    ),
    "a layer attribute missing": (
        lambda f: f["layers/stages.0.0"].attrs.__delitem__("module_type"),
        "'module_type' is missing",
    ),
    "shard_count zero": (lambda f: f.attrs.__setitem__("shard_count", 0), "'shard_count' is 0"),
    "n_samples a float": (lambda f: f.attrs.__setitem__("n_samples", 6.0), "'n_samples' is 6.0"),
    # well-typed edits only the attribute digest can tell, on a group and on a dataset
    "a layer attribute edited": (
        lambda f: f["layers/stages.0.0"].attrs.__setitem__("module_type", "Linear"),
        "no longer match the digest",
    ),
    "a dataset attribute edited": (
        lambda f: f["layers/stages.1.0/output"].attrs.__setitem__("DIMENSION_LABELS", ["a"] * 4),
        "no longer match the digest",
    ),
}


@pytest.mark.parametrize("case", sorted(DAMAGE))
def test_damaged_file_is_refused(capture_file, case):
    damage, fragment = DAMAGE[case]
    _edit(capture_file, damage)
    with pytest.raises(ProbeError, match="damaged|not a boolean") as e:
        probe.open(capture_file)
    assert fragment in str(e.value) and str(capture_file) in str(e.value)


def test_an_intact_file_still_opens(capture_file):
    with probe.open(capture_file) as cap:
        assert cap.read("stages.0.0", "output").shape[0] == 3


def test_the_writer_never_marks_complete_a_file_that_breaks_the_schema(tmp_path, monkeypatch):
    import sys

    capture_module = sys.modules["probe.capture"]  # the module (probe.capture is the function)

    real = capture_module._layer_attrs
    monkeypatch.setattr(
        capture_module, "_layer_attrs", lambda *a: {**real(*a), "is_block": "maybe"}
    )
    out = tmp_path / "c.h5"
    model = probe.zoo.create("resnet8", in_channels=1, width=4)
    with pytest.raises(ValueError, match="breaks its own schema.*is_block"):
        probe.capture(model, [torch.randn(2, 1, 8, 8)], probes=["residual"], out=out)
    assert not out.exists() and not list(tmp_path.glob("c.h5.tmp-*"))
