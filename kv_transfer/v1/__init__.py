"""Stubs generated from proto/pdserve/kv_transfer/v1/kv_transfer.proto (`make proto`; see proto/generate.py)."""
