"""A multi-node Ray cluster on one host: a head with no CPUs for tasks plus N worker nodes, each a
separate ``ray start`` process tree, stopped by PID (only the processes this script started).

    python cluster/local_cluster.py start --workers 2 --cpus-per-worker 1 --state /tmp/mmr-cluster
    RAY_ADDRESS=$(python cluster/local_cluster.py address --state /tmp/mmr-cluster) mmrerank run CONFIG
    python cluster/local_cluster.py stop --state /tmp/mmr-cluster

Used by the cluster tests (``tests/`` marker ``cluster``) through :class:`LocalCluster`. Token auth is
whatever Ray's default is; tests that need it off set ``RAY_AUTH_MODE=disabled`` for their own cluster.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

log = logging.getLogger("mmrerank.cluster")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _ray_bin() -> str:
    cand = Path(sys.executable).with_name("ray")
    return str(cand) if cand.exists() else "ray"


@dataclass
class Node:
    name: str
    pgid: int
    temp_dir: str
    raylet_pids: list[int] = field(default_factory=list)
    lost: bool = False  # killed on purpose (a simulated machine failure)


@dataclass
class LocalCluster:
    """Head (num_cpus=0) + workers as separate ``ray start --block`` process groups on 127.0.0.1."""

    state: str
    workers: int = 2
    cpus_per_worker: float = 1
    object_store_mb: int = 200
    address: str = ""
    nodes: list[Node] = field(default_factory=list)
    env: dict[str, str] = field(default_factory=dict)

    def _start_node(self, name: str, args: list[str]) -> Node:
        # A short temp dir per node, whatever its name: Ray's socket paths under it (session_<time>_<pid>/
        # sockets/plasma_store) must stay under the 107-byte AF_UNIX limit.
        temp = f"/tmp/mmr-{os.getpid()}-n{len(self.nodes)}"
        logf = open(Path(self.state) / f"{name}.log", "wb")  # noqa: SIM115 - owned by the child
        proc = subprocess.Popen([_ray_bin(), "start", "--block", f"--temp-dir={temp}", *args],
                                stdout=logf, stderr=subprocess.STDOUT, start_new_session=True,
                                env={**os.environ, **self.env})
        return Node(name, proc.pid, temp)

    def start(self, timeout_s: float = 120) -> LocalCluster:
        Path(self.state).mkdir(parents=True, exist_ok=True)
        port = _free_port()
        self.address = f"127.0.0.1:{port}"
        self.nodes.append(self._start_node("head", [
            "--head", f"--port={port}", "--node-ip-address=127.0.0.1", "--num-cpus=0", "--num-gpus=0",
            "--include-dashboard=false", f"--object-store-memory={self.object_store_mb * 1024 * 1024}",
            f"--ray-client-server-port={_free_port()}"]))
        self._wait(1, timeout_s)
        for i in range(self.workers):
            self.nodes.append(self._start_worker(f"worker{i}"))
        self._wait(1 + self.workers, timeout_s)
        self.save()
        log.info("local cluster up at %s: head + %d workers", self.address, self.workers)
        return self

    def _start_worker(self, name: str) -> Node:
        return self._start_node(name, [
            f"--address={self.address}", "--node-ip-address=127.0.0.1", f"--num-cpus={self.cpus_per_worker}",
            "--num-gpus=0", f"--object-store-memory={self.object_store_mb * 1024 * 1024}"])

    def add_worker(self, name: str, timeout_s: float = 120) -> Node:
        """Join one more worker node (as an autoscaler replacing a lost machine would)."""
        alive = self._alive_nodes()
        node = self._start_worker(name)
        self.nodes.append(node)
        self._wait(alive + 1, timeout_s)
        self.save()
        return node

    def node_of(self, pid: int) -> str:
        """Name of the node running ``pid`` (a worker or actor process): the node whose raylet is an
        ancestor of it (Ray workers are the raylet's children but may leave its process group)."""
        raylets: dict[int, str] = {}
        for node in self.nodes:
            if not node.lost:
                with contextlib.suppress(RuntimeError):
                    raylets[self.raylet_pid(node.name)] = node.name
        p = pid
        while p > 1:
            if p in raylets:
                return raylets[p]
            p = _ppid(p)
        pgid = os.getpgid(pid)
        for node in self.nodes:
            if node.pgid == pgid:
                return node.name
        raise LookupError(f"process {pid} belongs to no node of this cluster")

    def kill_raylet(self, name: str) -> int:
        """SIGKILL a node's raylet, the way a machine failure looks to the rest of the cluster."""
        pid = self.raylet_pid(name)
        os.kill(pid, signal.SIGKILL)
        next(n for n in self.nodes if n.name == name).lost = True
        log.warning("killed raylet %d of %s", pid, name)
        return pid

    def _alive_nodes(self) -> int:
        import ray

        out = subprocess.run([sys.executable, "-c", (
            "import ray,sys; ray.init(address=sys.argv[1], log_to_driver=False); "
            "print(sum(n['Alive'] for n in ray.nodes()))"), self.address],
            capture_output=True, text=True, timeout=60, env={**os.environ, **self.env})
        del ray
        return int(out.stdout.strip().splitlines()[-1]) if out.returncode == 0 and out.stdout.strip() else 0

    def _wait(self, n: int, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            for node in self.nodes:
                if not _alive(node.pgid) and not node.lost:
                    raise RuntimeError(f"{node.name} exited; see {self.state}/{node.name}.log")
            try:
                if self._alive_nodes() >= n:
                    return
            except subprocess.TimeoutExpired:
                pass
            time.sleep(1)
        raise TimeoutError(f"cluster did not reach {n} nodes in {timeout_s}s; logs in {self.state}")

    def raylet_pid(self, name: str) -> int:
        """PID of a node's raylet (to kill one node the way a machine failure would)."""
        node = next(n for n in self.nodes if n.name == name)
        out = subprocess.run(["pgrep", "-g", str(node.pgid), "-f", "raylet/raylet"], capture_output=True, text=True)
        pids = [int(p) for p in out.stdout.split()]
        if not pids:
            raise RuntimeError(f"no raylet found for {name}")
        return pids[0]

    def kill_node(self, name: str) -> None:
        node = next(n for n in self.nodes if n.name == name)
        _killpg(node.pgid, signal.SIGKILL)

    def stop(self) -> None:
        for node in reversed(self.nodes):
            _killpg(node.pgid, signal.SIGTERM)
        deadline = time.monotonic() + 15
        for node in self.nodes:
            while _alive(node.pgid) and time.monotonic() < deadline:
                time.sleep(0.2)
            _killpg(node.pgid, signal.SIGKILL)
        self.nodes.clear()
        path = Path(self.state) / "cluster.json"
        if path.exists():
            path.unlink()

    def save(self) -> None:
        (Path(self.state) / "cluster.json").write_text(json.dumps(asdict(self), indent=2))

    @classmethod
    def load(cls, state: str) -> LocalCluster:
        d = json.loads((Path(state) / "cluster.json").read_text())
        d["nodes"] = [Node(**n) for n in d["nodes"]]
        return cls(**d)


def _alive(pgid: int) -> bool:
    # The group leader (`ray start --block`) is our child: reap it once it exits, or it stays a zombie
    # and the group looks alive (stop() then sat out its whole SIGTERM grace every time).
    try:
        os.waitpid(pgid, os.WNOHANG)
    except ChildProcessError:
        pass
    try:
        os.killpg(pgid, 0)
        return True
    except (ProcessLookupError, PermissionError):
        return False


def _ppid(pid: int) -> int:
    """Parent PID from /proc (0 when the process is gone)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return int(f.read().rsplit(")", 1)[1].split()[1])
    except (OSError, ValueError, IndexError):
        return 0


def _killpg(pgid: int, sig: int) -> None:
    try:
        os.killpg(pgid, sig)
    except ProcessLookupError:
        pass


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("command", choices=["start", "stop", "address"])
    p.add_argument("--state", default="/tmp/mmr-cluster", help="where logs and cluster.json (PIDs) live")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--cpus-per-worker", type=float, default=1)
    p.add_argument("--object-store-mb", type=int, default=200)
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.command == "start":
        c = LocalCluster(args.state, args.workers, args.cpus_per_worker, args.object_store_mb).start()
        sys.stdout.write(c.address + "\n")
    elif args.command == "address":
        sys.stdout.write(LocalCluster.load(args.state).address + "\n")
    else:
        LocalCluster.load(args.state).stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
