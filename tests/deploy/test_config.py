"""DsrayServeArgs and deploy/serve.yaml, without Ray: defaults, resolution, and errors that name the field."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from pydantic import ValidationError

from deploy.app import build_app, llm_server_options
from deploy.config import DsrayServeArgs

SERVE_YAML = Path(__file__).resolve().parents[2] / "deploy" / "serve.yaml"


def test_defaults(monkeypatch):
    monkeypatch.delenv("DSRAY_API_KEY", raising=False)
    args = DsrayServeArgs()
    assert args.served_model_name == "tiny" and args.api_key is None
    # Serve's default of 5 would cap streaming; ours leaves room for a full batch plus the queue.
    assert args.llm_server.max_ongoing_requests > 256 + args.max_waiting_requests
    assert args.ingress.max_ongoing_requests >= 1000


def test_served_name_from_directory_and_api_key_from_env(monkeypatch):
    monkeypatch.setenv("DSRAY_API_KEY", "from-env")
    args = DsrayServeArgs(model="/models/DeepSeek-V3-tiny/")
    assert args.served_model_name == "DeepSeek-V3-tiny" and args.api_key == "from-env"
    assert DsrayServeArgs(api_key="given").api_key == "given"


def test_engine_fields_are_checked_up_front():
    with pytest.raises(ValidationError, match="max_num_seqs"):
        DsrayServeArgs(engine={"max_num_seqs": 0})
    with pytest.raises(ValidationError, match="not_a_field"):
        DsrayServeArgs(engine={"not_a_field": 1})
    with pytest.raises(ValidationError, match="top-level 'model'"):
        DsrayServeArgs(engine={"model": "/x"})


def test_worker_counts_select_the_ray_executor():
    assert "executor" not in DsrayServeArgs().engine  # no counts: the in-process executor
    args = DsrayServeArgs(expert_workers=4)
    assert args.engine_config("/m").executor == "ray"
    assert (args.engine_config("/m").num_attention_workers, args.engine_config("/m").num_expert_workers) == (1, 4)


def test_zero_expert_workers_put_the_experts_on_the_attention_workers(capsys):
    from dsray.cli import main

    config = DsrayServeArgs(attention_workers=2, expert_workers=0).engine_config("/m")
    assert (config.executor, config.num_attention_workers, config.num_expert_workers) == ("ray", 2, 0)
    with pytest.raises(ValidationError, match="hold every expert already"):
        DsrayServeArgs(expert_workers=0, engine={"local_expert_share": 0.5})
    with pytest.raises(ValidationError, match="the pools cannot change"):
        DsrayServeArgs(expert_workers=0, engine={"autoscaling": {}})
    assert main(["serve", "--expert-workers", "-1"]) == 2
    assert "expert_workers: Input should be greater than or equal to 0" in capsys.readouterr().err


def test_num_threads_reaches_the_engine(monkeypatch, capsys):
    import deploy.launch
    from dsray.cli import main

    seen = []
    monkeypatch.setattr(deploy.launch, "serve_forever", lambda args: seen.append(args) or 0)
    assert main(["serve", "--num-threads", "3"]) == 0
    assert seen[0].engine_config("/m").num_threads == 3
    assert main(["serve", "--num-threads", "0"]) == 2
    assert "num_threads: Input should be greater than or equal to 1" in capsys.readouterr().err


@pytest.mark.parametrize(
    "flag, field, default", [("keepalive-s", "stream_keepalive_s", 15.0), ("interval-ms", "stream_interval_ms", 50.0)]
)
def test_stream_settings_reach_the_app(monkeypatch, capsys, flag, field, default):
    import deploy.launch
    from dsray.cli import main

    seen = []
    monkeypatch.setattr(deploy.launch, "serve_forever", lambda args: seen.append(args) or 0)
    assert main(["serve"]) == 0 and main(["serve", f"--stream-{flag}", "0"]) == 0
    assert [getattr(args, field) for args in seen] == [default, 0.0]
    assert main(["serve", f"--stream-{flag}", "-1"]) == 2
    assert f"{field}: Input should be greater than or equal to 0" in capsys.readouterr().err


def test_a_cluster_of_our_own_offers_the_cpus_the_workers_reserve():
    from deploy.launch import logical_cpus_wanted

    assert logical_cpus_wanted(DsrayServeArgs()) == 1  # the replica runs the model itself
    assert logical_cpus_wanted(DsrayServeArgs(attention_workers=1, expert_workers=1)) == 3
    assert logical_cpus_wanted(DsrayServeArgs(attention_workers=2, expert_workers=0)) == 3
    two = DsrayServeArgs(
        expert_workers=2, llm_server={"max_replicas": 2}, engine={"expert_worker_resources": {"CPU": 2}}
    )
    assert logical_cpus_wanted(two) == 2 * (1 + 1 + 2 * 2)


def test_ports_picked_for_haproxy_are_none_that_ray_or_the_kernel_hand_out():
    """Ray binds dozens of port-0 servers as the cluster starts: a port from the ephemeral range (or Ray's
    worker ports) could be taken before HAProxy binds it."""
    import socket

    from deploy.launch import _ephemeral_ports, free_port

    low, high = _ephemeral_ports()
    for _ in range(20):
        port = free_port()
        assert not low <= port <= high and not 10002 <= port <= 19999, port
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", port))  # free


def test_redundant_experts_need_expert_workers(capsys):
    from dsray.cli import main

    args = DsrayServeArgs(expert_workers=2, engine={"num_redundant_experts": 2})
    assert args.engine_config("/m").num_redundant_experts == 2
    with pytest.raises(ValidationError, match="need executor='ray'"):
        DsrayServeArgs(engine={"num_redundant_experts": 2})
    assert main(["serve", "--redundant-experts", "2"]) == 2  # refused before any Ray starts
    assert (
        DsrayServeArgs(expert_workers=1, engine={"local_expert_share": 0.5}).engine_config("/m").local_expert_share
        == 0.5
    )
    assert main(["serve", "--local-expert-share", "0.5"]) == 2  # the in-process executor holds every expert
    assert main(["serve", "--expert-workers", "1", "--local-expert-share", "1.5"]) == 2  # a share is at most 1
    assert main(["serve", "--expert-workers", "2", "--eplb-imbalance-threshold", "0.5"]) == 2  # must be > 1
    assert "--expert-workers" in capsys.readouterr().err


def test_autoscaling_options():
    fixed = llm_server_options(DsrayServeArgs(llm_server={"min_replicas": 2, "max_replicas": 2}))
    assert fixed["num_replicas"] == 2 and "autoscaling_config" not in fixed
    scaled = llm_server_options(DsrayServeArgs(llm_server={"min_replicas": 1, "max_replicas": 3}))
    assert scaled["autoscaling_config"]["max_replicas"] == 3 and "num_replicas" not in scaled
    with pytest.raises(ValidationError, match="min_replicas"):
        DsrayServeArgs(llm_server={"min_replicas": 3, "max_replicas": 2})


def test_missing_checkpoint_fails_before_deploying(tmp_path):
    with pytest.raises(ValueError, match="not a checkpoint directory"):
        build_app({"model": str(tmp_path / "nowhere")})


def test_serve_yaml_is_a_valid_serve_config_with_valid_args():
    from ray.serve.schema import ServeDeploySchema

    config = yaml.safe_load(SERVE_YAML.read_text())
    schema = ServeDeploySchema.model_validate(config)
    (application,) = schema.applications
    assert application.import_path == "deploy.app:build_app"
    DsrayServeArgs.model_validate(application.args)
    build_app(application.args)  # builds the application graph (nothing is started)


def test_fast_ingress_env_defaults_opt_out_and_user_overrides(monkeypatch):
    from deploy import launch

    for key in ("DSRAY_SERVE_FAST_INGRESS", "RAY_SERVE_ENABLE_HA_PROXY", "RAY_SERVE_HAPROXY_STATS_PORT"):
        monkeypatch.delenv(key, raising=False)
    env = launch.fast_ingress_env()
    if not env:
        pytest.skip("this Ray or platform has no HAProxy ingress mode")
    assert env["RAY_SERVE_ENABLE_HA_PROXY"] == "1" and env["RAY_SERVE_THROUGHPUT_OPTIMIZED"] == "1"
    assert env["RAY_SERVE_HAPROXY_STATS_PORT"] != env["RAY_SERVE_HAPROXY_METRICS_PORT"]
    monkeypatch.setenv("RAY_SERVE_HAPROXY_STATS_PORT", "18404")  # the user's own value is kept, not replaced
    assert "RAY_SERVE_HAPROXY_STATS_PORT" not in launch.fast_ingress_env()
    monkeypatch.setenv("DSRAY_SERVE_FAST_INGRESS", "0")
    assert launch.fast_ingress_env() == {}


def test_a_replica_calls_the_llm_server_over_its_own_serve_transport(monkeypatch):
    """The handle a replica is built with carries the driver's defaults; the replica's Serve settings choose."""
    from ray.serve._private import constants

    from deploy.launch import replica_handle

    class Handle:  # DeploymentHandle.options, recorded
        def options(self, **options):
            return options

    monkeypatch.setattr(constants, "RAY_SERVE_USE_GRPC_BY_DEFAULT", True)  # RAY_SERVE_THROUGHPUT_OPTIMIZED=1
    assert replica_handle(Handle()) == {"_by_reference": False}  # Serve's gRPC transport
    monkeypatch.setattr(constants, "RAY_SERVE_USE_GRPC_BY_DEFAULT", False)
    assert replica_handle(Handle()) == {"_by_reference": True}  # Ray actor calls


def test_cluster_env_is_set_inside_and_restored_after(monkeypatch):
    import os

    from deploy import launch

    monkeypatch.setenv("DSRAY_TEST_KEPT", "before")
    monkeypatch.delenv("DSRAY_TEST_NEW", raising=False)
    with pytest.raises(RuntimeError):
        with launch.cluster_env({"DSRAY_TEST_KEPT": "inside", "DSRAY_TEST_NEW": "inside"}):
            assert os.environ["DSRAY_TEST_KEPT"] == os.environ["DSRAY_TEST_NEW"] == "inside"
            raise RuntimeError("ray.init failed")
    assert os.environ["DSRAY_TEST_KEPT"] == "before" and "DSRAY_TEST_NEW" not in os.environ


def test_requests_are_multiplexed_only_with_one_llm_server_replica():
    assert DsrayServeArgs().batches_requests
    assert not DsrayServeArgs(ingress={"batch_requests": False}).batches_requests
    assert not DsrayServeArgs(llm_server={"min_replicas": 2, "max_replicas": 2}).batches_requests
    assert not DsrayServeArgs(llm_server={"min_replicas": 1, "max_replicas": 3}).batches_requests  # autoscaling
