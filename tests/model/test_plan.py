"""The replica memory planner on the official DeepSeek-V3.2 config.json (tests/model/fixtures/)
and the DeepSeek-V4-Flash preset, built on the meta device (the real 671B / 284B shapes, on this
CPU), for 8 x H200 (141 GB) and 8 x H100 (80 GB); a V4 config.json dir; V4's TP / EP split on a
tiny config; the CLI; the refusals (indivisible parallel sizes, GPUs too small).

    .venv/bin/python -m pytest -q tests/model/test_plan.py -p no:cacheprovider
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from dsa_rag.model.plan import PlanError, check_fits, plan_replica, resolve_config, weights_per_rank
from dsa_rag.model.v4.cache import bytes_per_token, fixed_bytes
from dsa_rag.model.v4.config import V4Config
from dsa_rag.model.v4.config import preset as v4_preset
from dsa_rag.model.v4.load import cast_v4
from dsa_rag.model.v4.model import Transformer as V4Transformer
from dsa_rag.rag_service.cli import main as cli_main
from tests.model.v4_helpers import tiny_v4_config

V32 = Path(__file__).parent / "fixtures" / "deepseek-v3.2"
FLASH = "deepseek-v4-flash"


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


@pytest.fixture(scope="module")
def flash():
    """V4-Flash on the meta device: (parameter count, bf16 bytes of the whole model, routed-expert
    parameters), and rank 0's weight bytes at TP=8 EP=8 (two meta builds, ~30 s here)."""
    cfg, dtype = resolve_config(FLASH)
    assert isinstance(cfg, V4Config) and dtype == torch.bfloat16
    with torch.device("meta"):
        model = cast_v4(V4Transformer(cfg), dtype)
    params = sum(p.numel() for p in model.parameters())
    full = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    routed = sum(p.numel() for n, p in model.named_parameters() if ".experts." in n)
    return params, full, routed, weights_per_rank(cfg, dtype, 8, 8, 8)


def _check_v4_cache(p):
    cfg = v4_preset(FLASH)
    assert p.kv_bytes_per_token + p.index_bytes_per_token == bytes_per_token(cfg) == 6584  # bf16, cache.py
    assert p.index_bytes_per_token == 20 * 128 * 2 / 4  # 20 CSA layers: one 128-dim indexer key per 4 tokens
    assert p.fixed_bytes_per_pack == fixed_bytes(cfg) > 0  # windows + compressor state, once per pack
    assert p.pack_gb * 1e9 == pytest.approx(6584 * 131072 + fixed_bytes(cfg))
    assert p.packs_per_replica == max(0, int(p.free_gb // p.pack_gb))
    assert "cache per token  6,584 B" in p.text() and f"+ {fixed_bytes(cfg):,} B fixed" in p.text()


def test_v4_flash_weights_per_rank(flash):
    params, full, routed, (held, fp8) = flash
    assert 284e9 < params < 285e9  # DeepSeek-V4-Flash: 284B total
    assert routed == 43 * 256 * 3 * 2048 * 4096  # 43 MoE layers x 256 experts x (w1, w2, w3)
    rest = full - routed * 2  # everything but the routed experts, bf16 (+ fp32 norms / mixers)
    shared = 43 * 3 * 2048 * 4096 * 2  # the shared expert stays whole on every rank under EP
    assert routed * 2 / 8 + max(rest / 8, shared) < held < routed * 2 / 8 + rest
    assert routed / 8 < fp8 < held / 1.9


def test_v4_flash_on_8xh200(flash):
    p = plan_replica(FLASH, 8, 141, _weights=flash[3])
    print(p.text())
    _check_v4_cache(p)
    assert (p.tensor_parallel_size, p.expert_parallel_size, p.dtype) == (8, 8, "bfloat16")
    assert p.weights_gb * 1e9 == flash[3][0]
    assert p.fits and p.packs_per_replica >= 50  # ~0.88 GB per 128k pack: V4's pools are small


def test_v4_flash_on_8xh100(flash):
    p = plan_replica(FLASH, 8, 80, _weights=flash[3])
    print(p.text())
    _check_v4_cache(p)
    assert not p.fits and "more than a 80 GB GPU" in p.shortfall and "FP8-resident weights" in p.shortfall
    q = plan_replica(FLASH, 8, 80, weights="fp8", _weights=flash[3])
    print(q.text())
    _check_v4_cache(q)
    assert q.fits and q.weights_gb * 1e9 == flash[3][1] and q.packs_per_replica >= 1


def test_v4_too_small_gpu_names_the_shortfall(flash):
    with pytest.raises(PlanError, match=r"deepseek-v4-flash on 8 x 40 GB .*more than a 40 GB GPU holds; "
                                        r"one pack needs GPUs of >= \d+ GB"):
        check_fits(FLASH, 8, 40, weights="fp8", _weights=flash[3])
    # weights fit, the 128k pack (its fixed part included) does not
    fp8 = flash[3][1] / 1e9
    gpu = (fp8 + 0.5) / 0.9
    p = plan_replica(FLASH, 8, gpu, weights="fp8", _weights=flash[3])
    assert not p.fits and "one 131,072-token pack needs 0.88 GB of cache per rank" in p.shortfall


def test_v4_config_dir(tmp_path, flash):
    d = v4_preset(FLASH).to_hf_dict()
    d["torch_dtype"] = "bfloat16"
    (tmp_path / "config.json").write_text(json.dumps(d))
    cfg, dtype = resolve_config(str(tmp_path))
    assert isinstance(cfg, V4Config) and dtype == torch.bfloat16 and cfg.layer_types == v4_preset(FLASH).layer_types
    p = plan_replica(str(tmp_path), 8, 141, _weights=flash[3])
    _check_v4_cache(p)
    with pytest.raises(PlanError, match="no FP8 layout here"):
        plan_replica(str(tmp_path), 8, 141, _weights=flash[3], fp8_numerics=True)


def test_v4_split_rules_on_a_tiny_config():
    """TP=EP=1 holds the whole model; the shared expert is sliced under TP=2 EP=1 and whole under
    TP=2 EP=2; o_groups must divide over TP (wo_a keeps whole output groups)."""
    cfg = tiny_v4_config()
    with torch.device("meta"):
        model = cast_v4(V4Transformer(cfg), torch.float32)
    full = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    shared = sum(p.numel() * 4 for n, p in model.named_parameters() if "shared_experts" in n)
    assert weights_per_rank(cfg, torch.float32, 1, 1, 1)[0] == full
    held_ep, _ = weights_per_rank(cfg, torch.float32, 2, 2, 2)
    held_tp, _ = weights_per_rank(cfg, torch.float32, 2, 2, 1)
    assert full / 2 < held_ep < full and held_tp == held_ep - shared // 2
    with pytest.raises(PlanError, match="o_groups = 2 does not split over 4"):
        weights_per_rank(cfg, torch.float32, 4, 4, 4)


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
    assert cli_main(["plan", "--model", "deepseek-v4-flash", "--fp8-numerics"]) == 2
    assert "DeepSeek-V4's caches" in capsys.readouterr().err


def test_start_up_check_refuses_before_loading():
    """What every rank of a parallel replica runs first (on CUDA with the GPU's own memory)."""
    from dsa_rag.model.parallel.launch import start_rank

    with pytest.raises(PlanError, match=r"dsa-tiny on 1 x 0.01 GB .*: weights need"):
        start_rank(0, 1, "dsa-tiny", tp=1, init_method="tcp://unused:1", gpu_mem_gb=0.01)
