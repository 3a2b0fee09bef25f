"""Security on a real deployment: real ``flower-superlink`` / ``flower-supernode`` processes on 127.0.0.1.

* TLS and SuperNode authentication, with a CA, a server certificate and node keys generated here:
  a node whose public key was not registered (``flwr supernode register``) is refused, a
  registered one trains.
* Hostile uploads through real Flower: a ClientApp variant (this repository's handlers, with the
  upload corrupted on nodes whose node config says ``hostile=<kind>``) sends NaN items, the wrong
  dimension, too many items, the wrong dtype, weights of the wrong length and negative weights.
  Each is rejected with its reason in the server's log and ``metrics.csv``; the honest nodes finish
  the round.

No pickle on the wire: every record the apps exchange is a Flower ``ArrayRecord`` / ``ConfigRecord``
/ ``MetricRecord`` (numpy buffers and scalars; see ``federation/messages.py``); Flower writes and
reads the arrays with ``allow_pickle=False`` (``tests/unit/test_server_and_messages.py::
test_no_pickle_on_the_wire``), and the hostile uploads here are refused by their content.
"""

from __future__ import annotations

import csv
import datetime as dt
import ipaddress
import re
import textwrap
import time
from typing import TYPE_CHECKING

import pytest
import tomllib

from flower_processes import REPO, FlowerProcesses, run_config_overrides, synthetic_products, tiny_run_config

if TYPE_CHECKING:
    from pathlib import Path

pytestmark = pytest.mark.slow


def _certificates(folder: Path) -> Path:
    """A CA, a server certificate for 127.0.0.1 and two SuperNode key pairs (OpenSSH format)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    folder.mkdir()
    now = dt.datetime.now(dt.timezone.utc)

    def certificate(subject: str, key, issuer: str, issuer_key, *extensions) -> x509.Certificate:
        builder = (
            x509
            .CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)]))
            .issuer_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, issuer)]))
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5))
            .not_valid_after(now + dt.timedelta(days=1))
        )
        for extension, critical in extensions:
            builder = builder.add_extension(extension, critical=critical)
        return builder.sign(issuer_key, hashes.SHA256())

    ca_key = ec.generate_private_key(ec.SECP384R1())
    ca = certificate("test-ca", ca_key, "test-ca", ca_key, (x509.BasicConstraints(ca=True, path_length=None), True))
    server_key = ec.generate_private_key(ec.SECP384R1())
    names = x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1")), x509.DNSName("localhost")])
    server = certificate("127.0.0.1", server_key, "test-ca", ca_key, (names, False))
    pem = serialization.Encoding.PEM
    (folder / "ca.crt").write_bytes(ca.public_bytes(pem))
    (folder / "server.pem").write_bytes(server.public_bytes(pem))
    (folder / "server.key").write_bytes(
        server_key.private_bytes(pem, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    for node in ("listed", "unlisted"):
        key = ec.generate_private_key(ec.SECP384R1())
        (folder / node).write_bytes(
            key.private_bytes(pem, serialization.PrivateFormat.OpenSSH, serialization.NoEncryption())
        )
        (folder / f"{node}.pub").write_bytes(
            key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
        )
    return folder


def _rows(output: Path) -> dict[int, str]:
    with (output / "metrics.csv").open() as file:
        return {int(row["client"]): row["status"] for row in csv.DictReader(file)}


def test_tls_and_supernode_auth_refuse_an_unregistered_node_and_train_a_registered_one(tmp_path: Path) -> None:
    certs = _certificates(tmp_path / "certs")
    data = synthetic_products(tmp_path / "data", ["stripes"])
    output = tmp_path / "out"
    flower = FlowerProcesses(tmp_path)
    flower.connection(root_certificates=certs / "ca.crt")
    tls = ["--root-certificates", str(certs / "ca.crt")]
    try:
        flower.superlink(
            "--ssl-ca-certfile", str(certs / "ca.crt"), "--ssl-certfile", str(certs / "server.pem"),
            "--ssl-keyfile", str(certs / "server.key"), "--enable-supernode-auth", insecure=False,
        )  # fmt: skip
        registered = flower.flwr("supernode", "register", str(certs / "listed.pub"), "loopback", timeout=120)
        assert registered.returncode == 0, registered.stdout + registered.stderr
        node_config = "partition-id=0 num-partitions=1"
        unlisted = flower.start(
            "supernode_unlisted", "flower-supernode", "--superlink", f"127.0.0.1:{flower.link_port}", *tls,
            "--auth-supernode-private-key", str(certs / "unlisted"), "--node-config", node_config,
        )  # fmt: skip
        flower.supernode("supernode_listed", node_config, *tls, "--auth-supernode-private-key", str(certs / "listed"),
                         insecure=False)  # fmt: skip
        deadline = time.monotonic() + 120
        while unlisted.poll() is None and time.monotonic() < deadline:
            time.sleep(0.5)
        refused = (flower.logs / "supernode_unlisted.log").read_text()
        assert unlisted.poll() is not None, f"the unregistered node is still running:\n{refused}"
        assert unlisted.returncode != 0
        assert "Failed to activate SuperNode" in refused, refused

        run = flower.run_app(tiny_run_config(data, output, ["stripes"], **{"num-server-rounds": 1}))
        assert run.returncode == 0, f"{run.stdout[-4000:]}\n{flower.log_tail()}"
    finally:
        flower.stop_all()
    assert _rows(output) == {0: "ok"}, flower.log_tail()


HOSTILE_APP = '''
"""This repository's ClientApp, with the upload corrupted on nodes whose node config has ``hostile``."""

