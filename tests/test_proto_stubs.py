"""The committed gRPC stubs must be exactly what the pinned protoc makes of coldswarm.proto."""

from pathlib import Path

from coldswarm.proto import generate


def test_committed_stubs_match_proto(tmp_path: Path):
    written = generate.generate(tmp_path)
    for fresh in written:
        committed = generate.PROTO_DIR / fresh.name
        assert committed.exists(), f"{committed.name} is missing: run `make proto` and commit it"
        assert fresh.read_bytes() == committed.read_bytes(), (
            f"{committed.name} differs from what coldswarm.proto generates: run `make proto` and commit"
        )


def test_stubs_import_under_package_root():
    from coldswarm.proto import coldswarm_pb2, coldswarm_pb2_grpc

    assert coldswarm_pb2.DESCRIPTOR.package == "coldswarm.v1"
    assert hasattr(coldswarm_pb2_grpc, "WorkerServiceStub")
    assert hasattr(coldswarm_pb2_grpc, "AdminServiceStub")
