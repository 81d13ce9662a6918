"""Hub look-ups the built-in plugins share: is a repo already cached here, and can the hub be reached?

Offline, the hub client retries a missing file for most of a minute before failing; asking these
first lets a loader say "not here, download it like this" at once. A pinned `revision` (commit,
tag or branch) is looked up as such: another revision in the cache does not count.
"""

from __future__ import annotations

import os
import socket
from pathlib import Path
from urllib.parse import urlparse

from assistant.errors import UserError


def is_local(ref: str) -> bool:
    """A path (it exists, or is spelt like one) rather than a hub repo id."""
    return ref.startswith((".", "/", "~")) or Path(ref).exists()


def check_repo_id(ref: str, what: str) -> None:
    """A one-line error for a reference that is neither a local path nor a valid hub id."""
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(ref)
    except HFValidationError:
        raise UserError(f"the {what} '{ref}' is neither a local path nor a hub id (owner/name)") from None


def cached(repo_id: str, filename: str, revision: str | None = None) -> bool:
    from huggingface_hub import try_to_load_from_cache

    try:
        return isinstance(try_to_load_from_cache(repo_id, filename, revision=revision), str)
    except ValueError:  # not a valid repo id
        return False


def reachable(timeout: float = 3.0) -> bool:
    if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on"):
        return False
    host = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co")).hostname or "huggingface.co"
    try:
        socket.create_connection((host, 443), timeout=timeout).close()
    except OSError:
        return False
    return True


def unavailable(repo_id: str, filename: str, revision: str | None = None) -> bool:
    """True when the repo's file (at `revision`, default the main branch) is neither cached nor downloadable now."""
    return not cached(repo_id, filename, revision) and not reachable()


def at_revision(ref: str, revision: str | None) -> str:
    """How messages name a hub reference: 'owner/name' or 'owner/name@revision'."""
    return ref if revision is None else f"{ref}@{revision}"
