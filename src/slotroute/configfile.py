"""Reading TOML config files with errors that name the file, the entry and the field."""

from __future__ import annotations

import math
import pathlib
import re
import tomllib
from collections.abc import Iterable, Mapping
from typing import Any

_MISSING: Any = object()

_SIZE_UNITS = {
    "": 1,
    "B": 1,
    "KB": 10**3,
    "MB": 10**6,
    "GB": 10**9,
    "TB": 10**12,
    "KIB": 2**10,
    "MIB": 2**20,
    "GIB": 2**30,
    "TIB": 2**40,
}
_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([A-Za-z]*)\s*$")


class ConfigError(ValueError):
    """An invalid config: the message names the file, the entry and the field."""

    def __init__(self, path: pathlib.Path | str, entry: str, field: str | None, problem: str):
        location = f"{path}: {entry}"
        if field:
            location += f": field '{field}'"
        super().__init__(f"{location}: {problem}")
        self.path = str(path)
        self.entry = entry
        self.field = field
        self.problem = problem


def load_toml(path: pathlib.Path) -> dict[str, Any]:
    """Parse a TOML file; a missing file or a syntax error raises ConfigError."""
    try:
        with path.open("rb") as handle:
            return tomllib.load(handle)
    except FileNotFoundError:
        raise ConfigError(path, "file", None, "file not found; pass an existing config file") from None
    except tomllib.TOMLDecodeError as error:
        raise ConfigError(path, "file", None, f"invalid TOML: {error}") from error
    except UnicodeDecodeError as error:
        raise ConfigError(path, "file", None,
                          f"not UTF-8 text ({error.reason} at byte {error.start}); "
                          "save the config as UTF-8 TOML") from None
    except IsADirectoryError:
        raise ConfigError(path, "file", None, "is a directory; pass a TOML file") from None
    except OSError as error:
        raise ConfigError(path, "file", None, f"cannot read: {error.strerror or error}") from None


def check_sections(path: pathlib.Path, document: dict[str, Any]) -> None:
    """Reject top-level tables other than [slotd] and [dispatcher], such as a misspelled one."""
    unknown = sorted(set(document) - {"slotd", "dispatcher"})
    if unknown:
        raise ConfigError(path, f"[{unknown[0]}]", None,
                          "unknown section; the known sections are [slotd] and [dispatcher]")


def parse_size(text: str) -> int:
    """Parse a byte size such as "24GiB", "512MB" or "1024"; raise ValueError if invalid."""
    match = _SIZE_RE.match(text)
    if not match or match.group(2).upper() not in _SIZE_UNITS:
        raise ValueError(f"invalid size {text!r}; use a number with a unit such as '8GiB'")
    return _check_size(int(float(match.group(1)) * _SIZE_UNITS[match.group(2).upper()]), text)


# Sizes travel as uint64 on the wire; no real device comes close to this bound.
MAX_SIZE = 2**60


def _check_size(count: int, original: object) -> int:
    if not 0 <= count <= MAX_SIZE:
        raise ValueError(f"invalid size {original!r}; use a size from 0 to 1 EiB such as '8GiB'")
    return count


def format_size(count: int) -> str:
    """Format a byte count with a binary unit, for messages."""
    for unit, factor in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if count >= factor:
            return f"{count / factor:.1f} {unit}"
    return f"{count} B"


