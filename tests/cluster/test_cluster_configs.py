"""cluster.yaml and deploy/cluster.local.yaml pass Ray's own cluster-config validation."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import jsonschema
import pytest
import yaml
from ray.autoscaler._private.util import validate_config

REPO = Path(__file__).resolve().parents[2]
CONFIGS = [REPO / "cluster.yaml", REPO / "deploy" / "cluster.local.yaml"]
# Top-level paths of the checkout that `pip install ~/dsray` on a cluster machine does not need.
NOT_SHIPPED = {".ci", ".gitignore", "Makefile", "benchmarks", "cluster.yaml", "docs", "tests"}


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_cluster_config_is_valid_for_ray(path):
    validate_config(yaml.safe_load(path.read_text()))


def test_validator_catches_a_bad_field():
    config = yaml.safe_load(CONFIGS[0].read_text())
    config["available_node_types"]["expert"]["min_wrokers"] = 1
    with pytest.raises(jsonschema.ValidationError):
        validate_config(config)


def test_node_types_pin_worker_roles():
    """Attention and expert nodes are GPU nodes (a GPU per worker); the head has none."""
    types = yaml.safe_load(CONFIGS[0].read_text())["available_node_types"]
    assert types["attention"]["resources"] == {"dsray_attention": 1, "GPU": 1}
    assert types["expert"]["resources"] == {"dsray_expert": 1, "GPU": 1}
    assert "GPU" not in types["head"]["resources"]


def test_local_cluster_ships_what_pip_install_needs():
    """cluster.local.yaml mounts the checkout path by path: every top-level path git would ship is there."""
    if shutil.which("git") is None or not (REPO / ".git").exists():
        pytest.skip("needs the git checkout to list its files")
    listed = subprocess.run(
        ["git", "ls-files", "--cached", "--others", "--exclude-standard"],
        cwd=REPO,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()
    checkout = {path.split("/")[0] for path in listed} - NOT_SHIPPED
    mounts = yaml.safe_load(CONFIGS[1].read_text())["file_mounts"]
    shipped = {source: target for target, source in mounts.items() if target.startswith("~/dsray/")}
    assert all(target == f"~/dsray/{source}" for source, target in shipped.items()), shipped
    assert set(shipped) == checkout
