"""Configuration tables: one literal table per section drives validation, `--check` and the docs.

A section is a tuple of `Key(name, kind, default, doc)`. `check_table()` walks it: unknown keys,
missing required keys and values of the wrong type are errors that name the file, the table and
the key, and say what was expected:

    gateway.toml: [locations."/api"] strip_prefix: expected a boolean, got "yes"

A `Kind` is what a value must be: `expected` completes "expected ..." in errors and fills the
type column of the reference; `check` returns the value (converted if need be) or raises
`Invalid`. Nothing here reads files or builds proxies: `_config.py` does, with these tables.
"""

from __future__ import annotations

import difflib
import json
import math
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from ._errors import ConfigError

__all__ = [
    "REQUIRED",
    "Invalid",
    "Key",
    "Kind",
    "Section",
    "Where",
    "boolean",
    "check_table",
    "integer",
    "one_of",
    "reference",
    "seconds",
    "size",
    "string",
    "strings",
    "string_table",
    "toml_key",
    "toml_repr",
]


class _Required:
    def __repr__(self) -> str:
        return "REQUIRED"


#: The default of a key that must be given.
REQUIRED: Any = _Required()


class Invalid(Exception):
    """A value that does not fit its key; the message is the detail after `key: `."""


@dataclass(frozen=True)
class Kind:
    """What a value must be: `expected` reads "a boolean"; `check` returns the value or raises."""

    expected: str
    check: Callable[[Any], Any]


@dataclass(frozen=True)
class Key:
    """One key of a section: its kind, its default (`REQUIRED`, or None for "unset") and docs.

    `shown_default` replaces the default in the reference when it is too long to be read there.
    """

    name: str
    kind: Kind
    default: Any
    doc: str
    shown_default: str | None = None


@dataclass(frozen=True)
class Section:
    """A table of the file, for the reference: its title as written in TOML, and its keys."""

    title: str
    doc: str
    keys: tuple[Key, ...]


@dataclass(frozen=True)
class Where:
    """Where a table is: the file (or `config` for a dict), the table as written in TOML, and a
    prefix for its keys when the table is an item of an array (`servers[1].`)."""

    source: str
    table: str
    prefix: str = ""

    def error(self, key: str | None, detail: str) -> ConfigError:
        """`source: [table] key: detail`, as a `ConfigError`."""
        at = f"{self.prefix}{key}" if key else self.prefix.rstrip(".")
        return ConfigError(f"{self.source}: {self.table}{' ' + at if at else ''}: {detail}")

    def relabel(self, exc: ConfigError) -> ConfigError:
        """A library error (`argument: detail`) placed in this table."""
        return ConfigError(f"{self.source}: {self.table} {self.prefix}{exc}")


def check_table(value: Any, keys: Sequence[Key], where: Where) -> dict[str, Any]:
    """Check a table against its keys: every key present, with its default if it was left out."""
    if not isinstance(value, Mapping):
        raise where.error(None, f"expected a table, got {toml_repr(value)}")
    names = [key.name for key in keys]
    for name in value:
        if name not in names:
            close = difflib.get_close_matches(name, names, n=1)
            hint = f"did you mean {close[0]}? " if close else ""
            raise where.error(name, f"unknown key; {hint}expected one of {', '.join(names)}")
    checked: dict[str, Any] = {}
    for key in keys:
        if key.name not in value:
            if key.default is REQUIRED:
                raise where.error(key.name, f"missing; expected {key.kind.expected}")
            # Defaults are written as in TOML (for the reference) and made into values here.
            default = key.default
            checked[key.name] = default if default is None else key.kind.check(default)
            continue
        try:
            checked[key.name] = key.kind.check(value[key.name])
        except Invalid as exc:
            raise where.error(key.name, str(exc)) from None
    return checked


