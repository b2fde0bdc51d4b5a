"""Which image layers each node lacks, and what the chain carries: facts in, layers out.

The facts are real `docker image inspect`, history and `docker info` output
(tests/fixtures/images/README.md). The image sent is a Ray-ready-like image: the sandbox's
`vllm-cpu-noray` (8 layers) plus one new layer of 1 MiB.
"""

from __future__ import annotations

import json
from functools import cache
from pathlib import Path

import pytest

from cluster.decide.layers import (
    ImageLayers,
    NodeLayers,
    NoImageRoom,
    chain_ids,
    first_missing,
    image_item,
    image_room_problems,
    in_containerd_store,
    parse_image_layers,
    parse_node_layers,
    plan_image_send,
    require_image_room,
)
from cluster.remote import relay

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "images"
RAY_LIKE = "vcluster-fixture-ray-like-1"
NEW_LAYER = 1 << 20


@cache
def fixture(name: str) -> object:
    return json.loads((FIXTURES / name).read_text())


def inspect(image: str) -> dict:
    return fixture(f"inspect-{image}.json")[0]  # type: ignore[index]


def target() -> ImageLayers:
    return parse_image_layers(inspect(RAY_LIKE), fixture(f"history-{RAY_LIKE}.json"))  # type: ignore[arg-type]


def node_with(*images: str, info: dict | None = None) -> NodeLayers:
    return parse_node_layers(
        [inspect(image) for image in images],
        info or fixture("info-docker-20.10.json"),  # type: ignore[arg-type]
    )


def test_the_image_s_layers_come_from_inspect_and_their_sizes_from_its_history():
    image = target()
    assert image.image_id.startswith("sha256:5806ccca1c35")
    assert len(image.diff_ids) == 9
    assert image.diff_ids[:8] == tuple(
        inspect("vcluster-vllm-cpu-noray-0.32.0")["RootFS"]["Layers"]
    )
    assert image.suffix_bytes(8) == NEW_LAYER  # the new layer alone: exact
    assert image.suffix_bytes(9) == 0
    assert image.suffix_bytes(0) == image.size  # every layer: the image's Size


def test_layers_without_content_make_a_suffix_s_size_an_upper_bound():
    # noray's 8th layer has no content (history shows 0, like the steps without a layer): the
    # two top layers count the two last sizes shown, 207 bytes more than they hold.
    assert target().suffix_bytes(7) == NEW_LAYER + 207


def test_an_image_without_history_counts_as_whole():
    image = parse_image_layers(inspect(RAY_LIKE))
    assert image.suffix_bytes(8) == image.size


def test_the_chain_ids_are_docker_s():
    # The layer store's own names: vcluster/base's single layer is its own chain ID, and
    # Docker's `sha256(parent + " " + diff)` for the layers above.
    diffs = inspect("vcluster-fixture-tiny-1")["RootFS"]["Layers"]
    chains = chain_ids(diffs)
    assert chains[0] == diffs[0]
    assert chains[1] != diffs[1] and chains[1].startswith("sha256:")


@pytest.mark.parametrize(
    ("held", "lowest_missing", "why"),
    [
        ((), 0, "an empty node lacks every layer"),
        (("vcluster-base-bookworm",), 1, "the base image: the first layer only"),
        (("vcluster-node-bookworm",), 1, "shares the first layer, then goes its own way"),
        (("vcluster-vllm-cpu-0.32.0",), 7, "the image below the source: 7 of its 8 layers"),
        (("vcluster-vllm-cpu-noray-0.32.0",), 8, "the source image: only the new layer is missing"),
        (("vcluster-base-bookworm", "vcluster-vllm-cpu-noray-0.32.0"), 8, "the best image counts"),
        ((RAY_LIKE,), 9, "the image itself: nothing"),
    ],
)
def test_a_node_lacks_the_layers_above_the_longest_chain_it_holds(held, lowest_missing, why):
    assert first_missing(target(), node_with(*held)) == lowest_missing, why


def test_a_layer_held_under_another_parent_does_not_count():
    # tiny's second layer sits on tiny-base; a node whose only image holds that diff ID on
    # another parent has another chain: Docker would need the layer's file.
    tiny = inspect("vcluster-fixture-tiny-1")
    elsewhere = {"RootFS": {"Layers": [tiny["RootFS"]["Layers"][1]]}}
    node = parse_node_layers([elsewhere], fixture("info-docker-20.10.json"))  # type: ignore[arg-type]
    assert first_missing(parse_image_layers(tiny), node) == 0


def test_the_node_s_docker_root_comes_from_docker_info():
    node = node_with()
    assert node.docker_root == "/var/lib/vcluster/docker"
    assert not node.whole_images_only


def test_a_node_with_containerd_s_image_store_gets_the_whole_image():
    # The captured info with its DriverStatus as Docker 24+ shows it for the containerd store.
    info = dict(fixture("info-docker-20.10.json"))  # type: ignore[call-overload]
    info["DriverStatus"] = [["driver-type", "io.containerd.snapshotter.v1"]]
    node = node_with("vcluster-vllm-cpu-noray-0.32.0", info=info)
    assert node.whole_images_only
    assert first_missing(target(), node) == 0


