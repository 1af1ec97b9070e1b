"""cluster.yaml and deploy/cluster.local.yaml pass Ray's own cluster-config validation."""

from __future__ import annotations

from pathlib import Path

import jsonschema
import pytest
import yaml
from ray.autoscaler._private.util import validate_config

REPO = Path(__file__).resolve().parents[2]
CONFIGS = [REPO / "cluster.yaml", REPO / "deploy" / "cluster.local.yaml"]


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_cluster_config_is_valid_for_ray(path):
    validate_config(yaml.safe_load(path.read_text()))


def test_validator_catches_a_bad_field():
    config = yaml.safe_load(CONFIGS[0].read_text())
    config["available_node_types"]["expert"]["min_wrokers"] = 1
    with pytest.raises(jsonschema.ValidationError):
        validate_config(config)


def test_node_types_pin_worker_roles():
    types = yaml.safe_load(CONFIGS[0].read_text())["available_node_types"]
    assert types["attention"]["resources"] == {"dsray_attention": 1}
    assert types["expert"]["resources"] == {"dsray_expert": 1}
    assert "GPU" not in types["head"]["resources"]
