"""The session's turns as a tree: branches visible, the cursor highlighted; selecting a node jumps there."""

from __future__ import annotations

from dataclasses import dataclass

from rich.text import Text
from textual.message import Message
from textual.widgets import Tree

from sessions.history import History, Turn

LABEL_WIDTH = 26
MAX_DEPTH = 100
"""Levels drawn nested; deeper turns continue in the last level's column, in walk order (Textual's Tree
recurses once per level, so a session 1 000 turns deep would not draw at all)."""


def label(turn: Turn, cursor: int | None) -> Text:
    """`▶ #3 add a red scarf`: the message cut to LABEL_WIDTH; the cursor's line in reverse."""
    message = turn.label if len(turn.label) <= LABEL_WIDTH else turn.label[: LABEL_WIDTH - 1] + "…"
    text = Text.assemble(("▶ " if turn.id == cursor else "  "), (f"#{turn.id} ", "bold"), message)
    if turn.id == cursor:
        text.stylize("bold reverse")
    return text


class HistoryTree(Tree[int]):
    """Node data is the turn id; the tree is rebuilt from the store after every change."""

    @dataclass
    class Jump(Message):
        """The person selected a turn (Enter or click)."""

        tree: HistoryTree
        turn_id: int

        @property
        def control(self) -> HistoryTree:
            return self.tree

    def __init__(self, **kwargs) -> None:
        super().__init__("no image yet", **kwargs)
        self.auto_expand = False
        self.guide_depth = 2
        self.show_root = False

    def show(self, history: History | None) -> None:
        self.clear()
        if history is None:
            return
        self.root.set_label(Text(f"session {history.name}"))  # a name is text, not markup
        cursor_node = None
        stack = [(self.root, t, 0) for t in reversed(history.children(None))]
        while stack:
            parent, turn, depth = stack.pop()
            kids = history.children(turn.id)
            nest = depth < MAX_DEPTH
            node = parent.add(
                label(turn, history.cursor), data=turn.id, expand=True, allow_expand=bool(kids) and nest
            )
            if turn.id == history.cursor:
                cursor_node = node
            stack.extend((node, kid, depth + 1) if nest else (parent, kid, depth) for kid in reversed(kids))
        self.root.expand_all()
        if cursor_node is not None:
            self.call_after_refresh(self.move_cursor, cursor_node)

    def on_tree_node_selected(self, event: Tree.NodeSelected[int]) -> None:
        event.stop()
        if event.node.data is not None:
            self.post_message(self.Jump(self, event.node.data))
