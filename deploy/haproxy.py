"""The HAProxy that ``dsray serve`` runs: Serve's generated config, hardened, then the real binary.

Ray Serve (2.60) writes HAProxy's config from a fixed template: the stats page and the Prometheus
exporter on every interface, the admin socket ``mode 666 level admin``, no header timeout, an hour
of client silence allowed, no per-client connection limit. Serve starts (and, on every reload,
restarts) the program named by ``RAY_SERVE_HAPROXY_BINARY_PATH`` as ``PROGRAM -db -f CONFIG ...``;
``deploy.launch`` points that at a shim that runs this file, which rewrites CONFIG in place (under
the lock Serve writes it with) and then becomes the real HAProxy with the same arguments, so
Serve's reloads and process checks see what they expect. Standard library only: it runs at every
HAProxy start, before the real binary.

``python deploy/haproxy.py SETTINGS.json -db -f CONFIG ...``; SETTINGS holds ``haproxy`` (the real
binary) and the ``FrontDoorArgs`` fields. On Linux the HAProxy it becomes dies with Serve's HAProxy
manager (``die_with_parent``).
"""

from __future__ import annotations

import fcntl
import json
import os
import re
import resource
import signal
import sys
from pathlib import Path
from typing import Any

LOOPBACK = "127.0.0.1"
FDS_PER_CONNECTION = 3  # a client's and a server's socket, and half a splice pipe (2 fds per 4 connections), rounded up
SPARE_FDS = 512  # listeners, the admin socket, health checks, logs
PR_SET_PDEATHSIG = 1  # <linux/prctl.h>


def max_connections(wanted: int) -> int:
    """``wanted``, or fewer where this process may not open enough files for it (HAProxy refuses to start then)."""
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY:
        return wanted
    return max(64, min(wanted, (hard - SPARE_FDS) // FDS_PER_CONNECTION))


def _sections(config: str) -> list[list[str]]:
    """The config's lines grouped by section (a section starts at an unindented line)."""
    sections: list[list[str]] = []
    for line in config.splitlines():
        if line and not line[0].isspace() or not sections:
            sections.append([])
        sections[-1].append(line)
    return sections


def harden(config: str, settings: dict[str, Any]) -> str:
    """Serve's HAProxy ``config`` with dsray's limits; applying it twice changes nothing more."""
    out: list[str] = []
    per_client = settings["max_connections_per_client"]
    for section in _sections(config):
        head = section[0].strip()
        lines = section
        if head == "global":
            lines = [re.sub(r"^(\s*stats socket \S+ .*?)mode \d+", r"\1mode 600", line) for line in lines]
            maxconn = max_connections(settings["max_connections"])
            lines = [re.sub(r"^(\s*)maxconn \d+", rf"\g<1>maxconn {maxconn}", x) for x in lines]
        elif head == "defaults":
            # Splicing hands request and response bodies to the kernel; a client that closed while its
            # request ran then went unnoticed (CLOSE-WAIT, its request running on), and the bodies here
            # are small JSON and SSE events, nothing splicing speeds up.
            lines = [x for x in lines if not re.match(r"\s*(timeout (client|http-request) |option splice-)", x)]
            lines[1:1] = [
                f"    timeout client {settings['client_timeout_s']}s",
                f"    timeout http-request {settings['header_timeout_s']}s",
            ]
        elif head.startswith(("frontend prometheus", "listen stats")):
            # Operators' pages: on the loopback interface only (nothing in Serve reads them over TCP).
            lines = [re.sub(r"^(\s*bind )\S*:(\d+)", rf"\g<1>{LOOPBACK}:\2", x) for x in lines]
        elif head.startswith(("frontend http_frontend", "frontend grpc_frontend")) and per_client > 0:
            lines = [x for x in lines if "dsray-per-client" not in x]
            bind = next(i for i, x in enumerate(lines) if x.strip().startswith("bind "))
            lines[bind + 1 : bind + 1] = [
                "    stick-table type ip size 1m expire 60s store conn_cur  # dsray-per-client",
                "    tcp-request connection track-sc0 src  # dsray-per-client",
                f"    tcp-request connection reject if {{ sc0_conn_cur gt {per_client} }}  # dsray-per-client",
            ]
        out.extend(lines)
    return "\n".join(out) + "\n"


def rewrite(path: str, settings: dict[str, Any]) -> None:
    """Harden the config file at ``path`` in place, holding the lock Serve writes it under."""
    with open(path + ".lock", "w") as lock:
        fcntl.flock(lock.fileno(), fcntl.LOCK_EX)
        try:
            config = Path(path).read_text()
            hardened = harden(config, settings)
            if hardened != config:
                Path(path).write_text(hardened)
        finally:
            fcntl.flock(lock.fileno(), fcntl.LOCK_UN)


def die_with_parent() -> None:
    """Have Linux SIGKILL this process when its parent dies (``prctl(PR_SET_PDEATHSIG)``, kept across exec).

    Serve's HAProxy manager kills its HAProxy when Serve shuts down in order. When the cluster ends
    otherwise (a ``dsray serve`` killed while stopping, the driver lost), the manager dies with the
    HAProxy still running: we found such orphans 40 minutes on, holding their stats and metrics
    ports. No-op elsewhere."""
    if not sys.platform.startswith("linux"):
        return
    import ctypes

    parent = os.getppid()
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) != 0:
        return
    if os.getppid() != parent:  # the parent died before the request took hold
        os._exit(1)


def main(argv: list[str]) -> None:
    die_with_parent()
    settings = json.loads(Path(argv[1]).read_text())
    args = argv[2:]
    if "-f" in args:
        rewrite(args[args.index("-f") + 1], settings)
    os.execv(settings["haproxy"], [settings["haproxy"], *args])


if __name__ == "__main__":
    main(sys.argv)
