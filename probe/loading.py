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
    "capture_model",
    "parse_input_size",
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
        "checkpoint": str(js.resolve()),  # analyses find it from any working directory
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
    data: ImageArrays,
    split: str,
    batch_size: int,
    device: torch.device,
    limit: int | None = None,
    channels_last: bool = False,
) -> DeviceLoader:
    """An un-augmented, ordered loader over ``split`` for captures (sample_index = dataset index);
    ``channels_last`` batches for a model known to take them (the zoo's: a user's model may
    ``.view`` its input)."""
    if split not in ("train", "test"):
        raise ProbeError(f"Invalid split {split!r}; allowed: train, test.")
    x, y = data.split(split)
    return DeviceLoader(
        x,
        y,
        batch_size,
        mean=data.mean,
        std=data.std,
        device=device,
        limit=limit,
        channels_last=channels_last,
    )


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
    # channels-last batches, as the trainer feeds the zoo's nets: a CIFAR ResNet-56 statistics
    # capture ~12 % faster on a 2-core CPU (docs/performance.md); one-channel images are
    # channels-last anyway (DeviceLoader), so digits captures are unchanged
    device = next(model.parameters()).device
    loader = capture_loader(data, split, batch_size, device, limit, channels_last=True)
    prov.update(dataset=data.name, split=split, split_limit=limit, **(extra_provenance or {}))
    return capture(model, loader, provenance=prov, **capture_kwargs)


def parse_input_size(text: str | None) -> tuple[int, int, int] | None:
    """``"3,64,64"`` (or ``3x64x64``) -> (3, 64, 64).

    Example:
        >>> parse_input_size("3,64,64"), parse_input_size(None)
        ((3, 64, 64), None)
    """
    if text is None:
        return None
    parts = text.replace("x", ",").split(",")
    try:
        size = tuple(int(p) for p in parts)
    except ValueError:
        size = ()
    if len(size) != 3 or min(size) < 1:
        raise ProbeError(
            f"Invalid --input-size {text!r}; give channels,height,width of positive integers, "
            "e.g. 3,224,224."
        )
    return size  # type: ignore[return-value]


class _Fit:
    """A loader's batches resized to ``size`` (:func:`probe.data.resize.resize`), a single
    channel repeated to C, in the loader's layout."""

    def __init__(self, loader: DeviceLoader, size: tuple[int, int, int] | None) -> None:
        self.loader, self.size = loader, size
        self.num_samples = loader.num_samples
        self.batch_size = loader.batch_size

    def _fit(self, x: torch.Tensor) -> torch.Tensor:
        from probe.data.resize import resize

        if self.size is not None:
            c, h, w = self.size
            if x.shape[1] == 1 and c > 1:
                x = x.expand(-1, c, -1, -1)
            x = resize(x, (h, w))
            if self.loader.channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
        return x

    def __iter__(self):
        for x, y, idx in self.loader:
            yield self._fit(x), y, idx

    def shard(self, start: int, stop: int) -> _Fit:
        return _Fit(self.loader.shard(start, stop), self.size)

    def sample(self, position: int) -> torch.Tensor:
        return self._fit(self.loader.sample(position))


def _probe_forward(
    model: torch.nn.Module, shape: tuple[int, ...], device, spec: str, grey: bool = False
) -> int:
    """Run one input of ``shape`` through the model; its number of outputs (classes). ``grey``:
    the shape is a dataset's own, of one channel (which --input-size can repeat)."""
    try:
        with torch.no_grad():
            out = model(torch.zeros(1, *shape, device=device))
    except Exception as e:
        if grey:
            _, h, w = shape
            hint = (
                f"The data's images have one channel ({h}x{w}): --input-size 3,{h},{w} repeats "
                "it for a model that takes three (or resizes, e.g. 3,224,224); a zoo model can "
                "be built for one with --model-arg in_channels=1."
            )
        else:
            hint = "Give the size it takes with --input-size C,H,W (e.g. 3,224,224 for ViTs)."
        raise ProbeError(
            f"{spec} rejected an input of shape [1, {', '.join(map(str, shape))}]: "
            f"{type(e).__name__}: {str(e)[:300].rstrip('.')}. {hint}"
        ) from e
    if not isinstance(out, torch.Tensor) or out.ndim != 2:
        raise ProbeError(
            f"{spec} returned {type(out).__name__}"
            + (f" of shape {list(out.shape)}" if isinstance(out, torch.Tensor) else "")
            + ", not logits [N, classes]; captures need a classifier's logits for the loss."
        )
    return int(out.shape[1])


def capture_model(
    model: torch.nn.Module,
    provenance: dict,
    data: str = "synthetic",
    *,
    input_size: tuple[int, int, int] | None = None,
    split: str = "test",
    batch_size: int = 64,
    limit: int | None = None,
    device: str = "auto",
    channels_last: bool = False,
    **capture_kwargs: object,
):
    """``probe.capture`` on any model (see :func:`probe.sources.load_model`) over ``data``:
    ``"synthetic"`` (noise of ``input_size``) or a dataset spec (digits, cifar10, a folder or
    ``.tar.gz`` tree), resized to ``input_size`` when given; ``channels_last`` batches only for
    a model whose ops all honour strides (a kernel that assumes NCHW memory would read wrong
    values: not the default, unlike the zoo's checkpoints)."""
    from probe.data.synthetic import synthetic

    dev = resolve_device(device)
    model = model.to(dev).eval()
    spec = provenance.get("model_spec") or provenance.get("model_name", type(model).__name__)
    if data == "synthetic":
        if input_size is None:
            raise ProbeError(
                "--data synthetic needs --input-size C,H,W (e.g. 3,64,64): noise images have no "
                "size of their own."
            )
        classes = _probe_forward(model, input_size, dev, spec)
        arrays = synthetic(input_size, classes, n=limit or 256)
    else:
        arrays = load_dataset(data, size=input_size[1:] if input_size else None)
        shape = input_size or arrays.image_shape
        grey = input_size is None and shape[0] == 1
        classes = _probe_forward(model, shape, dev, spec, grey)
        if classes < arrays.num_classes:
            raise ProbeError(
                f"{spec} has {classes} outputs but {arrays.name} has {arrays.num_classes} classes; "
                f"build it with --model-arg num_classes={arrays.num_classes}."
            )
    loader = capture_loader(arrays, split, batch_size, dev, limit, channels_last=channels_last)
    prov = {**provenance, "dataset": arrays.name, "split": split, "split_limit": limit}
    if input_size is not None:
        prov["input_size"] = list(input_size)
    if channels_last:  # the layout changes the rounding: recorded where it was asked for
        prov["channels_last"] = True
    return capture(model, _Fit(loader, input_size), provenance=prov, **capture_kwargs)
