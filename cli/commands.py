"""Attach every command module's command to the `kdstore` group."""

from __future__ import annotations

from kdstore.cli import main
from kdstore.cli.label import label

main.add_command(label)

__all__ = ["main"]
