"""Ray's autoscaler on namespace hosts: a NodeProvider whose nodes are hosts of a `cluster/hosts.sh` set.

A test and demo provider, like Ray's fake multi-node one, but its nodes are real hosts (each its own
address, disk and processes): creating a node makes a host and starts Ray on it; terminating one
removes the host and everything it had. `cluster/hosts.sh up 1 --autoscale cluster/hosts-autoscaler.yaml`
starts the head with it (docs/cluster.md, "the autoscaler on namespace hosts").

Two halves, one file:
- `HostsNodeProvider` runs in the autoscaler, on the head host h0 (`provider: type: external`). A host
  cannot make its siblings (its mount and PID namespaces are its own), so it asks the machine, as a
  cloud provider asks its cloud's API, through the Unix socket /tmp/hosts-api.sock. Its nodes and
  their tags are kept in a small JSON file on the head's disk, so a restarted autoscaler finds them.
- `serve` is that API, on the machine (started by `hosts.sh up --autoscale`, stopped by `down`): one
  JSON line in, one out; `add` picks the next unused name hK and runs `hosts.sh add` (several at
  once; a host that fails to come up is removed again), `remove` runs `hosts.sh remove`, `list`
  says which hosts are up.
"""

from __future__ import annotations

import json
import os
import re
import socket
import socketserver
import subprocess
import sys
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from ray.autoscaler.node_provider import NodeProvider
from ray.autoscaler.tags import (
    NODE_KIND_HEAD,
    NODE_KIND_WORKER,
    STATUS_UP_TO_DATE,
    TAG_RAY_NODE_KIND,
    TAG_RAY_NODE_NAME,
    TAG_RAY_NODE_STATUS,
    TAG_RAY_USER_NODE_TYPE,
)

API_SOCKET = "/tmp/hosts-api.sock"  # on h0: the machine's API (hosts.sh puts it on h0's disk)
STATE_PATH = "/tmp/hosts-provider.json"  # on h0's disk: node id (host name) -> ip, tags
HEAD_NODE_TYPE = "ray.head.default"


