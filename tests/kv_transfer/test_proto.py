"""The generated stubs in use are exactly what the build step makes from the committed .proto."""

from __future__ import annotations

import runpy
from pathlib import Path

import pdserve.kv_transfer.v1.kv_transfer_pb2 as pb

ROOT = Path(__file__).resolve().parents[2]


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
    for bad in (wire[:-1], wire + b"\x08\x01", b"\x22\xff\xff"):  # truncated, trailing field, bad varint
        parsed = None
        try:
            parsed = decode_push_message(bad)
        except Exception as e:  # protobuf's own error for what is not a PushMessage
            assert "pars" in str(e).lower() or "decode" in str(e).lower(), e
        assert not isinstance(parsed, memoryview)
