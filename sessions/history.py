"""A session's history: a tree of turns and a cursor. Undo and redo only move the cursor."""

from __future__ import annotations

import math
from collections.abc import Collection, Iterator
from typing import Any, Literal

from pydantic import BaseModel, PrivateAttr

from assistant.errors import UserError
from assistant.text import printable

TurnKind = Literal["open", "edit"]
MAX_INDENT = 40
"""Levels a printed tree indents; deeper turns show their depth instead, so lines stay short."""


class Turn(BaseModel):
    """One committed step: an opened image ("open", a root) or an edit of its parent's image."""

    id: int
    parent: int | None
    kind: TurnKind
    message: str
    plan: dict[str, Any] | None = None
    params: dict[str, Any] = {}
    image_sha256: str
    timings: dict[str, float] = {}
    created: str

    @property
    def seed(self) -> int | None:
        return self.params.get("seed")

    @property
    def label(self) -> str:
        """What a tree shows: the message; a plan's step as its own instruction with its place in the
        plan, and a self-checked attempt with its score. Stored values are shown only when well-formed
        (an imported store may hold anything)."""
        text = self.message
        step: Any = self.params.get("plan_step")
        instruction = (self.plan or {}).get("instruction")
        if isinstance(instruction, str) and _numbers(step, 2) and all(isinstance(v, int) for v in step):
            text = f"{instruction} (step {step[0]}/{step[1]})"
        check = self.params.get("check")
        score: Any = check.get("score") if isinstance(check, dict) else None
        if _numbers([score], 1) and 0 <= score <= 1:
            text += f"  check {score:.2f}"
        return text


def _numbers(values: Any, count: int) -> bool:
    """Whether `values` is a list of `count` finite numbers (bool is no number)."""
    return (
        isinstance(values, list)
        and len(values) == count
        and all(isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v) for v in values)
    )


class History(BaseModel):
    """All turns of one session (ids ascending = creation order) and where the cursor is.

    Turns are indexed by id and by parent once, so lookups stay cheap in sessions of thousands of
    turns; nothing walks the tree by recursion, whose depth would be the session's.
    """

    name: str
    cursor: int | None
    turns: list[Turn]
    _by_id: dict[int, Turn] = PrivateAttr()
    _children: dict[int | None, list[Turn]] = PrivateAttr()

    def model_post_init(self, context: Any) -> None:
        self._by_id = {t.id: t for t in self.turns}
        self._children = {}
        for t in self.turns:
            self._children.setdefault(t.parent, []).append(t)

    def turn(self, turn_id: int) -> Turn:
        if turn_id not in self._by_id:
            raise UserError(f"session '{self.name}' has no turn {turn_id}")
        return self._by_id[turn_id]

    def children(self, turn_id: int | None) -> list[Turn]:
        """The turns under `turn_id` (None: the roots), oldest first."""
        return list(self._children.get(turn_id, ()))

    def walk(self, last: Collection[int] = ()) -> Iterator[tuple[Turn, int]]:
        """Every turn with its depth (roots 0), depth first, a parent before its children.

        Children come oldest first, except that those whose id is in `last` come after the rest:
        the export walks the cursor's branch last so its replay ends there.
        """
        stack = [(t, 0) for t in reversed(self._ordered(None, last))]
        while stack:
            turn, depth = stack.pop()
            yield turn, depth
            stack.extend((kid, depth + 1) for kid in reversed(self._ordered(turn.id, last)))

    def _ordered(self, turn_id: int | None, last: Collection[int]) -> list[Turn]:
        return sorted(self._children.get(turn_id, ()), key=lambda t: t.id in last)

    def current(self) -> Turn | None:
        return None if self.cursor is None else self.turn(self.cursor)

    def cursor_turn(self) -> Turn:
        """The cursor's turn, for a session that has turns (a stored one always does); else one line."""
        if self.cursor is None:
            raise UserError(f"session '{self.name}' has no turns yet")
        return self.turn(self.cursor)

    def undo_target(self) -> Turn:
        cur = self.current()
        if cur is None or cur.parent is None:
            raise UserError(f"nothing to undo in session '{self.name}'")
        return self.turn(cur.parent)

    def redo_target(self) -> Turn:
        kids = self.children(self.cursor)
        if not kids:
            raise UserError(f"nothing to redo in session '{self.name}'")
        return kids[-1]

    def path(self, turn_id: int) -> list[Turn]:
        """Turns from the root down to turn_id."""
        out = [self.turn(turn_id)]
        while out[-1].parent is not None:
            out.append(self.turn(out[-1].parent))
        return out[::-1]

    def tree_lines(self, images: bool = False) -> list[str]:
        """The tree as `icedit sessions show` and the chat's /history print it: a title, then one line per
        turn in walk order, * on the cursor, indented by `indent`, text made `printable` (and with `images`,
        each turn's image id)."""
        lines = [f"session {printable(self.name)} (cursor at #{self.cursor})"]
        for t, depth in self.walk():
            mark = "*" if t.id == self.cursor else " "
            seed = f"  seed {t.seed}" if t.seed is not None else ""
            image = f"  [{t.image_sha256[:12]}]" if images else ""
            lines.append(f"{mark} {indent(depth)}#{t.id} {t.kind}: {printable(t.label)}{seed}{image}")
        return lines

    def newest_below(self, turn_id: int) -> list[Turn]:
        """The turns redo would step through from turn_id: each one the newest child of the one before."""
        out: list[Turn] = []
        while kids := self._children.get(out[-1].id if out else turn_id):
            out.append(kids[-1])
        return out


def numbered(turn_ids: list[int]) -> str:
    """Turns named in one line ("turn 4", "turns 4, 7"), the first ten and a count when there are more."""
    if len(turn_ids) == 1:
        return f"turn {turn_ids[0]}"
    shown = ", ".join(map(str, turn_ids[:10]))
    return f"turns {shown}" + (f", ... ({len(turn_ids)} in all)" if len(turn_ids) > 10 else "")


def indent(depth: int) -> str:
    """A printed tree line's indent: two spaces a level, at most MAX_INDENT levels, then the depth itself."""
    if depth <= MAX_INDENT:
        return "  " * depth
    return "  " * MAX_INDENT + f"({depth}) "
