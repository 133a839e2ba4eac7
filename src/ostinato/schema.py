"""Typed TOML tables: dataclass sections checked field by field, with `section.key=value` overrides.

Shared by the training config and the planner's scenarios. A field declares its help text and
rules (`choices`, `gt`, `ge`, `le`; `words` for a `float | str` field: a number or one of
those words, such as "auto") with `option`; `build_sections` collects every problem as a
line naming the field and what it allows, so the caller can raise them all in one error.
"""

from __future__ import annotations

import dataclasses
import tomllib
from typing import Any

KINDS = {"int": int, "float": float, "bool": bool, "str": str, "float | str": float}


def option(default: Any, help: str, **rules: Any) -> Any:
    return dataclasses.field(default=default, metadata={"help": help, **rules})


def parse_value(text: str) -> Any:
    """Override values use TOML syntax (1, 0.5, true, "x"); anything else is a plain string."""
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text.strip()


def apply_override(raw: dict[str, Any], item: str, errors: list[str]) -> None:
    """Set `section.key=value` in the nested dict `raw`, or append why it cannot be read."""
    key, sep, text = item.removeprefix("--").partition("=")
    section, dot, name = key.partition(".")
    if not sep or not dot or not name:
        errors.append(f"override {item!r}: expected section.key=value")
        return
    table = raw.setdefault(section, {})
    if isinstance(table, dict):
        table[name] = parse_value(text)


def build_sections(
    raw: dict[str, Any], sections: dict[str, type], errors: list[str]
) -> dict[str, Any]:
    """One instance per section from nested dicts; problems are appended to `errors`."""
    for name, value in raw.items():
        if name not in sections:
            errors.append(f"[{name}]: unknown section; allowed: {', '.join(sections)}")
        elif not isinstance(value, dict):
            errors.append(f"[{name}]: must be a table of keys, got {value!r}")
    return {
        name: _build_section(
            name, cls, raw[name] if isinstance(raw.get(name), dict) else {}, errors
        )
        for name, cls in sections.items()
    }


def _build_section(name: str, cls: type, table: dict[str, Any], errors: list[str]) -> Any:
    fields = {f.name: f for f in dataclasses.fields(cls)}
    values = {}
    for key, value in table.items():
        if key not in fields:
            errors.append(f"{name}.{key}: unknown key; allowed: {', '.join(fields)}")
            continue
        problem = check_value(fields[key], value)
        if problem:
            errors.append(f"{name}.{key} = {value!r}: {problem}")
        else:
            values[key] = value if isinstance(value, str) else KINDS[str(fields[key].type)](value)
    return cls(**values)


def check_value(f: dataclasses.Field, value: Any) -> str | None:
    """None if `value` suits field `f`, else what is wrong with it."""
    kind, rules = KINDS[str(f.type)], f.metadata
    if "words" in rules and isinstance(value, str):
        if value in rules["words"]:
            return None
        return f"allowed values: a number or {', '.join(rules['words'])} ({rules['help']})"
    numeric = isinstance(value, int | float) and not isinstance(value, bool)
    if kind is float and not numeric or kind is int and not (numeric and float(value).is_integer()):
        return f"must be {'a number' if kind is float else 'an integer'} ({rules['help']})"
    if kind in (bool, str) and not isinstance(value, kind):
        return f"must be {kind.__name__} ({rules['help']})"
    if "choices" in rules and value not in rules["choices"]:
        return f"allowed values: {', '.join(map(str, rules['choices']))}"
    for rule, holds, word in (
        ("gt", lambda a, b: a > b, ">"),
        ("ge", lambda a, b: a >= b, ">="),
        ("le", lambda a, b: a <= b, "<="),
    ):
        if rule in rules and not holds(value, rules[rule]):
            return f"must be {word} {rules[rule]} ({rules['help']})"
    return None


def toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(value, float):
        return repr(value)
    return str(value)


def to_toml(data: dict[str, dict[str, Any]]) -> str:
    lines: list[str] = []
    for section, table in data.items():
        lines.append(f"[{section}]")
        lines.extend(f"{key} = {toml_value(value)}" for key, value in table.items())
        lines.append("")
    return "\n".join(lines)
