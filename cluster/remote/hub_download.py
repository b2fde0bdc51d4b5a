"""Download one model from the Hugging Face hub into this host's model cache, once for the cluster.

Run on the head (`download: head`) as `python3 -c SOURCE`, with the host's Python (3.8 or
later) and its standard library only: the hosts need not have `huggingface_hub`. It makes the
hub's HTTP calls that `huggingface_hub.snapshot_download` makes, and writes the layout that
vcluster's chain sends on (cluster/decide/manifest.py `hub_items`):

    MODEL_CACHE/hub/models--ORG--NAME/blobs/SHA256
    MODEL_CACHE/hub/models--ORG--NAME/snapshots/COMMIT/PATH -> ../../blobs/SHA256
    MODEL_CACHE/hub/models--ORG--NAME/refs/main                 holds COMMIT

The configuration is one JSON line on standard input (`endpoint`, `repo`, `revision`, `root`,
and `token`, which thus never shows in `ps`). Events are JSON lines on standard output:
`progress` (`bytes`, `total`), then `done` (`commit`, `files`: [path, size, sha256]) or
`error` (`kind`: revision, repo, gated, network, http or disk; `status`; `message`).

A file is downloaded to `blobs/COMMIT-PATHDIGEST.vcluster-download` and resumed from there (an HTTP
range) when a run was cut off; an LFS file whose blob is there already is not downloaded again.
Hidden files (`.gitattributes`) are left out, as from a `source:` folder.
"""

from __future__ import annotations

import errno
import hashlib
import http.client
import json
import os
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from typing import IO, Any

CHUNK = 1 << 20
PARTIAL = ".vcluster-download"
TIMEOUT_S = 60.0
PROGRESS_INTERVAL_S = 0.5
RETRIES = 5
RETRY_PAUSE_S = 1.0


class HubFailure(Exception):
    def __init__(self, kind: str, message: str, status: int | None = None) -> None:
        Exception.__init__(self, message)
        self.kind = kind
        self.status = status


class _SameHostAuth(urllib.request.HTTPRedirectHandler):
    """Follows redirects, and keeps the token only on the hub's own host (not on a CDN's)."""

    def redirect_request(
        self,
        req: urllib.request.Request,
        fp: IO[bytes],
        code: int,
        msg: str,
        headers: http.client.HTTPMessage,
        newurl: str,
    ) -> urllib.request.Request | None:
        new = urllib.request.HTTPRedirectHandler.redirect_request(
            self, req, fp, code, msg, headers, newurl
        )
        if new is not None:
            before = urllib.parse.urlsplit(req.full_url).netloc
            if urllib.parse.urlsplit(newurl).netloc != before:
                new.remove_header("Authorization")
        return new


_OPENER = urllib.request.build_opener(_SameHostAuth)


def emit(event: dict[str, Any]) -> None:
    sys.stdout.write(json.dumps(event) + "\n")
    sys.stdout.flush()


def _open(
    url: str, token: str | None, extra: dict[str, str] | None = None
) -> http.client.HTTPResponse:
    headers = {"User-Agent": "vcluster-hub-download", "Accept-Encoding": "identity"}
    if token:
        headers["Authorization"] = "Bearer " + token
    headers.update(extra or {})
    try:
        request = urllib.request.Request(url, headers=headers)  # noqa: S310 (the hub: http or https)
        return _OPENER.open(request, timeout=TIMEOUT_S)
    except urllib.error.HTTPError as error:
        code = error.headers.get("X-Error-Code", "")
        message = error.headers.get("X-Error-Message", "") or error.reason
        if code == "RevisionNotFound":
            raise HubFailure("revision", message, error.code) from error
        if code == "GatedRepo":
            raise HubFailure("gated", message, error.code) from error
        if code == "RepoNotFound" or (error.code in (401, 404) and "/api/models/" in url):
            raise HubFailure("repo", message, error.code) from error
        raise HubFailure("http", f"HTTP {error.code} from {url}: {message}", error.code) from error
    except OSError as error:  # URLError, a timeout, a reset
        reason = getattr(error, "reason", error)
        raise HubFailure("network", f"cannot reach {url.split('/api/')[0]}: {reason}") from error


