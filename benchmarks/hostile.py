"""Hostile-user battery: damaged captures, checkpoints and run directories, and fuzzed CLI calls,
each classified by what the CLI did with it.

    python -m benchmarks.hostile [--flips 40] [--fuzz 80] [--seed 0]

Columns: tried / clean error (exit 1 or 2, one line, no traceback) / traceback / accepted
wrongly (exit 0 on an input whose content was damaged) / unresumable (a killed or damaged run
that no rerun can finish). A byte flip that leaves every attribute and dataset as it was (free
space, padding) is "accepted rightly" and counted apart. A fuzzed call still working after
FUZZ_LIMIT_S (a valid value asking for endless work) is stopped and counted as "still running".
Runs in-process (click's CliRunner).
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import signal
import tempfile
import warnings
from collections import Counter
from pathlib import Path
from types import SimpleNamespace

import h5py
import numpy as np
from click.testing import CliRunner

from probe.cli.main import cli

TINY = ["--model", "resnet8", "--epochs", "1", "--opt", "width=4", "--set", "batch_size=512"]


class StillRunning(BaseException):
    """A fuzzed call that took a valid value and went on working (``--epochs 1000000000000``)."""


def _stop(signum: int, frame: object) -> None:
    raise StillRunning


def invoke(args: list[str], limit_s: int = 0):
    """The CLI called in-process; stopped after ``limit_s`` seconds (0: no limit)."""
    previous = signal.signal(signal.SIGALRM, _stop) if limit_s else None
    signal.alarm(limit_s)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return CliRunner().invoke(cli, [str(a) for a in args])
    except StillRunning as e:  # not an Exception: through the CLI's handlers and CliRunner's
        return SimpleNamespace(output="", exit_code=-1, exception=e)
    finally:
        signal.alarm(0)
        if previous is not None:
            signal.signal(signal.SIGALRM, previous)


def outcome(res, damaged: bool) -> str:
    text = res.output or ""
    if isinstance(res.exception, StillRunning):
        return "still running (stopped)"
    crashed = res.exception is not None and not isinstance(res.exception, SystemExit)
    if crashed or "Traceback" in text:
        return "traceback"
    if res.exit_code == 0:
        return "accepted wrongly" if damaged else "accepted rightly"
    if res.exit_code in (1, 2) and text.strip():
        return "clean error"
    return "traceback"


def h5_content(path: Path) -> object:
    """Everything h5py reads from a file (attributes and data), or None if it cannot be read."""
    try:
        out = {}
        with h5py.File(path, "r") as f:
            out["/"] = {k: repr(v) for k, v in f.attrs.items()}

            def visit(name, obj):
                out[name] = {k: repr(v) for k, v in obj.attrs.items() if k != "DIMENSION_LIST"}
                if isinstance(obj, h5py.Dataset):
                    out[name + "#data"] = obj[()].tobytes()

            f.visititems(visit)
        return out
    except Exception:
        return None


def capture_cases(work: Path, capture: Path, flips: int, rng: random.Random) -> list[tuple]:
    rows = []
    original = h5_content(capture)
    assert invoke(["analyze", capture, "--out", work / "an-base", "--no-lesions"]).exit_code == 0
    baseline = (work / "an-base" / "measures.csv").read_text()
    size = capture.stat().st_size
    for i in range(flips):
        path = work / f"flip{i}.h5"
        shutil.copy(capture, path)
        data = bytearray(path.read_bytes())
        offset = rng.randrange(size)
        data[offset] ^= 1 << rng.randrange(8)
        path.write_bytes(bytes(data))
        damaged = h5_content(path) != original
        rows.append(
            (
                "capture bit flip",
                "inspect --verify",
                outcome(invoke(["inspect", "--verify", path]), damaged),
            )
        )
        an = work / f"an{i}"
        kind = outcome(invoke(["analyze", path, "--out", an, "--no-lesions"]), damaged)
        if kind == "accepted wrongly" and (an / "measures.csv").read_text() == baseline:
            kind = "accepted, numbers right"  # the flip hit text the measures do not use
        rows.append(("capture bit flip", "analyze", kind))
    edits = {
        "complete=string": lambda f: f.attrs.__setitem__("complete", "False"),
        "complete=False": lambda f: f.attrs.__setitem__("complete", False),
        "no layers": lambda f: f.__delitem__("layers"),
        "no sample_index": lambda f: f.__delitem__("sample_index"),
        "labels short": lambda f: (
            f.__delitem__("labels"),
            f.create_dataset("labels", data=np.zeros(2, "i8")),
        ),
        "config not JSON": lambda f: f.attrs.__setitem__("config", "{"),
        "provenance list": lambda f: f.attrs.__setitem__("provenance", "[]"),
        "n_samples float": lambda f: f.attrs.__setitem__("n_samples", 3.0),
        "n_samples 1e12": lambda f: f.attrs.__setitem__("n_samples", 10**12),
        "format other": lambda f: f.attrs.__setitem__("format", "x"),
        "version 2": lambda f: f.attrs.__setitem__("format_version", "2.0.0"),
        "layer attr type": lambda f: f[f"layers/{next(iter(f['layers']))}"].attrs.__setitem__(
            "residual", "yes"
        ),
        "string data": lambda f: _replace_first(f, np.array([b"x"] * 3)),
        "extra rows": lambda f: _replace_first(f, np.zeros(10**4, "f4")),
        "only root attrs": lambda f: [f.__delitem__(k) for k in list(f.keys())],
    }
    for name, edit in edits.items():
        path = work / f"edit-{name.replace(' ', '_')}.h5"
        shutil.copy(capture, path)
        with h5py.File(path, "r+") as f:
            edit(f)
        for cmd in (
            ["inspect", path],
            ["analyze", path, "--out", work / f"ae-{name}", "--no-lesions"],
        ):
            rows.append(("capture edit", cmd[0], outcome(invoke(cmd), True)))
    fifo = work / "fifo.h5"
    import os

    os.mkfifo(fifo)
    rows.append(("capture FIFO", "inspect", outcome(invoke(["inspect", fifo]), True)))
    return rows


def _replace_first(f, data):
    layer = next(iter(f["layers"]))
    q = next(iter(f[f"layers/{layer}"]))
    del f[f"layers/{layer}/{q}"]
    f.create_dataset(f"layers/{layer}/{q}", data=data)


def _same_capture(a: Path, b: Path) -> bool:
    ca, cb = h5_content(a), h5_content(b)
    if ca is None or cb is None:
        return False
    data = lambda c: {k: v for k, v in c.items() if k.endswith("#data")}  # noqa: E731
    return data(ca) == data(cb)


def checkpoint_outcome(res, out: Path, reference: Path) -> str:
    kind = outcome(res, True)
    if kind == "accepted wrongly" and _same_capture(out, reference):
        return "recovered (right numbers)"  # e.g. a damaged JSON rebuilt from the weights header
    return kind


def checkpoint_cases(work: Path, run: Path, rng: random.Random) -> list[tuple]:
    rows = []
    reference = work / "ck-reference.h5"
    assert invoke(["capture", run, "--limit", "8", "--out", reference]).exit_code == 0
    js = sorted((run / "checkpoints").glob("epoch-*.json"))[-1]
    st = js.with_suffix(".safetensors")
    meta = json.loads(js.read_text())
    edits = {
        "json []": "[]",
        "json null": "null",
        "json string": '"x"',
        "json truncated": js.read_text()[: len(js.read_text()) // 2],
        "residual flipped": json.dumps(
            {**meta, "model": {**meta["model"], "residual": not meta["model"]["residual"]}}
        ),
        "depth float": json.dumps({**meta, "model": {**meta["model"], "depth": 8.5}}),
        "depth string": json.dumps({**meta, "model": {**meta["model"], "depth": "8"}}),
        "width negative": json.dumps({**meta, "model": {**meta["model"], "width": -4}}),
    }
    for name, text in edits.items():
        d = work / f"ck-{name.replace(' ', '_')}"
        shutil.copytree(run, d)
        (d / "checkpoints" / js.name).write_text(text)
        res = invoke(["capture", d, "--limit", "8", "--out", d / "c.h5"])
        rows.append(("checkpoint edit", name, checkpoint_outcome(res, d / "c.h5", reference)))
    for i in range(10):
        d = work / f"ckflip{i}"
        shutil.copytree(run, d)
        target = d / "checkpoints" / st.name
        data = bytearray(target.read_bytes())
        data[rng.randrange(len(data))] ^= 0xFF
        target.write_bytes(bytes(data))
        res = invoke(["capture", d, "--limit", "8", "--out", d / "c.h5"])
        rows.append(
            ("checkpoint bit flip", "capture", checkpoint_outcome(res, d / "c.h5", reference))
        )
    for name, damage in {
        "history empty": lambda d: (d / "history.json").write_text(""),
        "history list of junk": lambda d: (d / "history.json").write_text("[1, 2]"),
        "resume json null": lambda d: (d / "resume.json").write_text("null"),
        "resume epoch 99": lambda d: (d / "resume.json").write_text(
            json.dumps({**json.loads((d / "resume.json").read_text()), "epoch": 99})
        ),
        "resume weights truncated": lambda d: (d / "resume.safetensors").write_bytes(
            (d / "resume.safetensors").read_bytes()[:100]
        ),
        "checkpoints dir removed": lambda d: shutil.rmtree(d / "checkpoints"),
    }.items():
        d = work / f"run-{name.replace(' ', '_')}"
        shutil.copytree(run, d)
        if (d / "resume.json").exists() or "resume" not in name:
            damage(d)
        res = invoke(["train", *TINY, "--epochs", "2", "--out", d])
        kind = outcome(res, True)
        if kind == "clean error":  # a clean refusal must not be permanent for a recoverable run
            again = invoke(["train", *TINY, "--epochs", "2", "--out", d])
            kind = "clean error" if again.exit_code != 0 else "clean error (then resumed)"
        rows.append(("run dir damage", "train", kind))
    return rows


BAD_VALUES = {
    "--device": ["=", "mps", "cuda:99", "tpu", ""],
    "--seed": ["-1", str(2**70), "x", "1.5"],
    "--epochs": ["0", "-3", "x", str(10**12)],
    "--limit": ["0", "-1", "abc"],
    "--batch-size": ["0", "-8", "1e3"],
    "--data": ["nope", "/nonexistent/x.tar.gz", "synthetic"],
    "--probe": ["nope", "jacobian:n_probes=0", "jacobian:n_probes=x", "residual:foo=1", ":"],
    "--layers": ["nomatch.*", "re:(", ""],
    "--out": ["/proc/x.h5", "/nonexistent/dir/x.h5", "/dev/null/x.h5"],
    "--threads": ["0", "-2", "many"],
    "--input-size": ["0,0,0", "3,64", "a,b,c"],
    "--model": ["torchvision:nope", "x.py:f", ":", "zoo:resnet9", "zoo:resnet50"],
}


FUZZ_LIMIT_S = 60  # the slowest refused or finished fuzzed call takes a few seconds


def fuzz_cases(work: Path, run: Path, capture: Path, n: int, rng: random.Random) -> list[tuple]:
    rows = []
    bases = {
        "train": ["train", *TINY, "--out", work / "fz-run"],
        "capture": ["capture", run, "--limit", "8", "--out", work / "fz.h5"],
        "capture --model": [
            "capture",
            "--model",
            "zoo:resnet8",
            "--model-arg",
            "in_channels=1",
            "--data",
            "digits",
            "--limit",
            "8",
            "--out",
            work / "fzm.h5",
        ],
        "analyze": ["analyze", capture, "--out", work / "fz-an", "--no-lesions"],
        "inspect": ["inspect", capture],
    }
    for _ in range(n):
        command = rng.choice(list(bases))
        option = rng.choice(list(BAD_VALUES))
        value = rng.choice(BAD_VALUES[option])
        args = list(bases[command])
        if option == "--threads":
            args = ["--threads", value] + args
        elif option in args:
            args[args.index(option) + 1] = value
        else:
            args += [option, value]
        # a valid value may ask for days of work (10**12 epochs): stopped, counted apart
        res = invoke(args, limit_s=FUZZ_LIMIT_S)
        kind = outcome(res, False)
        if kind == "accepted rightly":  # an option the command ignores or a value it may take
            kind = "accepted (valid)"
        rows.append(("fuzzed CLI", f"{command} {option}={value!r}", kind))
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--flips", type=int, default=40)
    ap.add_argument("--fuzz", type=int, default=80)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    rng = random.Random(args.seed)
    work = Path(tempfile.mkdtemp(prefix="hostile-"))
    run = work / "run"
    assert invoke(["train", *TINY, "--save-at", "0,last", "--out", run]).exit_code == 0
    capture = work / "c.h5"
    assert invoke(["capture", run, "--limit", "64", "--probe", "residual", "--probe", "activations",
                   "--out", capture]).exit_code == 0  # fmt: skip
    rows = capture_cases(work, capture, args.flips, rng)
    rows += checkpoint_cases(work, run, rng)
    rows += fuzz_cases(work, run, capture, args.fuzz, rng)
    cols = ["clean error", "traceback", "accepted wrongly", "unresumable"]
    groups = list(dict.fromkeys(g for g, _, _ in rows))
    print(
        "| experiment | tried | clean error | traceback | accepted wrongly | unresumable | other |"
    )
    print("|---|---|---|---|---|---|---|")
    for g in groups:
        kinds = Counter(k for gg, _, k in rows if gg == g)
        clean = sum(v for k, v in kinds.items() if k.startswith("clean error"))
        other = ", ".join(
            f"{v} {k}"
            for k, v in kinds.items()
            if not k.startswith("clean error") and k not in cols
        )
        print(
            f"| {g} | {sum(kinds.values())} | {clean} | {kinds[cols[1]]} | {kinds[cols[2]]} | {kinds[cols[3]]} | {other} |"
        )
    bad = [r for r in rows if r[2] in cols[1:]]
    for r in bad:
        print("  !", r)
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
