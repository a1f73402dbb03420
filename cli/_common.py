"""Shared CLI plumbing: turn library errors into one-line click errors."""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any, TypeVar

import click

from kdstore.errors import KdstoreError

F = TypeVar("F", bound=Callable[..., Any])


def user_errors(fn: F) -> F:
    """Run a command body, turning KdstoreError into a ClickException (exit 1, no traceback)."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except KdstoreError as e:
            raise click.ClickException(str(e)) from e
        except KeyboardInterrupt:
            raise click.ClickException(
                "interrupted; completed work is kept, rerun the same command to resume"
            ) from None

    return wrapper  # type: ignore[return-value]


def _parse_list(option: str, text: str, kind: type, what: str, example: str) -> list[Any]:
    try:
        values = [kind(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise click.BadParameter(f"{text!r} is not a comma-separated list of {what}, e.g. {example}",
                                 param_hint=option) from None
    if not values:
        raise click.BadParameter("needs at least one value", param_hint=option)
    return values


def parse_float_list(option: str, text: str) -> list[float]:
    """Parse '1,2,5' into floats, naming the option on error."""
    return _parse_list(option, text, float, "numbers", "1,2,5")


def parse_int_list(option: str, text: str) -> list[int]:
    """Parse '0,1,2' into ints, naming the option on error."""
    return _parse_list(option, text, int, "integers", "0,1,2")


def progress_bar(total: int, desc: str, unit: str, disable: bool = False) -> Any:
    """A tqdm bar on stderr; silent when stderr is not a terminal or `disable`."""
    import sys

    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit=unit, unit_scale=True, leave=False, dynamic_ncols=True,
                disable=disable or not sys.stderr.isatty())


def parse_shard(text: str | None) -> tuple[int, int]:
    """'--shard I/N', else torchrun's RANK/WORLD_SIZE, else (0, 1)."""
    import os

    if text is None:
        world = int(os.environ.get("WORLD_SIZE", "1") or 1)
        return (int(os.environ.get("RANK", "0") or 0), world) if world > 1 else (0, 1)
    try:
        i, n = (int(v) for v in text.split("/"))
    except ValueError:
        raise click.BadParameter(f"{text!r} is not I/N, e.g. 0/4", param_hint="--shard") from None
    if n < 1 or not 0 <= i < n:
        raise click.BadParameter(f"{text}: need 0 <= I < N", param_hint="--shard")
    return i, n
