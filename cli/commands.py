"""Attach every command module's command to the `kdstore` group."""

from __future__ import annotations

from kdstore.cli import main
from kdstore.cli.convert import convert
from kdstore.cli.diff import diff
from kdstore.cli.inspect import inspect
from kdstore.cli.label import label
from kdstore.cli.ls import ls
from kdstore.cli.munge import munge_command
from kdstore.cli.prune import prune
from kdstore.cli.push import push
from kdstore.cli.quickstart import quickstart
from kdstore.cli.train import train
from kdstore.cli.verify import verify

main.add_command(label)
main.add_command(train)
main.add_command(munge_command)
main.add_command(quickstart)
main.add_command(ls)
main.add_command(inspect)
main.add_command(verify)
main.add_command(convert)
main.add_command(diff)
main.add_command(push)
main.add_command(prune)

__all__ = ["main"]
