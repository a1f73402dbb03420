"""Attach every command module's command to the `kdstore` group."""

from __future__ import annotations

from kdstore.cli import main
from kdstore.cli.label import label
from kdstore.cli.munge import munge_command
from kdstore.cli.quickstart import quickstart
from kdstore.cli.train import train

main.add_command(label)
main.add_command(train)
main.add_command(munge_command)
main.add_command(quickstart)

__all__ = ["main"]
