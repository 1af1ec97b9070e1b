"""Keep Serve's per-replica gRPC servers on the loopback interface when ``dsray serve`` runs on one machine.

Each Serve replica opens a gRPC server for calls between deployments (and, with HAProxy, one for
direct ingress), and Ray 2.60 binds both to ``[::]`` — every interface — with no setting to change
it. Ray's token authentication guards them, but a single-machine ``dsray serve`` promises that
nothing it starts listens beyond 127.0.0.1 unless ``--host`` says so. ``launch.init_cluster`` sets
``DSRAY_LOOPBACK_ONLY=1`` in the environment of a loopback cluster it starts and makes
``bind_loopback_if_asked`` the job's ``worker_process_setup_hook``, so it runs in every worker
process (Serve's controller, proxies and replicas) before Serve starts a server there; a replica
also runs it when it imports ``deploy``, which holds its deployment classes. It rewrites the
``[::]:PORT`` addresses Serve binds to ``127.0.0.1:PORT`` (Serve's gRPC proxy, whose fallback
port HAProxy uses, included). Peers
reach a replica at its node address, which on such a cluster is 127.0.0.1 too.
"""

from __future__ import annotations

import logging
import os

logger = logging.getLogger(__name__)

ENV = "DSRAY_LOOPBACK_ONLY"
ANY_INTERFACE = "[::]:"


def _loopback(address: str) -> str:
    return "127.0.0.1:" + address[len(ANY_INTERFACE) :] if address.startswith(ANY_INTERFACE) else address


def bind_loopback_if_asked() -> None:
    """In a process of a loopback cluster (``DSRAY_LOOPBACK_ONLY=1``), make Serve bind its gRPC servers
    to 127.0.0.1; elsewhere, nothing. Idempotent."""
    if os.environ.get(ENV) != "1":
        return
    try:
        from ray.serve._private import default_impl, replica
    except ImportError:  # no Serve in this process's Ray: nothing binds
        return
    for module, name in ((replica, "add_port_to_grpc_server"), (default_impl, "add_grpc_address")):
        original = getattr(module, name, None)
        if original is None or getattr(original, "dsray_loopback", False):
            if original is None:
                logger.warning("dsray: Serve has no %s.%s; its gRPC server may bind every interface", module, name)
            continue

        def bind(server, address, _original=original):
            return _original(server, _loopback(address))

        bind.dsray_loopback = True
        setattr(module, name, bind)
