"""Regenerate ``csi_pb2.py`` and ``csi_pb2_grpc.py`` from ``proto/csi.proto``.

The stubs are committed so that running the plugin needs only grpcio and
protobuf; grpcio-tools is needed only here (and by the test that checks the
committed stubs are current). Run: ``python -m csi.gen [OUT_DIR]``.
"""

from __future__ import annotations

import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent


def generate(out_dir: Path = HERE) -> None:
    """Run protoc; imports in the grpc stub are made package-relative (``from . import``)."""
    import grpc_tools
    from grpc_tools import protoc
    include = Path(grpc_tools.__file__).parent / "_proto"
    out_dir.mkdir(parents=True, exist_ok=True)
    rc = protoc.main(["protoc", f"-I{HERE / 'proto'}", f"-I{include}",
                      f"--python_out={out_dir}", f"--grpc_python_out={out_dir}", "csi.proto"])
    if rc != 0:
        raise SystemExit(f"protoc failed with {rc}")
    stub = out_dir / "csi_pb2_grpc.py"
    stub.write_text(stub.read_text().replace("import csi_pb2 as csi__pb2",
                                             "from . import csi_pb2 as csi__pb2"))


if __name__ == "__main__":
    generate(Path(sys.argv[1]) if len(sys.argv) > 1 else HERE)
