"""Only the missing layers of an image, through a real relay into a real `docker load`.

The node is a host of the SSH lab (real sshd, the relay run over SSH) whose relay loads into
the sandbox's dockerd (`unix:///run/vcluster/docker.sock`, Docker 20.10), the engine its
Docker SDK also reads over SSH. The images are made here for each test module: a base of one
layer of random bytes (`docker import`: no other image shares it) and an app image on top of it
with one new layer of 2 MiB, like a Ray-ready image on its source image. The engine is shared by
the lab's hosts, so the image's source is a `docker save` taken before the app image is removed
(filtered by the same code as a save here), and the relay's `save` mode over SSH is tested on
its own.
"""

from __future__ import annotations

import io
import os
import tarfile
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import replace
from pathlib import Path

import docker
import docker.errors
import pytest

from cluster.decide.layers import ImageLayers, NoImageRoom
from cluster.nodes.images import (
    ImageSource,
    image_id,
    image_layers,
    node_layers,
    saved_on_node_without,
    source_here,
)
from cluster.nodes.transfer import ChainNode, send_image
from cluster.nodes.transport.ssh import connect
from cluster.remote.relay import filtered_save
from cluster.sandbox.dockerd import LocalDocker, ensure_local_docker
from tests.integration.conftest import lab_target
from tests.support.ssh_lab import SshLab

NEW_LAYER_BYTES = 2 << 20


@pytest.fixture(scope="module")
def local_docker() -> LocalDocker:
    return ensure_local_docker()


@pytest.fixture(scope="module")
def engine(local_docker: LocalDocker) -> Iterator[docker.DockerClient]:
    client = docker.DockerClient(base_url=local_docker.host, timeout=120)
    yield client
    client.close()


class Images:
    """The module's base and app images, and a `docker save` of the app taken while present."""

    def __init__(self, engine: docker.DockerClient, folder: Path) -> None:
        run = uuid.uuid4().hex[:8]
        self.base = f"vcluster-itest-layers/base:{run}"
        self.app = f"vcluster-itest-layers/app:{run}"
        self.engine = engine
        self.folder = folder
        root = io.BytesIO()
        with tarfile.open(fileobj=root, mode="w") as archive:
            data = os.urandom(64 << 10)
            info = tarfile.TarInfo("base.bin")
            info.size = len(data)
            archive.addfile(info, io.BytesIO(data))
        repository, tag = self.base.split(":")
        engine.api.import_image_from_data(root.getvalue(), repository=repository, tag=tag)
        self.saved_base = folder / "base.tar"
        self.saved_base.write_bytes(b"".join(engine.images.get(self.base).save(named=True)))
        (folder / "new.bin").write_bytes(os.urandom(NEW_LAYER_BYTES))
        (folder / "Dockerfile").write_text(
            f"FROM {self.base}\nCOPY new.bin /opt/new.bin\nLABEL io.vcluster.itest=layers\n"
        )
        engine.images.build(path=str(folder), tag=self.app, rm=True)
        layers = image_layers(engine, self.app)
        assert layers is not None
        self.layers: ImageLayers = layers
        self.saved = folder / "app.tar"
        with open(self.saved, "wb") as handle:
            for chunk in engine.images.get(self.app).save(named=True):
                handle.write(chunk)

    def restore(self) -> None:
        """The base present and the app absent, as each test starts."""
        if image_id(self.engine, self.base) is None:
            self.engine.images.load(self.saved_base.read_bytes())
        self.remove_app()

    def remove_app(self) -> None:
        if image_id(self.engine, self.app) is not None:
            self.engine.images.remove(self.app, force=True)

    def remove_all(self) -> None:
        self.remove_app()
        if image_id(self.engine, self.base) is not None:
            self.engine.images.remove(self.base, force=True)

    def new_layer_tar_bytes(self) -> int:
        """The size of the new layer's file in `docker save`: what the chain must carry."""
        with tarfile.open(self.saved) as archive:
            layers = [m for m in archive if m.name.endswith("/layer.tar") and m.isfile()]
            return max(m.size for m in layers)

    def source(self, corrupt_at: int | None = None) -> ImageSource:
        """The app as the controller reads it: the saved tar, filtered like a save here."""

        def save(drop: Sequence[str]) -> Iterator[bytes]:
            data = self.saved.read_bytes()
            out = b"".join(filtered_save([data], list(drop), list(self.layers.diff_ids)))
            if corrupt_at is not None:
                changed = bytearray(out)
                changed[_new_layer_offset(out) + corrupt_at] ^= 1
                out = bytes(changed)
            yield from (out[at : at + (1 << 20)] for at in range(0, len(out), 1 << 20))

        return ImageSource("the saved tar", self.layers, save)


