"""A STAND-IN for the Hugging Face hub's HTTP API, on 127.0.0.1 (or any address): not the hub.

It serves a few tiny repositories the way the hub answers `huggingface_hub`'s client (set
`HF_ENDPOINT=http://ADDRESS:PORT`), for the calls `snapshot_download` and vcluster's own
download program make, and nothing else:

- `GET /api/models/ORG/NAME/revision/REV`: the repository's info at a revision (`sha`, the
  commit; `siblings`, its files);
- `GET /api/models/ORG/NAME/tree/REV[/PATH]?recursive=...`: its files, with `oid` (the git blob
  id), `size` and, for large files, `lfs` (`oid` is their sha256), in one page;
- `HEAD|GET /ORG/NAME/resolve/REV/PATH`: a file, with `X-Repo-Commit`, `ETag` (the sha256 of an
  LFS file, else the git blob id; `X-Linked-Etag` and `X-Linked-Size` too for an LFS file),
  `Content-Length`, `Accept-Ranges` and `Range: bytes=N-` (206, `Content-Range`).

Errors carry the hub's `X-Error-Code` (`RepoNotFound`, `RevisionNotFound`, `EntryNotFound`,
`GatedRepo`) with its status (404; 401 without a token, 403 with a token that lacks access).
`cut_once` names files whose first GET stops after half their bytes (the connection closes),
to test resuming. With `cdn_host`, LFS files are redirected (302) to `/cdn/ORG/NAME/SHA256` on
that host name, as the hub sends them to its CDN (a token must not follow). Every request is logged in `requests`.
"""

from __future__ import annotations

import hashlib
import json
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import unquote, urlsplit

LFS_THRESHOLD = 1024
"""Files at least this large are served as LFS files (as the hub does for weights)."""


def git_blob_id(data: bytes) -> str:
    """The id git gives a file's bytes (the hub's `oid` and ETag of a non-LFS file)."""
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


@dataclass
class StandinRepo:
    """A model repository: its files at one commit, the branches and tags that name it."""

    repo_id: str
    files: dict[str, bytes]
    commit: str = ""
    refs: dict[str, str] = field(default_factory=dict)
    gated: bool = False

    def __post_init__(self) -> None:
        if not self.commit:
            listing = json.dumps({p: hashlib.sha256(d).hexdigest() for p, d in self.files.items()})
            self.commit = hashlib.sha1(listing.encode()).hexdigest()
        self.refs.setdefault("main", self.commit)

    def resolve(self, revision: str) -> str | None:
        """The commit a revision names (a branch, a tag or the commit itself), or None."""
        if revision == self.commit:
            return self.commit
        return self.refs.get(revision)

    def is_lfs(self, path: str) -> bool:
        return len(self.files[path]) >= LFS_THRESHOLD

    def etag(self, path: str) -> str:
        data = self.files[path]
        return hashlib.sha256(data).hexdigest() if self.is_lfs(path) else git_blob_id(data)


@dataclass(frozen=True)
class Request:
    method: str
    path: str
    range: str | None
    authorization: str | None
    client: str
    """The address the request came from."""


class StandinHub:
    """The server; `url` is what HF_ENDPOINT takes. Use `running(...)`."""

    def __init__(self, repos: list[StandinRepo], token: str | None = None, host: str = "127.0.0.1"):
        self.repos = {repo.repo_id: repo for repo in repos}
        self.token = token
        """The one token that opens gated repositories."""
        self.cut_once: set[str] = set()
        self.cdn_host: str | None = None
        """When set, LFS files are redirected there (`/cdn/ORG/NAME/SHA256`), as to the hub's CDN."""
        self.requests: list[Request] = []
        self._cut_done: set[str] = set()
        self._lock = threading.Lock()
        self._server = ThreadingHTTPServer((host, 0), _handler(self))
        self._server.daemon_threads = True
        self.url = f"http://{host}:{self._server.server_address[1]}"
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()

    def file_requests(self, path: str, repo_id: str | None = None) -> list[Request]:
        """The GETs of one file's bytes (by its path in the repository), from the CDN too."""
        repos = [self.repos[repo_id]] if repo_id else list(self.repos.values())
        ends = {"/" + path} | {f"/cdn/{r.repo_id}/{r.etag(path)}" for r in repos if path in r.files}
        return [r for r in self.requests if r.method == "GET" and any(map(r.path.endswith, ends))]

    def take_cut(self, key: str) -> bool:
        """Whether this GET of `key` is the one to cut (once per file)."""
        with self._lock:
            if key in self.cut_once and key not in self._cut_done:
                self._cut_done.add(key)
                return True
            return False


@contextmanager
def running(
    repos: list[StandinRepo], token: str | None = None, host: str = "127.0.0.1"
) -> Iterator[StandinHub]:
    hub = StandinHub(repos, token, host)
    hub.start()
    try:
        yield hub
    finally:
        hub.stop()


