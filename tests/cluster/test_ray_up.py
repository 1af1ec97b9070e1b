"""`ray up deploy/cluster.local.yaml` for real: three sshds on loopback addresses stand for the head,
the attention machine and the expert machine; the app is deployed with `serve deploy` over `ray exec`,
answers a chat completion over HTTP, and `ray down` takes the cluster away again.

Each "machine" is an sshd on port 22 of its own 127.x.y.z (the head's autoscaler reaches workers on
port 22: Ray drops `ssh_proxy_command` from the head's copy of the config) and PID 1 of its own PID
and mount namespace, where an /etc/passwd of its own gives this user a home directory of its own
and a directory of its own is bind-mounted over /tmp/ray. So what the cluster launcher runs over SSH
(`ray stop` included, which kills every Ray process it can see) sees only that machine's processes,
never other Ray clusters on this host, and writes only that machine's files. Killing an sshd ends
its namespace and everything in it.

The config is deploy/cluster.local.yaml with only what a user would CHANGE replaced (IPs, user, key),
the install step swapped for this test's venv (no torch download), the token's source, and the
ports other Ray clusters on this host may hold.
"""

from __future__ import annotations

import ctypes
import errno
import getpass
import hashlib
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import pytest
import yaml
from ray.autoscaler._private.util import validate_config

from deploy.launch import free_port
from dsray.make_model import make_model

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent  # the venv every "machine" uses instead of installing dsray
VENV = BIN.parent
CLUSTER_FILE = REPO / "deploy" / "cluster.local.yaml"
FILE_IPS = ["10.0.0.10", "10.0.0.11", "10.0.0.12"]  # head, attention, expert in cluster.local.yaml
# Not 127.0.0.1 (Ray swaps that node IP for the host's address); a random /24 of 127/8 per run.
_NET = "127." + ".".join(str(b % 254 + 1) for b in os.urandom(2))
IPS = [f"{_NET}.10", f"{_NET}.11", f"{_NET}.12"]

PROBE = """\
import json, sys
from ray.util.state import list_actors, list_nodes
address = sys.argv[1]
nodes = {n.node_id: n for n in list_nodes(address=address) if n.state == "ALIVE"}
actors = {}
for a in list_actors(address=address, filters=[("state", "=", "ALIVE")]):
    node = nodes.get(a.node_id)
    actors.setdefault(a.class_name, []).append(node.node_ip if node else a.node_id)
roles = {n.node_ip: sorted(k for k in n.resources_total if k.startswith("dsray_")) for n in nodes.values()}
print("PROBE " + json.dumps({"nodes": roles, "actors": actors}))
"""


def _sshd() -> str | None:
    found = shutil.which("sshd")
    if found:
        return found
    return "/usr/sbin/sshd" if os.access("/usr/sbin/sshd", os.X_OK) else None


def _why_not() -> str | None:
    """Why this machine cannot run the test, or None."""
    if _sshd() is None:
        return "sshd is not installed (apt-get install openssh-server)"
    for tool in ("ssh", "ssh-keygen", "rsync", "unshare", "mount"):
        if shutil.which(tool) is None:
            return f"{tool} is not installed (ray up needs ssh and rsync; the isolation needs unshare and mount)"
    if os.geteuid() != 0:
        return "needs root: sshd logs in as this user, and each machine needs PID and mount namespaces"
    done = subprocess.run(["unshare", "-p", "-f", "--mount-proc", "true"], capture_output=True, text=True)
    if done.returncode != 0:
        return f"cannot make PID namespaces here, so `ray stop` could not be isolated: {done.stderr.strip()}"
    for ip in IPS:
        with socket.socket() as s:
            try:
                s.bind((ip, 22))
            except OSError as e:
                if e.errno == errno.EADDRINUSE:
                    return f"port 22 of {ip} is taken (an sshd on 0.0.0.0?); the head reaches workers on port 22"
                raise
    return None


def _die_with_parent() -> None:
    """preexec_fn: SIGKILL this child (unshare, and through --kill-child its sshd) if pytest dies."""
    ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


