"""``probe capture`` and ``probe inspect``."""

from __future__ import annotations

import json
import time

import click

from probe.cli.progress import bar, say

__all__ = ["COMMANDS"]


@click.command("capture")
@click.argument("checkpoint", type=click.Path(exists=True), required=False)
@click.option(
    "--model",
    "model_spec",
    default=None,
    help="Any model instead of a CHECKPOINT: torchvision:NAME, timm:NAME, zoo:NAME, "
    "path/to/file.py:FUNCTION or package.module:FUNCTION.",
)
@click.option(
    "--model-arg",
    "model_args",
    multiple=True,
    help="key=value passed to the model's factory (JSON values), repeatable; e.g. num_classes=10.",
)
@click.option(
    "--weights",
    type=click.Path(exists=True, dir_okay=False),
    default=None,
    help="State dict for --model: .safetensors, or a torch.save'd dict (read weights_only).",
)
@click.option(
    "--seed",
    "model_seed",
    type=click.IntRange(min=0, max=2**63 - 1),
    default=0,
    show_default=True,
    help="Seed of --model's random initialisation (weights not given by --weights).",
)
@click.option(
    "--name",
    "run_name",
    default=None,
    help="The model's label in tables and figures (probe analyze). Default: the --model spec "
    "with its --model-arg values and --weights file, or the checkpoint's model.",
)
@click.option(
    "--input-size",
    default=None,
    help="C,H,W the model takes (e.g. 3,224,224); images are resized to it. Needed with "
    "--data synthetic.",
)
@click.option(
    "--data",
    "dataset",
    default=None,
    help="Dataset: digits, cifar10, a class-folder tree or .tar.gz, or 'synthetic' (noise, "
    "--model only). Default: the one the checkpoint was trained on.",
)
@click.option(
    "--channels-last",
    is_flag=True,
    default=False,
    help="With --model: feed it channels-last batches (faster convolutions) -- only a model whose "
    "ops all honour strides: a kernel of its own that assumes NCHW memory would read wrong values. "
    "The zoo's checkpoints always get them.",
)
@click.option("--split", default="test", show_default=True, type=click.Choice(["train", "test"]))
@click.option(
    "--layers",
    multiple=True,
    default=("auto",),
    show_default=True,
    help="Glob or re:regex of dotted module names; repeatable. 'auto' = every residual block.",
)
@click.option(
    "--probe",
    "probe_specs",
    multiple=True,
    default=("residual", "channel"),
    show_default=True,
    help="name[:key=value,...]: residual, channel, grad, activations, gradients, jacobian, shattered, segments, param_grads.",
)
@click.option(
    "--limit", type=click.IntRange(min=1), default=None, help="Capture at most this many samples."
)
@click.option("--batch-size", type=click.IntRange(min=1), default=256, show_default=True)
@click.option(
    "--compression", type=click.Choice(["none", "zstd", "gzip"]), default="none", show_default=True
)
@click.option("--mode", type=click.Choice(["eval", "train"]), default="eval", show_default=True)
@click.option(
    "--grouped/--per-call",
    default=None,
    help="Compute statistics of equally shaped blocks together (fewer kernel launches, the "
    "same numbers) or each at its call. Default: grouped on a GPU; on the CPU the statistics of "
    "blocks with small tensors grouped, the others per call.",
)
@click.option(
    "--cuda-graph",
    is_flag=True,
    default=False,
    help="Record the probed pass as a CUDA graph and replay it for every batch of the same "
    "shape: one launch per batch (CUDA only; statistics and raw tensors without a sample cap). "
    "Checked against the eager pass once; falls back to it with a warning.",
)
@click.option("--out", required=True, type=click.Path(dir_okay=False), help="Output HDF5 file.")
@click.option("--device", default="auto", show_default=True)
@click.option(
    "--join",
    type=click.Choice(["copy", "virtual"]),
    default="copy",
    show_default=True,
    help="Under torchrun: rank 0 copies the ranks' parts into one self-contained --out (copy), "
    "or writes --out as an index over the parts kept in OUT.shards/ (virtual: no copy).",
)
def capture_cmd(
    checkpoint,
    model_spec,
    model_args,
    weights,
    model_seed,
    run_name,
    input_size,
    dataset,
    channels_last,
    split,
    layers,
    probe_specs,
    limit,
    batch_size,
    compression,
    mode,
    grouped,
    cuda_graph,
    out,
    device,
    join,
):
    """Run probes over a dataset with a trained CHECKPOINT (file or run directory), or with any
    model given by --model, into an HDF5 file."""
    from probe.errors import ProbeError
    from probe.loading import capture_checkpoint, capture_model, parse_input_size
    from probe.probes.registry import make_probe
    from probe.sources import load_model, parse_kwargs

    if (checkpoint is None) == (model_spec is None):
        raise ProbeError(
            "Give either a CHECKPOINT (file or run directory) or --model SPEC, not "
            + ("both." if checkpoint else "neither.")
            + " E.g. probe capture --model torchvision:resnet18 --data synthetic --input-size "
            "3,64,64 --out x.h5"
        )
    if checkpoint is not None and (model_args or weights or input_size):
        raise ProbeError(
            "--model-arg, --weights and --input-size go with --model; a checkpoint records its "
            "own model, weights and data."
        )
    if model_spec is not None and dataset is None:
        raise ProbeError(
            "--model needs --data: digits, cifar10, a folder or .tar.gz of train/<class>/*, or "
            "synthetic (noise of --input-size, for smoke runs)."
        )
    if checkpoint is None and dataset is not None and dataset == "synthetic" and input_size is None:
        raise ProbeError("--data synthetic needs --input-size C,H,W (e.g. 3,64,64).")

    probes = [make_probe(s) for s in probe_specs]
    if any(getattr(p, "fused", False) for p in probes):  # else a first batch that seems to hang
        say(
            "fused statistics: the first batch of each input shape compiles them "
            "(seconds per block shape; kept in the compiler's cache for later runs)",
            err=True,
        )
    layer_spec = "auto" if list(layers) == ["auto"] else list(layers)
    state: dict = {"last": 0, "started": time.perf_counter()}

    def progress(done, total):
        if "bar" not in state:
            state["bar"] = bar(total, "capture", unit="sample", started=state["started"])
        state["bar"].update(done - state["last"])
        state["last"] = done

    common = dict(
        split=split,
        batch_size=batch_size,
        limit=limit,
        device=device,
        layers=layer_spec,
        probes=probes,
        out=out,
        mode=mode,
        compression=None if compression == "none" else compression,
        progress=progress,
        join=join,
        grouped=grouped,
        cuda_graph=cuda_graph,
        name=run_name,
    )
    try:
        if model_spec is not None:
            model, prov = load_model(model_spec, weights, parse_kwargs(model_args), model_seed)
            cap = capture_model(
                model,
                prov,
                dataset,
                input_size=parse_input_size(input_size),
                channels_last=channels_last,
                **common,
            )
        else:
            cap = capture_checkpoint(checkpoint, dataset, **common)
    finally:
        if "bar" in state:
            state["bar"].close()
    with cap:
        n = int(cap.attrs["n_samples"])
        secs = float(cap.attrs["wall_seconds"])
        qs = sorted({q for layer in cap.layers for q in cap.quantities(layer)})
        world = cap.provenance.get("ranks", {}).get("world", 1)
        on = f" on {world} ranks" if world > 1 else ""
        # the bar's time also counts loading the model and data; say which is which
        total = time.perf_counter() - state["started"]
        say(
            f"captured {n} samples x {len(cap.layers)} layers in {secs:.1f} s{on} "
            f"({n / max(secs, 1e-9):.0f} samples/s; {total:.1f} s in all, with loading the "
            "model and data)"
        )
        say(f"quantities: {', '.join(qs)}")
        if cuda_graph:  # whether the recording was used (a fallback also warned why not)
            replayed = int(cap.attrs.get("replayed_batches", 0))
            say(
                f"replayed {replayed} batch{'es' if replayed != 1 else ''} of a recorded CUDA graph"
            )
        say(f"wrote {out}" + (f" (an index over {out}.shards/)" if "shards" in cap.attrs else ""))


