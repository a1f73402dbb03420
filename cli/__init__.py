"""The `kdstore` command line: a thin click layer over the library."""

from __future__ import annotations

import sys
from typing import Any

import click

from kdstore import __version__


class _Group(click.Group):
    """The command group; under torchrun a finished command leaves through `kdstore.distributed.exit_process`."""

    def main(self, *args: Any, **kwargs: Any) -> Any:
        try:
            return super().main(*args, **kwargs)
        except SystemExit as e:
            if "torch.distributed" in sys.modules:  # never imports torch for a command that did not
                from kdstore import distributed

                distributed.exit_process(e.code)
            raise


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(__version__, prog_name="kdstore")
def main() -> None:
    """kdstore: run teachers once, store their targets, distill students at any temperature.

    \b
    Typical use:
      kdstore label --teacher teacher.pt --transfer train.parquet --out ./targets --name mnist-t1
      kdstore train --targets ./targets/mnist-t1 --student mlp:784-800-800-10 --loss kd -T 1,5,20
      kdstore quickstart      # the whole pipeline on the embedded digits dataset
    """


def _register() -> None:
    # Each command lives in its own module; importing them here keeps `main` the one entry point.
    from kdstore.cli import commands  # noqa: F401


_register()
