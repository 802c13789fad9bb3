"""The conformance table of docs/probes.md: every torchvision classification model and the timm
families of probe.conformance.TIMM_MODELS, random weights (no constant parameter left), eval and
train mode.

    python -m benchmarks.conformance [--out table.md] [--only PATTERN]

Columns: sites found / true count (probe.conformance.KNOWN_SITES), the worst relative error of
act(F + S) against y in eval / train mode, the worst error of F and S against the operands of an
fx-traced copy of each block (eval), the probes that ran (residual + jacobian, eval), and hooks
left on the model afterwards. Needs torchvision and/or timm (see docs/install.md).
"""

from __future__ import annotations

import argparse
import contextlib
import fnmatch
import time
import warnings

import torch

from probe.conformance import build, catalogue, check_sites, expected_sites
from probe.errors import ProbeError


def row(spec: str) -> str:
    model, x = build(spec)
    true = expected_sites(model)
    try:
        ev = check_sites(
            model, x, name=spec, probes=("residual", "jacobian:n_probes=2,max_samples=1")
        )
        tr = check_sites(model, x, name=spec, mode="train")
    except ProbeError as e:
        if "No residual sites" not in str(e):
            raise
        return f"| {spec} | 0 / {true} | — | — | no additive residual (clear error) | 0 |"
    jac = "jacobian" if "jac_dev2" in ev.probes else "—"
    return (
        f"| {spec} | {ev.sites} / {true} | {ev.max_act_error:.0e} / {tr.max_act_error:.0e} | "
        f"{ev.max_fs_error:.0e} ({ev.fx_checked} sites) | residual, {jac} | "
        f"{ev.hooks_left + tr.hooks_left} |"
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=None, help="write the markdown table here too")
    ap.add_argument("--only", default="*", help="fnmatch pattern over specs")
    args = ap.parse_args()
    warnings.simplefilter("ignore")
    torch.set_num_threads(max(1, torch.get_num_threads()))
    lines = [
        "| model | sites found / true | act(F+S) vs y, eval / train | F, S vs fx operands | probes | hooks left |",
        "|---|---|---|---|---|---|",
    ]
    t0 = time.perf_counter()
    for spec in catalogue():
        if fnmatch.fnmatch(spec, args.only):
            lines.append(row(spec))
            print(lines[-1], flush=True)
    versions = [f"torch {torch.__version__}"]
    for pkg in ("torchvision", "timm"):
        with contextlib.suppress(ImportError):
            versions.append(f"{pkg} {__import__(pkg).__version__}")
    footer = f"\n{len(lines) - 2} models, {time.perf_counter() - t0:.0f} s ({', '.join(versions)})."
    print(footer)
    if args.out:
        with open(args.out, "w") as f:
            f.write("\n".join(lines) + "\n" + footer + "\n")


if __name__ == "__main__":
    main()