import numpy as np
from flwr.app import Array, ArrayRecord
from flwr.clientapp import ClientApp

from anomalib_feddymem.flower import client_app as honest

app = ClientApp()
app.query()(honest.query)
app.evaluate()(honest.evaluate)


def _corrupt(upload: ArrayRecord, kind: str) -> ArrayRecord:
    items, weights = upload["items"].numpy().copy(), upload["weights"].numpy().copy()
    if kind == "nan":
        items[0, 0] = np.nan
    elif kind == "wrong-dimension":
        items = items[:, :-1]
    elif kind == "too-many-items":
        items = np.tile(items, (65537 // len(items) + 1, 1))
        weights = np.ones(len(items), dtype=np.float32)
    elif kind == "wrong-dtype":
        items = items.astype(np.float64)
    elif kind == "weights-length":
        weights = weights[:-1]
    elif kind == "negative-weights":
        weights[0] = -1.0
    return ArrayRecord(array_dict={"items": Array(np.ascontiguousarray(items)), "weights": Array(weights)})


@app.train()
def train(msg, context):
    reply = honest.train(msg, context)
    kind = str(context.node_config.get("hostile", ""))
    if kind:
        reply.content["upload"] = _corrupt(reply.content["upload"], kind)
    return reply
'''

HOSTILE_KINDS = ["nan", "wrong-dimension", "too-many-items", "wrong-dtype", "weights-length", "negative-weights"]


def _hostile_app(folder: Path) -> Path:
    """A Flower app folder: this repository's ServerApp and config, the hostile ClientApp."""
    folder.mkdir()
    project = tomllib.loads((REPO / "pyproject.toml").read_text())
    config = project["tool"]["flwr"]["app"]["config"]
    lines = [f"{key} = {value!r}".replace("True", "true").replace("False", "false") for key, value in config.items()]
    (folder / "pyproject.toml").write_text(
        textwrap.dedent("""\
        [build-system]
        requires = ["hatchling"]
        build-backend = "hatchling.build"

        [project]
        name = "hostile-feddymem"
        version = "0.1.0"
        dependencies = []

        [tool.hatch.build.targets.wheel]
        packages = ["."]

        [tool.flwr.app]
        publisher = "anomalib-feddymem-tests"

        [tool.flwr.app.components]
        serverapp = "anomalib_feddymem.flower.server_app:app"
        clientapp = "hostile_client_app:app"

        [tool.flwr.app.config]
        """)
        + "\n".join(lines)
        + "\n"
    )
    (folder / "hostile_client_app.py").write_text(HOSTILE_APP)
    return folder


def test_hostile_uploads_are_rejected_with_their_reasons_and_the_round_goes_on(tmp_path: Path) -> None:
    clients = 2 + len(HOSTILE_KINDS)
    products = ["stripes", "disc"]
    data = synthetic_products(tmp_path / "data", products, train_per_product=clients)
    output = tmp_path / "out"
    app = _hostile_app(tmp_path / "hostile_app")
    flower = FlowerProcesses(tmp_path)
    try:
        flower.superlink()
        for partition in range(clients):
            hostile = f" hostile='{HOSTILE_KINDS[partition - 2]}'" if partition >= 2 else ""
            flower.supernode(f"supernode_{partition}", f"partition-id={partition} num-partitions={clients}{hostile}")
        run_config = tiny_run_config(
            data, output, products, **{"num-server-rounds": 1, "num-clients": clients, "min-clients": 2,
                                       "partition": "iid", "round-timeout": 900},
        )  # fmt: skip
        run = flower.flwr("run", str(app), "loopback", "--stream", "--run-config", run_config_overrides(run_config))
        assert run.returncode == 0, f"{run.stdout[-4000:]}\n{flower.log_tail()}"
    finally:
        flower.stop_all()
    rows = _rows(output)
    assert rows[0] == rows[1] == "ok", rows
    expected = {
        "nan": "NaN",
        "wrong-dimension": r"items must have shape \(K, 32\)",
        "too-many-items": "too many items",
        "wrong-dtype": "float64",
        "weights-length": "weights",
        "negative-weights": "negative",
    }
    for partition, kind in enumerate(HOSTILE_KINDS, start=2):
        assert rows[partition].startswith("rejected: "), (kind, rows[partition])
        assert re.search(expected[kind], rows[partition], re.IGNORECASE), (kind, rows[partition])
    log = run.stdout
    for partition in range(2, clients):
        assert re.search(rf"client {partition}: ", log), f"the server log names client {partition}:\n{log[-4000:]}"
