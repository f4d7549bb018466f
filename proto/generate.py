"""The one build step that turns `proto/**/*.proto` into Python stubs.

`make` (the `proto` target) and the package build (`setup.py`'s build_py) both
run this. Protos live under their package path (`proto/pdserve/kv_transfer/v1/
kv_transfer.proto` for `package pdserve.kv_transfer.v1`), so the generated
imports name the installed package (`from pdserve.kv_transfer.v1 import ...`).
The stubs land next to the code that uses them, with the namespace's root
folder dropped as in the package mapping (`pdserve.kv_transfer` is the
`kv_transfer/` folder): `kv_transfer/v1/kv_transfer_pb2.py` (+ `_pb2_grpc.py`,
`.pyi`). They are build outputs, ignored by git; `tests/kv_transfer/
test_proto.py` fails if the stubs in use differ from what this step makes from
the committed `.proto`.

Usage: python proto/generate.py [OUT_ROOT]   (default: the repository root)
"""

from __future__ import annotations

import shutil
import sys
import tempfile
from pathlib import Path

PROTO_ROOT = Path(__file__).resolve().parent
NAMESPACE = "pdserve"  # the import namespace whose subpackages are the repository's top-level folders


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
        if rel.parts[0] != NAMESPACE:
            raise RuntimeError(f"{proto}: protos live under proto/{NAMESPACE}/ (their package path)")
        folder = Path(*rel.parent.parts[1:])  # pdserve/kv_transfer/v1 -> kv_transfer/v1
        with tempfile.TemporaryDirectory() as tmp:
            args = ["protoc", f"-I{PROTO_ROOT}", f"-I{include}", f"--python_out={tmp}", f"--pyi_out={tmp}",
                    f"--grpc_python_out={tmp}", str(proto)]
            if protoc.main(args) != 0:
                raise RuntimeError(f"protoc failed on {proto}")
            (out_root / folder).mkdir(parents=True, exist_ok=True)
            for suffix in ("_pb2.py", "_pb2.pyi", "_pb2_grpc.py"):
                made = Path(tmp) / rel.parent / f"{rel.stem}{suffix}"
                target = out_root / folder / made.name
                shutil.copyfile(made, target)
                written.append(target)
        init = out_root / folder / "__init__.py"  # the stubs' folder is a package (its parents are ours)
        if not init.exists():
            init.write_text("")
    return written


if __name__ == "__main__":
    out = Path(sys.argv[1]) if len(sys.argv) > 1 else PROTO_ROOT.parent
    for f in generate(out):
        print(f"generated {f.relative_to(out)}")
