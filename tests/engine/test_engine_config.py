"""EngineConfig holds the scheduler's settings once, nested, and still takes them at the top level."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from dsray.engine.scheduler import SchedulerConfig
from dsray.engine_config import EngineConfig


def test_scheduler_fields_at_the_top_level_land_in_the_nested_config():
    flat = EngineConfig(model="m", max_num_seqs=8, block_size=4, enable_prefix_caching=False)
    nested = EngineConfig(model="m", scheduler={"max_num_seqs": 8, "block_size": 4, "enable_prefix_caching": False})
    assert flat == nested
    assert flat.scheduler == SchedulerConfig(max_num_seqs=8, block_size=4, enable_prefix_caching=False)
    assert flat.scheduler.max_num_batched_tokens == SchedulerConfig().max_num_batched_tokens
    assert not set(SchedulerConfig.model_fields) & set(EngineConfig.model_fields)  # nothing restated


def test_config_survives_a_round_trip_through_its_dump():
    config = EngineConfig(model="m", max_num_batched_tokens=96, scheduler=SchedulerConfig(max_num_seqs=5))
    assert config.scheduler.max_num_seqs == 5 and config.scheduler.max_num_batched_tokens == 96
    assert EngineConfig.model_validate(config.model_dump()) == config


def test_a_field_given_twice_or_out_of_range_is_refused_by_name():
    with pytest.raises(ValidationError, match="max_num_seqs given both"):
        EngineConfig(model="m", max_num_seqs=4, scheduler={"max_num_seqs": 8})
    with pytest.raises(ValidationError, match="max_num_seqs"):
        EngineConfig(model="m", max_num_seqs=0)
    with pytest.raises(ValidationError, match="block_size"):
        EngineConfig(model="m", block_size=2048)
    with pytest.raises(ValidationError, match="max_num_seq"):
        EngineConfig(model="m", scheduler={"max_num_seq": 8})  # a typo is not silently ignored
