"""Our top-level packages import from this repo, and Ray Serve stays inside deploy/."""

from __future__ import annotations

import ast
import importlib
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ["dsray", "router", "experts", "attention", "deploy"]


@pytest.mark.parametrize("name", PACKAGES)
def test_package_imports_from_this_repo(name):
    # router/experts/attention/deploy are unrelated projects on PyPI; never pick those up.
    module = importlib.import_module(name)
    assert Path(module.__file__).resolve().parent == REPO / name


def test_only_deploy_imports_ray_serve():
    offenders = []
    for package in PACKAGES:
        if package == "deploy":
            continue
        for file in (REPO / package).rglob("*.py"):
            for node in ast.walk(ast.parse(file.read_text())):
                names = []
                if isinstance(node, ast.Import):
                    names = [a.name for a in node.names]
                elif isinstance(node, ast.ImportFrom) and node.module:
                    names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
                if any(n == "ray.serve" or n.startswith("ray.serve.") for n in names):
                    offenders.append(str(file.relative_to(REPO)))
    assert not offenders, f"only deploy/ may import ray.serve: {offenders}"


def test_tests_have_no_init_py():
    assert not list((REPO / "tests").rglob("__init__.py"))