def toml_repr(value: Any, limit: int = 60) -> str:
    """A value as TOML writes it, for error messages: `"yes"`, `true`, `[1, 2]`, `{a = 1}`."""
    if isinstance(value, bool):
        text = "true" if value else "false"
    elif isinstance(value, str):
        text = json.dumps(value, ensure_ascii=False)
    elif isinstance(value, float) and not math.isfinite(value):
        text = "nan" if math.isnan(value) else ("inf" if value > 0 else "-inf")
    elif isinstance(value, (int, float)):
        text = repr(value)
    elif isinstance(value, Mapping):
        text = "{" + ", ".join(f"{toml_key(k)} = {toml_repr(v)}" for k, v in value.items()) + "}"
    elif isinstance(value, (list, tuple)):
        text = "[" + ", ".join(toml_repr(item) for item in value) + "]"
    else:
        text = str(value)  # dates and times
    return text if len(text) <= limit else text[: limit - 3] + "..."


_BARE_KEY = re.compile(r"[A-Za-z0-9_-]+")


def toml_key(name: str) -> str:
    """A key as TOML needs it written: bare (`api`) or quoted (`"/api"`)."""
    return name if _BARE_KEY.fullmatch(name) else json.dumps(name, ensure_ascii=False)


def _got(expected: str, value: Any) -> Invalid:
    return Invalid(f"expected {expected}, got {toml_repr(value)}")


def _kind(expected: str, accepts: Callable[[Any], bool]) -> Kind:
    def check(value: Any) -> Any:
        if not accepts(value):
            raise _got(expected, value)
        return value

    return Kind(expected, check)


boolean = _kind("a boolean", lambda value: isinstance(value, bool))
string = _kind("a string", lambda value: isinstance(value, str))


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def integer(minimum: int) -> Kind:
    """An integer >= `minimum`."""
    return _kind(f"an integer >= {minimum}", lambda value: _is_int(value) and value >= minimum)


def _positive(value: Any) -> float:
    if (_is_int(value) or isinstance(value, float)) and 0 < value < math.inf:
        return float(value)
    raise _got("positive seconds (a number)", value)


#: Positive seconds, an integer or a float.
seconds = Kind("positive seconds (a number)", _positive)


def one_of(choices: Iterable[str]) -> Kind:
    """One of a few strings."""
    allowed = tuple(choices)
    expected = "one of " + ", ".join(json.dumps(choice) for choice in allowed)
    return _kind(expected, lambda value: value in allowed and isinstance(value, str))


def _strings(value: Any) -> tuple[str, ...]:
    if isinstance(value, list) and all(isinstance(item, str) for item in value):
        return tuple(value)
    raise _got("an array of strings", value)


#: An array of strings, kept as a tuple.
strings = Kind("an array of strings", _strings)


def _string_table(value: Any) -> dict[str, str]:
    if isinstance(value, Mapping) and all(isinstance(item, str) for item in value.values()):
        return dict(value)
    raise _got('a table of strings (Name = "value")', value)


#: A table of strings, such as headers: `{ X-Source = "gateway" }`.
string_table = Kind('a table of strings (Name = "value")', _string_table)

_UNITS = {"": 1, "k": 1024, "m": 1024**2, "g": 1024**3}
_SIZE = re.compile(r"([0-9]+)\s*([kmg]?)", re.IGNORECASE)


def _size(value: Any) -> int:
    # nginx's sizes: a number of bytes, or a number with k, m or g (client_max_body_size 10m).
    if _is_int(value) and value >= 0:
        return int(value)
    if isinstance(value, str):
        match = _SIZE.fullmatch(value.strip())
        if match:
            return int(match[1]) * _UNITS[match[2].lower()]
    raise _got('bytes (an integer, or a string such as "10m")', value)


#: Bytes: an integer, or nginx's `"512k"`, `"10m"`, `"1g"`.
size = Kind('bytes (an integer, or a string such as "10m")', _size)


def reference(sections: Iterable[Section]) -> str:
    """The Markdown reference of these sections: a heading, its text and a table of keys each."""
    lines: list[str] = []
    for section in sections:
        lines += [f"### `{section.title}`", "", section.doc, ""]
        lines += ["| key | type | default | meaning |", "| --- | --- | --- | --- |"]
        for key in section.keys:
            if key.shown_default is not None:
                default = key.shown_default
            elif key.default is REQUIRED:
                default = "required"
            elif key.default is None:
                default = "unset"
            else:
                default = f"`{toml_repr(key.default, limit=200)}`"
            kind = key.kind.expected.replace("|", "\\|")
            lines.append(f"| `{key.name}` | {kind} | {default} | {key.doc} |")
        lines.append("")
    return "\n".join(lines)
