"""Multi-device replicas in the deployment graph, without a cluster: the serve config's
tensor/expert_parallel_size args reach ServeSettings, and build_app gives ModelReplica one
placement group of max(tp, ep) bundles, STRICT_PACK; sizes that cannot share a node's ranks
are refused. (The live 2-rank replica: tests/service/test_ray_parallel.py.)

    .venv/bin/python -m pytest -q tests/service/test_deploy_parallel.py -p no:cacheprovider
"""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from dsa_rag.rag_service.serve.deployments import build_app
from dsa_rag.rag_service.serve.settings import ServeSettings

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"


def _model_replica_config(app):
    return app._bound_deployment._replica_config.init_args[3]._bound_deployment._replica_config


@pytest.mark.parametrize("tp,ep", [(8, 8), (8, 1), (1, 8)])
def test_build_app_places_one_replica_in_one_placement_group(tp, ep):
    args = yaml.safe_load((DEPLOY / "serve.yaml").read_text())["applications"][0]["args"]
    assert args["tensor_parallel_size"] == 1 and args["expert_parallel_size"] == 1  # the default: one device
    rc = _model_replica_config(build_app({**args, "data_dir": "/tmp/x", "tensor_parallel_size": tp,
                                          "expert_parallel_size": ep}))
    assert rc.placement_group_strategy == "STRICT_PACK"
    assert rc.placement_group_bundles == [{"CPU": 1}] * 8  # no GPUs in this cluster-less build
    assert rc.ray_actor_options["num_cpus"] == 1  # the replica (rank 0) fits bundle 0


def test_single_device_replica_has_no_placement_group():
    rc = _model_replica_config(build_app({"data_dir": "/tmp/x"}))
    assert rc.placement_group_bundles is None


def test_sizes_that_cannot_share_a_node_are_refused():
    with pytest.raises(ValueError, match="tensor_parallel_size = 2: must be 1 or the replica's rank count 4"):
        ServeSettings(tensor_parallel_size=2, expert_parallel_size=4)
    assert ServeSettings(tensor_parallel_size=4, expert_parallel_size=4).replica_ranks == 4


def test_one_process_serving_refuses_a_multi_rank_replica():
    """`dsa-rag serve --no-ray` (LocalBackend) builds its worker in one process: no silent TP=1."""
    from dsa_rag.rag_service.ask.worker import PackWorker

    with pytest.raises(ValueError, match="runs on Ray, one placement group per replica"):
        PackWorker.from_settings(None, ServeSettings(tensor_parallel_size=2, expert_parallel_size=2))
