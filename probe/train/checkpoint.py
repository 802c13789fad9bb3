"""Checkpoints as safetensors weights plus a JSON config; nothing is ever unpickled.

A checkpoint ``stem`` is two files: ``stem.safetensors`` (the state dict) and ``stem.json`` (model
name and options, recipe, seed, epoch, metrics, library versions, code revision and the SHA-256 of
the weights). Both are written under temporary names, fsynced and renamed into place, the weights
first. The weights file also carries the whole config in its own header, so it is complete on its
own: a process killed between the two renames leaves new weights beside the previous JSON, which
the next read recognises (the JSON's hash is that of other weights) and rebuilds from the weights
file, instead of refusing the run forever. A JSON whose hash matches but whose content differs
from the header was edited (``"residual": false``, ``"epoch": 99``) and is refused. Loading
validates the weights against the config.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from probe.errors import ProbeError
from probe.tempfiles import atomic_path
from probe.zoo import NetConfig
from probe.zoo.cifar_resnet import CifarResNet

__all__ = [
    "atomic_write_text",
    "save_checkpoint",
    "load_checkpoint",
    "read_checkpoint_meta",
    "checkpoint_paths",
    "file_sha256",
    "weights_sha256",
]

log = logging.getLogger(__name__)
FORMAT = "resprobe-checkpoint"
FORMAT_VERSION = 1


def file_sha256(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def tensors_sha256(tensors: dict[str, torch.Tensor]) -> str:
    """A digest of tensors' names, dtypes, shapes and bytes (sorted by name): it identifies the
    weights independently of the file they are in, so it can be stored inside that file.

    Example:
        >>> a = tensors_sha256({"w": torch.ones(2)}); b = tensors_sha256({"w": torch.ones(2)})
        >>> a == b, a == tensors_sha256({"w": torch.zeros(2)})
        (True, False)
    """
    h = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].detach().to("cpu").contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def checkpoint_paths(path: str | os.PathLike) -> tuple[Path, Path]:
    """(weights, json) for a checkpoint given as its stem, its .json or its .safetensors."""
    p = Path(path)
    stem = p.with_suffix("") if p.suffix in (".json", ".safetensors") else p
    return stem.with_suffix(".safetensors"), stem.with_suffix(".json")


def atomic_write_text(path: Path, text: str) -> None:
    """Write ``text`` under a temporary name, fsync, and rename over ``path``."""
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def save_checkpoint(
    stem: str | os.PathLike,
    model: nn.Module,
    meta: dict,
    extra_tensors: dict[str, torch.Tensor] | None = None,
) -> Path:
    """Write ``stem.safetensors`` and ``stem.json``; returns the JSON path.

    ``meta`` must hold ``model`` (the :class:`NetConfig` as a dict) and may hold anything
    JSON-serialisable (recipe, seed, epoch, metrics ...). ``extra_tensors`` (e.g. optimizer
    momentum) are stored under an ``extra.`` prefix.

    Example:
        >>> from probe.zoo import create
        >>> import tempfile
        >>> net = create("resnet20")
        >>> p = save_checkpoint(tempfile.mkdtemp() + "/ck", net, {"model": net.config.to_dict()})
        >>> load_checkpoint(p)[0].config.depth
        20
    """
    weights, js = checkpoint_paths(stem)
    weights.parent.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()}
    for k, v in (extra_tensors or {}).items():
        tensors[f"extra.{k}"] = v.detach().to("cpu").contiguous()
    doc = json.loads(
        json.dumps(
            {"format": FORMAT, "format_version": FORMAT_VERSION, **meta, "weights": weights.name},
            default=str,
        )
    )
    try:
        with atomic_path(weights) as tmp:
            save_file(
                tensors,
                str(tmp),
                metadata={
                    "format": FORMAT,
                    _HEADER_KEY: json.dumps(doc),
                    _DIGEST_KEY: tensors_sha256(tensors),
                },
            )
    except OSError as e:
        raise ProbeError(f"Could not write checkpoint {weights}: {e}") from e
    _write_config(js, {**doc, "sha256": file_sha256(weights)})
    return js


def weights_sha256(path: str | os.PathLike) -> str:
    """What a checkpoint's weights are, independently of the file around them: the
    :func:`tensors_sha256` stored in its header (two runs that train the same tensors write
    files that differ in their recorded timings), or the file's sha256 for a checkpoint written
    without it. ``path``: the checkpoint's stem, .json or .safetensors.

    Example:
        >>> import tempfile, torch.nn as nn
        >>> stem = tempfile.mkdtemp() + "/ck"
        >>> _ = save_checkpoint(stem, nn.Linear(2, 2), {"run": 1})
        >>> first = weights_sha256(stem)
        >>> _ = save_checkpoint(stem, nn.Linear(2, 2), {"run": 2})  # other weights (a new init)
        >>> weights_sha256(stem) == first
        False
    """
    weights, _ = checkpoint_paths(path)
    try:
        digest = _stored_digest(weights)
    except Exception:  # not a safetensors file: its bytes are all there is to go by
        digest = None
    return digest or file_sha256(weights)


def _stored_digest(weights: Path) -> str | None:
    """The :func:`tensors_sha256` that :func:`save_checkpoint` stored in the weights' header
    (None for an older checkpoint); a file that is not safetensors raises."""
    with safe_open(str(weights), framework="pt") as f:
        return (f.metadata() or {}).get(_DIGEST_KEY)


_HEADER_KEY = "resprobe_config"  # the checkpoint's config inside the safetensors header
_DIGEST_KEY = "resprobe_tensors_sha256"  # tensors_sha256 of the weights, inside the same header


def _write_config(js: Path, doc: dict) -> None:
    atomic_write_text(js, json.dumps(doc, indent=2, sort_keys=True, default=str))


def _header_config(weights: Path) -> dict | None:
    """The config stored inside the weights file (None: an older checkpoint, or unreadable)."""
    try:
        with safe_open(str(weights), framework="pt") as f:
            raw = (f.metadata() or {}).get(_HEADER_KEY)
        return json.loads(raw) if raw else None
    except Exception:  # not a safetensors file: load_checkpoint reports it
        return None


def read_checkpoint_meta(path: str | os.PathLike) -> dict:
    """The config of a checkpoint, validated: format and version, and -- for checkpoints that
    carry their config in the weights header -- agreement of the JSON with that header. A JSON
    left from the previous save (killed between the renames) is rebuilt from the header."""
    return _validated_meta(*checkpoint_paths(path))[0]


def _validated_meta(weights: Path, js: Path) -> tuple[dict, bool]:
    """(config, whether the weights' hash was checked against it on the way)."""
    header = _header_config(weights) if weights.exists() else None
    if header is not None:
        return _reconciled(weights, js, header), True
    return _json_config(js), False


def _check_tensors(weights: Path) -> None:
    """Refuse weights whose tensors no longer match the digest stored with them (bit rot, a
    partial copy): without this a damaged file would pass as 'a save cut between its renames'."""
    try:
        digest = _stored_digest(weights)
        tensors = load_file(str(weights)) if digest else None
    except Exception as e:  # a header that parses but data that does not
        raise ProbeError(f"Checkpoint weights {weights} are damaged and cannot be read: {e}") from e
    if digest is None:
        raise ProbeError(
            f"Checkpoint weights {weights} do not match the hash recorded in their JSON, and the "
            "file (written by an older resprobe) stores no digest of its own to tell a damaged "
            "file from an interrupted save. If the save was interrupted, delete the .json to "
            "rebuild it; otherwise the weights are damaged."
        )
    if tensors_sha256(tensors) != digest:
        raise ProbeError(
            f"Checkpoint weights {weights} are damaged: their tensors no longer match the digest "
            "stored with them. Restore the file (or use another checkpoint); a run whose "
            "checkpoint is damaged trains again once its run directory is moved aside."
        )


def _reconciled(weights: Path, js: Path, header: dict) -> dict:
    sha = file_sha256(weights)
    stored = None
    if js.exists():
        try:
            stored = json.loads(js.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError):
            stored = None
    if not isinstance(stored, dict) or stored.get("sha256") != sha:
        # The JSON is missing, damaged or describes other weights: either the save was cut
        # between its two renames (the weights file, renamed whole, says what it is) or the
        # weights themselves are damaged -- which their stored digest tells apart.
        _check_tensors(weights)
        doc = {**header, "sha256": sha}
        _write_config(js, doc)
        log.warning("rebuilt %s from the config stored in %s", js, weights.name)
        return doc
    edited = sorted(
        k for k in set(header) | (set(stored) - {"sha256"}) if stored.get(k) != header.get(k)
    )
    if edited:
        raise ProbeError(
            f"{js} disagrees with the config stored inside {weights.name} on {', '.join(edited[:4])}: "
            f"the JSON was edited. Restore it, or delete {js.name} to rebuild it from the weights."
        )
    return stored


def _json_config(js: Path) -> dict:
    if not js.exists():
        raise ProbeError(
            f"No checkpoint config {js}. A checkpoint is a .safetensors file plus a .json beside it; "
            "an interrupted save leaves no .json and is not a checkpoint."
        )
    try:
        meta = json.loads(js.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ProbeError(f"Checkpoint config {js} is not valid JSON: {e}") from e
    if not isinstance(meta, dict):
        raise ProbeError(
            f"Checkpoint config {js} holds a JSON {type(meta).__name__}, not an object; it is "
            "damaged. Restore it or delete the checkpoint."
        )
    if meta.get("format") != FORMAT or meta.get("format_version") != FORMAT_VERSION:
        raise ProbeError(
            f"{js} is not a {FORMAT} v{FORMAT_VERSION} config (format={meta.get('format')!r}, "
            f"version={meta.get('format_version')!r})."
        )
    return meta


def load_checkpoint(
    path: str | os.PathLike, device: str | torch.device = "cpu", verify_hash: bool = True
) -> tuple[CifarResNet, dict]:
    """Build the model described by the config and load its weights, validating both.

    Raises :class:`ProbeError` when the weights are missing, were modified after saving (hash),
    or do not fit the architecture (missing, unexpected or mis-shaped tensors).
    """
    weights, js = checkpoint_paths(path)
    meta, hash_checked = _validated_meta(weights, js)
    if not weights.exists():
        raise ProbeError(f"Checkpoint weights {weights} are missing (config {js} exists).")
    if verify_hash and not hash_checked and file_sha256(weights) != meta.get("sha256"):
        raise ProbeError(
            f"Checkpoint weights {weights} do not match the hash in {js}: the file was modified or "
            "belongs to another checkpoint. Restore the file (or use another checkpoint); a run "
            "whose checkpoint is damaged trains again once its run directory is moved aside."
        )
    try:
        config = NetConfig(**meta["model"])
    except (KeyError, TypeError) as e:
        raise ProbeError(f"Invalid model config in {js}: {e}") from e
    model = CifarResNet(config)
    state = {
        k: v
        for k, v in load_file(str(weights), device=str(device)).items()
        if not k.startswith("extra.")
    }
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    shapes = sorted(k for k in set(expected) & set(state) if expected[k].shape != state[k].shape)
    if missing or unexpected or shapes:
        detail = "; ".join(
            f"{label}: {', '.join(keys[:4])}{' ...' if len(keys) > 4 else ''}"
            for label, keys in (
                ("missing", missing),
                ("unexpected", unexpected),
                ("wrong shape", shapes),
            )
            if keys
        )
        raise ProbeError(
            f"Weights {weights} do not fit the config in {js} ({config}): {detail}. "
            "Was the .json copied from another run?"
        )
    model.load_state_dict(state)
    return model.to(device), meta


def load_extra_tensors(
    path: str | os.PathLike, device: str | torch.device = "cpu"
) -> dict[str, torch.Tensor]:
    """The ``extra.`` tensors of a checkpoint (optimizer state for resuming)."""
    weights, _ = checkpoint_paths(path)
    return {
        k[6:]: v
        for k, v in load_file(str(weights), device=str(device)).items()
        if k.startswith("extra.")
    }