def _ns_processes(ns: str) -> list[str]:
    """'pid cmdline' of every live process in PID namespace ``ns`` (seen from this host's /proc).

    Zombies (exited, not yet reaped by the namespace's PID 1) are not counted: nothing runs there.
    """
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            stat = Path(f"/proc/{pid}/stat").read_text()
            if stat[stat.rindex(")") + 2] == "Z":
                continue
            if os.readlink(f"/proc/{pid}/ns/pid") == ns:
                cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
                found.append(f"{pid} {cmdline[:120]}")
        except OSError:
            pass
    return found


def _names(procs: list[str]) -> list[str]:
    """Short names for _ns_processes lines: ray::Actor, raylet, log_monitor.py, …"""
    names = []
    for line in procs:
        args = line.split()[1:] or ["?"]
        if args[0].rsplit("/", 1)[-1].startswith("python"):  # a Python script: its name
            args = [next((a for a in args[1:] if not a.startswith("-")), args[0])]
        names.append(args[0].rsplit("/", 1)[-1])
    return names


# PID 1 of a machine's namespaces: its own /etc/passwd (so its own home) and /tmp/ray, then sshd.
_MACHINE = 'mount --bind "$1" /etc/passwd && mount --bind "$2" /tmp/ray && exec "$3" -D -e -f "$4"'


def _with_home(passwd_line: str, home: Path) -> str:
    """An /etc/passwd line, with ``home`` as the home directory if it is this user's."""
    fields = passwd_line.split(":")
    if len(fields) == 7 and fields[2] == str(os.geteuid()):
        fields[5] = str(home)
    return ":".join(fields)


