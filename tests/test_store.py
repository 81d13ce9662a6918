"""The session store and its history tree, driven directly (no agent, no engine)."""

from __future__ import annotations

import sqlite3
import time

import pytest
from PIL import Image

from assistant.errors import UserError
from sessions.identity import encode_png, png_digest
from sessions.store import MIGRATIONS, NewTurn, Store


def draft(
    kind: str = "edit",
    message: str = "m",
    color: tuple[int, int, int] = (10, 20, 30),
    size: tuple[int, int] = (8, 6),
    seed: int | None = None,
    replies: list[tuple[str, str]] | None = None,
) -> NewTurn:
    png = encode_png(Image.new("RGB", size, color))
    return NewTurn(
        kind=kind,
        message=message,
        png=png,
        image_sha256=png_digest(png),
        size=size,
        plan=None if kind == "open" else {"intent": "edit", "instruction": message},
        params={} if seed is None else {"seed": seed},
        replies=[("user", message)] if replies is None else replies,
    )


def dump(store: Store) -> list[str]:
    return list(store.db.iterdump())


@pytest.fixture
def tree(store):
    """open(1) -> a(2) -> b(3); cursor on b."""
    opened, a = store.add_turns(
        "s", None, [draft("open", "open cat", (1, 1, 1)), draft("edit", "a", (2, 2, 2))]
    )
    (b,) = store.add_turns("s", a.id, [draft("edit", "b", (3, 3, 3))])
    return opened, a, b


# ---------------------------------------------------------------------- the tree


def test_undo_goes_to_the_parent_and_redo_to_the_newest_child(store, tree):
    _, a, b = tree
    h = store.history("s")
    assert h.cursor == b.id
    assert h.undo_target().id == a.id
    store.move_cursor("s", a.id)
    (c,) = store.add_turns("s", a.id, [draft("edit", "c", (4, 4, 4))])  # a second child of a
    store.move_cursor("s", a.id)
    h = store.history("s")
    assert [t.id for t in h.children(a.id)] == [b.id, c.id]
    assert h.redo_target().id == c.id  # the newest child, not the first


def test_a_new_turn_after_undo_makes_a_branch_and_undo_deletes_nothing(store, tree):
    opened, a, b = tree
    store.move_cursor("s", a.id)
    assert [t.id for t in store.history("s").turns] == [opened.id, a.id, b.id]
    (c,) = store.add_turns("s", store.history("s").cursor, [draft("edit", "c", (4, 4, 4))])
    h = store.history("s")
    assert [(t.id, t.parent) for t in h.turns] == [
        (opened.id, None),
        (a.id, opened.id),
        (b.id, a.id),
        (c.id, a.id),
    ]
    assert h.cursor == c.id
    assert [t.id for t in h.path(c.id)] == [opened.id, a.id, c.id]
    assert store.image(b.image_sha256) == encode_png(Image.new("RGB", (8, 6), (3, 3, 3)))


def test_undo_at_the_root_and_redo_at_a_leaf_are_clear_errors(store, tree):
    opened = tree[0]
    with pytest.raises(UserError, match=r"^nothing to redo in session 's'$"):
        store.history("s").redo_target()
    store.move_cursor("s", opened.id)
    with pytest.raises(UserError, match=r"^nothing to undo in session 's'$"):
        store.history("s").undo_target()


def test_add_turns_chains_parents_and_moves_the_cursor_to_the_last(store):
    opened, edited = store.add_turns(
        "s", None, [draft("open", "open cat", (1, 1, 1)), draft("edit", "a", (2, 2, 2))]
    )
    assert (opened.kind, opened.parent, opened.message) == ("open", None, "open cat")
    assert (edited.kind, edited.parent, edited.message) == ("edit", opened.id, "a")
    assert edited.id == opened.id + 1
    assert store.history("s").cursor == edited.id
    assert edited.plan == {"intent": "edit", "instruction": "a"}


def test_a_session_is_created_by_its_first_turn(store):
    assert not store.exists("s")
    assert store.sessions() == []
    with pytest.raises(UserError, match="no session named 's'"):
        store.history("s")
    (opened,) = store.add_turns("s", None, [draft("open", "open cat")])
    assert store.exists("s")
    assert [(i.name, i.cursor, i.turns) for i in store.sessions()] == [("s", opened.id, 1)]


def test_a_failed_first_turn_leaves_no_session_behind(store, tree):
    before = dump(store)
    # parent 1 belongs to session "s": the new session "t" must not be half-created
    with pytest.raises(UserError, match=r"session 't' has no turn 1"):
        store.add_turns("t", 1, [draft("edit", "x", (9, 9, 9))])
    assert not store.exists("t")
    assert dump(store) == before


def test_images_are_content_addressed(store):
    same = draft("open", "open cat", (5, 5, 5))
    store.add_turns("s", None, [same, draft("edit", "a", (5, 5, 5))])  # an edit that changed nothing
    store.add_turns("t", None, [draft("open", "open again", (5, 5, 5))])
    rows = store.db.execute("SELECT sha256, png, width, height FROM images").fetchall()
    assert rows == [(same.image_sha256, same.png, 8, 6)]
    assert store.db.execute("SELECT COUNT(*) FROM turns").fetchone()[0] == 3


