"""A multi-node Ray cluster on one host: a head with no CPUs for tasks plus N worker nodes, each a
separate ``ray start`` process tree, stopped by PID (only the processes this script started).

    python cluster/local_cluster.py start --workers 2 --cpus-per-worker 1 --state /tmp/mmr-cluster
    RAY_ADDRESS=$(python cluster/local_cluster.py address --state /tmp/mmr-cluster) mmrerank run CONFIG
    python cluster/local_cluster.py stop --state /tmp/mmr-cluster

Used by the cluster tests (``tests/`` marker ``cluster``) through :class:`LocalCluster`. Token auth is
whatever Ray's default is; tests that need it off set ``RAY_AUTH_MODE=disabled`` for their own cluster.
``--dashboard`` starts the head's dashboard on loopback (the job and Serve REST API: ``serve deploy --address``);
a node can declare GPUs it does not have (``add_worker(num_gpus=1)``): Ray schedules on them as a logical resource.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

from pipelines.ray_env import LOCAL_SYSTEM_CONFIG

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
    lost: bool = False  # killed on purpose (a simulated machine failure) or stopped (stop_node)


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
    dashboard: bool = False  # off by default: one process less per cluster when nothing needs its REST API
    dashboard_address: str = ""  # http://127.0.0.1:<port> once started with dashboard=True

    def _node(self, name: str) -> Node:
        """The newest node of that name (a failed start that was retried leaves an older, lost one)."""
        return next(n for n in reversed(self.nodes) if n.name == name)

    def _start_node(self, name: str, args: list[str]) -> Node:
        # A short temp dir per node, whatever its name: Ray's socket paths under it (session_<time>_<pid>/
        # sockets/plasma_store) must stay under the 107-byte AF_UNIX limit.
        temp = f"/tmp/mmr-{os.getpid()}-n{len(self.nodes)}"
        logf = open(Path(self.state) / f"{name}.log", "wb")  # noqa: SIM115 - owned by the child
        proc = subprocess.Popen([_ray_bin(), "start", "--block", f"--temp-dir={temp}", *args],
                                stdout=logf, stderr=subprocess.STDOUT, start_new_session=True,
                                env={**os.environ, **self.env})
        return Node(name, proc.pid, temp)

    def start(self, timeout_s: float = 120, retries: int = 1) -> LocalCluster:
        """Head, then the workers together; a worker whose start fails is started again (see :meth:`_join`)."""
        Path(self.state).mkdir(parents=True, exist_ok=True)
        port = _free_port()
        self.address = f"127.0.0.1:{port}"
        dash = ["--include-dashboard=false"]
        if self.dashboard:
            dash_port = _free_port()
            self.dashboard_address = f"http://127.0.0.1:{dash_port}"
            dash = ["--include-dashboard=true", "--dashboard-host=127.0.0.1", f"--dashboard-port={dash_port}"]
        self.nodes.append(self._start_node("head", [
            "--head", f"--port={port}", "--node-ip-address=127.0.0.1", "--num-cpus=0", "--num-gpus=0", *dash,
            f"--object-store-memory={self.object_store_mb * 1024 * 1024}", f"--ray-client-server-port={_free_port()}",
            # the workers read the head's system config from its GCS
            f"--system-config={json.dumps(LOCAL_SYSTEM_CONFIG)}"]))
        self._wait(1, timeout_s)
        self._join({f"worker{i}": functools.partial(self._start_worker, f"worker{i}") for i in range(self.workers)},
                   1 + self.workers, timeout_s, retries)
        if self.dashboard:  # it comes up after the GCS: a `serve deploy` right after start() would be refused
            self._wait_dashboard(timeout_s)
        self.save()
        log.info("local cluster up at %s: head + %d workers", self.address, self.workers)
        return self

    def _start_worker(self, name: str, num_cpus: float | None = None, num_gpus: int = 0) -> Node:
        # num_gpus > 0 without a GPU: Ray trusts the declared count (a logical resource), sets
        # CUDA_VISIBLE_DEVICES for the tasks it gives them, and code that checks torch.cuda falls back to CPU.
        cpus = self.cpus_per_worker if num_cpus is None else num_cpus
        return self._start_node(name, [
            f"--address={self.address}", "--node-ip-address=127.0.0.1", f"--num-cpus={cpus}",
            f"--num-gpus={num_gpus}", f"--object-store-memory={self.object_store_mb * 1024 * 1024}"])

    def _join(self, starts: dict[str, Callable[[], Node]], n: int, timeout_s: float, retries: int) -> list[Node]:
        """Start the named nodes and wait until the cluster counts ``n``. A node whose ``ray start`` exited is
        started again, ``retries`` times: `ray start` gives its raylet a fixed 30 s to register with the GCS and
        exits when that runs out, which happens on a heavily loaded host."""
        started = {name: start() for name, start in starts.items()}
        self.nodes.extend(started.values())
        for attempt in range(retries + 1):
            try:
                self._wait(n, timeout_s)
                break
            except RuntimeError:
                failed = [name for name, node in started.items() if not _alive(node.pgid)]
                if attempt == retries or not failed:
                    raise
                for name in failed:
                    _killpg(started[name].pgid, signal.SIGKILL)  # whatever of it is left must not register later
                    started[name].lost = True
                    lines = (Path(self.state) / f"{name}.log").read_text(errors="replace").strip().splitlines()
                    log.warning("node %s failed to start (%s); starting it again", name,
                                lines[-1] if lines else "no log")
                    started[name] = starts[name]()
                    self.nodes.append(started[name])
        self.save()
        return list(started.values())

    def add_worker(self, name: str, timeout_s: float = 120, num_cpus: float | None = None, num_gpus: int = 0,
                   retries: int = 1) -> Node:
        """Join one more worker node (as an autoscaler replacing a lost machine, or adding a GPU one, would); a
        failed start is retried (:meth:`_join`)."""
        start = functools.partial(self._start_worker, name, num_cpus, num_gpus)
        return self._join({name: start}, self._alive_nodes() + 1, timeout_s, retries)[0]

    def stop_node(self, name: str, timeout_s: float = 60) -> None:
        """Stop one node gracefully (SIGTERM to its process group, as ``ray stop`` would) and wait until the
        cluster no longer counts it: its resources (a declared GPU) are gone before the caller goes on."""
        node = self._node(name)
        _killpg(node.pgid, signal.SIGTERM)
        deadline = time.monotonic() + timeout_s
        while _alive(node.pgid) and time.monotonic() < deadline:
            time.sleep(0.2)
        _killpg(node.pgid, signal.SIGKILL)
        node.lost = True
        self.save()
        # At most the nodes not lost: a node killed earlier that the GCS still counts only makes this wait longer.
        target = sum(not n.lost for n in self.nodes)
        while (alive := self._alive_nodes()) > target:
            if time.monotonic() > deadline:
                raise TimeoutError(f"the cluster counts {alive} nodes, {target} expected, {timeout_s}s after "
                                   f"stopping {name}")
            time.sleep(0.5)
        log.info("stopped node %s", name)

    def _wait_dashboard(self, timeout_s: float) -> None:
        from urllib.error import URLError
        from urllib.request import urlopen

        deadline = time.monotonic() + timeout_s
        while True:
            try:
                with urlopen(f"{self.dashboard_address}/api/version", timeout=5) as r:  # noqa: S310 - our loopback URL
                    if r.status == 200:
                        return
            except (URLError, OSError):
                pass
            if time.monotonic() > deadline:
                raise TimeoutError(f"no dashboard at {self.dashboard_address} in {timeout_s}s; logs in {self.state}")
            time.sleep(0.5)

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
        self._node(name).lost = True
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

    def check_nodes(self) -> None:
        """Raise if a node's ``ray start`` exited that was not killed or stopped on purpose (a failed start)."""
        for node in self.nodes:
            if not _alive(node.pgid) and not node.lost:
                raise RuntimeError(f"{node.name} exited; see {self.state}/{node.name}.log")

    def _wait(self, n: int, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            self.check_nodes()
            try:
                if self._alive_nodes() >= n:
                    return
            except subprocess.TimeoutExpired:
                pass
            time.sleep(1)
        raise TimeoutError(f"cluster did not reach {n} nodes in {timeout_s}s; logs in {self.state}")

    def raylet_pid(self, name: str) -> int:
        """PID of a node's raylet (to kill one node the way a machine failure would)."""
        node = self._node(name)
        out = subprocess.run(["pgrep", "-g", str(node.pgid), "-f", "raylet/raylet"], capture_output=True, text=True)
        pids = [int(p) for p in out.stdout.split()]
        if not pids:
            raise RuntimeError(f"no raylet found for {name}")
        return pids[0]

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
    p.add_argument("--dashboard", action="store_true", help="start the head's dashboard on loopback (serve deploy)")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.command == "start":
        c = LocalCluster(args.state, args.workers, args.cpus_per_worker, args.object_store_mb,
                         dashboard=args.dashboard).start()
        sys.stdout.write(c.address + "\n")
    elif args.command == "address":
        sys.stdout.write(LocalCluster.load(args.state).address + "\n")
    else:
        LocalCluster.load(args.state).stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
