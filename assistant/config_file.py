"""`icedit config set`: one key of the TOML config file changed in place, the rest of the file (comments,
order, other tables) as it was. The standard library reads TOML but does not write it, and rewriting
the whole file from what was read would drop the person's comments, so the line is edited."""

from __future__ import annotations

import json
import math
import re
import tomllib

from assistant.errors import UserError

_HEADER = re.compile(r"^\s*\[\s*([A-Za-z0-9_.-]+)\s*\]\s*(#.*)?$")
_KEY = re.compile(r"^[A-Za-z0-9_-]+$")


def parse_value(text: str) -> str | int | float | bool:
    """What `icedit config set KEY VALUE` means by VALUE: a TOML number, true/false or quoted string,
    else the text itself (so `preset tiny` needs no quotes)."""
    try:
        value = tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text
    return value if isinstance(value, str | int | float | bool) else text


def toml_value(value: str | int | float | bool) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float) and not math.isfinite(value):
        raise UserError(f"{value} is not a number a config file can hold")
    return json.dumps(value, ensure_ascii=False) if isinstance(value, str) else repr(value)


def with_value(text: str, key: str, value: str | int | float | bool) -> str:
    """`text` (a config file) with KEY (or TABLE.KEY) set to `value`: its line replaced, or added at the
    end of its table (the top, before any table, for a plain key; a new table at the end if none)."""
    table, _, name = key.rpartition(".")
    if not _KEY.match(name) or (table and not all(_KEY.match(part) for part in table.split("."))):
        raise UserError(
            f"'{key}' is not a config key: letters, digits, _ and -, TABLE.KEY for a plugin's table"
        )
    line = f"{name} = {toml_value(value)}"
    lines = text.splitlines()
    sections = [i for i, row in enumerate(lines) if _HEADER.match(row)]
    if table:
        start = next((i + 1 for i in sections if _HEADER.match(lines[i])[1] == table), None)  # type: ignore[index]
        if start is None:
            return "\n".join([*lines, *([""] if lines else []), f"[{table}]", line]) + "\n"
    else:
        start = 0
    end = next((i for i in sections if i >= start), len(lines))
    mine = re.compile(rf"^\s*{re.escape(name)}\s*=")
    for i in range(start, end):
        if mine.match(lines[i]):
            lines[i] = line
            return "\n".join(lines) + "\n"
    while end > start and not lines[end - 1].strip():  # after the table's last key, not its blank lines
        end -= 1
    lines.insert(end, line)
    return "\n".join(lines) + "\n"