def _json(url: str, token: str | None) -> tuple[Any, str]:
    with _open(url, token) as response:
        return json.loads(response.read().decode()), response.headers.get("Link", "")


def _next_page(link: str) -> str | None:
    """The `rel="next"` URL of a Link header (the hub pages long listings), or None."""
    for part in link.split(","):
        if 'rel="next"' in part:
            return part.split(";")[0].strip().strip("<>")
    return None


def _safe(path: str) -> list[str]:
    parts = path.split("/")
    if path.startswith("/") or any(p in ("", ".", "..") for p in parts):
        raise HubFailure("http", f"the hub listed a file outside the repository: {path!r}")
    return parts


def listing(
    endpoint: str, repo: str, revision: str, token: str | None
) -> tuple[str, list[tuple[str, int, str | None]]]:
    """(commit, [(path, size, sha256 or None)]) of the repository at `revision`."""
    quoted = urllib.parse.quote(revision, safe="")
    info, _ = _json(f"{endpoint}/api/models/{repo}/revision/{quoted}", token)
    commit = info["sha"]
    url: str | None = f"{endpoint}/api/models/{repo}/tree/{commit}?recursive=true"
    files: list[tuple[str, int, str | None]] = []
    while url:
        page, link = _json(url, token)
        for entry in page:
            if entry.get("type") != "file":
                continue
            oid = (entry.get("lfs") or {}).get("oid")
            sha256 = (
                oid
                if isinstance(oid, str) and len(oid) == 64 and set(oid) <= set("0123456789abcdef")
                else None
            )
            files.append((entry["path"], int(entry["size"]), sha256))
        url = _next_page(link)
    shown = [f for f in files if not any(p.startswith(".") for p in _safe(f[0]))]
    return commit, sorted(shown)


class Progress:
    def __init__(self, total: int) -> None:
        self.total = total
        self.done = 0
        self.shown_at = 0.0

    def add(self, count: int, force: bool = False) -> None:
        self.done += count
        now = time.monotonic()
        if force or now - self.shown_at >= PROGRESS_INTERVAL_S:
            self.shown_at = now
            emit({"event": "progress", "bytes": self.done, "total": self.total})


def _hash_file(path: str) -> hashlib._Hash:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(CHUNK), b""):
            digest.update(block)
    return digest


def fetch_file(
    endpoint: str,
    repo: str,
    commit: str,
    path: str,
    size: int,
    blobs: str,
    token: str | None,
    progress: Progress,
) -> str:
    """The file's blob (downloaded, or resumed from its partial file); its sha256."""
    named = hashlib.sha256(path.encode()).hexdigest()[:16]  # any path, one short name
    partial = os.path.join(blobs, f"{commit[:12]}-{named}{PARTIAL}")
    start = os.path.getsize(partial) if os.path.isfile(partial) else 0
    if start > size:
        os.remove(partial)
        start = 0
    digest = _hash_file(partial) if start else hashlib.sha256()
    progress.add(start)
    url = f"{endpoint}/{repo}/resolve/{commit}/{urllib.parse.quote(path)}"
    if start < size or size == 0:
        extra = {"Range": f"bytes={start}-"} if start else {}
        with _open(url, token, extra) as response:
            if start and response.status != 206:  # the range was ignored: from the start
                progress.add(-start)
                start = 0
                digest = hashlib.sha256()
            with open(partial, "ab" if start else "wb") as out:
                try:
                    for block in iter(lambda: response.read(CHUNK), b""):
                        out.write(block)
                        digest.update(block)
                        progress.add(len(block))
                except (http.client.HTTPException, OSError) as error:  # cut off: resumable
                    if getattr(error, "errno", None) in (errno.ENOSPC, errno.EDQUOT):
                        raise  # a full disk here, not a cut: no retry (main reports it)
                    raise HubFailure("network", f"{path}: cut off: {error!r}") from error
    got = os.path.getsize(partial)
    if got != size:
        raise HubFailure("network", f"{path}: {got} bytes arrived, {size} expected")
    sha256 = digest.hexdigest()
    os.replace(partial, os.path.join(blobs, sha256))
    return sha256


