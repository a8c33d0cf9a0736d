"""The ``saekit`` command line. Each sub-command's flags come from its config dataclass."""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import json
import sys
import typing
from typing import Any

from saekit.config import flag_name
from saekit.errors import ConfigError, SaekitError

# modules that add their own sub-commands with register_cli(subparsers)
COMMAND_MODULES = ("saekit.evaluate", "saekit.dashboard", "saekit.generation", "saekit.steer_eval",
                   "saekit.concept_run", "saekit.demo")


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
        if f.metadata.get("cli", True):
            default = f.default_factory() if f.default_factory is not dataclasses.MISSING \
                else f.default
            _add_flag(parser, flag_name(f), f.name, hints[f.name], default,
                      f.metadata.get("help", ""))


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
              help: str) -> None:
    if typing.get_origin(kind) is list:
        (item,) = typing.get_args(kind)
        parser.add_argument(flag, dest=dest, action=ExtendFromCommas, item_type=item,
                            default=None, help=f"{help}; repeatable or comma-separated "
                            f"(default: {','.join(map(str, default))})".lstrip("; "))
    elif kind is bool:
        parser.add_argument(flag, dest=dest, action=argparse.BooleanOptionalAction,
                            default=default, help=help or None)
    else:
        parser.add_argument(flag, dest=dest, type=_scalar_type(kind), default=default,
                            help=f"{help} (default: {default})".lstrip())


def config_from_args(config_class: type, args: argparse.Namespace):
    """Build the dataclass from parsed flags, leaving unset list flags at their defaults."""
    values = {f.name: getattr(args, f.name) for f in dataclasses.fields(config_class)
              if f.metadata.get("cli", True) and getattr(args, f.name) is not None}
    for f in dataclasses.fields(config_class):
        if f.metadata.get("architecture_settings"):
            values[f.name] = architecture_options_from_args(args)
    return config_class(**values)


def run_cache(args: argparse.Namespace) -> None:
    from saekit.capture import CaptureConfig, capture_activations
    from saekit.cache import ActivationCache

    config = config_from_args(CaptureConfig, args)
    out = capture_activations(config, args.out, device=args.device)
    cache = ActivationCache.open(out)
    size = sum(e["bytes"] for e in cache.manifest["shards"])
    print(f"wrote {cache.manifest['n_tokens']:,} tokens x {len(cache.hooks)} hook(s) "
          f"({', '.join(cache.hooks)}), d_model {cache.d_model}, {cache.n_shards} shards, "
          f"{size / 2**30:.2f} GiB to {out}")


def run_train(args: argparse.Namespace) -> None:
    from saekit.train import TrainConfig, train

    config = config_from_args(TrainConfig, args)
    if not config.activations or not config.out:
        raise ConfigError("saekit train needs --activations DIR (from `saekit cache`) and --out DIR.")
    saved = train(config)
    for name, folder in saved.items():
        summary = json.loads((folder / "train_summary.json").read_text())["held_out"]
        if "fvu" not in summary:  # --holdout-tokens 0
            print(f"{name}: no held-out tokens, nothing evaluated -> {folder}")
            continue
        print(f"{name}: held-out FVU {summary['fvu']:.4f}, L0 {summary['l0']:.1f}, dead "
              f"{100 * summary['dead_fraction_training']:.1f}% -> {folder}")


def run_hooks(args: argparse.Namespace) -> None:
    from saekit.model import load_model

    model = load_model(args.model, device=args.device)
    names = [n for n in model.hook_dict if args.grep in n]
    print("\n".join(names))


def build_parser() -> argparse.ArgumentParser:
    from saekit.capture import CaptureConfig
    from saekit.train import TrainConfig

    parser = argparse.ArgumentParser(prog="saekit", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    cache = sub.add_parser("cache", help="capture activations of a model over a corpus")
    add_config_arguments(cache, CaptureConfig)
    cache.add_argument("--out", required=True, help="cache folder (resumed if it exists)")
    cache.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: auto)")
    cache.set_defaults(run=run_cache)

    train = sub.add_parser("train", help="train SAEs (a sweep) on cached activations")
    add_config_arguments(train, TrainConfig)
    add_architecture_arguments(train)
    train.set_defaults(run=run_train)

    hooks = sub.add_parser("hooks", help="list a model's hook names")
    hooks.add_argument("--model", default="gemma-3-270m")
    hooks.add_argument("--grep", default="", help="only names containing this")
    hooks.add_argument("--device", default=None)
    hooks.set_defaults(run=run_hooks)

    for module in COMMAND_MODULES:
        importlib.import_module(module).register_cli(sub)

    return parser


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
