"""The one build step that turns `proto/**/*.proto` into Python stubs.

`make` (the `proto` target) and the package build (`setup.py`'s build_py) both
run this. The stubs land next to the code that uses them: `proto/kv_transfer/v1/
kv_transfer.proto` becomes `kv_transfer/v1/kv_transfer_pb2.py` (+ `_pb2_grpc.py`,
`.pyi`). They are build outputs, ignored by git; `tests/test_proto.py` fails if
the stubs in use differ from what this step makes from the committed `.proto`.

Usage: python proto/generate.py [OUT_ROOT]   (default: the repository root)
"""

from __future__ import annotations

import sys
from pathlib import Path

PROTO_ROOT = Path(__file__).resolve().parent


def proto_files() -> list[Path]:
    return sorted(PROTO_ROOT.rglob("*.proto"))


def generate(out_root: Path) -> list[Path]:
    """Run protoc (from grpcio-tools) on every .proto; returns the files written."""
    import grpc_tools
    from grpc_tools import protoc

    include = str(Path(grpc_tools.__file__).parent / "_proto")  # google/protobuf/*.proto
    written: list[Path] = []
    for proto in proto_files():
        rel = proto.relative_to(PROTO_ROOT)
        (out_root / rel.parent).mkdir(parents=True, exist_ok=True)
        args = ["protoc", f"-I{PROTO_ROOT}", f"-I{include}", f"--python_out={out_root}",
                f"--pyi_out={out_root}", f"--grpc_python_out={out_root}", str(proto)]
        if protoc.main(args) != 0:
            raise RuntimeError(f"protoc failed on {proto}")
        stem = out_root / rel.parent / rel.stem
        written += [Path(f"{stem}_pb2.py"), Path(f"{stem}_pb2.pyi"), Path(f"{stem}_pb2_grpc.py")]
        for pkg in [rel.parent, *rel.parent.parents][:-1]:  # make every generated dir a package
            init = out_root / pkg / "__init__.py"
            if not init.exists():
                init.write_text("")
    return written


if __name__ == "__main__":
    out = Path(sys.argv[1]) if len(sys.argv) > 1 else PROTO_ROOT.parent
    for f in generate(out):
        print(f"generated {f.relative_to(out)}")
