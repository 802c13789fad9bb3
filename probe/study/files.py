"""The study's files: written atomically, reused only when whole (a damaged one is redone) and
made with the settings the study asks for now (one made with others is redone).

A capture or a lesion table is keyed by everything its numbers depend on: the checkpoint's
weights (their sha256), the data, the split, the sample limit, the probes and their parameters,
the layers and the package version. A study run again into its directory after a change to any
of them -- a larger ``capture_limit``, another probe, a run trained anew -- captures again
instead of presenting the old numbers under the new settings.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
from collections.abc import Mapping
from pathlib import Path

import pandas as pd

from probe.errors import ProbeError
from probe.loading import capture_checkpoint
from probe.store.reader import open_capture
from probe.tempfiles import atomic_path

__all__ = [
    "write_text",
    "write_csv",
    "reusable_table",
    "settings_key",
    "stamped_table",
    "stamp_path",
    "write_stamped_csv",
    "valid_capture",
    "capture_key",
    "capture_done",
    "capture_once",
]

log = logging.getLogger(__name__)


def write_text(path: Path, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def write_csv(path: Path, table: pd.DataFrame) -> str:
    """``table`` to ``path``, whole or not at all; the sha256 of the bytes written (what
    :func:`write_stamped_csv` stamps the table with)."""
    raw = table.to_csv(index=False).encode()
    with atomic_path(path) as tmp:
        tmp.write_bytes(raw)
    return hashlib.sha256(raw).hexdigest()


def reusable_table(
    path: Path, columns: tuple[str, ...], sha256: str | None = None, *, warn: bool = True
) -> pd.DataFrame | None:
    """A table a previous run wrote, if it is whole (parses, has rows and ``columns``, and has
    the ``sha256`` digest when one is given); else None, so the rerun recomputes it instead of
    trusting a damaged file (logged unless ``warn`` is False)."""
    if not path.is_file():
        return None
    try:
        raw = path.read_bytes()
        damaged = sha256 is not None and hashlib.sha256(raw).hexdigest() != sha256
        t = None if damaged else pd.read_csv(io.BytesIO(raw))
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError, OSError):
        t = None
    if t is None or t.empty or not set(columns) <= set(t.columns):
        if warn:
            log.warning("recomputing %s: the stored table is empty or damaged", path)
        return None
    return t


def settings_key(checkpoint: Path, **settings: object) -> str:
    """sha256 of a checkpoint's weights (their tensors, :func:`probe.train.checkpoint.
    weights_sha256`), ``settings`` and the package version: what a study's capture or table of
    that checkpoint is reused under.

    Example:
        >>> import tempfile, pathlib
        >>> ck = pathlib.Path(tempfile.mkdtemp()) / "epoch-0001.json"
        >>> _ = ck.with_suffix(".safetensors").write_bytes(b"weights")
        >>> settings_key(ck, limit=64) == settings_key(ck, limit=64) != settings_key(ck, limit=128)
        True
    """
    import probe
    from probe.train.checkpoint import weights_sha256

    doc = {"weights_sha256": weights_sha256(checkpoint), "version": probe.__version__, **settings}
    return hashlib.sha256(json.dumps(doc, sort_keys=True, default=str).encode()).hexdigest()


def stamp_path(table: Path) -> Path:
    """Where :func:`write_stamped_csv` keeps the key of ``table``: ``<stem>.key.json`` beside
    it."""
    return table.with_name(table.stem + ".key.json")


def stamped_table(
    path: Path, columns: tuple[str, ...], key: str, *, warn: bool = True
) -> pd.DataFrame | None:
    """:func:`reusable_table`, and only if it was written under ``key`` and is the very table
    written then (:func:`write_stamped_csv`): a table of other settings is recomputed, which is
    logged unless ``warn`` is False (a planner asking whether the table is done: the
    recomputation logs it), and so is a table whose bytes changed since -- cut short at a row
    boundary, it would still parse, with rows missing."""
    try:
        stamp = json.loads(stamp_path(path).read_text())
        made_under, digest = stamp.get("key"), stamp.get("sha256")
    except (OSError, ValueError, AttributeError):
        made_under = digest = None
    if made_under != key:
        if warn and path.exists():
            log.warning("recomputing %s: it was made with other settings", path)
        return None
    if not isinstance(digest, str):  # stamped before stamps held the table's digest
        if warn:
            log.warning("recomputing %s: its stamp holds no checksum to check it by", path)
        return None
    return reusable_table(path, columns, sha256=digest, warn=warn)


def write_stamped_csv(path: Path, table: pd.DataFrame, key: str) -> None:
    """``table`` to ``path``, then its key and its digest beside it: a kill between the two
    leaves a table that :func:`stamped_table` does not reuse, and so does any change since."""
    digest = write_csv(path, table)
    write_text(stamp_path(path), json.dumps({"key": key, "sha256": digest}))


def valid_capture(path: Path, key: str | None = None, *, warn: bool = True) -> bool:
    """Whether ``path`` holds a whole capture, made under ``key`` when one is given
    (:func:`capture_key`); one of other settings is logged unless ``warn`` is False. A damaged
    one is deleted and logged whoever asks: it is deleted once, so it is said once."""
    if not path.exists():
        return False
    try:
        with open_capture(path) as cap:
            made_under = cap.provenance.get("study_capture_key")
    except ProbeError as e:
        log.warning("capturing %s again: it is damaged (%s)", path, e)
        path.unlink()
        return False
    if key is not None and made_under != key:
        if warn:
            log.warning("capturing %s again: it was made with other settings", path)
        return False
    return True


def capture_key(checkpoint: Path, cfg, data, capture_kwargs: Mapping[str, object]) -> str:
    """The :func:`settings_key` of a study's capture of ``checkpoint`` with ``capture_kwargs``
    (``limit``, ``layers``, ``probes``): the data, split and batch size come from ``cfg``. The
    device is left out: a capture on another device measures the same network."""
    layers = capture_kwargs.get("layers", "auto")
    return settings_key(
        checkpoint,
        dataset=data.name,
        train_limit=cfg.train_limit,
        split=cfg.split,
        batch_size=cfg.batch_size,
        limit=capture_kwargs.get("limit", cfg.capture_limit),
        layers=layers if isinstance(layers, str) else getattr(layers, "__qualname__", layers),
        probes=[p.config() for p in capture_kwargs.get("probes", ())],
    )


def capture_done(path: Path, checkpoint: Path, cfg, data, **capture_kwargs: object) -> bool:
    """Whether :func:`capture_once` with these arguments would keep what ``path`` holds; asked
    by planners, so without a warning: :func:`capture_once` logs the capture made again."""
    return valid_capture(path, capture_key(checkpoint, cfg, data, capture_kwargs), warn=False)


def capture_once(
    path: Path, checkpoint: Path, cfg, data, callback, text: str, **capture_kwargs
) -> None:
    """Capture ``checkpoint`` on the study's split into ``path`` unless a whole capture made with
    these settings is there (a damaged one, or one of other settings, is redone); ``text`` is the
    progress stage shown while it runs."""
    capture_kwargs.setdefault("limit", cfg.capture_limit)
    key = capture_key(checkpoint, cfg, data, capture_kwargs)
    if valid_capture(path, key):
        return
    callback("stage", {"text": text})
    capture_checkpoint(
        checkpoint,
        data,
        split=cfg.split,
        batch_size=cfg.batch_size,
        device=cfg.device,
        extra_provenance={"study": cfg.name, "study_capture_key": key},
        out=path,
        **capture_kwargs,
    ).close()