def test_reopen_keeps_sessions_turns_cursor_and_images(settings, tree, store):
    a = tree[1]
    store.move_cursor("s", a.id, [("user", "undo")])
    history, sessions, transcript = store.history("s"), store.sessions(), store.transcript("s")
    images = {t.image_sha256: store.image(t.image_sha256) for t in history.turns}
    store.close()
    with Store(settings.store_path) as again:
        assert again.history("s") == history
        assert again.history("s").cursor == a.id
        assert again.sessions() == sessions
        assert again.transcript("s") == transcript
        for digest, png in images.items():
            assert again.image(digest) == png
            assert png_digest(again.image(digest)) == digest
    # the fixture closes the (already closed) store again; sqlite allows that


def test_user_version_counts_the_migrations(store):
    assert store.db.execute("PRAGMA user_version").fetchone()[0] == len(MIGRATIONS)


def test_a_store_from_a_newer_version_is_refused(settings):
    Store(settings.store_path).close()
    db = sqlite3.connect(settings.store_path)
    db.execute(f"PRAGMA user_version = {len(MIGRATIONS) + 1}")
    db.close()
    with pytest.raises(UserError, match="newer") as e:
        Store(settings.store_path)
    assert f"schema {len(MIGRATIONS) + 1}, this one knows {len(MIGRATIONS)}" in str(e.value)
    assert "\n" not in str(e.value)


def test_a_file_that_is_not_a_database_is_one_line(settings):
    settings.store_path.parent.mkdir(parents=True)
    settings.store_path.write_bytes(b"this is not sqlite" * 100)
    with pytest.raises(UserError, match="cannot open the session store"):
        Store(settings.store_path)


def test_sessions_counts_turns_per_session_newest_first(store):
    store.add_turns("one", None, [draft("open", "o", (1, 1, 1)), draft("edit", "e", (2, 2, 2))])
    (root,) = store.add_turns("two", None, [draft("open", "o", (3, 3, 3))])
    store.add_turns("two", root.id, [draft("edit", "x", (4, 4, 4))])
    (x2,) = store.add_turns("two", root.id, [draft("edit", "y", (5, 5, 5))])
    infos = {i.name: i for i in store.sessions()}
    assert {n: (i.turns, i.cursor) for n, i in infos.items()} == {"one": (2, 2), "two": (3, x2.id)}
    assert [i.name for i in store.sessions()] == ["two", "one"]
    time.sleep(0.01)  # `updated` has millisecond resolution
    store.move_cursor("one", 1)  # a cursor move makes a session the most recent
    assert [i.name for i in store.sessions()] == ["one", "two"]


def test_transcript_holds_the_chat_lines_in_order(store):
    opened, a = store.add_turns(
        "s",
        None,
        [
            draft("open", "open cat", (1, 1, 1), replies=[("user", "open cat")]),
            draft(
                "edit", "add a hat", (2, 2, 2), replies=[("user", "add a hat"), ("assistant", "a hat it is")]
            ),
        ],
    )
    store.move_cursor("s", opened.id, [("user", "undo that")])
    store.log("s", [("user", "what is this?"), ("assistant", "a cat")])
    store.move_cursor("s", a.id)  # no replies: nothing logged
    lines = [(e.role, e.text, e.turn_id) for e in store.transcript("s")]
    assert lines == [
        ("user", "open cat", opened.id),
        ("user", "add a hat", a.id),
        ("assistant", "a hat it is", a.id),
        ("user", "undo that", opened.id),
        ("user", "what is this?", opened.id),
        ("assistant", "a cat", opened.id),
    ]


@pytest.mark.parametrize(
    "call",
    [
        lambda s: s.history("ghost"),
        lambda s: s.transcript("ghost"),
        lambda s: s.move_cursor("ghost", 1),
        lambda s: s.log("ghost", [("user", "hi")]),
    ],
    ids=["history", "transcript", "move_cursor", "log"],
)
def test_an_unknown_session_is_named(store, tree, call):
    before = dump(store)
    with pytest.raises(UserError, match=r"^no session named 'ghost' \(see `icedit sessions list`\)$"):
        call(store)
    assert dump(store) == before


def test_move_cursor_to_a_turn_of_another_session_changes_nothing(store, tree):
    (other,) = store.add_turns("t", None, [draft("open", "open dog", (7, 7, 7))])
    before = dump(store)
    with pytest.raises(UserError, match=rf"^session 's' has no turn {other.id}$"):
        store.move_cursor("s", other.id, [("user", "jump")])
    assert dump(store) == before
    assert store.history("s").cursor == tree[2].id
    with pytest.raises(UserError, match=r"session 's' has no turn 999"):
        store.add_turns("s", 999, [draft("edit", "x", (9, 9, 9))])
    assert dump(store) == before


def test_an_unknown_image_is_a_user_error(store):
    with pytest.raises(UserError, match=r"image 000000000000 is not in the store"):
        store.image("0" * 64)


def test_a_store_that_fails_while_it_is_made_leaves_nothing_behind(tmp_path, monkeypatch):
    """The first command is killed (here: fails) while it makes the store: no file without tables is
    left at the store's path, nor a temporary beside it; the next command makes it whole."""
    path = tmp_path / "home" / "sessions.sqlite3"

    def dies(self):
        raise KeyboardInterrupt

    with monkeypatch.context() as m:
        m.setattr(Store, "_migrate", dies)
        with pytest.raises(KeyboardInterrupt):
            Store(path)
    assert sorted(p.name for p in path.parent.iterdir()) == []
    with Store(path) as store:
        assert store.db.execute("PRAGMA user_version").fetchone() == (len(MIGRATIONS),)
        store.add_turns("s", None, [draft("open", "open a")])
    assert sorted(p.name for p in path.parent.iterdir() if not p.name.endswith(("-wal", "-shm"))) == [
        path.name
    ]
