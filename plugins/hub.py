"""Hub look-ups the built-in plugins share: is a repo already cached here, and can the hub be reached?

Offline, the hub client retries a missing file for most of a minute before failing; asking these
first lets a loader say "not here, download it like this" at once.
"""

from __future__ import annotations

import os
import socket
from urllib.parse import urlparse


def cached(repo_id: str, filename: str) -> bool:
    from huggingface_hub import try_to_load_from_cache

    try:
        return isinstance(try_to_load_from_cache(repo_id, filename), str)
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


def unavailable(repo_id: str, filename: str) -> bool:
    """True when the repo's file is neither cached nor downloadable now."""
    return not cached(repo_id, filename) and not reachable()
