"""Configuration of the experiment scripts: typed dataclasses, JSON files, command-line overrides.

Each script declares its options as a dataclass, one field per option, each with its one-line doc
(:func:`~tokencompress_env.options.option`), which ``--help`` prints with the default. :func:`parse_config`
reads ``--config FILE.json`` (keys are the field names), then applies command-line overrides
(``--key value`` or ``--key-with-dashes value``), validates types, and rejects unknown keys with the
list of valid ones and the closest match. :func:`cli_main` turns user errors into a one-line message
and exit code 2 instead of a traceback.
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import json
import math
import os
import sys
import types
import typing
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, TypeVar

from tokencompress_env.errors import ConfigError, TokenCompressError
from tokencompress_env.options import option_docs

T = TypeVar("T")


def _unknown_key_message(key: str, valid: Sequence[str], where: str) -> str:
    """Message for an unknown key: the closest valid key and the list of all.

    :param key: the unknown key
    :param valid: valid keys
    :param where: where the key was found ("config file X", "command line")
    :return: the message
    """
    close = difflib.get_close_matches(key, list(valid), n=1, cutoff=0.5)
    hint = f" (did you mean '{close[0]}'?)" if close else ""
    return f"unknown key '{key}' in {where}{hint}; valid keys: {', '.join(sorted(valid))}"


def _base_type(tp: Any) -> tuple[Any, bool]:
    """Strip ``X | None`` to ``X``.

    :param tp: a type annotation
    :return: the inner type and whether ``None`` is allowed
    """
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return (args[0] if len(args) == 1 else tp), len(args) < len(typing.get_args(tp))
    return tp, False


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Convert a JSON or command-line value to the field's type, or raise :class:`ConfigError`.

    :param value: the value
    :param tp: the field's type
    :param key: the field name (for messages)
    :return: the converted value
    """
    inner, optional = _base_type(tp)
    if value is None or (isinstance(value, str) and value.lower() in {"none", "null"} and optional):
        if optional:
            return None
        raise ConfigError(f"config key '{key}' may not be null")
    origin = typing.get_origin(inner)
    try:
        if origin in (list, tuple) or inner in (list, tuple):
            items = value if isinstance(value, (list, tuple)) else [value]
            args = typing.get_args(inner)
            item_type = args[0] if args else str
            converted = [_coerce(v, item_type, key) for v in items]
            return tuple(converted) if (origin is tuple or inner is tuple) else converted
        if inner is bool:
            if isinstance(value, bool):
                return value
            if isinstance(value, str) and value.lower() in {"true", "1", "yes", "on", "false", "0", "no", "off"}:
                return value.lower() in {"true", "1", "yes", "on"}
            raise ValueError(value)
        if inner is int:
            if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
                raise ValueError(value)
            return int(value)
        if inner is float:
            if isinstance(value, bool):
                raise ValueError(value)
            result = float(value)
            if math.isnan(result):
                raise ValueError(value)
            return result
        if inner is str:
            if not isinstance(value, (str, int, float)):
                raise ValueError(value)
            return str(value)
    except (TypeError, ValueError):
        name = getattr(inner, "__name__", str(inner))
        raise ConfigError(f"config key '{key}' expects {name}, got {value!r}") from None
    return value


def config_fields(cls: type) -> dict[str, dataclasses.Field[Any]]:
    """The fields of a config dataclass, by name.

    :param cls: the dataclass
    :return: name -> field
    """
    return {f.name: f for f in dataclasses.fields(cls)}


def build_config(cls: type[T], values: dict[str, Any], where: str = "config") -> T:
    """Build a config dataclass from a dict, rejecting unknown keys and ill-typed values.

    :param cls: the config dataclass
    :param values: key -> value
    :param where: where the values came from (for messages)
    :return: the config
    """
    fields = config_fields(cls)
    hints = typing.get_type_hints(cls)
    for key in values:
        if key not in fields:
            raise ConfigError(_unknown_key_message(key, list(fields), where))
    converted = {key: _coerce(value, hints[key], key) for key, value in values.items()}
    config = cls(**converted)
    validate = getattr(config, "validate", None)
    if callable(validate):
        validate()
    return config


