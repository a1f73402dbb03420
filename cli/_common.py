"""Shared CLI plumbing: library errors as one-line click errors that name options; comma-list parameters."""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any, TypeVar

import click

from kdstore.errors import KdstoreError

F = TypeVar("F", bound=Callable[..., Any])


def option_names(command: click.Command, aliases: dict[str, str] | None = None) -> dict[str, str]:
    """How the library's argument names read on this command's line: ``top_k`` -> ``--top-k``.

    A config field is found as the parameter of the same name, else of its singular or plural (``temperatures``
    -> ``--temperature``), else ``NAME_path`` (``eval`` -> ``--eval``); `aliases` settle the rest.
    """
    names: dict[str, str] = {}
    for p in command.params:
        if not p.name:
            continue
        if isinstance(p, click.Option):
            names[p.name] = next((o for o in p.opts if o.startswith("--")), p.opts[0])
        else:
            names[p.name] = p.human_readable_name
    for name in list(names):
        if name.endswith("_path"):
            names.setdefault(name[: -len("_path")], names[name])
    for name, shown in list(names.items()):
        names.setdefault(name + "s", shown)
        if name.endswith("s"):
            names.setdefault(name[:-1], shown)
    names.update(aliases or {})
    return names


def user_errors(fn: F | None = None, *, aliases: dict[str, str] | None = None) -> Any:
    """Run a command body, turning KdstoreError into a ClickException (exit 1, no traceback) whose message names
    this command's options where the library names its arguments (see kdstore.errors)."""
    if fn is None:
        return functools.partial(user_errors, aliases=aliases)

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except KdstoreError as e:
            ctx = click.get_current_context(silent=True)
            names = option_names(ctx.command, aliases) if ctx is not None else {}
            raise click.ClickException(e.render(names)) from e
        except KeyboardInterrupt:
            raise click.ClickException(
                "interrupted; completed work is kept, rerun the same command to resume"
            ) from None

    return wrapper  # type: ignore[return-value]


class CommaList(click.ParamType):
    """A comma-separated list of `kind` values (``1,2,5``) as a tuple; at least one value."""

    def __init__(self, kind: type, what: str, example: str) -> None:
        self.kind, self.what, self.example = kind, what, example
        self.name = f"{kind.__name__}[,{kind.__name__}...]"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> tuple[Any, ...]:
        if isinstance(value, tuple):
            return value
        try:
            values = tuple(self.kind(v) for v in str(value).split(",") if v.strip())
        except ValueError:
            self.fail(f"{value!r} is not a comma-separated list of {self.what}, e.g. {self.example}", param, ctx)
        if not values:
            self.fail("needs at least one value", param, ctx)
        return values


class ChoiceList(CommaList):
    """A comma-separated list of `choices` (``hard,kd``) as a tuple."""

    def __init__(self, choices: tuple[str, ...]) -> None:
        super().__init__(str, "choices", ",".join(choices[:2]))
        self.choices = choices
        self.name = "choice[,choice...]"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> tuple[Any, ...]:
        values = super().convert(value, param, ctx)
        bad = [v for v in values if v not in self.choices]
        if bad:
            self.fail(f"{bad[0]!r} is not one of {', '.join(self.choices)}", param, ctx)
        return values


_SWITCH = {"on": True, "yes": True, "true": True, "1": True, "off": False, "no": False, "false": False, "0": False}


def _switch(text: str) -> bool:
    try:
        return _SWITCH[text.strip().lower()]
    except KeyError:
        raise ValueError(text) from None


FLOATS = CommaList(float, "numbers", "1,2,5")
INTS = CommaList(int, "integers", "0,1,2")
SWITCHES = CommaList(_switch, "on/off values", "off,on")


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


def group_size_option(text: str) -> int | None:
    """`kdstore train --group-size`: auto (None) or a positive count."""
    if text == "auto":
        return None
    try:
        return int(text)
    except ValueError:
        raise click.BadParameter(f"{text!r}: expected a whole number of points or auto",
                                 param_hint="'--group-size'") from None
