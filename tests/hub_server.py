"""A Hugging Face hub on 127.0.0.1 that the real clients (huggingface_hub, diffusers, transformers) download from.

It speaks the few endpoints those clients call, with the real hub's headers and errors: `X-Repo-Commit` and
an `ETag` (git sha1, or sha256 for LFS files) on every file, `Range` resumes, and `X-Error-Code` on failures,
which `hf_raise_for_status` turns into RepositoryNotFoundError, GatedRepoError, RevisionNotFoundError and
EntryNotFoundError. It advertises no Xet, so clients take the plain HTTP download path.

The clients read HF_ENDPOINT and HF_HOME once, at import: run them in a subprocess with `client_env()`.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import socket
import subprocess
import sys
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import NamedTuple, Self
from urllib.parse import parse_qs, parse_qsl, unquote, urlsplit

import pytest

LFS_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".gguf", ".onnx", ".msgpack", ".h5")
LFS_MIN_SIZE = 10 * 2**20  # the hub stores bigger files in LFS whatever their name
DATE = "2024-08-01T00:00:00.000Z"
ROOT = Path(__file__).resolve().parent.parent


@dataclass(frozen=True)
class Repo:
    """A model repo: the main branch's files, its other branches or tags, and whether access is gated ("manual")."""

    files: dict[str, bytes]
    gated: bool = False
    revisions: dict[str, dict[str, bytes]] = field(default_factory=dict)


class Blob(NamedTuple):
    oid: str  # git blob sha1 (of the LFS pointer, for LFS files)
    size: int
    sha256: str | None  # set for LFS files
    pointer_size: int | None

    @property
    def etag(self) -> str:
        return self.sha256 or self.oid