def _handler(hub: StandinHub) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, format: str, *args: object) -> None:
            pass  # the log is `hub.requests`

        def do_HEAD(self) -> None:
            self._answer(head=True)

        def do_GET(self) -> None:
            self._answer(head=False)

        def _answer(self, head: bool) -> None:
            path = unquote(urlsplit(self.path).path)
            hub.requests.append(
                Request(
                    self.command,
                    path,
                    self.headers.get("Range"),
                    self.headers.get("Authorization"),
                    self.client_address[0],
                )
            )
            parts = path.strip("/").split("/")
            if (
                parts[:2] == ["api", "models"]
                and len(parts) >= 6
                and parts[4] in ("revision", "tree")
            ):
                self._api(f"{parts[2]}/{parts[3]}", parts[4], parts[5], "/".join(parts[6:]))
            elif parts[0] == "cdn" and len(parts) == 4:
                self._cdn(f"{parts[1]}/{parts[2]}", parts[3], head)
            elif len(parts) >= 5 and parts[2] == "resolve":
                self._resolve(f"{parts[0]}/{parts[1]}", parts[3], "/".join(parts[4:]), head)
            else:
                self._error(404, "RepoNotFound", "no such route on the stand-in hub")

        def _repo_at(self, repo_id: str, revision: str) -> tuple[StandinRepo, str] | None:
            repo = hub.repos.get(repo_id)
            if repo is None:
                self._error(404, "RepoNotFound", "Repository not found")
                return None
            if repo.gated:
                given = self.headers.get("Authorization")
                if given is None:
                    self._error(401, "GatedRepo", "Access to this model is restricted: log in")
                    return None
                if given != f"Bearer {hub.token}":
                    self._error(403, "GatedRepo", "Access to this model is restricted")
                    return None
            commit = repo.resolve(revision)
            if commit is None:
                self._error(404, "RevisionNotFound", f"Invalid rev id: {revision}")
                return None
            return repo, commit

        def _api(self, repo_id: str, kind: str, revision: str, under: str) -> None:
            found = self._repo_at(repo_id, revision)
            if found is None:
                return
            repo, commit = found
            if kind == "revision":
                body: object = {
                    "_id": commit[:24], "id": repo_id, "modelId": repo_id, "sha": commit,
                    "private": False, "gated": "manual" if repo.gated else False,
                    "disabled": False, "tags": [], "downloads": 0, "likes": 0,
                    "lastModified": "2026-12-01T00:00:00.000Z",
                    "siblings": [{"rfilename": p} for p in sorted(repo.files)],
                }  # fmt: skip
            else:
                body = [
                    self._tree_entry(repo, p) for p in sorted(repo.files) if p.startswith(under)
                ]
            self._json(body)

        def _tree_entry(self, repo: StandinRepo, path: str) -> dict:
            data = repo.files[path]
            entry: dict = {
                "type": "file",
                "oid": git_blob_id(data),
                "size": len(data),
                "path": path,
            }
            if repo.is_lfs(path):
                entry["lfs"] = {"oid": repo.etag(path), "size": len(data), "pointerSize": 134}
            return entry

        def _resolve(self, repo_id: str, revision: str, path: str, head: bool) -> None:
            found = self._repo_at(repo_id, revision)
            if found is None:
                return
            repo, commit = found
            if path not in repo.files:
                self._error(404, "EntryNotFound", f"{path} does not exist on {revision}")
                return
            if hub.cdn_host is not None and repo.is_lfs(path):
                self._to_cdn(repo, commit, path)
                return
            self._send_file(repo, commit, path, head)

        def _to_cdn(self, repo: StandinRepo, commit: str, path: str) -> None:
            """As the hub answers for an LFS file: a redirect to its CDN, with the file's facts."""
            port = hub.url.rsplit(":", 1)[1]
            etag = repo.etag(path)
            self.send_response(302)
            self.send_header("Location", f"http://{hub.cdn_host}:{port}/cdn/{repo.repo_id}/{etag}")
            self.send_header("X-Repo-Commit", commit)
            self.send_header("ETag", f'"{etag}"')
            self.send_header("X-Linked-Etag", f'"{etag}"')
            self.send_header("X-Linked-Size", str(len(repo.files[path])))
            self.send_header("Content-Length", "0")
            self.end_headers()

        def _cdn(self, repo_id: str, etag: str, head: bool) -> None:
            repo = hub.repos.get(repo_id)
            found = [p for p in (repo.files if repo else {}) if repo and repo.etag(p) == etag]
            if repo is None or not found:
                self._error(404, "EntryNotFound", "no such object on the stand-in CDN")
                return
            self._send_file(repo, repo.commit, found[0], head)

        def _send_file(self, repo: StandinRepo, commit: str, path: str, head: bool) -> None:
            data = repo.files[path]
            start = 0
            asked = self.headers.get("Range")
            if asked and asked.startswith("bytes=") and asked.endswith("-"):
                start = min(int(asked[6:-1]), len(data))
            self.send_response(206 if start else 200)
            etag = repo.etag(path)
            self.send_header("X-Repo-Commit", commit)
            self.send_header("ETag", f'"{etag}"')
            if repo.is_lfs(path):
                self.send_header("X-Linked-Etag", f'"{etag}"')
                self.send_header("X-Linked-Size", str(len(data)))
            self.send_header("Accept-Ranges", "bytes")
            self.send_header("Content-Type", "application/octet-stream")
            self.send_header("Content-Length", str(len(data) - start))
            if start:
                self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
            self.end_headers()
            if head:
                return
            body = data[start:]
            if not start and hub.take_cut(path):
                self.wfile.write(body[: len(body) // 2])
                self.wfile.flush()
                self.close_connection = True
                self.connection.close()
                return
            self.wfile.write(body)

        def _json(self, body: object) -> None:
            data = json.dumps(body).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(data)

        def _error(self, status: int, code: str, message: str) -> None:
            data = json.dumps({"error": message}).encode()
            self.send_response(status)
            self.send_header("X-Error-Code", code)
            self.send_header("X-Error-Message", message)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(data)

    return Handler
