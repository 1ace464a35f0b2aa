"""deploy/: the Ray Serve config, the cluster launcher config and the KubeRay RayService load and
validate against Ray's own schemas, and name deployments, settings and routers that exist.
No Ray cluster is started.

    .venv/bin/python -m pytest -q tests/service/test_deploy.py
"""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"
NAMES = {"Ingress", "Ingestion", "ModelReplica"}


def _check_serve_config(cfg: dict) -> None:
    from ray._common.utils import import_attr
    from ray.serve.request_router import RequestRouter
    from ray.serve.schema import ServeDeploySchema

    from dsa_rag.rag_service.serve.settings import ServeSettings

    schema = ServeDeploySchema.model_validate(cfg)
    (app,) = schema.applications
    assert app.import_path == "dsa_rag.rag_service.serve.deployments:build_app"
    builder = import_attr(app.import_path)
    args = dict(app.args)
    extra = {"model_autoscaling_config", "app_name"}
    unknown = set(args) - set(ServeSettings.model_fields) - extra
    assert not unknown, f"args that ServeSettings does not know: {unknown}"
    built = builder({**args, "data_dir": "/tmp/x"})  # builds the graph (no cluster needed)
    names = set()

    def walk(node):  # Application -> its deployment's bound init args (Ray internals, read-only)
        dep = node._bound_deployment
        names.add(dep.name)
        rc = dep._replica_config
        for a in list(rc.init_args) + list(rc.init_kwargs.values()):
            if hasattr(a, "_bound_deployment"):
                walk(a)

    walk(built)
    assert names == NAMES
    by_name = {d.name: d for d in app.deployments}
    assert set(by_name) <= NAMES
    model = by_name["ModelReplica"]
    router = model.request_router_config
    assert issubclass(import_attr(router["request_router_class"]), RequestRouter)
    assert model.autoscaling_config or model.num_replicas
    assert model.ray_actor_options.num_gpus is not None


def test_serve_config_validates_and_builds():
    cfg = yaml.safe_load((DEPLOY / "serve.yaml").read_text())
    _check_serve_config(cfg)
    assert cfg["http_options"]["host"] == "127.0.0.1"
    auto = next(d for d in cfg["applications"][0]["deployments"] if d["name"] == "ModelReplica")["autoscaling_config"]
    from ray.serve.config import AutoscalingConfig

    AutoscalingConfig(**auto)


def test_cluster_launcher_config_validates():
    pytest.importorskip("jsonschema")
    from ray.autoscaler._private.util import fillout_defaults, validate_config

    cfg = yaml.safe_load((DEPLOY / "cluster.yaml").read_text())
    validate_config(fillout_defaults(cfg))  # Ray's ray-schema.json, after `ray up`'s defaults
    types = cfg["available_node_types"]
    head = types[cfg["head_node_type"]]
    assert head["resources"]["GPU"] == 0 and head["resources"]["CPU"] > 0
    gpu = [t for n, t in types.items() if n != cfg["head_node_type"]]
    assert gpu and all(t["resources"]["GPU"] >= 1 for t in gpu)
    assert any("--num-gpus=0" in c for c in cfg["head_start_ray_commands"])


def test_kuberay_rayservice_is_consistent():
    docs = list(yaml.safe_load_all((DEPLOY / "kuberay-rayservice.yaml").read_text()))
    rs = next(d for d in docs if d["kind"] == "RayService")
    assert rs["apiVersion"] == "ray.io/v1"
    serve_cfg = yaml.safe_load(rs["spec"]["serveConfigV2"])
    _check_serve_config(serve_cfg)
    app_args = serve_cfg["applications"][0]["args"]
    assert app_args["redis_url"].startswith("redis://") and app_args["data_dir"].startswith("/mnt/")
    cluster = rs["spec"]["rayClusterConfig"]
    import ray

    assert cluster["rayVersion"] == ray.__version__
    head = cluster["headGroupSpec"]
    assert head["rayStartParams"]["num-gpus"] == "0"
    for g in cluster["workerGroupSpecs"]:
        gpus = g["rayStartParams"]["num-gpus"]
        c = g["template"]["spec"]["containers"][0]
        assert c["resources"]["limits"]["nvidia.com/gpu"] == gpus
        assert g["minReplicas"] <= g["replicas"] <= g["maxReplicas"]
    model = next(d for d in serve_cfg["applications"][0]["deployments"] if d["name"] == "ModelReplica")
    assert model["ray_actor_options"]["num_gpus"] == 1
    claims = {d["metadata"]["name"] for d in docs if d["kind"] == "PersistentVolumeClaim"}
    mounted = {v["persistentVolumeClaim"]["claimName"] for v in head["template"]["spec"]["volumes"]}
    assert mounted <= claims
    assert any(d["kind"] == "Service" and d["metadata"]["name"] in app_args["redis_url"] for d in docs)