def call_api(request: dict, path: str = API_SOCKET, timeout_s: float | None = None) -> dict:
    """One request to the host API; raises RuntimeError with its error if it failed. No timeout by
    default: an `add` takes as long as the host takes to join (hosts.sh bounds that)."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(timeout_s)
        s.connect(path)
        s.sendall((json.dumps(request) + "\n").encode())
        reply = s.makefile("r").readline()
    if not reply:
        raise RuntimeError(f"host API at {path}: no reply to {request}")
    answer = json.loads(reply)
    if not answer.get("ok"):
        raise RuntimeError(f"host API at {path}: {request['op']} failed: {answer.get('error')}")
    return answer


class HostsNodeProvider(NodeProvider):
    """Nodes are hosts of this set, named by their host name (h1, h2, ...); the head is h0.

    provider config (all optional): `api_socket` (default /tmp/hosts-api.sock), `state_path`
    (default /tmp/hosts-provider.json), `head_ip` (default $RAYLM_HEAD, which hosts.sh sets)."""

    def __init__(self, provider_config: dict[str, Any], cluster_name: str) -> None:
        NodeProvider.__init__(self, provider_config, cluster_name)
        self._api = provider_config.get("api_socket", API_SOCKET)
        self._state_path = Path(provider_config.get("state_path", STATE_PATH))
        head_ip = provider_config.get("head_ip") or os.environ.get("RAYLM_HEAD")
        if not head_ip:
            raise RuntimeError("HostsNodeProvider: no head address (provider.head_ip or $RAYLM_HEAD)")
        self._lock = threading.RLock()
        self._nodes: dict[str, dict[str, Any]] = {}
        if self._state_path.exists():
            self._nodes = json.loads(self._state_path.read_text())
        self._nodes["h0"] = {"ip": head_ip, "tags": {
            TAG_RAY_NODE_KIND: NODE_KIND_HEAD, TAG_RAY_USER_NODE_TYPE: HEAD_NODE_TYPE,
            TAG_RAY_NODE_NAME: "h0", TAG_RAY_NODE_STATUS: STATUS_UP_TO_DATE}}
        self._save()

    def _save(self) -> None:
        tmp = self._state_path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self._nodes, indent=1, sort_keys=True))
        os.replace(tmp, self._state_path)

    def non_terminated_nodes(self, tag_filters: dict[str, str]) -> list[str]:
        up = set(call_api({"op": "list"}, self._api, timeout_s=60)["hosts"])
        with self._lock:
            gone = [n for n in self._nodes if n != "h0" and n not in up]  # removed by hand, or crashed
            for node_id in gone:
                del self._nodes[node_id]
            if gone:
                self._save()
            return [n for n, node in self._nodes.items()
                    if all(node["tags"].get(k) == v for k, v in tag_filters.items())]

    def is_running(self, node_id: str) -> bool:
        with self._lock:
            return node_id in self._nodes

    def is_terminated(self, node_id: str) -> bool:
        return not self.is_running(node_id)

    def node_tags(self, node_id: str) -> dict[str, str]:
        with self._lock:
            return dict(self._nodes[node_id]["tags"])

    def internal_ip(self, node_id: str) -> str:
        with self._lock:
            return self._nodes[node_id]["ip"]

    def external_ip(self, node_id: str) -> str:
        return self.internal_ip(node_id)

    def set_node_tags(self, node_id: str, tags: dict[str, str]) -> None:
        with self._lock:
            self._nodes[node_id]["tags"].update(tags)
            self._save()

    def create_node(self, node_config: dict[str, Any], tags: dict[str, str], count: int) -> dict | None:
        raise NotImplementedError("HostsNodeProvider creates nodes with the node type's resources only")

    def create_node_with_resources_and_labels(self, node_config: dict[str, Any], tags: dict[str, str], count: int,
                                              resources: dict[str, float], labels: dict[str, str]) -> dict | None:
        """`count` new hosts, each with Ray started with the node type's resources (CPU, GPU and the
        custom ones: a `trainer` slot, say), joined to the head. Blocks until the hosts are made."""
        custom = {k: v for k, v in resources.items() if k not in ("CPU", "GPU", "memory", "object_store_memory")}
        request = {"op": "add", "cpus": int(resources.get("CPU", 0)), "gpus": int(resources.get("GPU", 0)),
                   "resources": custom}
        with ThreadPoolExecutor(max_workers=count) as pool:  # made side by side, as a cloud makes VMs
            calls = [pool.submit(call_api, request, self._api) for _ in range(count)]
        hosts = [c.result() for c in calls if c.exception() is None]
        with self._lock:  # the hosts made are this provider's, even if another failed
            for host in hosts:
                self._nodes[host["host"]] = {"ip": host["ip"], "tags": {
                    **tags, TAG_RAY_NODE_KIND: NODE_KIND_WORKER, TAG_RAY_NODE_NAME: host["host"],
                    TAG_RAY_NODE_STATUS: STATUS_UP_TO_DATE}}  # no updater: hosts.sh starts its Ray
            self._save()
        for c in calls:
            if c.exception() is not None:
                raise c.exception()
        return {host["host"]: host for host in hosts}

    def terminate_node(self, node_id: str) -> None:
        """Remove the host: its processes, namespaces, link and disk (`hosts.sh remove`)."""
        if node_id == "h0":
            raise RuntimeError("HostsNodeProvider does not terminate the head")
        call_api({"op": "remove", "host": node_id}, self._api)
        with self._lock:
            self._nodes.pop(node_id, None)
            self._save()

    @staticmethod
    def bootstrap_config(cluster_config: dict[str, Any]) -> dict[str, Any]:
        return cluster_config


# --- the machine's side: the host API --------------------------------------------------------------

HOSTS_SH = Path(__file__).resolve().with_name("hosts.sh")


class HostApi:
    """Runs hosts.sh for the provider (hosts.sh locks the set's host list itself)."""

    def __init__(self, state: Path):
        self.state = state
        self.turn = threading.Lock()
        self.subnet = os.environ.get("RAYLM_HOSTS_SUBNET", "198.18.0")

    def hosts(self) -> list[str]:
        try:
            return (self.state / "hosts").read_text().split()
        except FileNotFoundError:
            return []

    def next_host(self) -> str:
        """h<K> for the smallest K above every host this set has had (a name is never reused, so a
        new host is never taken for a dead node of the same name and address)."""
        used = [int(h[1:]) for h in self.hosts() if re.fullmatch(r"h\d+", h)]
        counter = self.state / "api-next"
        k = max([int(counter.read_text()) if counter.exists() else 1, *(u + 1 for u in used)])
        if k > 99:
            raise RuntimeError("no host names left (h1..h99)")
        counter.write_text(str(k + 1))
        return f"h{k}"

    def sh(self, *args: str) -> None:
        done = subprocess.run(["bash", str(HOSTS_SH), *args], capture_output=True, text=True)
        sys.stderr.write(f"hosts.sh {' '.join(args)}: exit {done.returncode}\n{done.stdout}{done.stderr}")
        sys.stderr.flush()
        if done.returncode != 0:
            lines = (done.stderr or done.stdout).strip().splitlines()
            raise RuntimeError(lines[-1] if lines else f"hosts.sh {args[0]} exited {done.returncode}")

    def handle(self, request: dict) -> dict:
        op = request.get("op")
        if op == "list":
            alive = [h for h in self.hosts() if h != "client" and self.alive(h)]
            return {"ok": True, "hosts": alive}
        if op == "add":  # several at once: each its own name, namespaces and address
            with self.turn:
                host = self.next_host()
            try:
                self.sh("add", host, "--cpus", str(int(request.get("cpus", 1))), "--gpus",
                        str(int(request.get("gpus", 0))), "--resources", json.dumps(request.get("resources", {})))
            except Exception:
                try:  # a host that did not come up is not left half made
                    self.sh("remove", host)
                except Exception:
                    pass
                raise
            return {"ok": True, "host": host, "ip": f"{self.subnet}.{int(host[1:]) + 1}"}
        if op == "remove":
            self.sh("remove", str(request["host"]))
            return {"ok": True}
        raise RuntimeError(f"unknown op {op!r} (add, remove, list)")

    def alive(self, host: str) -> bool:
        try:
            pid = int((self.state / host / "pid").read_text())
            os.kill(pid, 0)
            return True
        except (OSError, ValueError):
            return False


def serve(sock_path: str) -> None:
    """The host API on `sock_path` until killed (hosts.sh down)."""
    base = Path(os.environ.get("RAYLM_HOSTS_DIR", "/var/lib/raylm-hosts"))
    api = HostApi(base / os.environ.get("RAYLM_HOSTS_PREFIX", "rl"))

    class Handler(socketserver.StreamRequestHandler):
        def handle(self) -> None:
            try:
                answer = api.handle(json.loads(self.rfile.readline()))
            except Exception as e:  # the provider gets the reason; the API serves on
                answer = {"ok": False, "error": f"{type(e).__name__}: {e}"}
            self.wfile.write((json.dumps(answer) + "\n").encode())

    class Server(socketserver.ThreadingMixIn, socketserver.UnixStreamServer):
        daemon_threads = True

    if os.path.exists(sock_path):
        os.unlink(sock_path)
    old = os.umask(0o177)  # the socket: root only
    server = Server(sock_path, Handler)
    os.umask(old)
    print(f"host API on {sock_path}", file=sys.stderr, flush=True)
    server.serve_forever()


if __name__ == "__main__":
    if len(sys.argv) != 3 or sys.argv[1] != "serve":
        sys.exit("usage: python cluster/hosts_provider.py serve SOCKET")
    serve(sys.argv[2])
