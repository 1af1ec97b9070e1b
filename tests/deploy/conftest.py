"""One real Ray + Serve dsray app (tiny model, free port) for the whole deploy test session, and clients for it."""

from __future__ import annotations

import shutil
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from deploy.launch import free_port

API_KEY = "test-key"
MAX_MODEL_LEN = 256
MAX_NUM_SEQS = 4
MAX_WAITING = 4


@dataclass
class Server:
    url: str  # http://127.0.0.1:PORT
    api_key: str
    model: str  # served model name
    model_dir: Path
    max_model_len: int = MAX_MODEL_LEN
    max_num_seqs: int = MAX_NUM_SEQS
    max_waiting_requests: int = MAX_WAITING
    grpc_target: str = ""  # 127.0.0.1:PORT of Serve's gRPC proxy
    _handles: dict = field(default_factory=dict)

    @property
    def base_url(self) -> str:
        return f"{self.url}/v1"

    @property
    def auth(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.api_key}"}

    def stats(self, app_name: str = "dsray") -> dict:
        """The LLMServer's stats(), straight through a handle (no HTTP in between)."""
        from ray import serve

        # One handle per app: each new handle starts its own router, too costly to make per poll.
        if app_name not in self._handles:
            self._handles[app_name] = serve.get_deployment_handle("LLMServer", app_name=app_name)
        return self._handles[app_name].stats.remote().result(timeout_s=30)


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> Path:
    from dsray.make_model import make_model

    return make_model("tiny", tmp_path_factory.mktemp("models") / "tiny")


@pytest.fixture(scope="session")
def server(tiny_model) -> Server:
    import ray
    from ray import serve

    from deploy import launch
    from deploy.app import build_app
    from deploy.grpc_service import SERVICER_FUNCTION

    port, grpc_port = free_port(), free_port()
    # address="local": a cluster of our own, never one another process started on this machine.
    # 4 logical CPUs so a second (fault-injection) app fits beside the main one.
    # The Serve settings `dsray serve` starts its cluster with (HAProxy ingress), so the tests meet what users run.
    # HAProxy's files in a private folder, as `dsray serve` keeps them (pytest's own are too deep a path).
    run_dir = launch.make_run_dir()
    with launch.cluster_env(launch.fast_ingress_env(run_dir) | launch.worker_env()):
        ray.init(address="local", num_cpus=4, include_dashboard=False, log_to_driver=False)
    try:
        serve.start(
            http_options={"host": "127.0.0.1", "port": port},
            grpc_options={"port": grpc_port, "grpc_servicer_functions": [SERVICER_FUNCTION]},
        )
        args = {
            "model": str(tiny_model),
            "api_key": API_KEY,
            "max_waiting_requests": MAX_WAITING,
            "engine": {"max_model_len": MAX_MODEL_LEN, "max_num_seqs": MAX_NUM_SEQS, "kv_cache_memory_gb": 0.05},
        }
        serve.run(build_app(args), name="dsray", route_prefix="/")
        yield Server(f"http://127.0.0.1:{port}", API_KEY, "tiny", tiny_model, grpc_target=f"127.0.0.1:{grpc_port}")
    finally:
        if ray.is_initialized():  # tests/ray may have ended this session already for its own clusters
            serve.shutdown()
            ray.shutdown()
        launch.kill_processes_using(run_dir)  # an HAProxy a last reload left behind, as `dsray serve` does
        shutil.rmtree(run_dir, ignore_errors=True)


@pytest.fixture
def client(server):
    import openai

    with openai.OpenAI(base_url=server.base_url, api_key=server.api_key, max_retries=0, timeout=60) as c:
        yield c


@pytest.fixture
def http(server):
    """A requests session with the API key; tests pass full URLs (``server.url + path``)."""
    import requests

    with requests.Session() as session:
        session.headers.update(server.auth)
        yield session
