"""Load a checkpoint (file or run directory) and the data to capture on, for the CLI and study."""

from __future__ import annotations

from pathlib import Path

import torch

from probe.capture import capture
from probe.data import DeviceLoader, ImageArrays, load_dataset
from probe.errors import ProbeError
from probe.train.checkpoint import checkpoint_paths, file_sha256, load_checkpoint
from probe.train.trainer import resolve_device

__all__ = [
    "resolve_checkpoint",
    "load_for_capture",
    "capture_loader",
    "dataset_for",
    "capture_checkpoint",
]


def resolve_checkpoint(path: str | Path) -> Path:
    """A checkpoint's JSON path from a checkpoint file, its stem, or a run directory (its last one)."""
    p = Path(path)
    if p.is_dir():
        found = (
            sorted((p / "checkpoints").glob("epoch-*.json")) if (p / "checkpoints").is_dir() else []
        )
        if not found:
            raise ProbeError(
                f"{p} holds no checkpoints (expected {p}/checkpoints/epoch-XXXX.json)."
            )
        return found[-1]
    _, js = checkpoint_paths(p)
    if not js.exists():
        raise ProbeError(f"No checkpoint at {path} (looked for {js}).")
    return js


def load_for_capture(path: str | Path, device: str = "auto") -> tuple[torch.nn.Module, dict, dict]:
    """(model in eval mode, checkpoint meta, provenance entry for the capture file)."""
    js = resolve_checkpoint(path)
    dev = resolve_device(device)
    model, meta = load_checkpoint(js, device=dev)
    weights, _ = checkpoint_paths(js)
    prov = {
        "checkpoint": str(js),
        "checkpoint_sha256": file_sha256(weights),
        "model_name": meta.get("model_name"),
        "model_config": meta.get("model"),
        "epoch": meta.get("epoch"),
        "seed": meta.get("seed"),
        "recipe": (meta.get("recipe") or {}).get("name"),
        "metrics": meta.get("metrics"),
        "train_limit": meta.get("train_limit"),
    }
    return model.eval(), meta, prov


def capture_loader(
    data: ImageArrays, split: str, batch_size: int, device: torch.device, limit: int | None = None
) -> DeviceLoader:
    """An un-augmented, ordered loader over ``split`` for captures (sample_index = dataset index)."""
    if split not in ("train", "test"):
        raise ProbeError(f"Invalid split {split!r}; allowed: train, test.")
    x, y = data.split(split)
    return DeviceLoader(x, y, batch_size, mean=data.mean, std=data.std, device=device, limit=limit)


def dataset_for(meta: dict, override: str | None) -> ImageArrays:
    spec = override or meta.get("dataset_spec") or (meta.get("dataset") or {}).get("name")
    if not spec:
        raise ProbeError("The checkpoint does not record its dataset; pass --data.")
    # A model trained on a subset was normalised with that subset's statistics: rebuild it.
    return load_dataset(spec).subset(meta.get("train_limit"))


def capture_checkpoint(
    checkpoint: str | Path,
    data: ImageArrays | str | None = None,
    *,
    split: str = "test",
    batch_size: int = 256,
    limit: int | None = None,
    device: str = "auto",
    extra_provenance: dict | None = None,
    **capture_kwargs: object,
):
    """``probe.capture`` on a checkpoint over ``split`` of ``data`` (arrays, a dataset spec, or
    None: the dataset it was trained on), recording the checkpoint's identity, dataset, split and
    limit in the provenance. A spec is read like the checkpoint's own dataset, including the
    training subset its normalisation came from."""
    model, meta, prov = load_for_capture(checkpoint, device)
    if not isinstance(data, ImageArrays):
        data = dataset_for(meta, data)
    loader = capture_loader(data, split, batch_size, next(model.parameters()).device, limit)
    prov.update(dataset=data.name, split=split, split_limit=limit, **(extra_provenance or {}))
    return capture(model, loader, provenance=prov, **capture_kwargs)
