"""The generated stubs in use are exactly what the build step makes from the committed .proto."""

from __future__ import annotations

import runpy
from pathlib import Path

import kv_transfer.v1.kv_transfer_pb2 as pb

ROOT = Path(__file__).resolve().parents[1]


def test_stubs_in_use_match_the_committed_proto(tmp_path):
    generate = runpy.run_path(str(ROOT / "proto" / "generate.py"))["generate"]
    fresh = generate(tmp_path)
    assert fresh, "no .proto found under proto/"
    in_use = Path(pb.__file__).parent
    for f in fresh:
        used = in_use / f.name
        assert used.is_file(), f"{used} is missing: run `make proto`"
        assert used.read_bytes() == f.read_bytes(), f"{used} is stale: run `make proto`"


def test_descriptor_names_the_service_and_wire_messages():
    svc = pb.DESCRIPTOR.services_by_name["KVTransfer"]
    assert [m.name for m in svc.methods] == ["Pair", "Reserve", "Push", "Release", "OpenChannel"]
    assert pb.DESCRIPTOR.package == "pdserve.kv_transfer.v1"
