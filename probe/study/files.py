"""The study's files: written atomically, reused only when whole (a damaged one is redone)."""

from __future__ import annotations

import logging
from pathlib import Path

import pandas as pd

from probe.errors import ProbeError
from probe.loading import capture_checkpoint
from probe.store.reader import open_capture
from probe.tempfiles import atomic_path

__all__ = ["write_text", "write_csv", "reusable_table", "valid_capture", "capture_once"]

log = logging.getLogger(__name__)


def write_text(path: Path, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def write_csv(path: Path, table: pd.DataFrame) -> None:
    with atomic_path(path) as tmp:
        table.to_csv(tmp, index=False)


def reusable_table(path: Path, columns: tuple[str, ...]) -> pd.DataFrame | None:
    """A table a previous run wrote, if it is whole (parses, has rows and ``columns``); else None,
    so the rerun recomputes it instead of trusting a damaged file."""
    if not path.is_file():
        return None
    try:
        t = pd.read_csv(path)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError, OSError):
        t = None
    if t is None or t.empty or not set(columns) <= set(t.columns):
        log.warning("recomputing %s: the stored table is empty or damaged", path)
        return None
    return t


def valid_capture(path: Path) -> bool:
    if not path.exists():
        return False
    try:
        open_capture(path).close()
        return True
    except ProbeError:
        path.unlink()
        return False


def capture_once(
    path: Path, checkpoint: Path, cfg, data, callback, text: str, **capture_kwargs
) -> None:
    """Capture ``checkpoint`` on the study's split into ``path`` unless a whole capture is there
    (a damaged one is redone); ``text`` is the progress stage shown while it runs."""
    if valid_capture(path):
        return
    callback("stage", {"text": text})
    capture_kwargs.setdefault("limit", cfg.capture_limit)
    capture_checkpoint(
        checkpoint,
        data,
        split=cfg.split,
        batch_size=cfg.batch_size,
        device=cfg.device,
        extra_provenance={"study": cfg.name},
        out=path,
        **capture_kwargs,
    ).close()
