"""Config fields that declare their own domain, checked once where the config is built (for the
CLI and Python alike): ``tokens: int = field(default=1000, metadata=domain(ge=1))``.

``check_fields(config)`` checks every field: its type (an int field takes an int, a float field
a finite number, a list each item), and its declared bounds or choices; numpy numbers become
int/float, and paths and torch devices given to a text field become text. The message names the
flag, the value and what is allowed. Float fields must be finite unless ``finite=False``.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import numbers
import os
import types
import typing
from dataclasses import dataclass
from typing import Any

from saekit.errors import ConfigError


@dataclass(frozen=True)
class Domain:
    """Allowed values of one field: bounds (``ge``/``gt``/``le``/``lt``) or ``choices``."""

    ge: float | None = None
    gt: float | None = None
    le: float | None = None
    lt: float | None = None
    choices: tuple | None = None
    finite: bool = True

    def describe(self) -> str:
        if self.choices is not None:
            return "one of " + ", ".join(map(repr, self.choices))
        parts = [f"{op} {bound:g}" for op, bound in ((">=", self.ge), (">", self.gt),
                                                     ("<=", self.le), ("<", self.lt))
                 if bound is not None]
        return " and ".join(parts) if parts else "a finite number"

    def admits(self, value: Any) -> bool:
        if self.choices is not None:
            return value in self.choices
        return ((self.ge is None or value >= self.ge) and (self.gt is None or value > self.gt)
                and (self.le is None or value <= self.le) and (self.lt is None or value < self.lt))


def domain(**bounds: Any) -> dict:
    """Field metadata declaring the allowed values (see ``Domain``)."""
    if "choices" in bounds:
        bounds["choices"] = tuple(bounds["choices"])
    return {"domain": Domain(**bounds)}


DEVICE_HELP = "cpu, cuda, cuda:1, mps ... (default: the best available)"


def setting(default: Any, help: str, required: bool = False, flag: str | None = None,
            **bounds: Any) -> Any:
    """A config field with its ``--help`` text and, optionally, its domain:
    ``k: int = setting(32, "active latents per sample", ge=1)``; ``required``: the command
    line must give it; ``flag``: its flag's name when not the field's (``hook`` for ``hooks``)."""
    metadata = {"help": help, "required": required, **(domain(**bounds) if bounds else {})}
    if flag:
        metadata["flag"] = flag
    if isinstance(default, (list, dict)):
        return dataclasses.field(default_factory=lambda: copy.deepcopy(default),
                                 metadata=metadata)
    return dataclasses.field(default=default, metadata=metadata)


def flag_name(f: dataclasses.Field) -> str:
    """The command-line flag of a config field: ``--batch-rows`` for ``batch_rows``."""
    return "--" + f.metadata.get("flag", f.name).replace("_", "-")


def check_fields(config: Any, error: type[ConfigError] = ConfigError) -> None:
    """Raise ``error`` naming the first field whose value has the wrong type or lies outside
    its declared ``domain``."""
    try:
        _check_fields(config)
    except ConfigError as err:
        if error is ConfigError:
            raise
        raise error(str(err)) from None


def _check_fields(config: Any) -> None:
    """Check each field, replacing it by its plain form (see ``_checked_value``)."""
    hints = typing.get_type_hints(type(config))
    for f in dataclasses.fields(config):
        value = getattr(config, f.name)
        kind = hints[f.name]
        rule = f.metadata.get("domain")
        if typing.get_origin(kind) is list:
            (item_kind,) = typing.get_args(kind)
            if not isinstance(value, (list, tuple)):
                raise ConfigError(f"{flag_name(f)} takes a list, got {value!r}.")
            value = [_checked_value(f, item_kind, item, rule) for item in value]
        else:
            value = _checked_value(f, kind, value, rule)
        if f.name == "device" and value:
            from saekit.model import check_device  # torch only when a device is named

            check_device(value)
        object.__setattr__(config, f.name, value)


def _checked_value(f: dataclasses.Field, kind: Any, value: Any, rule: Domain | None) -> Any:
    """``value`` in its plain form (numpy numbers as int/float, paths and devices as text),
    or ``ConfigError`` when it has the wrong type or lies outside ``rule``."""
    union = typing.get_origin(kind) in (typing.Union, types.UnionType)
    options = [a for a in typing.get_args(kind) if a is not type(None)] if union else [kind]
    if value is None:
        if type(None) in typing.get_args(kind):
            return None
        raise ConfigError(f"{flag_name(f)} needs a value.")
    base = options[0]
    if base is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{flag_name(f)} is true or false, got {value!r}.")
        return value
    if base is int:
        if isinstance(value, bool) or not isinstance(value, numbers.Integral):
            raise ConfigError(f"{flag_name(f)} takes a whole number, got {value!r}.")
        value = int(value)
    elif base is float:
        if isinstance(value, bool) or not isinstance(value, numbers.Real):
            raise ConfigError(f"{flag_name(f)} takes a number, got {value!r}.")
        try:
            value = float(value)
        except OverflowError:
            value = math.inf
        finite = rule.finite if rule else True
        if math.isnan(value) or (finite and math.isinf(value)):
            raise ConfigError(f"{flag_name(f)} must be a finite number, got {value!r}.")
    elif base is str:
        if isinstance(value, os.PathLike) or type(value).__name__ == "device":
            value = os.fspath(value) if isinstance(value, os.PathLike) else str(value)
        if not isinstance(value, str):
            raise ConfigError(f"{flag_name(f)} takes text, got {value!r}.")
    if rule is not None and not rule.admits(value):
        raise ConfigError(f"{flag_name(f)} must be {rule.describe()}, got {value!r}.")
    return value