def _new_layer_offset(data: bytes) -> int:
    with tarfile.open(fileobj=io.BytesIO(data)) as archive:
        return max(
            (m for m in archive if m.name.endswith("/layer.tar") and m.isfile()),
            key=lambda m: m.size,
        ).offset_data


@pytest.fixture(scope="module")
def images(
    engine: docker.DockerClient, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Images]:
    made = Images(engine, tmp_path_factory.mktemp("image-layers"))
    yield made
    made.remove_all()


@pytest.fixture
def node(ssh_lab: SshLab, tmp_path: Path, local_docker: LocalDocker) -> Iterator[ChainNode]:
    connection = connect(lab_target(ssh_lab, "node01"))
    yield ChainNode(
        "node01",
        ssh_lab.host("node01").address,
        connection,
        str(tmp_path / "cache"),
        docker_host=local_docker.host,
    )
    connection.close()


def send(node: ChainNode, images: Images, engine: docker.DockerClient, source: ImageSource,
         layers_on=None):  # fmt: skip
    return send_image(
        [node],
        images.app,
        source,
        lambda _: image_id(engine, images.app) is None,
        layers_on or (lambda _: node_layers(engine)),
    )


def test_a_node_holding_the_base_receives_only_the_new_layer_and_loads_the_same_image(
    node, images, engine
):
    images.restore()
    outcome = send(node, images, engine, images.source())
    assert outcome.failed == {} and outcome.complete == ["node01"]
    assert outcome.first_round is not None
    assert outcome.first_round.carried == images.layers.diff_ids[1:]  # the new layer only
    layer = images.new_layer_tar_bytes()
    assert layer <= outcome.bytes_sent <= 1.1 * layer
    assert image_id(engine, images.app) == images.layers.image_id


def test_where_the_node_has_no_layer_the_whole_image_goes(node, images, engine):
    images.remove_all()
    try:
        outcome = send(node, images, engine, images.source())
        assert outcome.failed == {}
        assert outcome.first_round is not None and outcome.first_round.whole
        assert outcome.bytes_sent == images.saved.stat().st_size  # docker save's own bytes
        assert image_id(engine, images.app) == images.layers.image_id
    finally:
        images.restore()


def test_a_layer_corrupted_in_transit_is_refused_and_nothing_is_loaded(node, images, engine):
    images.restore()
    outcome = send(node, images, engine, images.source(corrupt_at=4096))
    why = outcome.failed["node01"]
    assert why.startswith("could not write " + images.app)
    assert "arrived with sha256:" in why and "refused, nothing loaded" in why
    assert image_id(engine, images.app) is None
    loaded = [i for i in engine.images.list(all=True) if i.id == images.layers.image_id]
    assert loaded == []


def test_the_relay_on_the_source_node_leaves_out_the_layers_held(node, images, engine):
    images.restore()
    engine.images.load(images.saved.read_bytes())  # the app on the node that sends it
    try:
        drop = list(images.layers.diff_ids[:1])
        data = b"".join(
            saved_on_node_without(
                node.connection, images.app, images.layers, drop, node.docker_host
            )
        )
    finally:
        images.remove_app()
    with tarfile.open(fileobj=io.BytesIO(data)) as archive:
        layer_files = [m for m in archive if m.name.endswith("/layer.tar")]
    assert [m.size for m in layer_files] == [images.new_layer_tar_bytes()]
    assert len(data) <= 1.1 * images.new_layer_tar_bytes()


def test_a_node_without_room_in_its_docker_data_root_is_refused_before_anything_is_sent(
    node, images, engine
):
    # The node's free space is real (its relay measures its Docker data root); the image is
    # said to hold a layer of 1 PB, more than any disk here has.
    images.restore()
    huge = replace(images.layers, layer_sizes=(1, 10**15))
    source = replace(images.source(), layers=huge)
    with pytest.raises(NoImageRoom) as refused:
        send(node, images, engine, source)
    line = refused.value.one_line()
    root = node_layers(engine).docker_root
    assert line.startswith(
        f"node01: not enough disk space to load {images.app}: node01 needs 2000000 GB under its Docker data root"
    )
    assert f"free space under {root} on those nodes" in line
    assert image_id(engine, images.app) is None


def test_an_image_read_from_this_machine_s_docker_leaves_out_the_layers_held(
    images, engine, local_docker, monkeypatch
):
    monkeypatch.setenv("DOCKER_HOST", local_docker.host)
    images.restore()
    engine.images.load(images.saved.read_bytes())
    try:
        source = source_here(images.app)
        assert source is not None
        assert source.origin == "this machine"
        assert source.layers == images.layers
        data = b"".join(source.save(images.layers.diff_ids[:1]))
    finally:
        images.remove_app()
    with tarfile.open(fileobj=io.BytesIO(data)) as archive:
        layer_files = [m for m in archive if m.name.endswith("/layer.tar")]
    assert [m.size for m in layer_files] == [images.new_layer_tar_bytes()]
