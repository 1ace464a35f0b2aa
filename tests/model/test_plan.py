"""The replica memory planner on the official DeepSeek-V3.2 config.json (tests/model/fixtures/),
built on the meta device (the real 671B shape, on this CPU), for 8 x H200 (141 GB) and
8 x H100 (80 GB); the CLI; the refusals (DeepSeek-V4, indivisible parallel sizes).

    .venv/bin/python -m pytest -q tests/model/test_plan.py -p no:cacheprovider
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from dsa_rag.model.plan import PlanError, check_fits, plan_replica, resolve_config, weights_per_rank
from dsa_rag.rag_service.cli import main as cli_main

V32 = Path(__file__).parent / "fixtures" / "deepseek-v3.2"


@pytest.fixture(scope="module")
def v32_weights():
    """Rank 0's weight bytes at TP=8 EP=8 (one meta build, ~20 s here, shared by the tests)."""
    cfg, dtype = resolve_config(str(V32))
    assert (cfg.num_hidden_layers, cfg.n_routed_experts, dtype) == (61, 256, torch.bfloat16)
    return weights_per_rank(cfg, dtype, 8, 8, 8)


def test_v32_cache_bytes_per_token(v32_weights):
    p = plan_replica(str(V32), 8, 141, _weights=v32_weights)
    assert p.kv_bytes_per_token == 61 * (512 + 64) * 2  # bf16 latent, every layer
    assert p.index_bytes_per_token == 61 * 128 * 2  # bf16 indexer keys (config.json asks no FP8 numerics)
    fp8 = plan_replica(str(V32), 8, 141, _weights=v32_weights, fp8_numerics=True)
    assert fp8.index_bytes_per_token == 61 * (128 + 4)  # e4m3 + one fp32 scale: DeepGEMM's 132 B


def test_v32_weights_per_rank(v32_weights):
    held, fp8 = v32_weights
    experts = 58 * 32 * 3 * 2048 * 7168  # 58 MoE layers x 256/8 experts x (w1, w2, w3) on each rank
    assert experts * 2 < held < experts * 2 + 15e9  # + replicated attention parts, sliced heads, vocab
    assert experts < fp8 < held / 1.9


def test_v32_on_8xh200(v32_weights, capsys):
    p = plan_replica(str(V32), 8, 141, _weights=v32_weights)
    print(p.text())
    assert not p.fits and p.packs_per_replica == 0  # dequantized bf16 weights: ~175 GB per rank
    assert "more than a 141 GB GPU" in p.shortfall and "FP8-resident weights" in p.shortfall
    q = plan_replica(str(V32), 8, 141, weights="fp8", _weights=v32_weights)
    print(q.text())
    assert q.fits and q.packs_per_replica == int(q.free_gb * 1e9 // (q.pack_gb * 1e9)) >= 1


def test_v32_on_8xh100(v32_weights):
    for weights in ("bf16", "fp8"):
        p = plan_replica(str(V32), 8, 80, weights=weights, _weights=v32_weights)
        print(p.text())
        assert not p.fits and "more than a 80 GB GPU" in p.shortfall
    with pytest.raises(PlanError, match="on 8 x 80 GB"):
        check_fits(str(V32), 8, 80, weights="fp8", _weights=v32_weights)


def test_refuses_deepseek_v4(tmp_path):
    d = json.loads((V32 / "config.json").read_text())
    d.update(model_type="deepseek_v4", architectures=["DeepseekV4ForCausalLM"])
    (tmp_path / "config.json").write_text(json.dumps(d))
    with pytest.raises(PlanError, match="DeepSeek-V4 .* not supported yet"):
        plan_replica(str(tmp_path), 8, 141)


def test_indivisible_sizes_name_the_dimension():
    with pytest.raises(PlanError, match="must be 1 or the replica's world size"):
        plan_replica("dsa-tiny", 4, 80, tp=2)
    with pytest.raises(PlanError, match="num_attention_heads = 8 does not split over 3"):
        plan_replica("dsa-tiny", 3, 80)


def test_cli(capsys):
    assert cli_main(["plan", "--model", "dsa-tiny", "--gpus", "2", "--gpu-mem", "1"]) == 0
    out = capsys.readouterr().out
    assert "packs/replica" in out and "verdict          fits" in out
    assert cli_main(["plan", "--model", "dsa-tiny", "--gpus", "2", "--gpu-mem", "0.1", "--json"]) == 1
    cap = capsys.readouterr()
    assert json.loads(cap.out)["fits"] is False and "one 131,072-token pack needs" in cap.err


def test_start_up_check_refuses_before_loading():
    """What every rank of a parallel replica runs first (on CUDA with the GPU's own memory)."""
    from dsa_rag.model.parallel.launch import start_rank

    with pytest.raises(PlanError, match=r"dsa-tiny on 1 x 0.01 GB .*: weights need"):
        start_rank(0, 1, "dsa-tiny", tp=1, init_method="tcp://unused:1", gpu_mem_gb=0.01)
