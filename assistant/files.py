"""Writing the files a person keeps (edits, archives, scripts, sheets): never half a file, never over
a file that is already there unless asked.

Each file is written to a temporary file in its own folder, flushed and fsynced, then moved into
place in one step: a full disk, a crash or `kill -9` leaves the old file (or no file) exactly as it
was, never a truncated one. Without `force` the move is a hard link, which the kernel refuses when
the name exists, so even a file that appears meanwhile is not replaced; with `force` it is a
rename over it. A link planted at the name is replaced, never written through.
"""

from __future__ import annotations

import errno
import os
import stat
import tempfile
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import BinaryIO, Literal

from PIL import Image

from assistant.errors import UserError
from assistant.text import printable

Content = bytes | Callable[[BinaryIO], None]
"""The bytes to write, or a function that writes them to the open file (PIL's `save`, `zipfile`)."""


Kind = Literal["file", "folder", "special", "missing", "loop", "bad name", "unreadable"]


_ERRNO_KINDS: dict[int | None, Kind] = {
    errno.ELOOP: "loop",
    errno.ENAMETOOLONG: "bad name",
    errno.ENOTDIR: "missing",
}
"""The `stat` errors that say what a path is; any other is "unreadable"."""


def kind(path: str | Path) -> Kind:
    """What a path names, following links, without opening it (a FIFO opened to look would block) and without
    raising: the file system's answers (a NUL byte, a loop of links, a device) become one word."""
    try:
        mode = os.stat(path).st_mode
    except ValueError:
        return "bad name"  # a NUL byte
    except FileNotFoundError:
        return "missing"  # a dangling link too
    except OSError as e:
        return _ERRNO_KINDS.get(e.errno, "unreadable")
    if stat.S_ISREG(mode):
        return "file"
    return "folder" if stat.S_ISDIR(mode) else "special"


SAID: dict[str, str] = {
    "bad name": "not a usable file name (a NUL byte, or too long)",
    "missing": "no such file",
    "loop": "a loop of symbolic links",
    "unreadable": "permission denied",
    "special": "a device, pipe or socket, not a file",
}
"""What each kind is, as the end of a one-line error (`path: ...`)."""


def kind_problem(path: str | Path, found: Kind) -> str:
    """The one line for a path that is none of what a caller takes (`found` from `kind`, a key of SAID)."""
    return f"{printable(os.fsdecode(path))}: {SAID[found]}"


def in_the_way(path: Path) -> bool:
    """Whether something (a file, a folder, a link, even a dangling one) holds this name."""
    return os.path.lexists(path)


def refuse_existing(paths: Iterable[Path], force: bool = False) -> None:
    """One line naming the first path that is already there, unless `force`; folders are never replaced."""
    for path in paths:
        if os.path.isdir(path) and not os.path.islink(path):
            raise UserError(f"{path} is a folder: give a file name")
        if not force and in_the_way(path):
            raise UserError(f"{path} already exists: choose another name, or pass --force to replace it")


def _umask() -> int:
    """The process's umask, read where Linux shows it: setting it to read it races with other threads."""
    try:
        with open("/proc/self/status") as f:
            return next(int(line.split()[1], 8) for line in f if line.startswith("Umask:"))
    except (OSError, StopIteration, ValueError):
        mask = os.umask(0o022)
        os.umask(mask)
        return mask


def write_file(path: Path, content: Content, *, force: bool = False) -> Path:
    """Write `content` to `path` atomically; an existing `path` is replaced only with `force`."""
    path = Path(path)
    refuse_existing([path], force)
    folder = path.parent
    try:
        short = os.fsdecode(os.fsencode(path.name)[:100])  # bytes, not characters, count against NAME_MAX
        fd, temp = tempfile.mkstemp(dir=folder, prefix=f".{short}.", suffix=".part")
    except OSError as e:
        raise _error(path, e) from None
    try:
        with os.fdopen(fd, "wb") as f:
            os.fchmod(f.fileno(), 0o666 & ~_umask())  # mkstemp's 0600 is for the temporary name only
            if callable(content):
                content(f)
            else:
                f.write(content)
            f.flush()
            os.fsync(f.fileno())
        _place(Path(temp), path, force)
        _sync_folder(folder)
    except OSError as e:
        raise _error(path, e) from None
    finally:
        if os.path.lexists(temp):
            os.unlink(temp)
    return path


def leftover(entry: Path) -> bool:
    """Whether `entry` is a temporary name `write_file` left when it was killed after linking the file
    into place (`.NAME.XXXXXXXX.part`, the same file as NAME beside it): dropping that name loses nothing."""
    name = entry.name
    if not (name.startswith(".") and name.endswith(".part")) or name.count(".") < 3:
        return False
    written = entry.with_name(name[1:].removesuffix(".part").rsplit(".", 1)[0])
    try:
        return os.path.samestat(os.lstat(entry), os.lstat(written)) and stat.S_ISREG(os.lstat(entry).st_mode)
    except OSError:
        return False


def _place(temp: Path, path: Path, force: bool) -> None:
    if force:
        os.replace(temp, path)
        return
    try:
        os.link(temp, path)  # fails with EEXIST if anything took the name since it was checked
    except FileExistsError:
        raise UserError(
            f"{path} already exists: choose another name, or pass --force to replace it"
        ) from None
    except OSError as e:
        if e.errno not in (errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EXDEV):
            raise
        os.replace(temp, path)  # a file system without hard links (FAT, some network shares)


def _sync_folder(folder: Path) -> None:
    """Make the new name itself durable (the rename lives in the folder's own data)."""
    try:
        fd = os.open(folder, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass  # some file systems cannot sync a folder; the file's data is synced already
    finally:
        os.close(fd)


def _error(path: Path, error: OSError) -> UserError:
    """One true line: the path we meant (not `error.filename`, which may be a temporary name or None)."""
    return UserError(f"cannot write {path}: {error.strerror or error}")


def save_image(img: Image.Image, path: Path, force: bool = False) -> Path:
    """Write `img` as the type its name says (.png, .jpg, .webp, ...), atomically, replacing a file only with
    `force`."""
    fmt = Image.registered_extensions().get(path.suffix.lower())
    if fmt is None or fmt not in Image.SAVE:
        raise UserError(f"{path}: unknown image type (use .png, .jpg, .webp, ...)")
    return write_file(path, lambda f: img.save(f, fmt), force=force)
