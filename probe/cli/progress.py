"""Progress bars for the CLI (tqdm, shown only on a terminal)."""

from __future__ import annotations

import sys
from collections.abc import Callable

from tqdm.auto import tqdm

__all__ = ["bar", "train_callback"]


def bar(total: int | None, desc: str, unit: str = "it") -> tqdm:
    return tqdm(
        total=total,
        desc=desc,
        unit=unit,
        disable=not sys.stderr.isatty(),
        leave=False,
        dynamic_ncols=True,
    )


def train_callback(desc: str) -> Callable[[str, dict], None]:
    """A trainer callback drawing one bar over all iterations with loss and error."""
    state: dict = {}

    def cb(event: str, info: dict) -> None:
        if event == "start":
            total = info["epochs"] * info["steps_per_epoch"]
            state["bar"] = bar(total, desc, unit="step")
            state["bar"].update(info["start_epoch"] * info["steps_per_epoch"])
            state["last"] = info["start_epoch"] * info["steps_per_epoch"]
        elif event == "step":
            b = state["bar"]
            b.update(info["iter"] - state["last"])
            state["last"] = info["iter"]
            b.set_postfix(
                epoch=info["epoch"], loss=f"{info['loss']:.3f}", err=f"{info['error']:.3f}"
            )
        elif event == "end":
            state["bar"].close()

    return cb
