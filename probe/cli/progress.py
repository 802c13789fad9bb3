"""Progress for the CLI: tqdm bars on a terminal, one plain line per finished unit otherwise.

A log file (a batch job, ``nohup``, CI) gets a line per training epoch and per finished capture,
so it shows where a run is without carriage-return noise. Under torchrun only rank 0 draws bars
and prints results (:func:`say`); the other ranks work silently.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable

import click
from tqdm.auto import tqdm

__all__ = ["bar", "train_callback", "say", "main_rank"]


def main_rank() -> bool:
    """Whether this process prints: the only process, or rank 0 of several."""
    from probe.distributed import ranks

    return ranks().is_main


def say(message: str = "", err: bool = False) -> None:
    """``click.echo`` on the printing rank only."""
    if main_rank():
        click.echo(message, err=err)


def _on_terminal() -> bool:
    return sys.stderr.isatty()


class _Lines:
    """The part of tqdm's interface the CLI uses, printing one line when the work is done."""

    def __init__(self, total: int | None, desc: str, unit: str) -> None:
        self.total, self.desc, self.unit, self.n = total, desc, unit, 0
        self.t0 = time.perf_counter()

    def update(self, k: int = 1) -> None:
        self.n += k

    def set_postfix(self, **kw: object) -> None:
        pass

    def close(self) -> None:
        # Only finished work gets its line: a run cut short by an error says so itself.
        if self.n and (self.total is None or self.n >= self.total):
            elapsed = time.perf_counter() - self.t0
            click.echo(f"{self.desc}: {self.n} {self.unit}s in {elapsed:.1f} s", err=True)


class _Silent:
    """A bar for a rank that does not print."""

    def update(self, k: int = 1) -> None:
        pass

    def set_postfix(self, **kw: object) -> None:
        pass

    def close(self) -> None:
        pass


def bar(
    total: int | None, desc: str, unit: str = "it", started: float | None = None
) -> tqdm | _Lines | _Silent:
    """A progress bar on a terminal, else one summary line at the end. ``started``
    (``time.perf_counter()``) backdates it to when the work began: callers that learn the
    total only after the first batch would otherwise time the rest alone."""
    if not main_rank():
        return _Silent()
    if not _on_terminal():
        lines = _Lines(total, desc, unit)
        if started is not None:
            lines.t0 = started
        return lines
    b = tqdm(total=total, desc=desc, unit=unit, leave=False, dynamic_ncols=True)
    if started is not None:  # tqdm's clock is time.time
        b.start_t = b.last_print_t = time.time() - (time.perf_counter() - started)
    return b


def train_callback(desc: str) -> Callable[[str, dict], None]:
    """A trainer callback: one bar over all iterations with loss and error on a terminal, else
    one line per epoch."""
    state: dict = {}
    terminal = _on_terminal()

    def cb(event: str, info: dict) -> None:
        if not main_rank():
            return
        if event == "start":
            state["epochs"] = info["epochs"]
            if not terminal:
                return
            total = info["epochs"] * info["steps_per_epoch"]
            state["bar"] = bar(total, desc, unit="step")
            state["bar"].update(info["start_epoch"] * info["steps_per_epoch"])
            state["last"] = info["start_epoch"] * info["steps_per_epoch"]
        elif event == "step" and terminal:
            b = state["bar"]
            b.update(info["iter"] - state["last"])
            state["last"] = info["iter"]
            b.set_postfix(
                epoch=info["epoch"], loss=f"{info['loss']:.3f}", err=f"{info['error']:.3f}"
            )
        elif event == "epoch" and not terminal:
            parts = [f"{desc}: epoch {info['epoch']}/{state.get('epochs', '?')}"]
            if "batch_loss" in info:
                parts.append(f"batch loss {info['batch_loss']:.4f}")
            if "train_error" in info:
                parts.append(f"train error {100 * info['train_error']:.2f}%")
            parts.append(f"{info.get('seconds', 0.0):.1f} s")
            click.echo(", ".join(parts), err=True)
        elif event == "end" and terminal and "bar" in state:
            state["bar"].close()

    return cb