def _size(nbytes: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if nbytes < 1024 or unit == "GiB":
            return f"{nbytes:.0f} {unit}" if unit == "B" else f"{nbytes:.1f} {unit}"
        nbytes /= 1024
    return ""


@click.command("inspect")
@click.argument("path", type=click.Path(exists=True, dir_okay=False))
@click.option("--attrs/--no-attrs", default=True, help="Show provenance and configuration.")
@click.option(
    "--verify",
    is_flag=True,
    help="Also read every chunk and check its checksum; exit 1 if any dataset is damaged.",
)
def inspect_cmd(path, attrs, verify):
    """Print the tree, shapes, dtypes, sizes and provenance of a capture; exit 1 if it is invalid."""
    import h5py

    import probe
    from probe.errors import ProbeError

    with probe.open(path) as cap:
        if verify:
            problems = cap.verify()
            damaged = [(k, p) for k, p in problems if not p.startswith("no checksum")]
            unchecked = len(problems) - len(damaged)
            for k, p in problems:
                click.echo(f"{'damaged' if (k, p) in damaged else 'unchecked'}: {k}: {p}", err=True)
            if damaged:
                raise ProbeError(
                    f"{path}: {len(damaged)} damaged dataset(s) (first: {damaged[0][0]}); the "
                    "capture cannot be trusted. Re-run it."
                )
            click.echo(
                f"verified: every chunk of {path} matches its checksum"
                + (f" ({unchecked} dataset(s) carry none)" if unchecked else "")
            )
        click.echo(
            f"{path}: {cap.attrs['format']} v{cap.attrs['format_version']}, complete, "
            f"{cap.attrs.get('n_samples')} samples, {len(cap.layers)} layers"
        )
        if attrs:
            click.echo("provenance:")
            for k, v in cap.provenance.items():
                click.echo(
                    f"  {k}: {json.dumps(v, default=str) if isinstance(v, (dict, list)) else v}"
                )
            click.echo(f"config: {json.dumps(cap.config, default=str)}")
        with h5py.File(path, "r") as f:
            for layer in cap.layers:
                la = cap.layer_attrs(layer)
                kind = "block" if la.get("is_block") else la.get("module_type", "")
                if la.get("is_block"):
                    kind += " (residual)" if la.get("residual") == 1 else " (plain)"
                click.echo(f"layers/{layer}  [{kind}]")
                for q in cap.quantities(layer):
                    d = f[f"layers/{layer}/{q}"]
                    dims = ",".join(dim.label or "?" for dim in d.dims)
                    enc = f" enc={d.attrs['encoding']}" if "encoding" in d.attrs else ""
                    click.echo(
                        f"  {q:18s} {str(d.shape):22s} {str(d.dtype):8s} {_size(d.id.get_storage_size()):>10s}"
                        f"  ({dims}){enc}"
                    )


@click.command("join")
@click.argument("out", type=click.Path(dir_okay=False))
@click.argument("shards", nargs=-1, required=True, type=click.Path(exists=True, dir_okay=False))
@click.option(
    "--copy",
    is_flag=True,
    help="Copy the shards' rows into OUT (one self-contained file) instead of writing an index "
    "of HDF5 virtual datasets over them.",
)
def join_cmd(out, shards, copy):
    """Join shard captures (one per process, in rank order) into OUT: an index of HDF5 virtual
    datasets over them, or with --copy one file holding their rows."""
    import probe

    path = probe.join_shards(list(shards), out, copy=copy)
    with probe.open(path) as cap:
        click.echo(
            f"joined {len(shards)} shards{' (copied)' if copy else ''}: "
            f"{cap.attrs['n_samples']} samples x {len(cap.layers)} layers -> {path}"
        )


COMMANDS = [capture_cmd, inspect_cmd, join_cmd]
