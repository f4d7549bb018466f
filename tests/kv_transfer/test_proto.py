"""The generated stubs in use are exactly what the build step makes from the committed .proto."""

from __future__ import annotations

import runpy
from pathlib import Path

import pytest
from google.protobuf.message import DecodeError

import pdserve.kv_transfer.v1.kv_transfer_pb2 as pb

ROOT = Path(__file__).resolve().parents[2]


def test_stubs_in_use_match_the_committed_proto(tmp_path):
    """Outside `make`, this catches stubs older than the .proto. Under `make test` the build step has just
    regenerated them from any changed .proto (by design), so there it catches what the build step does not
    redo: a generated file edited by hand (make's rule depends on the .proto, not on its outputs)."""
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


def test_hand_encoded_chunk_bytes_are_the_protobuf_message():
    import google_crc32c
    import torch

    from pdserve.kv_transfer.protocol import decode_push_message, encode_chunk_data

    kvs = [torch.randn(2, 300, 3, 64)[:, 17:250] for _ in range(2)]  # token slices: K, V halves not adjacent
    wire, n, crc = encode_chunk_data(kvs)
    data = torch.stack(kvs).numpy().tobytes()
    assert n == len(data) and crc == google_crc32c.value(data)
    assert pb.PushMessage.FromString(wire) == pb.PushMessage(chunk_data=data)
    assert pb.PushMessage(chunk_data=data).SerializeToString() == wire
    fast = decode_push_message(wire)  # read in place
    assert isinstance(fast, memoryview) and fast.tobytes() == data
    # what the fast path must not take for a bare chunk: protobuf's own parser rejects what is corrupt...
    for bad in (wire[:-1], b"\x22\xff\xff"):  # truncated payload, a length varint that never ends
        with pytest.raises(DecodeError):
            decode_push_message(bad)
    # ...and parses what is a valid message of another shape: a trailing `header` field (1) after the chunk
    # wins the `kind` oneof, as protobuf says, instead of the chunk bytes coming back in place
    trailing = decode_push_message(wire + b"\x0a\x00")
    assert isinstance(trailing, pb.PushMessage) and trailing.WhichOneof("kind") == "header", trailing
