"""Regenerate the gRPC stubs committed beside ``coldswarm.proto``.

Run ``python -m coldswarm.proto.generate`` (or ``make proto``) after editing the
``.proto``. ``tests/test_proto_stubs.py`` regenerates into a temporary folder and
fails on any difference, so committed stubs cannot drift from the contract.

The proto is compiled from a temporary tree ``coldswarm/proto/coldswarm.proto`` so
that the generated ``_pb2_grpc`` module imports ``coldswarm.proto.coldswarm_pb2``
(an absolute import that works inside the installed package) rather than a bare
top-level ``coldswarm_pb2``.
"""

from __future__ import annotations

import shutil
import sys
import tempfile
from pathlib import Path

PROTO_DIR = Path(__file__).resolve().parent
PROTO_NAME = "coldswarm.proto"
GENERATED = ("coldswarm_pb2.py", "coldswarm_pb2.pyi", "coldswarm_pb2_grpc.py")


def generate(out_dir: Path) -> list[Path]:
    """Compile ``coldswarm.proto`` into ``out_dir``; return the written files."""
    from grpc_tools import protoc

    out_dir = Path(out_dir)
    with tempfile.TemporaryDirectory() as tmp:
        src_root = Path(tmp) / "src"
        pkg = src_root / "coldswarm" / "proto"
        pkg.mkdir(parents=True)
        shutil.copyfile(PROTO_DIR / PROTO_NAME, pkg / PROTO_NAME)
        gen_root = Path(tmp) / "gen"
        gen_root.mkdir()
        include = str(Path(protoc.__file__).parent / "_proto")
        rc = protoc.main(
            [
                "grpc_tools.protoc",
                f"-I{src_root}",
                f"-I{include}",
                f"--python_out={gen_root}",
                f"--pyi_out={gen_root}",
                f"--grpc_python_out={gen_root}",
                f"coldswarm/proto/{PROTO_NAME}",
            ]
        )
        if rc != 0:
            raise RuntimeError(f"protoc failed with exit code {rc}")
        out_dir.mkdir(parents=True, exist_ok=True)
        written = []
        for name in GENERATED:
            dst = out_dir / name
            shutil.copyfile(gen_root / "coldswarm" / "proto" / name, dst)
            written.append(dst)
        return written


if __name__ == "__main__":
    for path in generate(Path(sys.argv[1]) if len(sys.argv) > 1 else PROTO_DIR):
        print(path)