def load_config_file(path: str | Path) -> dict[str, Any]:
    """Read a JSON config file (keys starting with ``_`` are comments and ignored).

    :param path: the file
    :return: its key -> value mapping
    """
    file = Path(path)
    if not file.is_file():
        raise ConfigError(f"config file '{path}' does not exist")
    try:
        data = json.loads(file.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError(f"config file '{path}' is not valid JSON: {exc}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"config file '{path}' must hold a JSON object")
    return {k: v for k, v in data.items() if not k.startswith("_")}


class _Parser(argparse.ArgumentParser):
    """An argument parser whose errors are :class:`ConfigError` with a closest-match hint."""

    def __init__(self, *args: Any, valid_keys: Sequence[str] = (), **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.valid_keys = list(valid_keys)

    def error(self, message: str) -> typing.NoReturn:
        """Raise a :class:`ConfigError` instead of printing usage and exiting.

        :param message: argparse's message
        """
        if message.startswith("unrecognized arguments:"):
            first = message.split(":", 1)[1].split()[0]
            key = first.lstrip("-").replace("-", "_").split("=")[0]
            raise ConfigError(_unknown_key_message(key, self.valid_keys, "command line"))
        raise ConfigError(message)


def parse_config(cls: type[T], argv: Sequence[str] | None = None, description: str = "", positional: str | None = None) -> T:
    """Parse ``--config FILE`` and ``--key value`` overrides into a config dataclass.

    Precedence: dataclass defaults < the JSON file < the command line.

    :param cls: the config dataclass (``--help`` shows the doc of each field)
    :param argv: arguments (default ``sys.argv[1:]``)
    :param description: the script's description for ``--help``
    :param positional: a field that may also be given as the one positional argument
    :return: the config
    """
    values, where = parse_config_values(cls, argv, description, positional)
    return build_config(cls, values, where=where)


def parse_config_values(
    cls: type, argv: Sequence[str] | None = None, description: str = "", positional: str | None = None
) -> tuple[dict[str, Any], str]:
    """The values given explicitly (the ``--config`` file, then the command line), not yet converted.

    :param cls: the config dataclass
    :param argv: arguments (default ``sys.argv[1:]``)
    :param description: the script's description for ``--help``
    :param positional: a field that may also be given as the one positional argument
    :return: key -> value, and where they came from (for messages)
    """
    fields = config_fields(cls)
    hints = typing.get_type_hints(cls)
    parser = _Parser(description=description, allow_abbrev=False, valid_keys=list(fields))
    parser.add_argument("--config", help="JSON file of options (keys as below); command-line options override it")
    if positional:
        parser.add_argument("positional", nargs="?", default=None, help=f"same as --{positional}")
    docs = option_docs(cls)
    for name, field in fields.items():
        inner, _ = _base_type(hints[name])
        flags = [f"--{name}"] + ([f"--{name.replace('_', '-')}"] if "_" in name else [])
        default = field.default if field.default is not dataclasses.MISSING else None
        if field.default_factory is not dataclasses.MISSING:
            default = field.default_factory()
        is_seq = typing.get_origin(inner) in (list, tuple) or inner in (list, tuple)
        text = f"{docs[name]} (default: {default})" if docs[name] else f"(default: {default})"
        parser.add_argument(*flags, dest=name, default=argparse.SUPPRESS, nargs="+" if is_seq else None, help=text.replace("%", "%%"))
    namespace = vars(parser.parse_args(list(sys.argv[1:] if argv is None else argv)))
    values: dict[str, Any] = {}
    config_path = namespace.pop("config", None)
    if config_path:
        values.update(load_config_file(config_path))
        build_config(cls, values, where=f"config file '{config_path}'")  # validate the file on its own
    pos = namespace.pop("positional", None)
    if positional and pos is not None:
        values[positional] = pos
    values.update(namespace)
    return values, "command line" if not config_path else f"'{config_path}' + command line"


def check_output_dir(path: str | Path, option: str) -> None:
    """Check that a folder can be created or written (before any work), or raise a one-line :class:`ConfigError`.

    :param path: the folder (it may not exist yet)
    :param option: the command-line option that names it (for the message)
    """
    folder = Path(path).expanduser()
    if folder.exists() and not folder.is_dir():
        raise ConfigError(f"--{option} '{path}' is a file, not a folder: pass a folder path")
    existing = folder
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise ConfigError(f"--{option} '{path}' cannot be created: '{existing}' is a file")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise ConfigError(f"--{option} '{path}' is not writable ('{existing}' is read-only): pass a folder you can write to")


def cli_main(main: Callable[[Sequence[str] | None], Any]) -> Callable[..., int]:
    """Wrap a script's ``main(argv)`` so user errors print one line and exit with code 2.

    :param main: the script's main function
    :return: a function returning the exit code
    """

    def run(argv: Sequence[str] | None = None) -> int:
        try:
            main(argv)
        except TokenCompressError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
        except KeyboardInterrupt:
            print("interrupted", file=sys.stderr)
            return 130
        return 0

    run.__doc__ = main.__doc__
    return run
