"""``probe analyze``: every applicable measure and figure for one or more captures.

Writes ``measures.csv`` (the tidy table), one PNG + SVG + CSV per figure, and reports which
measures were skipped because the captures lack the data for them.
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from analyses import figures
from analyses.checkpoints import source_checkpoint
from analyses.cka import capture_representations, cka_matrix
from analyses.figure_reuse import render, stamped_figures
from analyses.identity import identity_closeness
from analyses.lesions import checkpoint_lesions
from analyses.residual import residual_magnitude, response_std_table
from analyses.signal import model_level_table, shattered_table, signal_propagation
from analyses.tidy import COLUMNS, check_poolable, quietly, run_key, source_of
from probe.errors import ProbeError
from probe.store.reader import CaptureReader, open_capture
from probe.tempfiles import atomic_path
from probe.train.runs import read_history

log = logging.getLogger(__name__)

__all__ = [
    "figure_caption",
    "AnalysisResult",
    "measure_table",
    "analyze",
    "write_figures",
    "FIGURES",
    "load_histories",
]

# figure name -> (quantity, how to get it, log y-axis)
FIGURES = {
    "identity_closeness": ("closeness", "probe 'residual' on blocks", True),
    "cos_y_shortcut": ("cos_ys", "probe 'residual' on blocks", False),
    "jacobian_deviation": ("jac_rel_dev", "probe 'jacobian' on blocks", True),
    "cka_adjacent": ("cka_adjacent", "probe 'activations' on blocks", False),
    "residual_ratio": ("residual_ratio", "probe 'residual' on blocks", True),
    "residual_share": ("residual_share", "probe 'residual' on blocks", False),
    "spp_channel_variance": ("av", "probe 'channel'", True),
    "spp_channel_squared_mean": ("asm", "probe 'channel'", True),
    "branch_variance": ("branch_av", "probe 'channel' on blocks", True),
    "activation_norms": ("act_norm", "probe 'residual'", True),
    "gradient_norms": ("grad_norm", "probe 'grad'", True),
    "iterative_refinement": ("cos_f_grad", "probe 'grad' on blocks", False),
    "jacobian_msv": ("jac_msv", "probe 'jacobian'", True),
    "jacobian_top_sv": ("jac_top_sv", "probe 'jacobian:top_k=1'", True),
    "gradient_scale_coefficient": ("gsc", "probes 'jacobian' and 'residual'", False),
    "shattered_gradients": ("cos_lag", "probe 'shattered'", False),
    "segment_isometry_in": ("seg_in_msv", "probe 'segments'", True),
    "segment_isometry_out": ("seg_out_msv", "probe 'segments'", True),
    "parameter_gradient_norms": ("param_grad_norm", "probe 'param_grads'", True),
}
# Measures whose inputs come from two probes, which must be in the same capture file
# (quantity -> {probe: one dataset it writes}).
_TWO_PROBES = {"gsc": {"jacobian": "jac_fro2", "residual": "x_norm"}}


def _skip_reason(quantity: str, how: str, caps: Sequence[CaptureReader]) -> str:
    """Why ``quantity`` is missing: its probe was not captured, or -- for a measure of two probes
    -- they were captured into different files of one run."""
    parts = _TWO_PROBES.get(quantity)
    if parts and caps:
        holds = {
            p: [c for c in caps if any(c.has(l, q) for l in c.layers)] for p, q in parts.items()
        }
        if all(holds.values()):
            names = {p: ", ".join(source_of(c) for c in cs[:2]) for p, cs in holds.items()}
            return (
                f"needs {how} in one capture; they are in different files "
                + "; ".join(f"'{p}' in {n}" for p, n in names.items())
                + ". Capture both probes together ("
                + " ".join(f"--probe {p}" for p in parts)
                + ")"
            )
    return f"no '{quantity}' in the captures (needs {how})"


# Quantities whose x-axis is not a block position (a lag, a parameter index).
_NOT_PER_BLOCK = {"cos_lag", "param_grad_norm"}
_CAPTIONS = {
    "fig7_response_std": "He et al. (2016) Fig. 7: std of each BN output after a 3×3 conv, in "
    "layer order (top) and sorted by size (bottom)",
    "fig7_response_std_channel": "Fig. 7 per channel: mean over channels of each BN output's std",
    "fig7_bn_gamma": "mean |γ| of the same BN layers (in eval mode the response std largely "
    "reads out γ)",
    "jacobian_spectra": "spectral density of JᵀJ (stochastic Lanczos quadrature) of the first, "
    "middle and last captured block",
    "training_error": "training error per epoch (eval mode); bands: 95% interval over seeds",
    "training_batch_error": "training batch error per epoch; bands: 95% interval over seeds",
    "lesions": "test error after deleting each single block (dashed: the intact net)",
}


def figure_caption(stem: str) -> str:
    """A sentence for a figure file's stem (``final_identity_closeness`` -> what it shows, when).

    Example:
        >>> figure_caption("init_gradient_norms")
        '||∂L/∂y|| (gradient norm) per block, at initialisation'
    """
    when, name = "", stem
    for prefix, words in (("init_", "at initialisation"), ("final_", "after training")):
        if stem.startswith(prefix):
            when, name = words, stem[len(prefix) :]
    if name in FIGURES:
        quantity = FIGURES[name][0]
        what = figures.LABELS.get(quantity, quantity) + (
            "" if quantity in _NOT_PER_BLOCK else " per block"
        )
    elif name.startswith("cka_"):
        what = f"linear CKA between every pair of captured layers ({name[4:]})"
    else:
        what = _CAPTIONS.get(name, name.replace("_", " "))
    return f"{what}, {when}" if when else what


@dataclass
class AnalysisResult:
    table: pd.DataFrame
    files: list[Path] = field(default_factory=list)
    skipped: dict[str, str] = field(default_factory=dict)
    # figures an earlier analysis drew into the same directory that this one did not (kept:
    # the directory is the caller's), so that they are not taken for this analysis's
    earlier: list[Path] = field(default_factory=list)


def _open(source: str | os.PathLike | CaptureReader) -> CaptureReader:
    return source if isinstance(source, CaptureReader) else open_capture(source)


def measure_table(caps: Sequence[CaptureReader]) -> pd.DataFrame:
    """Every measure of every capture as one tidy table (refuses captures it would pool wrongly,
    see :func:`analyses.tidy.check_poolable`)."""
    check_poolable(caps)
    parts = []
    with quietly():  # what is missing is listed under "skipped" by the caller
        for cap in caps:
            for fn in (
                identity_closeness,
                residual_magnitude,
                response_std_table,
                signal_propagation,
                shattered_table,
                model_level_table,
            ):
                parts.append(fn(cap))
    parts = [p for p in parts if len(p)]
    return pd.concat(parts, ignore_index=True) if parts else pd.DataFrame(columns=COLUMNS)


def slq_spectra(caps: Sequence[CaptureReader]) -> pd.DataFrame:
    """Lanczos-quadrature nodes and weights of the first, middle and last captured block per run."""
    rows = []
    for cap in caps:
        layers = [l for l in cap.layers if cap.has(l, "jac_slq_nodes")]
        if not layers:
            continue
        key = run_key(cap)
        picks = {"first": layers[0], "middle": layers[len(layers) // 2], "last": layers[-1]}
        for position, layer in picks.items():
            nodes, weights = cap.read(layer, "jac_slq_nodes"), cap.read(layer, "jac_slq_weights")
            keep = nodes > 0
            rows.append(
                pd.DataFrame(
                    {
                        "model": key["model"],
                        "seed": key["seed"],
                        "checkpoint": key["checkpoint"],
                        "position": position,
                        "layer": layer,
                        "log10_eigenvalue": np.log10(nodes[keep]),
                        "weight": weights[keep] / len(nodes),
                    }
                )
            )
    return pd.concat(rows, ignore_index=True) if rows else pd.DataFrame()


def load_histories(caps: Sequence[CaptureReader]) -> pd.DataFrame:
    """Per-epoch training histories of the runs the captures came from (where still on disk)."""
    frames, seen = [], set()
    for cap in caps:
        ck = source_checkpoint(cap)
        if ck is None:
            continue
        hist = ck.parent.parent / "history.json"
        if hist.exists() and hist not in seen:
            seen.add(hist)
            key = run_key(cap)
            try:
                h = pd.DataFrame(read_history(hist))
            except ProbeError as e:  # the curves are left out; every other figure is drawn
                log.warning("leaving out the training curves of %s: %s", hist.parent, e)
                continue
            for k in ("model", "depth", "residual", "seed"):
                h[k] = key[k]
            frames.append(h)
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()


def _cka_tag(key: dict, taken: set[str]) -> str:
    """A file-name part for one run's CKA figure: its model, seed and epoch, with the characters a
    model name may hold but a file name may not ('torchvision:resnet50', 'nets/mine.py:make')
    replaced; unique among ``taken`` (which it joins).

    Example:
        >>> taken = set()
        >>> key = {"model": "nets/mine.py:make", "seed": 0, "checkpoint": -1}
        >>> _cka_tag(key, taken), _cka_tag(key | {"model": "nets_mine.py_make"}, taken)
        ('nets_mine.py_make_s0', 'nets_mine.py_make_s0_2')
        >>> _cka_tag({"model": "resnet20", "seed": 1, "checkpoint": 12}, taken)
        'resnet20_s1_e12'
    """
    name = re.sub(r"[^A-Za-z0-9._-]+", "_", key["model"]).strip("_") or "model"
    tag = f"{name}_s{key['seed']}" + (f"_e{key['checkpoint']}" if key["checkpoint"] >= 0 else "")
    unique, n = tag, 1
    while unique in taken:
        n += 1
        unique = f"{tag}_{n}"
    taken.add(unique)
    return unique


def write_figures(
    table: pd.DataFrame,
    out: Path,
    caps: Sequence[CaptureReader] = (),
    histories: pd.DataFrame | None = None,
    lesions: pd.DataFrame | None = None,
    prefix: str = "",
) -> tuple[list[Path], dict[str, str]]:
    """Every figure the data allows (PNG + SVG + CSV); returns (files, skipped measures with reasons)."""
    files: list[Path] = []
    skipped: dict[str, str] = {}
    present = set(table["quantity"]) if len(table) else set()
    # Nets of several depths line up by relative position (first block 0, last 1), not by index.
    relative = len(table) > 0 and table["depth"].nunique() > 1
    for name, (quantity, how, logy) in FIGURES.items():
        if quantity not in present:
            skipped[name] = _skip_reason(quantity, how, caps)
            continue
        d = table[table["quantity"] == quantity]
        if not np.isfinite(d["value"].to_numpy(np.float64)).any():
            skipped[name] = (
                f"every value of '{quantity}' is NaN or infinite: the captured layers had "
                "non-finite results (see each layer's nonfinite_samples in probe inspect)"
            )
            continue
        rel = relative and quantity not in _NOT_PER_BLOCK
        files += render(
            out,
            prefix + name,
            figures.plot_vs_layer,
            table,
            quantity,
            logy=logy,
            relative=rel,
            data=figures.with_relative_depth(d) if rel else d,
        )
    if "response_std_pooled" in present:
        d = table[table["quantity"].str.startswith(("response_std", "bn_gamma"))]
        files += render(out, prefix + "fig7_response_std", figures.plot_fig7, table, data=d)
        files += render(
            out,
            prefix + "fig7_response_std_channel",
            figures.plot_fig7,
            table,
            "response_std_channel",
            data=d,
        )
        if "bn_gamma_abs" in present:
            files += render(
                out, prefix + "fig7_bn_gamma", figures.plot_fig7, table, "bn_gamma_abs", data=d
            )
    else:
        skipped["fig7_response_std"] = (
            "no BatchNorm2d layers with probe 'channel' (capture e.g. --layers '**bn*')"
        )
    tags: set[str] = set()
    for cap in caps:
        layers, reps = capture_representations(cap)
        if len(layers) >= 2:
            mat = cka_matrix(reps)
            key = run_key(cap)
            tag = _cka_tag(key, tags)
            epoch = f" (epoch {key['checkpoint']})" if key["checkpoint"] >= 0 else ""
            files += render(
                out,
                f"{prefix}cka_{tag}",
                figures.plot_cka,
                mat,
                layers,
                f"{key['model']}{epoch}",
                data=pd.DataFrame(mat, index=layers, columns=layers).reset_index(),
            )
    spectra = slq_spectra(caps)
    if len(spectra):
        files += render(
            out, prefix + "jacobian_spectra", figures.plot_spectra, spectra, data=spectra
        )
    else:
        skipped["jacobian_spectra"] = "no 'jac_slq_nodes' (needs probe 'jacobian:slq_steps=10')"
    if not any(f.name.startswith(prefix + "cka_") for f in files):
        skipped["cka_matrix"] = (
            "no 'output' activations on two or more layers (needs probe 'activations')"
        )
    if histories is not None and len(histories) and "train_error" in histories:
        h = histories.dropna(subset=["train_error"])
        if len(h):
            files += render(out, prefix + "training_error", figures.plot_training, h, data=h)
        hb = (
            histories.dropna(subset=["batch_error"])
            if "batch_error" in histories
            else histories.iloc[0:0]
        )
        if len(hb):
            files += render(
                out,
                prefix + "training_batch_error",
                figures.plot_training,
                hb,
                "batch_error",
                data=hb,
            )
    else:
        skipped["training_curves"] = (
            "the runs' history.json files are not reachable from the capture provenance, or "
            "damaged (logged)"
        )
    if lesions is not None and len(lesions):
        files += render(out, prefix + "lesions", figures.plot_lesions, lesions, data=lesions)
    return files, skipped


def analyze(
    sources: Sequence[str | os.PathLike | CaptureReader],
    out_dir: str | os.PathLike,
    *,
    lesions: bool = True,
    device: str = "cpu",
    progress=None,
) -> AnalysisResult:
    """Compute every measure the captures allow, write figures and CSVs to ``out_dir``.

    When captures of several checkpoints of one run are given, models are labelled
    ``<model>@e<epoch>`` so that checkpoints are drawn apart, not pooled.

    Example:
        >>> res = analyze(["run.h5"], "figures/")  # doctest: +SKIP
        >>> res.skipped  # doctest: +SKIP
    """
    if not sources:
        raise ProbeError("No captures given to analyze.")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    caps = [_open(s) for s in sources]
    try:
        table = measure_table(caps)
        les = None
        skipped_lesions = ""
        if lesions:
            done, parts = set(), []
            for cap in caps:
                key = run_key(cap)
                ident = (key["model"], key["seed"], key["checkpoint"])
                if ident in done:
                    continue
                done.add(ident)
                ck = source_checkpoint(cap)
                if ck is None:  # a model given without a checkpoint: nothing to lesion
                    continue
                if progress:
                    epoch = "" if key["checkpoint"] < 0 else f" epoch {key['checkpoint']}"
                    progress(f"lesions {key['model']} seed {key['seed']}{epoch}")
                parts.append(checkpoint_lesions(ck, key, device=device))
            if parts:
                les = pd.concat(parts, ignore_index=True)
                table = pd.concat([table, les[COLUMNS]], ignore_index=True)
            else:
                skipped_lesions = "no checkpoint reachable from the capture provenance"
        else:
            skipped_lesions = "disabled (--no-lesions)"
        if len(table) and (table.groupby(["model", "seed"])["checkpoint"].nunique() > 1).any():
            table["model"] = table["model"] + "@e" + table["checkpoint"].astype(str)
            if les is not None:
                les["model"] = les["model"] + "@e" + les["checkpoint"].astype(str)
        files, skipped = write_figures(table, out, caps, load_histories(caps), les)
        if skipped_lesions:
            skipped["lesions"] = skipped_lesions
        with atomic_path(out / "measures.csv") as tmp:
            table.to_csv(tmp, index=False)
        files.append(out / "measures.csv")
        written = set(files)
        earlier = [p for p in stamped_figures(out) if p not in written]
        return AnalysisResult(table, files, skipped, earlier)
    finally:
        for cap, src in zip(caps, sources):
            if not isinstance(src, CaptureReader):
                cap.close()