class Fields:
    """Typed reads of one config table, raising ConfigError that names the entry and field.

    Call `finish()` after the reads: any key that was not read is reported as
    unknown, which catches misspelled field names.
    """

    def __init__(self, path: pathlib.Path, entry: str, table: Any):
        if not isinstance(table, Mapping):
            raise ConfigError(path, entry, None, f"expected a table, got {_type_name(table)}")
        self.path = path
        self.entry = entry
        self.table = table
        self._read: set[str] = set()

    def error(self, field: str | None, problem: str) -> ConfigError:
        return ConfigError(self.path, self.entry, field, problem)

    def _get(self, name: str, default: Any, kinds: tuple[type, ...], kind_name: str) -> Any:
        self._read.add(name)
        if name not in self.table:
            if default is _MISSING:
                raise self.error(name, "missing; this field is required")
            return default
        value = self.table[name]
        # bool is a subclass of int: reject true/false where a number is expected.
        if isinstance(value, bool) and bool not in kinds:
            raise self.error(name, f"expected {kind_name}, got a boolean")
        if not isinstance(value, kinds):
            raise self.error(name, f"expected {kind_name}, got {_type_name(value)} {value!r}")
        return value

    def string(self, name: str, default: Any = _MISSING, *, choices: Iterable[str] = ()) -> Any:
        value = self._get(name, default, (str,), "a string")
        allowed = tuple(choices)
        if allowed and value is not default and value not in allowed:
            raise self.error(name, f"invalid value {value!r}; expected one of: {', '.join(allowed)}")
        return value

    def boolean(self, name: str, default: Any = _MISSING) -> Any:
        return self._get(name, default, (bool,), "true or false")

    def integer(self, name: str, default: Any = _MISSING, *, minimum: int | None = None) -> Any:
        value = self._get(name, default, (int,), "an integer")
        if minimum is not None and value is not default and value < minimum:
            raise self.error(name, f"invalid value {value}; must be at least {minimum}")
        return value

    def seconds(self, name: str, default: Any = _MISSING, *, minimum: float = 0.0) -> Any:
        value = self._get(name, default, (int, float), "a number of seconds")
        if value is not default and value is not None and not math.isfinite(value):
            raise self.error(name, f"invalid value {value}; use a finite number of seconds")
        if value is not default and value < minimum:
            raise self.error(name, f"invalid value {value}; must be at least {minimum} seconds")
        return float(value) if value is not None else None

    def size(self, name: str, default: Any = _MISSING) -> Any:
        value = self._get(name, default, (int, str), "a size such as '8GiB' or a byte count")
        if value is default:
            return value
        try:
            if isinstance(value, int):
                return _check_size(value, value)
            return parse_size(value)
        except ValueError as error:
            raise self.error(name, str(error)) from None

    def string_list(self, name: str, default: Any = _MISSING) -> Any:
        value = self._get(name, default, (list,), "a list of strings")
        if value is default:
            return value
        for index, item in enumerate(value):
            if not isinstance(item, str):
                raise self.error(f"{name}[{index}]", f"expected a string, got {_type_name(item)}")
        return tuple(value)

    def string_map(self, name: str, default: Any = _MISSING) -> Any:
        value = self._get(name, default, (dict,), "a table of strings")
        if value is default:
            return value
        for key, item in value.items():
            if not isinstance(item, str):
                raise self.error(f"{name}.{key}", f"expected a string, got {_type_name(item)}")
        return dict(value)

    def table_of(self, name: str) -> Fields | None:
        self._read.add(name)
        if name not in self.table:
            return None
        return Fields(self.path, f"{self.entry}.{name}", self.table[name])

    def tables(self, name: str, key_field: str) -> list[Fields]:
        """Read an array of tables such as [[slotd.slots]]; each entry is labelled by key_field."""
        self._read.add(name)
        value = self.table.get(name, [])
        if not isinstance(value, list):
            raise self.error(name, f"expected an array of tables ([[...]]), got {_type_name(value)}")
        entries = []
        for index, item in enumerate(value):
            label = f"[[{self.entry}.{name}]] #{index + 1}"
            if isinstance(item, Mapping) and isinstance(item.get(key_field), str):
                label = f"[[{self.entry}.{name}]] {key_field} = {item[key_field]!r}"
            entries.append(Fields(self.path, label, item))
        return entries

    def finish(self) -> None:
        unknown = sorted(set(self.table) - self._read)
        if unknown:
            known = ", ".join(sorted(self._read))
            raise self.error(unknown[0], f"unknown field; known fields here: {known}")


def _type_name(value: Any) -> str:
    if isinstance(value, Mapping):
        return "a table"
    if isinstance(value, list):
        return "a list"
    return type(value).__name__
