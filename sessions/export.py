"""Export a session as a replay script that rebuilds its whole tree, branches included.

The tree is walked depth-first (iteratively: sessions run thousands of turns deep), `undo` climbing
back after each branch; the branch holding the cursor is walked last, so the replay ends where the
session's cursor is. Edits carry their instruction and seed, so the replay repeats them without a
rewriter: a plan's steps and the self-check's attempts are turns like any other, replayed one by one
(`attempts = 1`, so a config file asking for more does not add attempts of its own).
"""

from __future__ import annotations

import json
from pathlib import Path

from assistant.errors import UserError
from assistant.files import refuse_existing, write_file
from sessions.history import History, Turn, numbered
from sessions.store import DamagedImage, Store


def _toml_table(values: dict) -> list[str]:
    return [f"{k} = {json.dumps(v, ensure_ascii=False)}" for k, v in values.items() if v is not None]


class LeftOut(UserError):
    """The script was written, but without the branches under opened images damaged in the store.

    Raised after every other file is in place; `written` lists them, `turns` the damaged open turns.
    """

    exit_code = 1

    def __init__(self, written: list[Path], turns: list[int], below: int):
        their, them = ("its", "it") if len(turns) == 1 else ("their", "them")
        super().__init__(
            f"{numbered(turns)}: {their} opened image is damaged in the store; left out of the script "
            f"with the {below} turn(s) below {them} (restore the store from a backup)"
        )
        self.written = written
        self.turns = turns


def export_script(store: Store, name: str, script: Path, force: bool = False) -> list[Path]:
    """Write the script and the opened images beside it; return every file written.

    Every name is checked before anything is written: a file already there (the person's own
    `trip-1.png`) is replaced only with `force`. Edits need no image (the replay repeats them), so
    only a damaged opened image costs anything: the first one stops the export, any other its branch.
    """
    history = store.history(name)
    roots = history.children(None)
    if len(roots) != 1 or roots[0].kind != "open":
        raise UserError(f"session '{name}' does not start with one opened image; cannot export it")
    refuse_existing([script, *(image_path(script, t) for t in history.turns if t.kind == "open")], force)
    try:
        source = store.image(roots[0].image_sha256)
    except DamagedImage as e:
        raise UserError(f"cannot export session '{name}': turn {roots[0].id}'s {e}") from None
    try:
        script.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"cannot create {script.parent}: {e.strerror}") from None
    written = [write_file(image_path(script, roots[0]), source, force=force)]
    on_path = {t.id for t in history.path(history.cursor_turn().id)}
    turns: list[dict] = []
    stand: list[Turn] = []  # the turns the replay stands on at this point, root first
    left_out: list[int] = []
    below = 0
    skip_under: int | None = None  # depth of a left-out open turn while the walk is below it
    for turn, depth in history.walk(last=on_path):
        if skip_under is not None and depth > skip_under:
            below += 1
            continue
        skip_under = None
        turns += _climb(stand, depth, on_path)
        if turn.parent is not None and turn.kind == "open":
            try:
                png = store.image(turn.image_sha256)
            except DamagedImage:
                left_out.append(turn.id)
                skip_under = depth
                continue
            written.append(write_file(image_path(script, turn), png, force=force))
            turns.append({"open": written[-1].name})
        elif turn.kind == "edit":
            turns.append(_edit(turn))
        stand.append(turn)
    turns += _climb(stand, 0, on_path)
    _write_script(script, name, history, written[0].name, turns, force)
    if left_out:
        raise LeftOut([script, *written], left_out, below)
    return [script, *written]


def _climb(stand: list[Turn], depth: int, on_path: set[int]) -> list[dict]:
    """Back up to `depth` once the walk is done below it: an undo for each branch off the cursor's path."""
    undos = []
    while len(stand) > depth:
        if stand.pop().id not in on_path:
            undos.append({"command": "undo"})
    return undos


def _edit(turn: Turn) -> dict:
    return {
        "say": turn.message,
        "instruction": (turn.plan or {}).get(
            "instruction"
        ),  # an old import may lack one: the rewriter decides
        "seed": turn.params.get("base_seed", turn.seed),
        "steps": turn.params.get("steps"),
        "guidance": turn.params.get("guidance"),
        "candidates": turn.params.get("candidates"),
        "early_steps": turn.params.get("early_steps"),
    }


def _write_script(
    script: Path, name: str, history: History, source: str, turns: list[dict], force: bool
) -> None:
    header: dict[str, object] = {"source": source, "attempts": 1}  # each attempt is a turn of its own
    edits = [t for t in history.turns if t.kind == "edit"]
    header |= _shared(edits, lambda t: {k: t.params.get(k) for k in ("preset", "judge", "engine")})
    options = _shared(edits, _weights)
    lines = [
        f"# replay of session {json.dumps(name)}: icedit replay {script.name} --out DIR",
        *_toml_table(header),
        "",
        *(["[options]", *_toml_table(options), ""] if options else []),
    ]
    for turn in turns:
        lines += ["[[turns]]", *_toml_table(turn), ""]
    write_file(script, "\n".join(lines).encode(), force=force)


def _shared(edits: list[Turn], values) -> dict[str, object]:
    """The settings (`values(turn)`) every edit of the session ran with alike; one that varies is left out."""
    found = [values(t) for t in edits]
    keys = {k for v in found for k in v}
    return {
        k: found[0][k]
        for k in sorted(keys)
        if found[0].get(k) is not None and all(v.get(k) == found[0][k] for v in found)
    }


def _weights(turn: Turn) -> dict[str, object]:
    """The plugin options that load the weights an edit was painted with, hub commits pinned; none for an
    engine that built its weights in-process (the preset says them)."""
    model, adapter = turn.params.get("model"), turn.params.get("adapter")
    found: dict[str, object] = {}
    if model:
        found |= {"model": model["source"], "revision": model.get("revision")}
    if adapter:
        found |= {"lora": adapter["source"], "lora_revision": adapter.get("revision")}
        found |= {"lora_scale": adapter.get("scale"), "top_k": adapter.get("top_k")}
    elif model:
        found["lora"] = "none"  # not the preset's
    return found


def image_path(script: Path, turn: Turn) -> Path:
    """Where the image an open turn shows goes beside the script."""
    return script.with_name(f"{script.stem}-{turn.id}.png")
