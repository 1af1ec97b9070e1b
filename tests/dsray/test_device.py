"""``EngineConfig.device``: where the local executor (and a Ray worker) puts weights, KV cache and sampling.

Without a GPU here, the checks that ask for one must fail at start, naming the option and what to change.
"""

from __future__ import annotations

import pytest
import torch
from pydantic import ValidationError

from dsray import LLM, SamplingParams
from dsray.cli import main as cli_main
from dsray.engine_config import EngineConfig, resolve_device
from dsray.make_model import ensure_default_model

GPUS = torch.cuda.device_count() if torch.cuda.is_available() else 0
MISSING = "cuda" if GPUS == 0 else f"cuda:{GPUS}"  # a GPU this machine does not have


def test_auto_resolves_to_this_machines_device():
    assert resolve_device("auto").type == ("cuda" if GPUS else "cpu")
    assert resolve_device("cpu") == torch.device("cpu")
    assert EngineConfig(model="m").device == "auto"


def test_bad_device_names_are_refused():
    for bad in ("gpu", "cuda:x", "mps"):
        with pytest.raises(ValidationError, match="device"):
            EngineConfig(model="m", device=bad)


def test_missing_gpu_fails_naming_the_option():
    with pytest.raises(ValueError, match=rf"device='{MISSING}' \(command line: --device\).*(cpu|pick one)"):
        EngineConfig(model="m", device=MISSING).resolved_device()


def test_llm_on_a_missing_gpu_fails_at_start():
    with pytest.raises(ValueError, match=rf"device='{MISSING}'"):
        LLM(str(ensure_default_model()), device=MISSING)


def test_dsray_serve_device_on_a_missing_gpu_fails_before_starting_ray(capsys, monkeypatch):
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    assert cli_main(["serve", "--device", MISSING]) == 2
    err = capsys.readouterr().err
    assert "--device" in err and MISSING in err


def test_cpu_device_runs_and_samples_on_cpu():
    with LLM(str(ensure_default_model()), dtype="float32", device="cpu") as llm:
        runner = llm.engine.executor.runner
        assert runner.device.type == "cpu" and runner.kv_cache.device.type == "cpu"
        out = llm.generate([[5, 6, 7]], SamplingParams(temperature=0.8, seed=3, max_tokens=4), use_tqdm=False)
        assert len(out[0].token_ids) == 4


def test_ray_executor_on_cuda_reserves_a_gpu_per_worker():
    config = EngineConfig(model="m", executor="ray", device="cuda", expert_worker_resources={"CPU": 2, "GPU": 0.5})
    assert config.attention_worker_resources == {"CPU": 1.0, "GPU": 1.0}
    assert config.expert_worker_resources == {"CPU": 2, "GPU": 0.5}
    assert EngineConfig(model="m", executor="ray").attention_worker_resources == {"CPU": 1.0}


def test_serve_replica_reserves_a_gpu_when_the_model_runs_in_it():
    from deploy.config import DsrayServeArgs

    assert DsrayServeArgs(engine={"device": "cuda"}).llm_server.num_gpus == 1
    assert DsrayServeArgs(engine={"device": "cuda"}, attention_workers=1).llm_server.num_gpus == 0
    assert DsrayServeArgs().llm_server.num_gpus == 0
