"""Private Redis topologies for tests: a 3-master/3-replica Redis Cluster and a master/replica set
watched by 3 sentinels, each on free loopback ports in a temporary directory, started once per
session and torn down after. The shared Redis on 6379 is never touched.

``kill(port)`` stops a node the way a crash does (SIGKILL); ``restart(port)`` brings it back with
its old configuration (a killed cluster master rejoins as a replica of its successor; a killed
sentinel-managed master is turned into a replica by the sentinels).
"""

from __future__ import annotations

import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import redis

from tests.services import free_port, unavailable

SENTINEL_PASSWORD = "s3cret pass"  # the data nodes ask for it; the sentinels do not (the usual setup)
SERVICE = "mymaster"


def _wait(condition, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            if condition():
                return
        except redis.RedisError:
            pass
        if time.monotonic() > deadline:
            raise RuntimeError(f"{what} not ready within {timeout} s")
        time.sleep(0.05)  # waiting for servers to start, not for a window


class Topology:
    """Processes of one topology, by port."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.procs: dict[int, subprocess.Popen] = {}
        self.argv: dict[int, list[str]] = {}

    def spawn(self, port: int, argv: list[str]) -> None:
        self.argv[port] = argv
        log = open(self.root / f"{port}.log", "ab")  # noqa: SIM115 - the process owns it
        self.procs[port] = subprocess.Popen(argv, cwd=self.root / str(port), stdout=log, stderr=log)

    def kill(self, port: int) -> None:
        proc = self.procs[port]
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)

    def restart(self, port: int) -> None:
        if self.procs[port].poll() is None:
            return
        self.spawn(port, self.argv[port])

    def stop(self) -> None:
        for proc in self.procs.values():
            if proc.poll() is None:
                proc.terminate()
        for proc in self.procs.values():
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
        shutil.rmtree(self.root, ignore_errors=True)


def cluster_port() -> int:
    """A free port whose cluster bus port (port + 10000) is free and valid too."""
    import random
    import socket

    while True:
        port = random.randint(20000, 45000)
        try:
            with socket.socket() as a, socket.socket() as b:
                a.bind(("127.0.0.1", port))
                b.bind(("127.0.0.1", port + 10000))
            return port
        except OSError:
            continue


def _server_argv(port: int, *extra: str) -> list[str]:
    # A replica syncs at once (not after the default 5 s diskless delay): a failover right after a node
    # (re)joined must not find an empty replica.
    return ["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
            "--dir", ".", "--repl-diskless-sync-delay", "0", *extra]


class ClusterServers(Topology):
    """3 masters and 3 replicas; ``url`` names two seed nodes, as a user would."""

    def __init__(self) -> None:
        super().__init__(Path(tempfile.mkdtemp(prefix="rl-cluster-")))
        self.ports = [cluster_port() for _ in range(6)]
        for port in self.ports:
            (self.root / str(port)).mkdir()
            self.spawn(port, _server_argv(port, "--cluster-enabled", "yes", "--cluster-config-file", "nodes.conf",
                                          "--cluster-node-timeout", "1000", "--cluster-replica-validity-factor", "0"))
        for port in self.ports:
            _wait(lambda port=port: redis.Redis(port=port).ping(), 10, f"cluster node {port}")
        subprocess.run(["redis-cli", "--cluster", "create", *[f"127.0.0.1:{p}" for p in self.ports],
                        "--cluster-replicas", "1", "--cluster-yes"], check=True, capture_output=True, timeout=60)
        self.wait_ok()
        self.url = f"redis+cluster://127.0.0.1:{self.ports[0]},127.0.0.1:{self.ports[1]}"

    def wait_ok(self, timeout: float = 30) -> None:
        """Every live node sees the cluster as ok and every slot has a reachable master."""
        def ok() -> bool:
            for port, proc in self.procs.items():
                if proc.poll() is not None:
                    continue
                node = redis.Redis(port=port)
                if node.cluster("info")["cluster_state"] != "ok":
                    return False
                info = node.info("replication")
                if info["role"] == "slave" and info.get("master_link_status") != "up":
                    return False
            return len(self.masters()) == 3

        _wait(ok, timeout, "Redis Cluster")

    def masters(self) -> list[int]:
        live = [p for p, proc in self.procs.items() if proc.poll() is None]
        slots = redis.Redis(port=live[0]).execute_command("CLUSTER", "SLOTS")
        return sorted({int(entry[2][1]) for entry in slots})


class SentinelServers(Topology):
    """A password-protected master, its replica, and 3 sentinels monitoring them as ``mymaster``."""

    def __init__(self) -> None:
        super().__init__(Path(tempfile.mkdtemp(prefix="rl-sentinel-")))
        self.master_port, self.replica_port = free_port(), free_port()
        self.sentinel_ports = [free_port() for _ in range(3)]
        auth = ("--requirepass", SENTINEL_PASSWORD, "--masterauth", SENTINEL_PASSWORD)
        for port in (self.master_port, self.replica_port, *self.sentinel_ports):
            (self.root / str(port)).mkdir()
        self.spawn(self.master_port, _server_argv(self.master_port, *auth))
        self.spawn(self.replica_port, _server_argv(self.replica_port, *auth, "--replicaof", "127.0.0.1",
                                                   str(self.master_port)))
        for port in self.sentinel_ports:
            conf = self.root / str(port) / "sentinel.conf"
            conf.write_text(
                f"port {port}\nbind 127.0.0.1\ndir {self.root / str(port)}\n"
                f"sentinel monitor {SERVICE} 127.0.0.1 {self.master_port} 2\n"
                f'sentinel auth-pass {SERVICE} "{SENTINEL_PASSWORD}"\n'
                f"sentinel down-after-milliseconds {SERVICE} 1000\n"
                f"sentinel failover-timeout {SERVICE} 5000\n"
                f"sentinel parallel-syncs {SERVICE} 1\n")
            self.spawn(port, ["redis-server", str(conf), "--sentinel"])
        self.wait_ok()
        hosts = ",".join(f"127.0.0.1:{p}" for p in self.sentinel_ports)
        password = SENTINEL_PASSWORD.replace(" ", "%20")
        self.url = f"redis+sentinel://:{password}@{hosts}/{SERVICE}/0"

    def client(self, port: int) -> redis.Redis:
        return redis.Redis(port=port, password=SENTINEL_PASSWORD, socket_timeout=2)

    def master(self) -> int:
        reply = redis.Redis(port=self.sentinel_ports[0]).execute_command("SENTINEL", "get-master-addr-by-name",
                                                                         SERVICE)
        return int(reply[1])

    def wait_ok(self, timeout: float = 30) -> None:
        """Every sentinel agrees on a master that says it is one and has a replica in sync, and knows the
        other sentinels and that replica: without them a killed master is never failed over (a quorum
        of 2 needs a sentinel that heard of the others, and a failover needs a replica to promote)."""
        def ok() -> bool:
            masters = {int(redis.Redis(port=p).execute_command("SENTINEL", "get-master-addr-by-name", SERVICE)[1])
                       for p in self.sentinel_ports}
            if len(masters) != 1:
                return False
            for port in self.sentinel_ports:
                sentinel = redis.Redis(port=port, decode_responses=True)
                others: list[dict] = sentinel.execute_command("SENTINEL SENTINELS", SERVICE)
                replicas: list[dict] = sentinel.execute_command("SENTINEL SLAVES", SERVICE)
                if len(others) != len(self.sentinel_ports) - 1:
                    return False
                if not any(not r["is_sdown"] for r in replicas):
                    return False
            info = self.client(masters.pop()).info("replication")
            return info["role"] == "master" and info.get("connected_slaves", 0) >= 1 and \
                info["slave0"]["state"] == "online"

        _wait(ok, timeout, "Sentinel set")


def _start(kind: Callable[[], Topology]) -> Topology:
    if not (shutil.which("redis-server") and shutil.which("redis-cli")):
        unavailable("redis-server / redis-cli")
    return kind()


@pytest.fixture(scope="session")
def redis_cluster():
    servers = _start(ClusterServers)
    yield servers
    servers.stop()


@pytest.fixture(scope="session")
def redis_sentinel():
    servers = _start(SentinelServers)
    yield servers
    servers.stop()
