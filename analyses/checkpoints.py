"""The checkpoint a capture was taken from, for measures that read it (BN scales, lesions, the
training history): found where the capture recorded it, or beside the capture when its folder
moved or the path was relative to another working directory -- and only if its weights still
hash to the ``checkpoint_sha256`` the capture recorded, so that no measure reads another
checkpoint's weights as this capture's.

Example:
    >>> import probe, torch
    >>> cap = probe.capture(probe.zoo.create("resnet8", in_channels=1, width=4),
    ...                     [torch.randn(2, 1, 8, 8)], probes=["residual"])
    >>> source_checkpoint(cap) is None  # an in-memory model: no checkpoint
    True
"""

from __future__ import annotations

import functools
import warnings
from pathlib import Path

from analyses.tidy import source_of
from probe.store.reader import CaptureReader
from probe.train.checkpoint import checkpoint_paths, file_sha256

__all__ = ["source_checkpoint", "CheckpointMissingWarning"]


class CheckpointMissingWarning(UserWarning):
    """A capture's checkpoint is gone or holds other weights: what is read from it is left out."""


@functools.lru_cache(maxsize=256)
def _sha256(path: str, mtime_ns: int, size: int) -> str:
    return file_sha256(path)


def _weights_hash(weights: Path) -> str:
    st = weights.stat()
    return _sha256(str(weights), st.st_mtime_ns, st.st_size)


def _candidates(recorded: Path, capture: Path | None) -> list[Path]:
    """The recorded path, then its tails under every folder that holds the capture."""
    out = [recorded]
    if capture is not None:
        parts = recorded.parts[1:] if recorded.is_absolute() else recorded.parts
        for folder in capture.resolve().parents:
            out += [folder.joinpath(*parts[k:]) for k in range(len(parts))]
    return list(dict.fromkeys(out))


_warned: set[str] = set()


def source_checkpoint(cap: CaptureReader) -> Path | None:
    """The JSON of the checkpoint ``cap`` was captured from, or None (a model given in memory, or
    a checkpoint that is gone or now holds other weights -- then with a warning, once)."""
    prov = cap.provenance
    recorded = prov.get("checkpoint")
    if not recorded:
        return None
    want = prov.get("checkpoint_sha256")
    capture = getattr(cap, "path", None)
    for path in _candidates(Path(recorded), None if capture is None else Path(capture)):
        weights, _ = checkpoint_paths(path)
        if (
            path.is_file()
            and weights.is_file()
            and (want is None or _weights_hash(weights) == want)
        ):
            return path
    if source_of(cap) not in _warned:
        _warned.add(source_of(cap))
        warnings.warn(
            f"{source_of(cap)} was captured from {recorded}, which is not there or holds other "
            "weights now (their SHA-256 differs from the capture's checkpoint_sha256), nor beside "
            "the capture: BN scales, lesions and the training history of that run are left out.",
            CheckpointMissingWarning,
            stacklevel=2,
        )
    return None
