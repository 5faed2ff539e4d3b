"""TLS: the coordinator serves with a cert/key; clients trust it through a CA file."""

from __future__ import annotations

import datetime
import ipaddress
from pathlib import Path

import grpc
import pytest

from coldswarm.common.channel import bearer, open_channel
from coldswarm.coordinator import admin_cli
from coldswarm.coordinator.server import start_server
from coldswarm.proto import coldswarm_pb2 as pb
from coldswarm.proto import coldswarm_pb2_grpc as pb_grpc

from .conftest import make_config


def self_signed(dir: Path) -> tuple[Path, Path]:
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName(
                [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
            ),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = dir / "cert.pem", dir / "key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    )
    return cert_path, key_path


@pytest.fixture
def tls_server(tmp_path, tiny_model):
    cert, key = self_signed(tmp_path)
    config = make_config(tmp_path / "data", tiny_model, tls_cert=cert, tls_key=key)
    running = start_server(config)
    yield running, cert, config.admin_token_path.read_text().strip()
    running.stop(grace=0)


def test_tls_round_trip(tls_server, capsys):
    running, cert, token = tls_server
    with open_channel(running.address, ca_file=cert) as channel:
        st = pb_grpc.AdminServiceStub(channel).Status(pb.StatusRequest(), metadata=bearer(token), timeout=10)
        assert st.current_version == 0
    # A plaintext client cannot talk to a TLS server.
    with open_channel(running.address) as channel:
        with pytest.raises(grpc.RpcError) as info:
            pb_grpc.AdminServiceStub(channel).Status(pb.StatusRequest(), metadata=bearer(token), timeout=3)
        assert info.value.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)
    rc = admin_cli.main(
        ["--coordinator", running.address, "--ca-file", str(cert), "--token", token, "status"]
    )
    assert rc == 0 and "version 0" in capsys.readouterr().out


def test_tls_needs_cert_and_key(tmp_path):
    with pytest.raises(ValueError, match="both"):
        make_config(tmp_path, None, tls_cert=tmp_path / "c.pem")