def test_the_stream_carries_the_layers_from_the_lowest_any_node_lacks():
    send = plan_image_send(
        target(),
        {
            "node-1": node_with("vcluster-vllm-cpu-noray-0.32.0"),
            "node-2": node_with("vcluster-vllm-cpu-0.32.0"),
        },
    )
    assert send.missing_from == {"node-1": 8, "node-2": 7}
    assert send.carried == target().diff_ids[7:]
    assert send.drop == target().diff_ids[:7]
    assert not send.whole
    assert send.describe().startswith("2 of 9 layer(s), about ")


def test_nodes_that_hold_the_source_image_get_only_the_new_layer():
    send = plan_image_send(
        target(), {f"node-{i}": node_with("vcluster-vllm-cpu-noray-0.32.0") for i in range(4)}
    )
    assert send.carried == target().diff_ids[8:]
    assert send.carried_bytes() == NEW_LAYER
    assert send.describe() == "1 of 9 layer(s), about 1.0 MB"


def test_one_node_without_any_layer_makes_the_whole_image_go():
    send = plan_image_send(
        target(), {"node-1": node_with("vcluster-vllm-cpu-noray-0.32.0"), "node-2": node_with()}
    )
    assert send.whole
    assert send.drop == ()
    assert send.describe().startswith("the whole image, about 2.1 GB")


def test_a_diff_id_the_stream_carries_is_never_dropped():
    # Two layers with the same bytes (an empty layer twice, say): one below the missing part,
    # one in it. `docker save` writes the file once; it must stay in the stream.
    base = inspect("vcluster-base-bookworm")
    doubled = {"Id": "sha256:" + "1" * 64, "Size": 1, "RootFS": {"Layers": [
        base["RootFS"]["Layers"][0], "sha256:" + "2" * 64, base["RootFS"]["Layers"][0]]}}  # fmt: skip
    send = plan_image_send(
        parse_image_layers(doubled), {"node-1": node_with("vcluster-base-bookworm")}
    )
    assert send.carried_from == 1
    assert send.drop == ()


def test_the_room_check_counts_the_stream_and_the_node_s_missing_layers():
    send = plan_image_send(
        target(),
        {"node-1": node_with("vcluster-vllm-cpu-noray-0.32.0"), "node-2": node_with()},
    )
    whole = target().size
    # node-1 unpacks the whole stream in Docker's temporary folder, and keeps only its layer.
    assert send.bytes_to_load("node-1") == whole + NEW_LAYER
    assert send.bytes_to_load("node-2") == 2 * whole
    assert image_room_problems(send, {"node-1": 10**12, "node-2": 10**12}) == []
    assert image_room_problems(send, {"node-1": 10**12, "node-2": 10**9}) == [
        "node-2 needs 4.1 GB under its Docker data root and has 1.0 GB free"
    ]


def test_no_room_is_one_line_naming_the_nodes_their_folder_and_the_fix():
    send = plan_image_send(target(), {"node-1": node_with(), "node-2": node_with()})
    with pytest.raises(NoImageRoom) as refused:
        require_image_room("ray-like:1", send, {"node-1": 5, "node-2": 10**12},
                           {"node-1": "/var/lib/docker"})  # fmt: skip
    line = refused.value.one_line()
    assert "\n" not in line
    assert "node-1" in line and "node-2" not in line.split(";")[0].split(":")[0]
    assert "not enough disk space to load ray-like:1: node-1 needs 4.1 GB" in line
    assert "/var/lib/docker" in line and "docker image prune" in line


def test_the_relays_see_the_image_s_id_its_diff_ids_and_the_carried_layers():
    send = plan_image_send(target(), {"node-1": node_with("vcluster-vllm-cpu-noray-0.32.0")})
    wire = image_item("ray-like:1", send).wire()
    assert wire["kind"] == "image" and wire["path"] == "ray-like:1"
    assert wire["image_id"] == target().image_id
    assert wire["diff_ids"] == list(target().diff_ids)
    assert wire["layers"] == [target().diff_ids[8]]


def containerd_info() -> dict:
    # Constructed, not captured (no Docker 29 runs here): the captured 20.10 info with the
    # fields Docker documents for its containerd image store (`docker info` shows Storage
    # Driver overlayfs and `driver-type: io.containerd.snapshotter.v1`).
    info = dict(fixture("info-docker-20.10.json"))  # type: ignore[call-overload]
    info["Driver"] = "overlayfs"
    info["DriverStatus"] = [["driver-type", "io.containerd.snapshotter.v1"]]
    return info


def test_a_source_s_store_comes_from_its_docker_info():
    assert not in_containerd_store(fixture("info-docker-20.10.json"))  # type: ignore[arg-type]
    assert in_containerd_store(containerd_info())


def test_from_a_containerd_store_source_the_whole_image_goes_checked_by_name():
    nodes = {f"node-{i}": node_with("vcluster-vllm-cpu-noray-0.32.0") for i in range(2)}
    send = plan_image_send(target(), nodes, whole=in_containerd_store(containerd_info()))
    assert send.whole and send.drop == () and send.by_name
    assert send.missing_from == {"node-0": 8, "node-1": 8}  # the nodes still load only one
    wire = {**image_item("ray-like:1", send).wire(), "sinks": list(nodes)}
    assert wire["by_name"] is True
    assert relay.parse_header(json.dumps(wire).encode()) == wire


def test_from_a_layer_store_source_the_relays_check_the_diff_ids():
    send = plan_image_send(target(), {"node-1": node_with("vcluster-vllm-cpu-noray-0.32.0")})
    assert not send.by_name
    assert image_item("ray-like:1", send).wire()["by_name"] is False
