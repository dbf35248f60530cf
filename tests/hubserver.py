"""A tiny fake Hugging Face Hub and file host on 127.0.0.1, for download (and push) tests that never touch the
internet.

Two threaded ``http.server`` instances share one :class:`FakeHub` state:

* ``hub`` (what ``HF_ENDPOINT`` points at) answers what ``huggingface_hub`` needs:
  - ``HEAD``/``GET /{repo}/resolve/{revision}/{filename}``: ``X-Repo-Commit``, ``ETag`` (git blob sha1 for small
    files), and for LFS files a 302 to the ``cdn`` server with ``X-Linked-Etag`` (sha256) and ``X-Linked-Size``,
    like the real Hub; 404s carry ``X-Error-Code: RepoNotFound | RevisionNotFound | EntryNotFound``;
  - ``GET /api/models/{repo}/revision/{rev}``: JSON with ``id``, ``sha`` and ``siblings``;
  - ``GET /api/models/{repo}/tree/{rev}``: the file listing (``path``, ``size``, ``oid``, ``lfs``) that
    ``snapshot_download`` uses for a pinned commit;
  - ``GET /gh/{path}``: a plain file URL that answers 302 to ``cdn /media/{path}`` (GitHub raw -> LFS media).
* ``cdn`` serves LFS blobs (``/lfs/{sha256}``) and plain files (``/media/{path}``).

Failure modes per file: ``"corrupt"`` (same length, flipped bytes), ``"truncate"`` (``Content-Length`` larger than
what is sent, then the connection is closed), ``"status:<code>"``. Every request is recorded in
:attr:`FakeHub.requests` so tests can assert that a cache hit made none.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import threading
import urllib.parse
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Dict, Iterator, List, Optional, Tuple

LFS_SUFFIXES = (".safetensors", ".pth", ".bin", ".pt", ".onnx")


def git_blob_sha1(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def lfs_pointer(data: bytes) -> bytes:
    """The pointer text git-lfs stores in a repository instead of ``data``."""
    return (b"version https://git-lfs.github.com/spec/v1\n"
            b"oid sha256:%s\nsize %d\n" % (sha256_hex(data).encode(), len(data)))


def _corrupt(data: bytes) -> bytes:
    return bytes(b ^ 0xFF for b in data[:64]) + data[64:] if data else b"x"


@dataclass
class FakeHub:
    """Shared state: repos (repo -> commit -> files), branches, plain URLs, failure modes, request log."""

    repos: Dict[str, Dict[str, Dict[str, bytes]]] = field(default_factory=dict)
    branches: Dict[str, Dict[str, str]] = field(default_factory=dict)
    media: Dict[str, bytes] = field(default_factory=dict)
    modes: Dict[Tuple[str, str], str] = field(default_factory=dict)  # (repo or "media", file) -> mode
    requests: List[Tuple[str, str, str]] = field(default_factory=list)  # (server, method, path)
    user_agents: List[str] = field(default_factory=list)  # of plain-URL requests (/gh, /media)
    hub_url: str = ""
    cdn_url: str = ""
    _lock: threading.Lock = field(default_factory=threading.Lock)

    # ---------------------------------------------------------------- set-up helpers for tests
    def add_repo(self, repo_id: str, commit: str, files: Dict[str, bytes], branch: Optional[str] = "main") -> None:
        self.repos.setdefault(repo_id, {})[commit] = dict(files)
        if branch:
            self.branches.setdefault(repo_id, {})[branch] = commit

    def add_url(self, path: str, data: bytes, mode: Optional[str] = None) -> str:
        """Serve ``data`` at ``/gh/{path}`` (302 to the cdn); returns the full URL."""
        self.media[path] = data
        if mode:
            self.modes[("media", path)] = mode
        return f"{self.hub_url}/gh/{path}"

    def set_mode(self, repo_or_media: str, filename: str, mode: Optional[str]) -> None:
        if mode is None:
            self.modes.pop((repo_or_media, filename), None)
        else:
            self.modes[(repo_or_media, filename)] = mode

    def count(self, server: Optional[str] = None) -> int:
        with self._lock:
            return sum(1 for s, _, _ in self.requests if server is None or s == server)

    def log(self, server: str, method: str, path: str) -> None:
        with self._lock:
            self.requests.append((server, method, path))

    # ---------------------------------------------------------------- lookups
    def resolve(self, repo_id: str, revision: str) -> Tuple[Optional[str], Optional[str]]:
        """(error code, commit)."""
        if repo_id not in self.repos:
            return "RepoNotFound", None
        commits = self.repos[repo_id]
        if revision in commits:
            return None, revision
        commit = self.branches.get(repo_id, {}).get(revision)
        if commit is None:
            return "RevisionNotFound", None
        return None, commit

    def find_blob(self, digest: str) -> Optional[Tuple[str, str, bytes]]:
        for repo_id, commits in self.repos.items():
            for files in commits.values():
                for name, data in files.items():
                    if sha256_hex(data) == digest:
                        return repo_id, name, data
        return None


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "FakeHub/1.0"
    hub: FakeHub
    role: str

    def log_message(self, format: str, *args: object) -> None:  # keep pytest output quiet
        pass

    # ---------------------------------------------------------------- response helpers
    def _send(self, status: int, body: bytes = b"", headers: Optional[Dict[str, str]] = None,
              content_length: Optional[int] = None) -> None:
        self.send_response(status)
        for key, value in (headers or {}).items():
            self.send_header(key, value)
        self.send_header("Content-Length", str(len(body) if content_length is None else content_length))
        self.end_headers()
        if self.command != "HEAD" and body:
            self.wfile.write(body)

    def _error(self, status: int, code: Optional[str], message: str, extra: Optional[Dict[str, str]] = None) -> None:
        headers = {"Content-Type": "application/json"}
        if code:
            headers["X-Error-Code"] = code
            headers["X-Error-Message"] = message
        headers.update(extra or {})
        self._send(status, json.dumps({"error": message}).encode(), headers)

    def _serve_bytes(self, data: bytes, mode: Optional[str], headers: Dict[str, str]) -> None:
        """Send a file body, honouring a failure mode."""
        if mode and mode.startswith("status:"):
            self._error(int(mode.split(":", 1)[1]), None, "injected failure")
            return
        if mode == "corrupt":
            data = _corrupt(data)
        headers = {"Content-Type": "application/octet-stream", **headers}
        if mode == "truncate" and self.command != "HEAD":
            self.send_response(200)
            for key, value in headers.items():
                self.send_header(key, value)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data[: len(data) // 2])
            self.wfile.flush()
            self.close_connection = True
            return
        self._send(200, data, headers)

    # ---------------------------------------------------------------- routing
    def do_HEAD(self) -> None:
        self._route()

    def do_GET(self) -> None:
        self._route()

    def do_POST(self) -> None:
        """Just enough of the upload API for push_to_hub: create a repo, preupload, commit (regular mode)."""
        path = urllib.parse.urlsplit(self.path).path
        self.hub.log(self.role, "POST", self.path)
        body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        if path == "/api/repos/create":
            req = json.loads(body)
            repo_id = f"{req['organization']}/{req['name']}" if req.get("organization") else req["name"]
            self.hub.repos.setdefault(repo_id, {})
            self.hub.branches.setdefault(repo_id, {})
            return self._send(200, json.dumps({"url": f"{self.hub.hub_url}/{repo_id}"}).encode(),
                              {"Content-Type": "application/json"})
        if path == "/api/validate-yaml":  # the model card's metadata check
            return self._send(200, b"{}", {"Content-Type": "application/json"})
        parts = path[len("/api/models/"):].split("/") if path.startswith("/api/models/") else []
        if len(parts) == 4 and parts[2] == "preupload":
            files = [{"path": f["path"], "uploadMode": "regular", "shouldIgnore": False}
                     for f in json.loads(body)["files"]]
            return self._send(200, json.dumps({"files": files}).encode(), {"Content-Type": "application/json"})
        if len(parts) == 4 and parts[2] == "commit":
            import base64

            repo_id, branch = f"{parts[0]}/{parts[1]}", urllib.parse.unquote(parts[3])
            base = self.hub.branches.get(repo_id, {}).get(branch)
            files = dict(self.hub.repos.get(repo_id, {}).get(base, {}))
            for line in body.decode().splitlines():
                item = json.loads(line)
                if item["key"] == "file":
                    files[item["value"]["path"]] = base64.b64decode(item["value"]["content"])
            commit = hashlib.sha1(repr(sorted(files.items())).encode()).hexdigest()
            self.hub.add_repo(repo_id, commit, files, branch=branch)
            return self._send(200, json.dumps({"commitUrl": f"{self.hub.hub_url}/{repo_id}/commit/{commit}",
                                               "commitOid": commit, "success": True}).encode(),
                              {"Content-Type": "application/json"})
        self._error(404, None, "Not Found")

    def _route(self) -> None:
        split = urllib.parse.urlsplit(self.path)
        path = split.path
        self.hub.log(self.role, self.command, self.path)
        if path.startswith(("/gh/", "/media/")):
            self.hub.user_agents.append(self.headers.get("User-Agent", ""))
        try:
            if self.role == "cdn":
                return self._cdn(path)
            if path.startswith("/api/models/"):
                return self._api(path[len("/api/models/"):])
            if path.startswith("/gh/"):
                rel = urllib.parse.unquote(path[len("/gh/"):])
                if rel not in self.hub.media:
                    return self._error(404, None, "Not Found")
                return self._send(302, b"", {"Location": f"{self.hub.cdn_url}/media/{urllib.parse.quote(rel)}"})
            parts = path.lstrip("/").split("/")
            if len(parts) >= 5 and parts[2] == "resolve":
                repo_id = f"{parts[0]}/{parts[1]}"
                revision = urllib.parse.unquote(parts[3])
                filename = urllib.parse.unquote("/".join(parts[4:]))
                return self._resolve(repo_id, revision, filename)
            self._error(404, None, "Not Found")
        except (BrokenPipeError, ConnectionResetError):
            self.close_connection = True

    def _resolve(self, repo_id: str, revision: str, filename: str) -> None:
        code, commit = self.hub.resolve(repo_id, revision)
        if code:
            return self._error(404, code, f"{code}: {repo_id}@{revision}")
        files = self.hub.repos[repo_id][commit]
        if filename not in files:
            return self._error(404, "EntryNotFound", f"{filename} not found", {"X-Repo-Commit": commit})
        data = files[filename]
        mode = self.hub.modes.get((repo_id, filename))
        if filename.endswith(LFS_SUFFIXES):
            digest = sha256_hex(data)
            return self._send(302, b"", {
                "Location": f"{self.hub.cdn_url}/lfs/{digest}?repo={urllib.parse.quote(repo_id)}",
                "X-Repo-Commit": commit,
                "ETag": f'"{git_blob_sha1(lfs_pointer(data))}"',
                "X-Linked-Etag": f'"{digest}"',
                "X-Linked-Size": str(len(data)),
            })
        self._serve_bytes(data, mode, {"X-Repo-Commit": commit, "ETag": f'"{git_blob_sha1(data)}"'})

    def _api(self, rest: str) -> None:
        parts = rest.split("/")
        if len(parts) < 4 or parts[2] not in ("revision", "tree"):
            return self._error(404, None, "Not Found")
        repo_id = f"{parts[0]}/{parts[1]}"
        revision = urllib.parse.unquote(parts[3])
        code, commit = self.hub.resolve(repo_id, revision)
        if code:
            return self._error(404, code, f"{code}: {repo_id}@{revision}")
        files = self.hub.repos[repo_id][commit]
        if parts[2] == "revision":
            body = {"id": repo_id, "modelId": repo_id, "sha": commit, "private": False,
                    "siblings": [{"rfilename": name} for name in sorted(files)]}
        else:
            body = []
            for name in sorted(files):
                data = files[name]
                entry = {"type": "file", "path": name, "size": len(data), "oid": git_blob_sha1(data)}
                if name.endswith(LFS_SUFFIXES):
                    pointer = lfs_pointer(data)
                    entry.update(size=len(data), oid=git_blob_sha1(pointer),
                                 lfs={"oid": sha256_hex(data), "size": len(data), "pointerSize": len(pointer)})
                body.append(entry)
        self._send(200, json.dumps(body).encode(), {"Content-Type": "application/json"})

    def _cdn(self, path: str) -> None:
        if path.startswith("/lfs/"):
            found = self.hub.find_blob(path[len("/lfs/"):])
            if found is None:
                return self._error(404, None, "Not Found")
            repo_id, name, data = found
            return self._serve_bytes(data, self.hub.modes.get((repo_id, name)), {"ETag": f'"{sha256_hex(data)}"'})
        if path.startswith("/media/"):
            rel = urllib.parse.unquote(path[len("/media/"):])
            if rel not in self.hub.media:
                return self._error(404, None, "Not Found")
            return self._serve_bytes(self.hub.media[rel], self.hub.modes.get(("media", rel)), {})
        self._error(404, None, "Not Found")


def _start(hub: FakeHub, role: str) -> ThreadingHTTPServer:
    handler = type(f"{role.title()}Handler", (_Handler,), {"hub": hub, "role": role})
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
    return server


@contextlib.contextmanager
def serve() -> Iterator[FakeHub]:
    """Start the fake Hub and CDN on free ports of 127.0.0.1; yields the shared :class:`FakeHub`."""
    hub = FakeHub()
    servers = [_start(hub, "hub"), _start(hub, "cdn")]
    hub.hub_url = "http://127.0.0.1:%d" % servers[0].server_address[1]
    hub.cdn_url = "http://127.0.0.1:%d" % servers[1].server_address[1]
    try:
        yield hub
    finally:
        for server in servers:
            server.shutdown()
            server.server_close()
