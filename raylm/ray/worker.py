"""What every Ray worker process of a raylm cluster or job does when it starts (Ray's
`worker_process_setup_hook`): keep user errors' tracebacks off the console, make the
collectives (gloo, NCCL's bootstrap) use the address Ray uses for this node, and name its own
cluster in RAY_ADDRESS.

Why RAY_ADDRESS: Ray's own in-cluster State API calls (Ray Train's PlacementGroupCleaner, which
frees the workers of a trial Tune stops) otherwise look for "the" Ray instance on the machine and
fail when it runs more than one. The worker's runtime context knows its cluster's GCS address,
so no port needs choosing before the cluster starts. A value already set is kept.

Why the address: gloo and NCCL pick their interface from the hostname when GLOO_SOCKET_IFNAME /
NCCL_SOCKET_IFNAME are unset. Many cloud images map the host's own name to 127.0.0.1, and then a
multi-host process group fails at its start (`Gloo connectFullMesh failed ... remote=[127.0.0.1]`).
The node's Ray IP is the address the other hosts reach it by, so the interface that holds it is the
right one. A value the user set is kept."""
from __future__ import annotations

import fcntl
import os
import socket
import struct

from raylm.ray.errors import hide_user_error_tracebacks

SIOCGIFADDR = 0x8915  # Linux: an interface's IPv4 address
IFNAME_VARS = ("GLOO_SOCKET_IFNAME", "NCCL_SOCKET_IFNAME")


def interface_of(address: str) -> str | None:
    """The name of the network interface that holds the IPv4 `address`, or None (not found, not
    Linux)."""
    try:
        names = [name for _, name in socket.if_nameindex()]
    except OSError:
        return None
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        for name in names:
            try:
                packed = fcntl.ioctl(s.fileno(), SIOCGIFADDR, struct.pack("256s", name.encode()[:15]))
            except OSError:  # no IPv4 address on it
                continue
            if socket.inet_ntoa(packed[20:24]) == address:
                return name
    return None


def pin_collective_interface(node_ip: str) -> str | None:
    """Set GLOO_SOCKET_IFNAME and NCCL_SOCKET_IFNAME (each unless set) to the interface holding
    `node_ip`; returns that interface, or None when none holds it (then nothing is set)."""
    name = interface_of(node_ip)
    if name is not None:
        for var in IFNAME_VARS:
            os.environ.setdefault(var, name)
    return name


def setup() -> None:
    """The worker process set-up hook of every raylm cluster and job."""
    hide_user_error_tracebacks()
    import ray
    import ray.util

    if not os.environ.get("RAY_ADDRESS"):
        os.environ["RAY_ADDRESS"] = ray.get_runtime_context().gcs_address
    pin_collective_interface(ray.util.get_node_ip_address())
