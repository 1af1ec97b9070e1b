"""Deadlines with the Ray executor: each attention rank's scheduler refuses its own waiting request
and cuts its own running one, and both ranks' KV caches are whole again afterwards."""

from __future__ import annotations

import pytest

from dsray import LLM, SamplingParams
from dsray.engine_core import EngineCore
from dsray.errors import DeadlineExceededError
from dsray.make_model import make_model


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return make_model("tiny", tmp_path_factory.mktemp("m") / "tiny", dtype="float32")


def test_deadlines_on_every_attention_rank(ray_cluster, tiny):
    with LLM(tiny, dtype="float32", executor="ray", num_attention_workers=2, num_expert_workers=1) as llm:
        engine = llm.engine
        free = [s.block_manager.num_free_blocks for s in engine.schedulers]
        endless = SamplingParams(temperature=0, max_tokens=200, ignore_eos=True, deadline_s=600)
        engine.add_request([5, 6, 7], endless, request_id="run-0")
        engine.add_request([5, 6, 8], endless, request_id="run-1")
        for _ in range(3):
            engine.step()
        # One more on each rank; they cannot start before their deadline passes (moved into the past).
        engine.add_request([9, 10], SamplingParams(max_tokens=4, deadline_s=600), request_id="wait-0")
        engine.add_request([9, 11], SamplingParams(max_tokens=4, deadline_s=600), request_id="wait-1")
        assert sorted(engine._rank_of.values()) == [0, 0, 1, 1]
        for scheduler in engine.schedulers:
            for seq in (*scheduler.running, *scheduler.waiting):
                seq.deadline -= 601
        reports = []
        EngineCore(engine).run(lambda timeout: [], reports.append, until_idle=True)
        refused = {rid: exc for report in reports for rid, exc in report.refused}
        assert set(refused) == {"wait-0", "wait-1"}
        assert all(isinstance(exc, DeadlineExceededError) for exc in refused.values())
        finished = {d[0]: d for report in reports for d in report.deltas if d[4] is not None}
        assert set(finished) == {"run-0", "run-1"}
        assert all(d[4:6] == ("length", "deadline") for d in finished.values())
        assert not engine.has_unfinished()
        assert [s.block_manager.num_free_blocks for s in engine.schedulers] == free
        # The workers forgot the ended sequences too: a new request runs on the freed ranks.
        out = llm.generate([5, 6, 7], SamplingParams(temperature=0, max_tokens=3, ignore_eos=True))
        assert len(out[0].token_ids) == 3
