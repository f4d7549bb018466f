"""`make gpu-check`'s script (bench/gpu_check.py) in its `--device cpu` mode on the tiny model, so its plumbing runs
in CI: every figure is produced, the bare engine agrees with HF in float32, the disaggregated deployment's outputs
equal the bare engine's with no KV block left behind, and the NCCL figure says why it was skipped. Without CUDA the
GPU run refuses with a message. The CUDA run itself has not run here (no GPU)."""

from __future__ import annotations

import json

import pytest
import torch

from pdserve.bench import gpu_check


def test_cpu_mode_produces_every_figure(ray_cluster, tiny_text_model_dir, tmp_path):
    out = tmp_path / "gpu-check.json"
    assert gpu_check.main(["--device", "cpu", "--model", str(tiny_text_model_dir), "--out", str(out),
                           "--max-tokens", "8", "--requests", "3"]) == 0
    r = json.loads(out.read_text())
    assert r["device"] == "cpu" and r["dtype"] == "float32" and not r["cuda_graphs"]
    hf = r["hf_greedy"]
    assert hf["prompts_exact"] == hf["prompts"] == len(gpu_check.PROMPTS)  # float32 is token-exact
    assert hf["tokens_agreeing"] == hf["tokens"] == hf["prompts"] * 8
    for batch in (1, 64):
        t = r["throughput"][f"batch_{batch}"]
        assert t["output_tokens"] == batch * 8 and t["output_tokens_per_s"] > 0
    d = r["disaggregated_grpc"]
    assert d["exact"] == d["requests"] == 3, d["errors"]
    assert d["leaked_blocks"] == 0 and d["stuck_requests"] == 0
    assert 0 < d["ttft_ms"]["p50"] <= d["ttft_ms"]["max"]
    assert "NCCL" in r["nccl_peer_killed"]["skipped"]
    assert ray_cluster.is_initialized()  # a cluster it did not start is left running


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal where there is no CUDA")
def test_without_cuda_it_says_so(tmp_path, capsys):
    assert gpu_check.main(["--out", str(tmp_path / "x.json")]) == 2
    assert "needs a CUDA device" in capsys.readouterr().err
    assert not (tmp_path / "x.json").exists()
