"""Secrets stay secret: never in a config's repr (what logs and tracebacks show), never printed at start-up,
not handed to workers that have no use for them, and readable from a file instead of a command line."""

from __future__ import annotations

import argparse

import pytest

from pdserve.engine.config import PdserveConfig
from pdserve.serve import add_serve_args, banner, serve_config

SECRETS = {"serve": {"api_key": "api-s3cret", "admin_key": "admin-s3cret"}, "kv_transfer": {"auth_token": "kv-s3cret"}}


def test_the_config_repr_shows_no_secret():
    cfg = PdserveConfig().replace(**SECRETS)
    text = repr(cfg) + str(cfg.serve) + str(cfg.kv_transfer)
    assert "s3cret" not in text and "api_key" not in text
    assert cfg.serve.api_key == "api-s3cret"  # still there, just not shown


def test_workers_get_the_kv_secret_but_not_the_routers_keys():
    cfg = PdserveConfig().replace(**SECRETS).for_workers()
    assert cfg.serve.api_key is None and cfg.serve.admin_key is None
    assert cfg.kv_transfer.auth_token == "kv-s3cret"  # workers authenticate to each other with it


def test_the_start_up_banner_names_the_key_without_showing_it():
    cfg = PdserveConfig().replace(**SECRETS)
    text = banner("http://127.0.0.1:8000", cfg, "127.0.0.1:6379")
    assert "s3cret" not in text and "$PDSERVE_API_KEY" in text and "http://127.0.0.1:8000" in text


def _args(*argv: str) -> argparse.Namespace:
    p = argparse.ArgumentParser()
    add_serve_args(p)
    return p.parse_args(list(argv))


def test_secrets_come_from_files(tmp_path):
    files = {}
    for name, secret in (("api", "from-a-file\n"), ("admin", "admin-from-a-file"), ("kv", " kv-from-a-file ")):
        files[name] = tmp_path / name
        files[name].write_text(secret)
    cfg = serve_config(_args("--api-key-file", str(files["api"]), "--admin-key-file", str(files["admin"]),
                             "--kv-auth-token-file", str(files["kv"])))
    assert (cfg.serve.api_key, cfg.serve.admin_key, cfg.kv_transfer.auth_token) == (
        "from-a-file", "admin-from-a-file", "kv-from-a-file")


def test_an_empty_secret_file_is_refused(tmp_path):
    empty = tmp_path / "empty"
    empty.write_text("\n")
    with pytest.raises(SystemExit, match="--api-key-file"):
        serve_config(_args("--api-key-file", str(empty)))
