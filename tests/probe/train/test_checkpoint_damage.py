"""Damaged weights are refused, also when the JSON beside them no longer matches (the case an
interrupted save also produces): the digest stored inside the weights tells the two apart."""

import json

import pytest
import torch

from probe.errors import ProbeError
from probe.train.checkpoint import checkpoint_paths, load_checkpoint, save_checkpoint
from probe.zoo import create


@pytest.fixture
def ckpt(tmp_path):
    model = create("resnet8", in_channels=1, width=4)
    return save_checkpoint(tmp_path / "epoch-0001", model, {"model": model.config.to_dict()}), model


def _flip(path, at):
    data = bytearray(path.read_bytes())
    data[at] ^= 0xFF
    path.write_bytes(bytes(data))


def test_a_bit_flip_in_the_weights_is_refused_and_the_json_is_kept(ckpt):
    js, _ = ckpt
    weights, _ = checkpoint_paths(js)
    before = js.read_text()
    _flip(weights, len(weights.read_bytes()) - 100)  # inside the tensor data
    with pytest.raises(ProbeError, match="damaged"):
        load_checkpoint(js)
    assert js.read_text() == before  # the evidence is not overwritten


def test_a_json_left_from_an_interrupted_save_is_rebuilt_from_intact_weights(ckpt):
    js, model = ckpt
    meta = json.loads(js.read_text())
    js.write_text(json.dumps({**meta, "sha256": "0" * 64}))  # describes other weights
    loaded, _ = load_checkpoint(js)
    assert all(
        torch.equal(a, b) for a, b in zip(loaded.state_dict().values(), model.state_dict().values())
    )
