"""The study report: a self-contained HTML page (figures embedded) and a Markdown summary."""

from __future__ import annotations

import base64
import html
import json
from pathlib import Path

import pandas as pd

from analyses.pipeline import figure_caption
from analyses.stats import RATE, seed_ci
from probe.provenance import code_revision, command_line, library_versions
from probe.runtime import runtime_settings
from probe.study.interventions.arms import ARMS
from probe.study.interventions.runner import InterventionData
from probe.study.presets import StudyConfig
from probe.study.verdicts import Verdict
from probe.tempfiles import atomic_path

__all__ = ["write_report"]

_CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;color:#222}
h1{font-size:1.6em}h2{border-bottom:1px solid #ddd;padding-bottom:.2em;margin-top:2em}
table{border-collapse:collapse;margin:.5em 0}td,th{border:1px solid #ccc;padding:.25em .6em;text-align:right}
th{background:#f4f4f4}.verdict{border:1px solid #ccc;border-radius:6px;padding:.6em 1em;margin:1em 0}
.tag{display:inline-block;padding:.1em .6em;border-radius:1em;font-weight:600;font-size:.9em}
.supported,.present{background:#d7f5dd;color:#145a22}.not-supported,.absent{background:#fbe0e0;color:#7a1414}
.inconclusive{background:#fff3cd;color:#6b5200}.SGD-leaves-it,.SGD-stays-at-it,.SGD-improves-on-it{background:#e3e8f7;color:#1d3570}.rule{color:#555;font-size:.9em}
figure{display:inline-block;margin:.5em;max-width:48%;vertical-align:top}figure img{max-width:100%}
figcaption{font-size:.85em;color:#555}.file{color:#999}pre{background:#f7f7f7;padding:.6em;overflow-x:auto;font-size:.8em}
"""

_SCRIPT = """
window.addEventListener('load', function () {
  var imgs = Array.prototype.slice.call(document.images);
  document.body.setAttribute('data-images-total', imgs.length);
  document.body.setAttribute('data-images-loaded', imgs.filter(function (i) { return i.complete && i.naturalWidth > 0; }).length);
});
"""


def _img(path: Path) -> str:
    data = base64.b64encode(path.read_bytes()).decode()
    return (
        f'<figure><img alt="{html.escape(path.stem)}" src="data:image/png;base64,{data}">'
        f"<figcaption>{html.escape(figure_caption(path.stem))} "
        f"<span class='file'>({html.escape(path.name)})</span></figcaption></figure>"
    )


def _pct(x: float) -> str:
    return "" if pd.isna(x) else f"{100 * x:.2f}%"


def _published(r) -> str:
    """The published test error of a degradation-table row, with its source, or ''."""
    return f"{r.published_test_error:.2f}% ({r.published_source})" if r.published_source else ""


def _interval(r, col: str) -> str:
    """'mean [low, high]' of an error column (the across-seed interval), or just the mean."""
    lo, hi = getattr(r, f"{col}_low", float("nan")), getattr(r, f"{col}_high", float("nan"))
    mean = _pct(getattr(r, col))
    return mean if pd.isna(lo) else f"{mean} [{_pct(lo)}, {_pct(hi)}]"


def _degradation_html(deg: pd.DataFrame) -> str:
    published = [_published(r) for r in deg.itertuples()]
    extra = "<th>published test error</th>" if any(published) else ""
    rows = "".join(
        f"<tr><td style='text-align:left'>{html.escape(r.family)}</td><td>{r.depth}</td><td>{r.seeds}</td>"
        f"<td>{_interval(r, 'train_error')}</td><td>{r.train_loss:.4f}</td>"
        f"<td>{_interval(r, 'test_error')}</td><td>{r.wall_s:.1f}</td>"
        + (f"<td>{html.escape(p) or '–'}</td>" if extra else "")
        + "</tr>"
        for r, p in zip(deg.itertuples(), published)
    )
    return (
        "<table><tr><th>architecture</th><th>depth</th><th>seeds (n)</th>"
        "<th>train error, mean [95% interval]</th><th>train loss</th>"
        "<th>test error, mean [95% interval]</th><th>train s/run</th>"
        + extra
        + "</tr>"
        + rows
        + "</table>"
    )


def _arm_rows(arm: str, arms: InterventionData) -> list[tuple[str, str, str, str]]:
    """(run, n, final train error mean ± sd [95% interval], final test error) per condition."""
    t = arms.conditions[arms.conditions["arm"] == arm]
    rows = []
    for label, g in t.groupby("label", sort=False):
        tr, te = (g[c].to_numpy(float) for c in ("final_train_error", "final_test_error"))
        m, lo, hi = seed_ci(tr, bounds=RATE)
        ci = "" if pd.isna(lo) else f" [{_pct(lo)}, {_pct(hi)}]"
        sd = f" ± {_pct(tr.std(ddof=1))}" if len(tr) > 1 else ""
        rows.append((label, str(len(tr)), f"{_pct(m)}{sd}{ci}", _pct(te.mean())))
    return rows


def _arm_html(v: Verdict, arms: InterventionData, figures: list[Path]) -> str:
    arm = ARMS[v.arm]
    head = (
        f"<div class='verdict' id='arm-{v.arm}'><h3>{html.escape(arm.title)} "
        f"<span class='tag {_slug(v.verdict)}'>{html.escape(v.verdict)}</span></h3>"
        f"<p><b>Question.</b> {html.escape(arm.question)}<br><b>Manipulation.</b> "
        f"{html.escape(arm.manipulation)}<br><b>Reference.</b> {html.escape(arm.reference)}</p>"
    )
    rows = _arm_rows(v.arm, arms)
    table = (
        "<table><tr><th>run</th><th>seeds (n)</th><th>final train error, mean ± sd [95% interval]</th>"
        "<th>final test error</th></tr>"
        + "".join(
            f"<tr><td style='text-align:left'>{html.escape(a)}</td><td>{b}</td><td>{c}</td><td>{d}</td></tr>"
            for a, b, c, d in rows
        )
        + "</table>"
        if rows
        else ""
    )
    ev = "".join(
        f"<tr><td style='text-align:left'>{html.escape(k)}</td><td>{html.escape(val)}</td></tr>"
        for k, val in v.evidence.items()
    )
    return (
        head
        + table
        + f"<p class='rule'>Rule: {html.escape(v.rule)}</p><table>{ev}</table>"
        + "".join(_img(f) for f in figures)
        + "</div>"
    )


def _arm_markdown(arm_verdicts: list[Verdict], arms: InterventionData) -> list[str]:
    md = [
        "| experiment | run | n | final train error, mean ± sd [95% interval] | final test error | verdict |",
        "|---|---|---:|---|---|---|",
    ]
    for v in arm_verdicts:
        for i, (label, n, tr, te) in enumerate(_arm_rows(v.arm, arms) or [("–", "", "", "")]):
            md.append(
                f"| {ARMS[v.arm].title if i == 0 else ''} | {label} | {n} | {tr} | {te} | "
                f"{'**' + v.verdict + '**' if i == 0 else ''} |"
            )
    return md + ["", *_verdict_table(arm_verdicts, "experiment", lambda v: ARMS[v.arm].title)]


def _verdict_table(verdicts: list[Verdict], what: str, title) -> list[str]:
    """Markdown rows: title, verdict, evidence and rule of each verdict."""
    md = [f"| {what} | verdict | evidence | rule |", "|---|---|---|---|"]
    for v in verdicts:
        ev = "; ".join(f"{k}: {val}" for k, val in v.evidence.items())
        md.append(f"| {title(v)} | **{v.verdict}** | {ev} | {v.rule} |")
    return md


def _slug(v: str) -> str:
    return v.replace(" ", "-")


def write_report(
    out: Path,
    cfg: StudyConfig,
    runs: pd.DataFrame,
    deg: pd.DataFrame,
    verdicts: list[Verdict],
    figdir: Path,
    skipped: dict[str, str],
    timings: dict[str, float],
    arm_verdicts: list[Verdict] | None = None,
    arms: InterventionData | None = None,
) -> tuple[Path, Path]:
    """Write ``report.html`` and ``summary.md`` into ``out``; returns both paths."""
    arm_verdicts = arm_verdicts or []
    pngs = {p.stem: p for p in sorted(figdir.glob("*.png"))}
    used: set[str] = set()
    parts = [
        f"<h1>Why does the deeper plain network train worse? — study '{html.escape(cfg.name)}'</h1>",
        f"<p>Dataset <b>{html.escape(cfg.dataset)}</b>, recipe <b>{html.escape(cfg.recipe)}</b>, depths "
        f"{', '.join(map(str, cfg.depths))}, seeds {', '.join(map(str, cfg.seeds))}; probes on the {cfg.split} split at "
        f"epochs {', '.join(map(str, cfg.capture_at))}. Wall time {timings.get('total', 0):.0f} s.</p>",
        "<h2>Degradation table</h2>",
        _degradation_html(deg),
    ]
    for name in ("degradation_vs_depth", "final_training_error"):
        if name in pngs:
            parts.append(_img(pngs[name]))
            used.add(name)
    parts.append("<h2>Explanations and verdicts</h2>")
    for v in verdicts:
        ev = "".join(
            f"<tr><td style='text-align:left'>{html.escape(k)}</td><td>{html.escape(val)}</td></tr>"
            for k, val in v.evidence.items()
        )
        figs = [n for n in v.figures if n in pngs]
        used.update(figs)
        tested = ", ".join(
            f"<a href='#arm-{a}'>{html.escape(ARMS[a].title)}</a>" for a in v.tested_by
        )
        parts.append(
            f"<div class='verdict'><h3>{html.escape(v.explanation)} <span class='tag {_slug(v.verdict)}'>"
            f"{html.escape(v.verdict)}</span></h3><p class='rule'>Rule: {html.escape(v.rule)}</p>"
            + (f"<p>Tested by intervention: {tested}</p>" if tested else "")
            + f"<table>{ev}</table>{''.join(_img(pngs[n]) for n in figs)}</div>"
        )
    if arm_verdicts and arms is not None:
        parts.append(
            "<h2>Interventions</h2><p>Each experiment changes one thing and watches the training "
            "error; the verdicts above only say whether measures line up with an explanation.</p>"
        )
        for v in arm_verdicts:
            figs = [n for n in v.figures if n in pngs]
            used.update(figs)
            parts.append(_arm_html(v, arms, [pngs[n] for n in figs]))
    rest = [n for n in pngs if n not in used]
    parts.append("<h2>All other figures</h2>" + "".join(_img(pngs[n]) for n in rest))
    if skipped:
        parts.append(
            "<h2>Measures skipped</h2><ul>"
            + "".join(f"<li>{html.escape(k)}: {html.escape(v)}</li>" for k, v in skipped.items())
            + "</ul>"
        )
    prov = {
        "config": cfg.to_dict(),
        "versions": library_versions(),
        "revision": code_revision(),
        "command": command_line(),
        "runtime": runtime_settings(),
        "timings_s": {k: round(v, 1) for k, v in timings.items()},
    }
    parts.append(
        "<h2>Provenance</h2><pre>" + html.escape(json.dumps(prov, indent=2, default=str)) + "</pre>"
    )
    page = (
        f"<!doctype html><html><head><meta charset='utf-8'><title>resprobe study {html.escape(cfg.name)}</title>"
        f"<style>{_CSS}</style><script>{_SCRIPT}</script></head><body>{''.join(parts)}</body></html>"
    )
    report = out / "report.html"
    with atomic_path(report) as tmp:
        tmp.write_text(page)

    md = [
        f"# Degradation study '{cfg.name}'",
        "",
        f"Dataset {cfg.dataset}, recipe {cfg.recipe}, depths {list(cfg.depths)}, seeds {list(cfg.seeds)}; "
        f"wall time {timings.get('total', 0):.0f} s. Full report: report.html.",
        "",
        "| architecture | depth | seeds (n) | train error [95% interval] | test error [95% interval] | published test error |",
        "|---|---:|---:|---:|---:|---|",
    ]
    for r in deg.itertuples():
        md.append(
            f"| {r.family} | {r.depth} | {r.seeds} | {_interval(r, 'train_error')} | "
            f"{_interval(r, 'test_error')} | {_published(r) or '–'} |"
        )
    md += ["", *_verdict_table(verdicts, "explanation", lambda v: v.explanation)]
    if arm_verdicts and arms is not None:
        md += ["", "## Interventions", "", *_arm_markdown(arm_verdicts, arms)]
    summary = out / "summary.md"
    with atomic_path(summary) as tmp:
        tmp.write_text("\n".join(md) + "\n")
    return report, summary