class Machines:
    """Three sshds, one per loopback IP, each PID 1 of its own PID and mount namespace."""

    def __init__(self, base: Path):
        self.base = base
        self.key = base / "id_ed25519"
        self.homes = [base / f"home{i}" for i in range(len(IPS))]  # this user's home on each machine
        self.procs: list[subprocess.Popen] = []
        self.namespaces: list[str] = []

    def start(self) -> None:
        base = self.base
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(self.key)], check=True)
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(base / "host_key")], check=True)
        shutil.copy(base / "id_ed25519.pub", base / "authorized_keys")
        os.makedirs("/run/sshd", mode=0o755, exist_ok=True)  # sshd's privilege separation dir
        os.makedirs("/tmp/ray", exist_ok=True)  # the mount point; each machine binds its own over it
        for i, (ip, home) in enumerate(zip(IPS, self.homes)):
            home.mkdir(mode=0o700)
            for dotfile in (".bashrc", ".profile"):  # a fresh account's home
                if Path("/etc/skel", dotfile).is_file():
                    shutil.copy(Path("/etc/skel", dotfile), home / dotfile)
            (home / "machine").write_text(ip)
            passwd = base / f"passwd{i}"
            passwd.write_text("".join(_with_home(line, home) for line in Path("/etc/passwd").open()))
            tmp_ray = base / f"tmp-ray{i}"
            tmp_ray.mkdir(mode=0o777)
            config = base / f"sshd_{i}.conf"
            config.write_text(
                f"ListenAddress {ip}:22\n"
                f"HostKey {base / 'host_key'}\n"
                f"AuthorizedKeysFile {base / 'authorized_keys'}\n"
                f"PidFile {base / f'sshd_{i}.pid'}\n"
                "StrictModes no\nUsePAM no\nPasswordAuthentication no\nKbdInteractiveAuthentication no\n"
                "PermitRootLogin prohibit-password\n"
            )
            log = open(base / f"sshd_{i}.log", "w")
            self.procs.append(
                subprocess.Popen(
                    ["unshare", "-p", "-f", "--mount-proc", "--kill-child", "sh", "-c", _MACHINE, "sh"]
                    + [str(passwd), str(tmp_ray), _sshd(), str(config)],
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    preexec_fn=_die_with_parent,
                )
            )
            log.close()
        for ip in IPS:
            self._wait_listening(ip)

    def _wait_listening(self, ip: str) -> None:
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            try:
                socket.create_connection((ip, 22), timeout=1).close()
                return
            except OSError:
                time.sleep(0.2)
        raise AssertionError(f"sshd on {ip}:22 did not start:\n{self.logs()}")

    def ssh(self, ip: str, command: str) -> str:
        done = subprocess.run(
            ["ssh", "-i", str(self.key), "-o", "BatchMode=yes", "-o", "StrictHostKeyChecking=no"]
            + ["-o", f"UserKnownHostsFile={os.devnull}", "-o", "IdentitiesOnly=yes", f"root@{ip}", command],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert done.returncode == 0, f"ssh {ip} {command!r}: {done.stdout}{done.stderr}"
        return done.stdout

    def check_isolation(self) -> None:
        """Before anything runs `ray stop`: a login on each machine sees only its own processes and home."""
        host_ns = os.readlink("/proc/self/ns/pid")
        for ip in IPS:
            lines = self.ssh(ip, "readlink /proc/self/ns/pid; cat ~/machine; echo; ps -e -o pid=,comm=").split("\n")
            ns, machine, procs = lines[0].strip(), lines[1].strip(), [ln.split() for ln in lines[2:] if ln.strip()]
            assert ns.startswith("pid:[") and ns != host_ns, f"{ip}: not in its own PID namespace ({ns})"
            assert ns not in self.namespaces, f"{ip} shares a PID namespace with another machine"
            assert machine == ip, f"{ip}: the home directory is not this machine's own ({machine!r})"
            assert ["1", "sshd"] in procs, f"{ip}: sshd is not PID 1 of the namespace: {procs}"
            assert {comm for _, comm in procs} <= {"sshd", "bash", "sh", "ps"}, f"{ip} sees other processes: {procs}"
            self.namespaces.append(ns)

    def ray_processes(self) -> dict[str, list[str]]:
        """Processes other than sshd's in each machine's namespace."""
        return {
            ip: [p for p in _ns_processes(ns) if "sshd" not in p.split(" ", 2)[1]]
            for ip, ns in zip(IPS, self.namespaces)
        }

    def logs(self) -> str:
        return "\n".join(p.read_text() for p in sorted(self.base.glob("sshd_*.log")))

    def stop(self) -> None:
        for proc in self.procs:
            proc.kill()  # unshare dies → --kill-child SIGKILLs sshd, PID 1 → the kernel ends the namespace
        for proc in self.procs:
            proc.wait(timeout=30)
        deadline = time.monotonic() + 30
        while any(_ns_processes(ns) for ns in self.namespaces) and time.monotonic() < deadline:
            time.sleep(0.5)


@pytest.fixture(scope="module")
def machines():
    why = _why_not()
    if why:
        pytest.skip(why)
    base = Path(tempfile.mkdtemp(prefix="dsray-ray-up-"))
    m = Machines(base)
    try:
        m.start()
        m.check_isolation()
        yield m
    finally:
        m.stop()
        left = {ns: _ns_processes(ns) for ns in m.namespaces}
        shutil.rmtree(base, ignore_errors=True)
        assert not any(left.values()), f"processes outlived their namespace: {left}"


def _cluster_config(m: Machines, token: Path, ports: dict[str, int]) -> dict:
    """deploy/cluster.local.yaml with this host's stand-ins for what a user would CHANGE."""
    text = CLUSTER_FILE.read_text()
    for file_ip, ip in zip(FILE_IPS, IPS):
        assert file_ip in text, f"{CLUSTER_FILE.name} no longer uses {file_ip}; update FILE_IPS"
        text = text.replace(file_ip, ip)
    config = yaml.safe_load(text)
    config["cluster_name"] += f"-test-{os.getpid()}"
    config["auth"] = {"ssh_user": "root", "ssh_private_key": str(m.key)}
    assert config["file_mounts"]["~/.ray/auth_token"] == "~/.ray/auth_token"
    config["file_mounts"]["~/.ray/auth_token"] = str(token)
    # The install step: link this test's venv (dsray installed, editable) instead of building one.
    setup = config["setup_commands"]
    installs = [c for c in setup if "pip install" in c]
    assert installs and all("~/dsray-venv" in c for c in installs), setup
    config["setup_commands"] = [f"ln -sfn {VENV} ~/dsray-venv"] + [c for c in setup if c not in installs]
    # Ports: other Ray clusters on this host may hold the defaults.
    for key in ("head_start_ray_commands", "worker_start_ray_commands"):
        config[key] = [
            c.replace(":6379", f":{ports['gcs']}")
            .replace("--port=6379", f"--port={ports['gcs']}")
            .replace("--dashboard-port=8265", f"--dashboard-port={ports['dashboard']}")
            for c in config[key]
        ]
    head_start = config["head_start_ray_commands"][-1]
    assert "ray start --head" in head_start and f"--dashboard-port={ports['dashboard']}" in head_start
    config["head_start_ray_commands"][-1] = head_start + f" --ray-client-server-port={ports['client']}"
    return config


def _serve_config(model: Path, http_port: int) -> dict:
    """deploy/serve.yaml with this test's model and port, one attention and one expert worker on their roles."""
    config = yaml.safe_load((REPO / "deploy" / "serve.yaml").read_text())
    config["http_options"]["port"] = http_port
    if "grpc_options" in config:
        config["grpc_options"]["port"] = free_port()  # not the fixed one: another server may hold it
    config["proxy_location"] = "HeadOnly"  # every machine is this host: one proxy per port
    args = config["applications"][0]["args"]
    args.update(model=str(model), attention_workers=1, expert_workers=1)
    args["engine"].update(
        dtype="float32",
        kv_cache_memory_gb=0.05,
        attention_worker_resources={"CPU": 0.1, "dsray_attention": 1},
        expert_worker_resources={"CPU": 0.1, "dsray_expert": 1},
    )
    args["llm_server"].update(num_cpus=0.1)
    return config


class Launcher:
    """The `ray` CLI on the launching machine (this one), with its own Ray temp dir."""

    def __init__(self, config: Path, base: Path):
        self.config = config
        self.log = base / "launcher.log"
        tmp = base / "launcher"
        tmp.mkdir()
        self.env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}  # the file alone decides
        self.env.update(RAY_TMPDIR=str(tmp), TMPDIR=str(tmp))  # TMPDIR: the CLI's config cache

    def run(self, *args: str, timeout: float = 300, check: bool = True) -> str:
        done = subprocess.run(
            [str(BIN / "ray"), *args],
            cwd=REPO,  # file_mounts name paths of the checkout relative to where `ray up` runs
            env=self.env,
            capture_output=True,
            text=True,
            timeout=timeout,
        )
        output = done.stdout + done.stderr
        with open(self.log, "a") as log:
            log.write(f"\n$ ray {' '.join(args)}  (rc {done.returncode})\n{output}")
        if check:
            assert done.returncode == 0, f"ray {' '.join(args)} failed:\n{output[-6000:]}"
        return output

    def exec(self, command: str, **kw) -> str:
        return self.run("exec", "--no-config-cache", str(self.config), command, **kw)

    def probe(self, dashboard: str) -> dict | None:
        out = self.exec(f"python ~/probe.py {dashboard}", timeout=120, check=False)
        found = re.search(r"^PROBE (.*)$", out.replace("\r", ""), re.M)
        return json.loads(found.group(1)) if found else None


