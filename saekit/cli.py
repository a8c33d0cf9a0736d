"""The ``saekit`` command line. Each sub-command's flags come from its config dataclass."""

from __future__ import annotations

import argparse
import dataclasses
import sys
import typing
from collections.abc import Callable
from typing import Any

from saekit.config import flag_name
from saekit.errors import SaekitError



class ExtendFromCommas(argparse.Action):
    """``--k 16,32 --k 64`` → [16, 32, 64]."""

    def __init__(self, *args, item_type: type = str, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.item_type = item_type

    def __call__(self, parser, namespace, values, option_string=None) -> None:
        items = getattr(namespace, self.dest) or []
        try:
            items += [self.item_type(v) for v in str(values).split(",") if v]
        except ValueError:
            parser.error(f"{option_string} takes {self.item_type.__name__} values, got {values!r}")
        setattr(namespace, self.dest, items)


def add_config_arguments(parser: argparse.ArgumentParser, config_class: type) -> None:
    """Add one ``--flag`` per dataclass field (list fields repeat: ``--hook A --hook B``);
    a field's ``help`` metadata is its help text."""
    hints = typing.get_type_hints(config_class)
    for f in dataclasses.fields(config_class):
        if f.metadata.get("architecture_settings"):
            add_architecture_arguments(parser)
        if f.metadata.get("cli", True):
            default = f.default_factory() if f.default_factory is not dataclasses.MISSING \
                else f.default
            rule = f.metadata.get("domain")
            _add_flag(parser, flag_name(f), f.name, hints[f.name], default,
                      f.metadata.get("help", ""), f.metadata.get("required", False),
                      rule.choices if rule else None)


def add_architecture_arguments(parser: argparse.ArgumentParser) -> None:
    """One repeatable ``--flag`` per setting of any registered SAE architecture (``--k``,
    ``--l1-coefficient``, ...), swept like every list flag; ``architecture_options_from_args``
    collects them."""
    from saekit.sae import ARCHITECTURES, architecture_settings

    group = parser.add_argument_group("architecture settings (each applies to the "
                                      "architectures named; unset: their default)")
    for name, owners in architecture_settings().items():
        f = owners[0][1]
        kind = typing.get_type_hints(ARCHITECTURES[owners[0][0]].config_class)[name]
        values = {field.default for _, field in owners}
        defaults = (f"{values.pop()} ({', '.join(arch for arch, _ in owners)})" if len(values) == 1
                    else ", ".join(f"{arch} {field.default}" for arch, field in owners))
        group.add_argument(flag_name(f), dest=name, action=ExtendFromCommas,
                           item_type=_scalar_type(kind), default=None,
                           help=f"{f.metadata.get('help', '')} (default: {defaults})")


def architecture_options_from_args(args: argparse.Namespace) -> dict[str, list]:
    """The architecture settings given on the command line: name → values."""
    from saekit.sae import architecture_settings

    return {name: getattr(args, name) for name in architecture_settings()
            if getattr(args, name, None) is not None}


def _scalar_type(kind: Any) -> type:
    optional = [a for a in typing.get_args(kind) if a is not type(None)]
    return optional[0] if optional else kind


def _add_flag(parser: argparse.ArgumentParser, flag: str, dest: str, kind: Any, default: Any,
              help: str, required: bool = False, choices: tuple | None = None) -> None:
    shown = "required" if required else f"default: {default}"
    if "(default" in help:  # the help says what the default means
        shown = "required" if required else ""
    if typing.get_origin(kind) is list:
        (item,) = typing.get_args(kind)
        shown = "required" if required else f"default: {','.join(map(str, default)) or 'none'}"
        parser.add_argument(flag, dest=dest, action=ExtendFromCommas, item_type=item,
                            default=None, required=required,
                            help=f"{help}; repeatable or comma-separated ({shown})"
                            .replace(" ()", "").lstrip("; "))
    elif kind is bool:
        parser.add_argument(flag, dest=dest, action=argparse.BooleanOptionalAction,
                            default=default, help=help or None)
    else:
        parser.add_argument(flag, dest=dest, type=_scalar_type(kind), default=default,
                            required=required, choices=choices,
                            help=f"{help} ({shown})".replace(" ()", "").lstrip())


def config_from_args(config_class: type, args: argparse.Namespace):
    """Build the dataclass from parsed flags, leaving unset list flags at their defaults."""
    values = {f.name: getattr(args, f.name) for f in dataclasses.fields(config_class)
              if f.metadata.get("cli", True) and getattr(args, f.name) is not None}
    for f in dataclasses.fields(config_class):
        if f.metadata.get("architecture_settings"):
            values[f.name] = architecture_options_from_args(args)
    return config_class(**values)


def build_parser() -> argparse.ArgumentParser:
    """The ``saekit`` parser: one sub-command per ``saekit.commands.COMMANDS`` entry, its flags
    built from the fields of its config dataclasses."""
    from saekit.commands import COMMANDS

    parser = argparse.ArgumentParser(prog="saekit", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    for command in COMMANDS:
        command_parser = sub.add_parser(command.name, help=command.help,
                                        description=command.help)
        for config_class in command.configs:
            add_config_arguments(command_parser, config_class)
        command_parser.set_defaults(run=_runner(command))
    return parser


def _runner(command) -> Callable[[argparse.Namespace], None]:
    def run(args: argparse.Namespace) -> None:
        command.run(*(config_from_args(c, args) for c in command.configs))
    return run


def main(argv: list[str] | None = None) -> int:
    """Run one sub-command: 0 on success; 2 with a one-line message for saekit's own errors
    (bad input) and OS errors (a path that cannot be read or written), 130 when interrupted.
    Anything else is a bug and keeps its traceback."""
    args = build_parser().parse_args(argv)
    try:
        args.run(args)
    except (SaekitError, OSError) as err:
        print(f"saekit {args.command}: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"saekit {args.command}: interrupted", file=sys.stderr)
        return 130
    return 0
