"""``probe analyze`` (filled in by the analyses package)."""

from __future__ import annotations

COMMANDS: list = []