def _fetch_resuming(
    endpoint: str,
    repo: str,
    commit: str,
    path: str,
    size: int,
    blobs: str,
    token: str | None,
    progress: Progress,
) -> str:
    """`fetch_file`, again from where it stopped when the connection was cut (a few times)."""
    for attempt in range(RETRIES + 1):
        counted = progress.done
        try:
            return fetch_file(endpoint, repo, commit, path, size, blobs, token, progress)
        except HubFailure as failure:
            if failure.kind != "network" or attempt == RETRIES:
                raise
            progress.done = counted  # the partial file's bytes are counted again on resume
            time.sleep(RETRY_PAUSE_S)
    raise AssertionError("unreachable")


def _link(folder: str, commit: str, path: str, sha256: str) -> None:
    parts = _safe(path)
    link = os.path.join(folder, "snapshots", commit, *parts)
    os.makedirs(os.path.dirname(link), exist_ok=True)
    target = "/".join([".."] * (len(parts) + 1) + ["blobs", sha256])
    if os.path.islink(link) and os.readlink(link) == target:
        return
    if os.path.lexists(link):
        os.remove(link)
    os.symlink(target, link)


def _present(folder: str, commit: str, path: str, size: int) -> str | None:
    """The sha256 of a file the snapshot has already (its link names its blob), or None."""
    link = os.path.join(folder, "snapshots", commit, *_safe(path))
    if not os.path.islink(link):
        return None
    blob = os.path.basename(os.readlink(link))
    real = os.path.join(folder, "blobs", blob)
    if len(blob) == 64 and os.path.isfile(real) and os.path.getsize(real) == size:
        return blob
    return None


def download(config: dict[str, Any]) -> dict[str, Any]:
    endpoint = config["endpoint"].rstrip("/")
    repo, token = config["repo"], config.get("token")
    commit, files = listing(endpoint, repo, config["revision"], token)
    folder = os.path.join(config["root"], "hub", "models--" + repo.replace("/", "--"))
    blobs = os.path.join(folder, "blobs")
    os.makedirs(blobs, exist_ok=True)
    os.makedirs(os.path.join(folder, "refs"), exist_ok=True)
    progress = Progress(sum(size for _, size, _ in files))
    done = []
    for path, size, lfs_sha256 in files:
        sha256 = _present(folder, commit, path, size)
        known = os.path.join(blobs, lfs_sha256) if lfs_sha256 else None
        if sha256 is None and known and os.path.isfile(known) and os.path.getsize(known) == size:
            sha256 = lfs_sha256
        if sha256 is None:
            sha256 = _fetch_resuming(endpoint, repo, commit, path, size, blobs, token, progress)
            if lfs_sha256 and sha256 != lfs_sha256:
                raise HubFailure(
                    "http",
                    f"{path}: sha256 {sha256[:12]}... arrived, the hub lists {lfs_sha256[:12]}...",
                )
        else:
            progress.add(size)
        _link(folder, commit, path, sha256)
        done.append([path, size, sha256])
    progress.add(0, force=True)
    ref = os.path.join(folder, "refs", "main")
    with open(ref + PARTIAL, "w") as handle:
        handle.write(commit)
    os.replace(ref + PARTIAL, ref)
    return {"commit": commit, "files": done}


def main() -> int:
    config = json.loads(sys.stdin.readline())
    try:
        result = download(config)
    except HubFailure as failure:
        emit(
            {
                "event": "error",
                "kind": failure.kind,
                "status": failure.status,
                "message": str(failure),
            }
        )
        return 1
    except OSError as error:  # the model cache: not writable, or full
        message = f"{error.strerror or error} under {config['root']}"
        emit({"event": "error", "kind": "disk", "status": None, "message": message})
        return 1
    emit(dict({"event": "done"}, **result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
