"""A session's history: a tree of turns and a cursor. Undo and redo only move the cursor."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel

from assistant.errors import UserError

TurnKind = Literal["open", "edit"]


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


class History(BaseModel):
    """All turns of one session (ids ascending = creation order) and where the cursor is."""

    name: str
    cursor: int | None
    turns: list[Turn]

    def turn(self, turn_id: int) -> Turn:
        for t in self.turns:
            if t.id == turn_id:
                return t
        raise UserError(f"session '{self.name}' has no turn {turn_id}")

    def children(self, turn_id: int | None) -> list[Turn]:
        return [t for t in self.turns if t.parent == turn_id]

    def current(self) -> Turn | None:
        return None if self.cursor is None else self.turn(self.cursor)

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
