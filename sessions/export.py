"""Export a session as a replay script that rebuilds its whole tree, branches included.

The tree is walked depth-first, `undo` climbing back after each branch; the branch holding the
cursor is walked last, so the replay ends where the session's cursor is. Edits carry their
instruction and seed, so the replay repeats them without a rewriter.
"""

from __future__ import annotations

import json
from pathlib import Path

from assistant.errors import UserError
from sessions.history import History, Turn
from sessions.store import Store


def _toml_table(values: dict) -> list[str]:
    return [f"{k} = {json.dumps(v, ensure_ascii=False)}" for k, v in values.items() if v is not None]


def export_script(store: Store, name: str, script: Path) -> list[Path]:
    """Write the script and the opened images beside it; return every file written."""
    history = store.history(name)
    roots = history.children(None)
    if len(roots) != 1 or roots[0].kind != "open":
        raise UserError(f"session '{name}' does not start with one opened image; cannot export it")
    on_path = {t.id for t in history.path(history.cursor)}
    written: list[Path] = []

    def image_file(turn: Turn) -> str:
        path = script.with_name(f"{script.stem}-{turn.id}.png")
        path.write_bytes(store.image(turn.image_sha256))
        written.append(path)
        return path.name

    turns: list[dict] = []

    def visit(turn: Turn, history: History) -> None:
        for child in sorted(history.children(turn.id), key=lambda t: t.id in on_path):
            if child.kind == "open":
                turns.append({"open": image_file(child)})
            else:
                turns.append(
                    {
                        "say": child.message,
                        "instruction": child.plan.get("instruction"),
                        "seed": child.params.get("base_seed", child.seed),
                        "steps": child.params.get("steps"),
                        "guidance": child.params.get("guidance"),
                        "candidates": child.params.get("candidates"),
                        "early_steps": child.params.get("early_steps"),
                    }
                )
            visit(child, history)
            if child.id not in on_path:
                turns.append({"command": "undo"})

    try:
        script.parent.mkdir(parents=True, exist_ok=True)
        source = image_file(roots[0])
        visit(roots[0], history)
        header = {"source": source}
        for key in ("preset", "judge", "engine"):  # settings every edit of the session shared
            values = {t.params.get(key) for t in history.turns if t.kind == "edit"}
            if len(values) == 1 and None not in values:
                header[key] = values.pop()
        lines = [f"# replay of session {json.dumps(name)}: icedit replay {script.name} --out DIR",
                 *_toml_table(header), ""]
        for turn in turns:
            lines += ["[[turns]]", *_toml_table(turn), ""]
        script.write_text("\n".join(lines), "utf-8")
    except OSError as e:
        raise UserError(f"cannot write {script}: {e.strerror}") from None
    return [script, *written]