def _git_sha1(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def _blob(path: str, data: bytes) -> Blob:
    if not (path.endswith(LFS_SUFFIXES) or len(data) >= LFS_MIN_SIZE):
        return Blob(_git_sha1(data), len(data), None, None)
    sha256 = hashlib.sha256(data).hexdigest()
    pointer = f"version https://git-lfs.github.com/spec/v1\noid sha256:{sha256}\nsize {len(data)}\n".encode()
    return Blob(_git_sha1(pointer), len(data), sha256, len(pointer))


@dataclass(frozen=True)
class Snapshot:
    """One revision's files with their blob ids; `sha` hashes them, so equal contents give the same commit."""

    files: dict[str, bytes]
    blobs: dict[str, Blob]
    sha: str

    @classmethod
    def of(cls, files: dict[str, bytes]) -> Snapshot:
        blobs = {path: _blob(path, data) for path, data in sorted(files.items())}
        sha = hashlib.sha1("".join(f"{p}\0{b.oid}\n" for p, b in blobs.items()).encode()).hexdigest()
        return cls(files, blobs, sha)

    def folders(self) -> set[str]:
        return {"/".join(p.split("/")[:i]) for p in self.files for i in range(1, p.count("/") + 1)}


class Request(NamedTuple):
    method: str
    path: str  # percent-decoded, without the query
    params: dict[str, str]
    range: str | None
    authorization: str | None
    status: int
    error: str | None  # the X-Error-Code sent; None with a 404 means an endpoint this server lacks


class HubError(Exception):
    def __init__(self, status: int, code: str | None, message: str, commit: str | None = None):
        super().__init__(message)
        self.status, self.code, self.message, self.commit = status, code, message, commit


class HubServer(ThreadingHTTPServer):
    """Serves `repos` ({repo_id: Repo}); a bearer token in `granted_tokens` may read gated repos' files.

    `stop()` (or leaving the `with` block) returns once no thread of it runs: open keep-alive
    connections are cut, then every handler thread is joined.
    """

    daemon_threads = False  # server_close() joins only non-daemon handler threads

    def __init__(self, repos: dict[str, Repo], granted_tokens: set[str] | frozenset[str] = frozenset()):
        super().__init__(("127.0.0.1", 0), _Handler)
        self.repos = repos
        self.granted_tokens = set(granted_tokens)
        self._snapshots = {
            repo_id: {
                name: Snapshot.of(files) for name, files in {"main": repo.files, **repo.revisions}.items()
            }
            for repo_id, repo in repos.items()
        }
        self._lock = threading.Lock()
        self._requests: list[Request] = []
        self._faults: dict[tuple[str, str], int] = {}
        self._open: set[socket.socket] = set()
        self._thread = threading.Thread(
            target=self.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
        )

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"

    @property
    def requests(self) -> list[Request]:
        with self._lock:
            return list(self._requests)

    def downloads(self, repo_id: str) -> list[str]:
        """The files of `repo_id` sent by a GET (200 or 206, cut by `fail_once` or not), in order, with repeats."""
        prefix = f"/{repo_id}/resolve/"
        return [
            r.path[len(prefix) :].split("/", 1)[1]
            for r in self.requests
            if r.method == "GET" and r.path.startswith(prefix) and r.status in (200, 206)
        ]

    def fail_once(self, repo_id: str, filename: str, after_bytes: int) -> None:
        """The next GET of that file (any revision) sends `after_bytes` of the body, then drops the connection."""
        with self._lock:
            self._faults[(repo_id, filename)] = after_bytes

    def __enter__(self) -> Self:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def stop(self) -> None:
        if self._thread.is_alive():
            self.shutdown()
            self._thread.join()
        with self._lock:
            connections = list(self._open)
        for connection in connections:
            with contextlib.suppress(OSError):  # it may be closing already
                connection.shutdown(socket.SHUT_RDWR)
        self.server_close()  # joins the handler threads

    def process_request(self, request, client_address) -> None:
        with self._lock:
            self._open.add(request)
        super().process_request(request, client_address)

    def shutdown_request(self, request) -> None:
        with self._lock:
            self._open.discard(request)
        super().shutdown_request(request)

    def _record(self, request: Request) -> None:
        with self._lock:
            self._requests.append(request)

    def _take_fault(self, repo_id: str, filename: str) -> int | None:
        with self._lock:
            return self._faults.pop((repo_id, filename), None)

    def snapshot(self, repo_id: str, revision: str, token: str | None, files: bool) -> Snapshot:
        """The repo at `revision` (branch, tag or full commit sha), checked as the hub checks: repo, gate, revision.

        A gated repo's model info and file listing are public; its files (`files=True`) are not.
        """
        if repo_id not in self.repos:
            raise HubError(404 if token else 401, "RepoNotFound", "Repository not found")
        if files and self.repos[repo_id].gated and token not in self.granted_tokens:
            if token is None:
                raise HubError(
                    401,
                    "GatedRepo",
                    f"Access to model {repo_id} is restricted. You must have access to "
                    "it and be authenticated to access it. Please log in.",
                )
            raise HubError(
                403,
                "GatedRepo",
                f"Access to model {repo_id} is restricted and you are not in the "
                f"authorized list. Visit https://huggingface.co/{repo_id} to ask for access.",
            )
        snapshots = self._snapshots[repo_id]
        by_sha = {s.sha: s for s in snapshots.values()}
        if revision in snapshots:
            return snapshots[revision]
        if revision in by_sha:
            return by_sha[revision]
        raise HubError(404, "RevisionNotFound", f"Invalid rev id: {revision}")


_API = re.compile(
    r"^/api/models/(?P<repo>[^/]+/[^/]+)"
    r"(?:/(?P<op>revision|tree|paths-info|auth-check)(?:/(?P<rev>[^/]+))?(?:/(?P<path>.+))?)?$"
)
_RESOLVE = re.compile(r"^/(?P<repo>[^/]+/[^/]+)/resolve/(?P<rev>[^/]+)/(?P<path>.+)$")
_RANGE = re.compile(r"^bytes=(\d+)-(\d*)$")


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    timeout = 30  # a connection idle this long is closed
    server: HubServer

    def log_message(self, format, *args) -> None:
        """Quiet: tests read `server.requests` instead."""

    def do_GET(self) -> None:
        self._handle()

    def do_HEAD(self) -> None:
        self._handle()

    def do_POST(self) -> None:
        self._handle()

    @property
    def _token(self) -> str | None:
        scheme, _, token = self.headers.get("Authorization", "").partition(" ")
        return (token.strip() or None) if scheme == "Bearer" else None

    def _handle(self) -> None:
        url = urlsplit(self.path)
        self._params = dict(parse_qsl(url.query))
        self._form = parse_qs(self.rfile.read(int(self.headers.get("Content-Length") or 0)).decode())
        try:
            if (m := _RESOLVE.match(url.path)) and self.command in ("GET", "HEAD"):
                self._resolve(unquote(m["repo"]), unquote(m["rev"]), unquote(m["path"]))
            elif m := _API.match(url.path):
                self._api(unquote(m["repo"]), m["op"], unquote(m["rev"] or "main"), unquote(m["path"] or ""))
            else:
                raise HubError(404, None, f"no such endpoint: {self.command} {url.path}")
        except HubError as e:
            headers = {"X-Error-Message": e.message} | ({"X-Error-Code": e.code} if e.code else {})
            self._send(
                e.status,
                json.dumps({"error": e.message}).encode(),
                headers | ({"X-Repo-Commit": e.commit} if e.commit else {}),
                "application/json",
                error=e.code,
            )

    def _api(self, repo_id: str, op: str | None, revision: str, path: str) -> None:
        if op == "auth-check" and self.command == "GET":
            self.server.snapshot(repo_id, "main", self._token, files=True)
            return self._json({})
        if op in (None, "revision") and self.command == "GET" and not path:
            return self._json(self._model_info(repo_id, revision))
        if op == "tree" and self.command == "GET":
            return self._json(self._tree(repo_id, revision, path))
        if op == "paths-info" and self.command == "POST" and not path:
            snapshot = self.server.snapshot(repo_id, revision, self._token, files=False)
            expand = self._form.get("expand", ["False"])[-1].lower() == "true"
            wanted = [p.strip("/") for p in self._form.get("paths", [])]
            return self._json(
                [
                    self._entry(snapshot, p, expand)
                    for p in wanted
                    if p in snapshot.files or p in snapshot.folders()
                ]
            )
        raise HubError(404, None, f"no such endpoint: {self.command} {self.path}")

    def _model_info(self, repo_id: str, revision: str) -> dict:
        snapshot = self.server.snapshot(repo_id, revision, self._token, files=False)
        blobs = self._params.get("blobs", "").lower() == "true"

        def sibling(path: str, blob: Blob) -> dict:
            if not blobs:
                return {"rfilename": path}
            lfs = {"lfs": {"sha256": blob.sha256, "size": blob.size, "pointerSize": blob.pointer_size}}
            return {"rfilename": path, "size": blob.size, "blobId": blob.oid} | (lfs if blob.sha256 else {})

        return {
            "_id": snapshot.sha[:24],
            "id": repo_id,
            "modelId": repo_id,
            "author": repo_id.split("/")[0],
            "sha": snapshot.sha,
            "lastModified": DATE,
            "createdAt": DATE,
            "private": False,
            "disabled": False,
            "gated": "manual" if self.server.repos[repo_id].gated else False,
            "downloads": 0,
            "likes": 0,
            "tags": [],
            "siblings": [sibling(p, b) for p, b in snapshot.blobs.items()],
            "usedStorage": sum(b.size for b in snapshot.blobs.values()),
        }

    def _tree(self, repo_id: str, revision: str, path: str) -> list[dict]:
        snapshot = self.server.snapshot(repo_id, revision, self._token, files=False)
        path = path.strip("/")
        if path and path not in snapshot.folders():
            raise HubError(404, "EntryNotFound", f"{path} does not exist on {revision}", snapshot.sha)
        recursive = self._params.get("recursive", "").lower() == "true"
        expand = self._params.get("expand", "").lower() == "true"
        prefix = f"{path}/" if path else ""
        names = sorted(
            n
            for n in snapshot.folders() | snapshot.files.keys()
            if n.startswith(prefix) and (recursive or "/" not in n[len(prefix) :])
        )
        return [self._entry(snapshot, n, expand) for n in names]

    def _entry(self, snapshot: Snapshot, path: str, expand: bool) -> dict:
        """A tree / paths-info entry, as `RepoFile` / `RepoFolder` parse it."""
        commit = {"lastCommit": {"id": snapshot.sha, "title": "Upload", "date": DATE}} if expand else {}
        if path not in snapshot.blobs:
            tree = hashlib.sha1(f"{snapshot.sha}/{path}".encode()).hexdigest()
            return {"type": "directory", "oid": tree, "size": 0, "path": path} | commit
        blob = snapshot.blobs[path]
        lfs = (
            {"lfs": {"oid": blob.sha256, "size": blob.size, "pointerSize": blob.pointer_size}}
            if blob.sha256
            else {}
        )
        return {"type": "file", "oid": blob.oid, "size": blob.size, "path": path} | lfs | commit

    def _resolve(self, repo_id: str, revision: str, path: str) -> None:
        snapshot = self.server.snapshot(repo_id, revision, self._token, files=True)
        if path not in snapshot.files:
            raise HubError(404, "EntryNotFound", "Entry not found", snapshot.sha)
        data, blob = snapshot.files[path], snapshot.blobs[path]
        headers = {"ETag": f'"{blob.etag}"', "X-Repo-Commit": snapshot.sha, "Accept-Ranges": "bytes"}
        if blob.sha256:
            headers |= {"X-Linked-Etag": f'"{blob.sha256}"', "X-Linked-Size": str(blob.size)}
        status, body = 200, data
        if self.command == "GET" and (asked := self.headers.get("Range")):
            m = _RANGE.match(asked)
            start = int(m[1]) if m else len(data)
            end = min(int(m[2]), len(data) - 1) if m and m[2] else len(data) - 1
            if start >= len(data) or end < start:
                raise HubError(416, None, f"range {asked} not satisfiable for {len(data)} bytes")
            status, body = 206, data[start : end + 1]
            headers["Content-Range"] = f"bytes {start}-{end}/{len(data)}"
        cut = self.server._take_fault(repo_id, path) if self.command == "GET" else None
        self._send(status, body, headers, "application/octet-stream", cut)

    def _json(self, payload) -> None:
        self._send(200, json.dumps(payload).encode(), {}, "application/json")

    def _send(
        self,
        status: int,
        body: bytes,
        headers: dict[str, str],
        content_type: str,
        cut: int | None = None,
        error: str | None = None,
    ) -> None:
        """Send a response; with `cut`, only that many body bytes, then the connection drops mid-body."""
        self.server._record(
            Request(
                self.command,
                unquote(urlsplit(self.path).path),
                self._params,
                self.headers.get("Range"),
                self.headers.get("Authorization"),
                status,
                error,
            )
        )
        self.send_response(status)
        for name, value in {
            "Content-Type": content_type,
            "Content-Length": str(len(body)),
            **headers,
        }.items():
            self.send_header(name, value)
        if cut is not None:
            self.send_header("Connection", "close")
            self.close_connection = True
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body if cut is None else body[:cut])
            self.wfile.flush()


