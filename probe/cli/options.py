"""Parsing helpers shared by CLI commands: KEY=VALUE overrides with typed values."""

from __future__ import annotations

import json

import click

__all__ = ["parse_overrides"]


def parse_overrides(items: tuple[str, ...], what: str) -> dict:
    """['epochs=3', 'lr=0.1', 'shortcut=B'] -> {'epochs': 3, 'lr': 0.1, 'shortcut': 'B'}."""
    out = {}
    for item in items:
        if "=" not in item:
            raise click.BadParameter(f"{item!r} is not KEY=VALUE (e.g. epochs=5).", param_hint=what)
        key, value = item.split("=", 1)
        try:
            out[key.strip()] = json.loads(value)
        except json.JSONDecodeError:
            out[key.strip()] = value
    return out
