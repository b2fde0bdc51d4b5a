"""A model's download from the Hugging Face hub, once for the cluster: here (with
`huggingface_hub`) or on the head (vcluster's own program, standard library only).

Here, `snapshot_download` writes the hub's cache layout under `HF_HUB_CACHE` (the user's hub
cache, so a model downloaded before with `hf download` is found there), skips the files it has,
retries a cut connection from where it stopped (an HTTP range), and uses `hf_xet` for the
repositories stored on Xet (it replaced `hf_transfer`, which `huggingface_hub` 1.x ignores).
The token is read here and given to the download only; on the head it goes in the program's
standard input, never in a command line. See docs/distribution.md.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

from cluster.decide.hub import HubError, endpoint, hub_error, revision_of
from cluster.decide.inventory import Model
from cluster.decide.manifest import Item, hub_folder
from cluster.nodes.transfer import CHUNK, ChainNode, Chunks
from cluster.progress import Meter, ProgressBoard, describe_transfer
from cluster.remote.registry import HUB_DOWNLOAD, source

HUB_DOWNLOAD_SOURCE = source(HUB_DOWNLOAD)


@dataclass(frozen=True)
class Downloaded:
    """A model's snapshot: the commit its revision named, and its files (path, size, sha256)
    where they were downloaded (`snapshot`: the folder here; None on the head)."""

    commit: str
    files: tuple[tuple[str, int, str], ...] = ()
    snapshot: Path | None = None


def download_here(
    model: Model,
    token: str | None,
    board: ProgressBoard | None = None,
    cache_dir: Path | None = None,
    environ: Mapping[str, str] | None = None,
) -> Downloaded:
    """The model's revision in this machine's hub cache (downloading what lacks)."""
    from huggingface_hub import snapshot_download  # the controller's; slow to import
    from huggingface_hub.errors import (
        GatedRepoError,
        HfHubHTTPError,
        HFValidationError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    hub = endpoint(os.environ if environ is None else environ)
    revision = revision_of(model)
    try:
        folder = snapshot_download(
            model.name,
            revision=revision,
            cache_dir=cache_dir,
            token=token or False,  # False: not even a token saved by `hf auth login`
            endpoint=hub,
            tqdm_class=_progress_bars(model, "this machine", board),
        )
    except RevisionNotFoundError as error:
        raise hub_error(model, "revision", where="this machine", hub=hub) from error
    except GatedRepoError as error:
        status = error.response.status_code if error.response is not None else None
        raise hub_error(model, "gated", where="this machine", status=status, hub=hub) from error
    except RepositoryNotFoundError as error:
        raise hub_error(model, "repo", where="this machine", hub=hub) from error
    except LocalEntryNotFoundError as error:
        cause = error.__cause__ or error
        detail = str(cause).splitlines()[0][:200]
        raise hub_error(model, "network", where="this machine", detail=detail, hub=hub) from error
    except (HfHubHTTPError, OSError) as error:
        detail = str(error).splitlines()[0][:200]
        raise hub_error(model, "other", where="this machine", detail=detail, hub=hub) from error
    except HFValidationError as error:  # a name the hub cannot hold (`a/b/c`, `org/m:1`)
        raise HubError(
            f"{model.name} is not a Hugging Face model id: {str(error).splitlines()[0][:200]}",
            where="this machine",
            fix="name the model ORG/NAME as on the hub, or give it `source:` (a folder here)",
        ) from error
    snapshot = Path(folder)
    return Downloaded(snapshot.name, snapshot=snapshot)


def _progress_bars(model: Model, where: str, board: ProgressBoard | None) -> type:
    """A tqdm class for `snapshot_download` that shows its bytes on `board`, never a bar."""
    from huggingface_hub.utils import tqdm

    meter = Meter(time.monotonic(), None)
    first: list[Any] = []

    class BoardBars(tqdm):  # type: ignore[misc]
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            kwargs["disable"] = True
            super().__init__(*args, **kwargs)
            self.counted = kwargs.get("unit") == "B" and not first
            if self.counted:
                first.append(self)  # the first bar in bytes: the bytes received

        def update(self, n: float | None = 1) -> bool | None:
            if self.counted and n:
                self.n += n
                meter.total = float(self.total) if self.total else None
                meter.set(time.monotonic(), float(self.n))
                if board is not None:
                    line = f"{model.served}: downloading on {where}: "
                    board.update(
                        model.served,
                        line + describe_transfer(meter, time.monotonic()),
                        meter.fraction(),
                    )
            return None

    return BoardBars


def download_on_head(
    head: ChainNode,
    model: Model,
    token: str | None,
    board: ProgressBoard | None = None,
    environ: Mapping[str, str] | None = None,
) -> Downloaded:
    """The model's revision in the head's model cache, by vcluster's download program there."""
    hub = endpoint(os.environ if environ is None else environ)
    config = {
        "endpoint": hub,
        "repo": model.name,
        "revision": revision_of(model),
        "root": head.root,
        "token": token,
    }
    channel = head.connection.open_channel(["python3", "-c", HUB_DOWNLOAD_SOURCE])
    channel.sendall((json.dumps(config) + "\n").encode())
    channel.shutdown_write()
    meter = Meter(time.monotonic(), None)
    result: dict | None = None
    for line in channel.makefile("r"):
        try:
            event = json.loads(line)
        except ValueError:
            continue
        if event.get("event") == "progress":
            meter.total = float(event["total"]) or None
            meter.set(time.monotonic(), float(event["bytes"]))
            if board is not None:
                text = f"{model.served}: downloading on {head.name}: "
                board.update(
                    model.served,
                    text + describe_transfer(meter, time.monotonic()),
                    meter.fraction(),
                )
        elif event.get("event") in ("done", "error"):
            result = event
    status = channel.recv_exit_status()
    errors = channel.makefile_stderr("r").read().strip()
    channel.close()
    if result is None:
        raise HubError(
            f"{model.name}: the download on the head ended without a word (exit {status}): "
            f"{str(errors)[-300:]}",
            where=head.name,
            fix="the head needs python3 (3.8 or later) and room under model_cache",
        )
    if result["event"] == "error":
        raise hub_error(
            model,
            result["kind"],
            where=head.name,
            status=result.get("status"),
            detail=result.get("message", ""),
            hub=hub,
        )
    files = tuple((str(p), int(s), str(h)) for p, s, h in result["files"])
    return Downloaded(str(result["commit"]), files)


def head_chunks(head: ChainNode, model: Model) -> Chunks:
    """The bytes of each item, read from the head's cache (blobs by sha256) over SSH; a
    made item (`refs/main`) from here."""
    folder = PurePosixPath(head.root) / hub_folder(model.name)

    def chunks(item: Item) -> Iterator[bytes]:
        if item.content is not None:
            yield item.content
            return
        blob = str(folder / "blobs" / item.sha256)
        channel = head.connection.open_channel(["cat", "--", blob])
        try:
            while data := channel.recv(CHUNK):
                yield data
            status = channel.recv_exit_status()
        finally:
            channel.close()
        if status != 0:
            raise HubError(
                f"could not read {blob} (exit {status})",
                where=head.name,
                fix="run the command again: the head downloads what lacks",
            )

    return chunks
