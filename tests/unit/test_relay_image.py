"""The relay's image tar, read as it passes: the save filter that leaves out the layers the
nodes hold, and the check on arrival that lets `docker load` finish only an image whose every
layer has the right sha256.

On a real `docker save` of Docker 20.10 (tests/fixtures/images/README.md): tiny-base (one
layer) and tiny (that layer and one more).
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import tarfile
from pathlib import Path

import pytest

from cluster.remote import relay
from cluster.remote.relay import (
    BadStream,
    ImageCheck,
    TarError,
    TarWalk,
    filtered_save,
    legacy_layer_index,
    parse_header,
)

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "images"
SAVED = (FIXTURES / "save-tiny-docker-20.10.tar").read_bytes()
TINY = json.loads((FIXTURES / "inspect-vcluster-fixture-tiny-1.json").read_text())[0]
DIFF_IDS = TINY["RootFS"]["Layers"]
BASE, NEW = DIFF_IDS


def members(data: bytes) -> dict[str, bytes]:
    with tarfile.open(fileobj=io.BytesIO(data)) as archive:
        return {
            m.name: (archive.extractfile(m).read() if m.isfile() else b"")  # type: ignore[union-attr]
            for m in archive
        }


def manifest_layers() -> list[str]:
    return json.loads(members(SAVED)["manifest.json"])[0]["Layers"]


def pieces(data: bytes, size: int) -> list[bytes]:
    return [data[at : at + size] for at in range(0, len(data), size)]


def header(layers: list[str]) -> dict:
    return {"kind": "image", "path": "vcluster-fixture/tiny:1", "sinks": ["node-1"],
            "image_id": TINY["Id"], "diff_ids": DIFF_IDS, "layers": layers}  # fmt: skip


def checked(data: bytes, layers: list[str], size: int = 4096) -> tuple[ImageCheck, bytes]:
    check = ImageCheck(header(layers))
    passed = b"".join(check.feed(piece) for piece in pieces(data, size))
    return check, passed


def flipped(data: bytes, at: int) -> bytes:
    changed = bytearray(data)
    changed[at] ^= 1
    return bytes(changed)


def data_offset(data: bytes, name: str) -> int:
    with tarfile.open(fileobj=io.BytesIO(data)) as archive:
        return archive.getmember(name).offset_data


# --- the save filter ------------------------------------------------------------------------


def test_each_pre_25_folder_is_placed_by_its_v1_id():
    chains = relay.chain_ids(DIFF_IDS)
    saved = members(SAVED)
    for index, layer in enumerate(manifest_layers()):
        folder = layer.split("/")[0]
        assert legacy_layer_index(folder, saved[f"{folder}/json"], chains) == index


def test_a_folder_whose_json_matches_no_layer_is_not_placed():
    folder = manifest_layers()[0].split("/")[0]
    assert (
        legacy_layer_index(folder, b'{"id": "x", "created": "2020"}', relay.chain_ids(DIFF_IDS))
        is None
    )
    assert legacy_layer_index(folder, b"not json", relay.chain_ids(DIFF_IDS)) is None


def test_the_filter_leaves_out_the_layers_the_nodes_hold_and_nothing_else():
    out = b"".join(filtered_save(pieces(SAVED, 3000), [BASE], DIFF_IDS))
    base_layer, new_layer = manifest_layers()
    kept = members(out)
    assert base_layer not in kept
    assert set(kept) == set(members(SAVED)) - {base_layer}
    assert hashlib.sha256(kept[new_layer]).hexdigest() == NEW.split(":")[1]
    assert len(out) < len(SAVED) - 10240 + 1024  # the base's 10 KB layer.tar is gone


def test_the_filter_without_layers_to_leave_out_gives_docker_s_bytes_back():
    assert b"".join(filtered_save(pieces(SAVED, 777), [], DIFF_IDS)) == SAVED


def test_a_save_cut_short_is_an_error():
    with pytest.raises(TarError, match="ended before its tar did"):
        b"".join(filtered_save([SAVED[:5000]], [BASE], DIFF_IDS))


# --- the check on arrival -------------------------------------------------------------------


def test_an_image_that_arrived_right_passes_and_its_tar_s_end_waits_for_the_check():
    out = b"".join(filtered_save([SAVED], [BASE], DIFF_IDS))
    check, passed = checked(out, [NEW], size=1000)
    assert check.problem() is None
    assert passed == out[: -len(relay.TRAILER)]  # everything but the end of the tar
    assert check.trailer() == relay.TRAILER


def test_the_whole_image_is_checked_too():
    check, _ = checked(SAVED, DIFF_IDS, size=1)
    assert check.problem() is None


def test_a_layer_changed_in_transit_is_refused():
    out = b"".join(filtered_save([SAVED], [BASE], DIFF_IDS))
    at = data_offset(out, manifest_layers()[1]) + 600
    with pytest.raises(
        TarError, match=r"arrived with sha256:[0-9a-f]{12}, not a layer of the image"
    ):
        checked(flipped(out, at), [NEW])


def test_a_config_changed_in_transit_is_refused():
    config = TINY["Id"].split(":")[1] + ".json"
    with pytest.raises(TarError, match=f"{config} arrived with sha256:"):
        checked(flipped(SAVED, data_offset(SAVED, config) + 10), DIFF_IDS)


def test_a_header_changed_in_transit_is_refused():
    with pytest.raises(TarError, match="checksum"):
        checked(flipped(SAVED, 20), DIFF_IDS)


def test_a_layer_the_stream_should_carry_but_does_not_is_refused():
    out = b"".join(filtered_save([SAVED], [BASE], DIFF_IDS))
    check, _ = checked(out, [BASE, NEW])
    assert check.problem() == f"layer {BASE[:19]} did not arrive: refused, nothing loaded"


def test_a_tar_that_stops_early_is_refused():
    check, _ = checked(SAVED[:-2048], DIFF_IDS)
    assert check.problem() == "the image's tar ended early: refused, nothing loaded"


def test_an_image_header_without_its_digests_is_a_bad_stream():
    good = header([NEW])
    assert parse_header(json.dumps(good).encode())["layers"] == [NEW]
    for broken in ({"diff_ids": 5}, {"layers": [BASE + "0"]}, {"image_id": None}):
        with pytest.raises(BadStream, match="wrong types"):
            parse_header(json.dumps({**good, **broken}).encode())


# --- the tar walk on what docker save may write (Python's own tar writer) --------------------


class Names(TarWalk):
    """The members a walk meets."""

    def __init__(self) -> None:
        super().__init__()
        self.seen: list[tuple[str, str, int]] = []

    def begin(self, name: str, kind: str, size: int) -> bool:
        self.seen.append((name, kind, size))
        return True


@pytest.mark.parametrize("form", [tarfile.PAX_FORMAT, tarfile.GNU_FORMAT])
def test_long_names_in_pax_and_gnu_headers_are_read(form):
    buffer = io.BytesIO()
    name = "blobs/sha256/" + "a" * 64 + "/" + "deep/" * 30 + "file"
    with tarfile.open(fileobj=buffer, mode="w", format=form) as archive:
        info = tarfile.TarInfo(name)
        info.size = 3
        archive.addfile(info, io.BytesIO(b"abc"))
    walk = Names()
    walk.feed(buffer.getvalue())
    assert walk.seen == [(name, "0", 3)]
    assert walk.ended


def test_docker_25_blobs_are_left_out_and_checked_by_their_names():
    # Docker 25 and later name every file of a save by its sha256 (blobs/sha256/HEX); no such
    # daemon runs here, so this tar is made in that layout by the test.
    layer_a, layer_b, config = b"layer a" * 100, b"layer b" * 100, b'{"config": 1}'
    digest = {blob: hashlib.sha256(blob).hexdigest() for blob in (layer_a, layer_b, config)}
    files = {f"blobs/sha256/{digest[blob]}": blob for blob in (layer_a, layer_b, config)}
    files["manifest.json"] = manifest(config, [layer_a, layer_b])
    diff_ids = [f"sha256:{digest[layer_a]}", f"sha256:{digest[layer_b]}"]
    out = b"".join(filtered_save([tar_of(files)], diff_ids[:1], diff_ids))
    assert set(members(out)) == {
        f"blobs/sha256/{digest[layer_b]}",
        f"blobs/sha256/{digest[config]}",
        "manifest.json",
    }
    check = ImageCheck({**header(diff_ids[1:]), "diff_ids": diff_ids,
                        "image_id": f"sha256:{digest[config]}"})  # fmt: skip
    check.feed(out)
    assert check.problem() is None
    at = out.index(b"layer b")
    with pytest.raises(TarError, match="arrived with"):
        ImageCheck({**header(diff_ids[1:]), "diff_ids": diff_ids}).feed(flipped(out, at))


@pytest.mark.parametrize("record", [b"0 path=x\n", b"3 a\n", b"x path=y\n"])
def test_a_pax_record_that_cannot_be_read_is_refused_not_looped_on(record):
    info = tarfile.TarInfo("././@PaxHeader")
    info.type = tarfile.XHDTYPE
    info.size = len(record)
    raw = info.tobuf(tarfile.USTAR_FORMAT) + record + bytes(-len(record) % 512)
    with pytest.raises(TarError, match="pax header"):
        Names().feed(raw)


# --- a source in containerd's image store, manifest.json, member types ---------------------


def blob(data: bytes) -> str:
    return "blobs/sha256/" + hashlib.sha256(data).hexdigest()


def digest_of(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def tar_of(files: dict[str, bytes]) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.USTAR_FORMAT) as archive:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            archive.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


def manifest(config: bytes, layers: list[bytes], tag: str = "vcluster-fixture/tiny:1") -> bytes:
    entry = {"Config": blob(config), "RepoTags": [tag], "Layers": [blob(x) for x in layers]}
    return json.dumps([entry]).encode()


def containerd_save() -> tuple[dict[str, bytes], list[str], str]:
    """A save laid out as Docker's containerd image store writes it (moby#47065): layers
    gzip-compressed and named by their compressed digest; the image named by its index. No
    such daemon runs here: the test builds it. Returns the files, the diff IDs, the image ID."""
    plain = [tar_of({"a.txt": b"layer a\n"}), tar_of({"b.txt": b"layer b\n"})]
    packed = [gzip.compress(layer, mtime=0) for layer in plain]
    diff_ids = [digest_of(layer) for layer in plain]
    config = json.dumps({"rootfs": {"type": "layers", "diff_ids": diff_ids}}).encode()
    media = "application/vnd.oci.image"
    oci_manifest = json.dumps({
        "schemaVersion": 2, "mediaType": f"{media}.manifest.v1+json",
        "config": {"mediaType": f"{media}.config.v1+json", "digest": digest_of(config), "size": len(config)},
        "layers": [{"mediaType": f"{media}.layer.v1.tar+gzip", "digest": digest_of(p), "size": len(p)} for p in packed],
    }).encode()  # fmt: skip
    index = json.dumps({"schemaVersion": 2, "mediaType": f"{media}.index.v1+json", "manifests": [
        {"mediaType": f"{media}.manifest.v1+json", "digest": digest_of(oci_manifest), "size": len(oci_manifest)},
    ]}).encode()  # fmt: skip
    files = {blob(data): data for data in (*packed, config, oci_manifest, index)}
    files["oci-layout"] = b'{"imageLayoutVersion":"1.0.0"}'
    files["index.json"] = json.dumps({"schemaVersion": 2, "manifests": [
        {"digest": digest_of(index), "size": len(index)}]}).encode()  # fmt: skip
    files["manifest.json"] = manifest(config, packed)
    return files, diff_ids, digest_of(index)


def containerd_header(diff_ids: list[str], image_id: str) -> dict:
    return {**header([]), "diff_ids": diff_ids, "image_id": image_id, "by_name": True}


def test_a_containerd_store_save_passes_with_each_file_checked_by_its_name():
    files, diff_ids, image_id = containerd_save()
    check = ImageCheck(containerd_header(diff_ids, image_id))
    check.feed(tar_of(files))
    assert check.problem() is None


def test_a_containerd_store_save_under_the_layer_store_check_is_refused():
    # why the source's store must be told: compressed blobs are not the diff IDs
    files, diff_ids, image_id = containerd_save()
    check = ImageCheck({**header(diff_ids), "diff_ids": diff_ids, "image_id": image_id})
    check.feed(tar_of(files))
    assert check.problem() == f"layer {diff_ids[0][:19]} did not arrive: refused, nothing loaded"


def test_a_containerd_store_blob_changed_in_transit_is_refused():
    files, diff_ids, image_id = containerd_save()
    data = tar_of(files)
    with pytest.raises(TarError, match="arrived with"):
        ImageCheck(containerd_header(diff_ids, image_id)).feed(flipped(data, 512 + 20))


def test_a_containerd_store_save_without_the_image_s_index_is_refused():
    files, diff_ids, _ = containerd_save()
    check = ImageCheck(containerd_header(diff_ids, "sha256:" + "0" * 64))
    check.feed(tar_of(files))
    assert (
        check.problem()
        == f"the image's config {'sha256:' + '0' * 12} did not arrive: refused, nothing loaded"
    )


def test_an_extra_image_named_by_the_declared_tag_is_refused():
    layer_a, config = b"layer a" * 100, b'{"config": 1}'
    other_layer, other_config = b"other layer" * 100, b'{"config": "other"}'
    files = {blob(data): data for data in (layer_a, config, other_layer, other_config)}
    files["manifest.json"] = manifest(other_config, [other_layer])
    check = ImageCheck(
        {**header([]), "diff_ids": [digest_of(layer_a)], "image_id": digest_of(config)}
    )
    check.feed(tar_of(files))
    assert check.problem() == (
        f"the image's manifest.json names config {blob(other_config)!r}, "
        f"not {digest_of(config)[:19]}: refused, nothing loaded"
    )


def test_a_manifest_with_two_entries_or_a_foreign_layer_is_refused():
    layer_a, config, other = b"layer a" * 100, b'{"config": 1}', b"other" * 100
    files = {blob(data): data for data in (layer_a, config, other)}
    declared = {**header([]), "diff_ids": [digest_of(layer_a)], "image_id": digest_of(config)}
    two = json.loads(manifest(config, [layer_a])) * 2
    check = ImageCheck(declared)
    check.feed(tar_of({**files, "manifest.json": json.dumps(two).encode()}))
    assert (
        check.problem()
        == "the image's manifest.json does not name exactly one image: refused, nothing loaded"
    )
    check = ImageCheck(declared)
    check.feed(tar_of({**files, "manifest.json": manifest(config, [other])}))
    assert "names layer" in (check.problem() or "")


def test_an_image_s_tar_without_manifest_json_is_refused():
    layer_a, config = b"layer a" * 100, b'{"config": 1}'
    check = ImageCheck(
        {**header([]), "diff_ids": [digest_of(layer_a)], "image_id": digest_of(config)}
    )
    check.feed(tar_of({blob(layer_a): layer_a, blob(config): config}))
    assert check.problem() == "the image's tar has no manifest.json: refused, nothing loaded"


@pytest.mark.parametrize("kind", [tarfile.CHRTYPE, tarfile.BLKTYPE])
def test_device_members_carry_no_data(kind):
    info = tarfile.TarInfo("dev/x")
    info.type = kind
    info.size = 1024  # a device's size field means nothing: no data follows
    after = tarfile.TarInfo("after")
    raw = info.tobuf(tarfile.USTAR_FORMAT) + after.tobuf(tarfile.USTAR_FORMAT) + bytes(1024)
    names = Names()
    names.feed(raw)
    assert names.seen == [("dev/x", kind.decode(), 0), ("after", "0", 0)]


@pytest.mark.parametrize("kind", [b"8", b"A", b"D", b"S"])
def test_a_member_of_an_unknown_type_is_refused(kind):
    block = bytearray(tarfile.TarInfo("odd").tobuf(tarfile.USTAR_FORMAT))
    block[156:157] = kind
    block[148:156] = b" " * 8
    block[148:156] = b"%06o\0 " % sum(block)
    with pytest.raises(TarError, match="unknown type"):
        TarWalk().feed(bytes(block))