def client_env(
    server: HubServer, home: Path, token: str | None = None, offline: bool = False
) -> dict[str, str]:
    """The environment for a client subprocess: this server, an own HF_HOME, no Xet, no telemetry, no other HF_*."""
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("HF_", "HUGGINGFACE_"))
        and k not in ("TRANSFORMERS_OFFLINE", "TRANSFORMERS_CACHE")
    }
    env |= {
        "HF_ENDPOINT": server.endpoint,
        "HF_HOME": str(home),
        "HF_HUB_DISABLE_XET": "1",
        "HF_HUB_DISABLE_TELEMETRY": "1",
        "HF_HUB_DISABLE_PROGRESS_BARS": "1",
    }
    if token is not None:
        env["HF_TOKEN"] = token
    if offline:
        env["HF_HUB_OFFLINE"] = "1"
    return env


def run_client(code: str, env: dict[str, str], timeout: float = 120):
    """Run `code` in a fresh interpreter; it prints one JSON value as its last stdout line, which is returned."""
    done = subprocess.run(
        [sys.executable, "-c", code],
        env=env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-4000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.fixture
def hub():
    """Start a HubServer: `hub(repos, granted_tokens=...)`; every one started is stopped when the test ends."""
    started: list[HubServer] = []

    def start(repos: dict[str, Repo], granted_tokens: set[str] | frozenset[str] = frozenset()) -> HubServer:
        started.append(HubServer(repos, granted_tokens).__enter__())
        return started[-1]

    yield start
    for server in started:
        server.stop()