@pytest.mark.timeout(900)
def test_ray_up_local_cluster_serves_chat(machines):
    m = machines
    ports = {"gcs": free_port(), "dashboard": free_port(), "client": free_port(), "http": free_port()}
    token = m.base / "auth_token"
    token.write_text(os.urandom(32).hex())
    token.chmod(0o600)
    config = _cluster_config(m, token, ports)
    validate_config(config)
    config_path = m.base / "cluster.yaml"
    config_path.write_text(yaml.safe_dump(config))
    model = make_model("tiny", m.base / "tiny", dtype="float32")  # one path every "machine" reads
    serve_path = m.base / "serve.yaml"
    serve_path.write_text(yaml.safe_dump(_serve_config(model, ports["http"])))
    (m.base / "probe.py").write_text(PROBE)
    ray = Launcher(config_path, m.base)
    dashboard = f"http://127.0.0.1:{ports['dashboard']}"
    timings: dict[str, float] = {}

    start = time.perf_counter()
    try:
        ray.run("up", "-y", "--no-config-cache", str(config_path), timeout=600)
        timings["ray_up_s"] = time.perf_counter() - start
        ray.run("rsync-up", str(config_path), str(m.base / "probe.py"), "~/probe.py")
        ray.run("rsync-up", str(config_path), str(serve_path), "~/serve.yaml")
        # The head's copy of the checkout builds as a package (what `pip install ~/dsray` does).
        ray.exec("pip wheel -q --no-deps --no-build-isolation -w ~/wheels ~/dsray && ls ~/wheels/dsray-*.whl")

        # The head's autoscaler starts the workers over SSH; wait for all three nodes and their roles.
        want = dict(zip(IPS, ([], ["dsray_attention"], ["dsray_expert"])))
        state, deadline = None, time.monotonic() + 420
        while time.monotonic() < deadline:
            state = ray.probe(dashboard)
            if state and state["nodes"] == want:
                break
            time.sleep(5)
        assert state and state["nodes"] == want, f"cluster nodes: {state}\n{ray.log.read_text()[-6000:]}"
        timings["cluster_ready_s"] = time.perf_counter() - start
        for home in m.homes:  # file_mounts reached every machine (workers get them from the head)
            assert (home / "dsray" / "pyproject.toml").is_file() and (home / "dsray" / "deploy" / "app.py").is_file()
            assert (home / ".ray" / "auth_token").read_text() == token.read_text()
            assert not (home / "dsray" / ".venv").exists()

        deployed = time.perf_counter()
        ray.exec(f"serve deploy ~/serve.yaml --address {dashboard}")
        url = f"http://127.0.0.1:{ports['http']}"
        deadline, healthy = time.monotonic() + 300, False
        while time.monotonic() < deadline and not healthy:
            try:
                with urllib.request.urlopen(f"{url}/health", timeout=5) as response:
                    healthy = response.status == 200
            except OSError:
                time.sleep(2)
        if not healthy:
            status = ray.exec(f"serve status --address {dashboard}", check=False)
            raise AssertionError(f"the app did not become healthy:\n{status[-6000:]}")
        timings["app_healthy_s"] = time.perf_counter() - deployed

        body = {"model": "tiny", "messages": [{"role": "user", "content": "Hello"}], "max_tokens": 8, "temperature": 0}
        request = urllib.request.Request(
            f"{url}/v1/chat/completions", json.dumps(body).encode(), {"Content-Type": "application/json"}
        )
        with urllib.request.urlopen(request, timeout=120) as response:
            assert response.status == 200
            reply = json.load(response)
        assert reply["usage"]["completion_tokens"] == 8 and reply["choices"][0]["finish_reason"] == "length"

        actors = ray.probe(dashboard)["actors"]
        assert actors["AttentionWorker"] == [IPS[1]] and actors["ExpertWorker"] == [IPS[2]], actors
    finally:
        down = time.perf_counter()
        ray.run("down", "-y", str(config_path), timeout=300, check=False)
        timings["ray_down_s"] = time.perf_counter() - down
        after_down = m.ray_processes()
        # `ray down` stops Ray on the head only: the local provider never logs in to the workers (their
        # raylets exit a minute after the head's GCS, their log monitors stay). Stop them as the README says.
        for ip in IPS[1:]:
            try:
                m.ssh(ip, "if [ -x ~/dsray-venv/bin/ray ]; then ~/dsray-venv/bin/ray stop; fi")
            except (AssertionError, subprocess.SubprocessError) as e:
                print(f"[ray up] ray stop on {ip}: {e}")
        left, deadline = m.ray_processes(), time.monotonic() + 30
        while any(left.values()) and time.monotonic() < deadline:  # processes `ray stop` signalled may take a moment
            time.sleep(1)
            left = m.ray_processes()
        timings["total_s"] = time.perf_counter() - start
        # Ray's SSH control sockets of this cluster (launcher and head share this host's /tmp).
        user_hash = hashlib.sha256(getpass.getuser().encode()).hexdigest()[:10]
        cluster_hash = hashlib.sha256(config["cluster_name"].encode()).hexdigest()[:10]
        shutil.rmtree(f"/tmp/ray_ssh_{user_hash}/{cluster_hash}", ignore_errors=True)
        print(f"[ray up] {json.dumps({k: round(v, 1) for k, v in timings.items()})}")
        print(f"[ray up] left by `ray down`: { {ip: _names(p) for ip, p in after_down.items()} }")
    assert not after_down[IPS[0]], f"Ray processes left on the head after ray down: {after_down[IPS[0]]}"
    assert not any(left.values()), f"Ray processes left after ray stop on the workers: {left}"
