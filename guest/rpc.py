"""The agent's request handlers (docs/protocol.md, "Requests and replies"): one function per
``op``, each taking the agent and the request, returning the reply's result fields or raising
Refused with the reply's one-line error. guest/agent.py's loop reads the requests and sends the
replies. Standard library only: this module goes into the guest image.
"""

from __future__ import annotations

import base64
import contextlib
import os

from bonneville.guest import container as containers
from bonneville.guest import hotplug, protocol, spawn, syscallfilter
from bonneville.guest.common import Refused, Stopwatch, errtext
from bonneville.guest.container import Container, Plan, check_id
from bonneville.guest.dnsrelay import DnsRelay
from bonneville.guest.netconfig import configure_network
from bonneville.guest.process import ExecSpec, set_winsize
from bonneville.guest.tunnel import Tunnel
from bonneville.guest.tunnel import connect as tunnel_connect
from bonneville.guest.uplink import address_nics

# For the type checker only: importing typing costs a cold boot ~0.1 s under TCG.
TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Callable
    from typing import Any

    from bonneville.guest.agent import Agent

    Handler = Callable[[Agent, dict[str, Any]], dict[str, Any]]


def op_hello(agent: Agent, message: dict[str, Any]) -> dict[str, Any]:
    """Version check; the clock and host entropy, first thing after a clone's restore."""
    version = message.get("version")
    if version != protocol.VERSION:
        raise Refused(f"unsupported protocol version {version!r} (agent speaks {protocol.VERSION})")
    if message.get("time") is not None:
        agent.mode.set_clock(float(message["time"]))
    if message.get("entropy"):
        agent.mode.add_entropy(base64.b64decode(message["entropy"]))
    return {"version": protocol.VERSION, "pid": os.getpid(), "kernel": os.uname().release}


def op_create(agent: Agent, message: dict[str, Any]) -> dict[str, Any]:
    """Build a container and take its init process up to execve; ``start`` lets it go."""
    watch = Stopwatch()
    pod = agent.sandbox
    container_id = check_id(message["container"])
    old = pod.containers.get(container_id)
    if old is not None and not old.removed:
        raise Refused(f"container {container_id} already exists")
    stream = int(message["stream"])
    pod.stream_free(stream)
    config = message.get("config") or {}
    if not isinstance(config, dict):
        raise Refused("create: config must be an object")
    process = message.get("process")
    if not isinstance(process, dict):
        raise Refused("create: process must be an object")
    spec = ExecSpec(process, True, pod.cap_last)
    syscallfilter.check(config.get("seccomp"))
    spec.seccomp = config.get("seccomp")
    plan = Plan(message.get("namespaces"))
    agent.mode.prepare_cgroups()
    agent.mode.ensure_share()
    watch.lap("share")
    created = Container(container_id, stream, agent.mode.cgroup_of(container_id))
    created.seccomp = spec.seccomp
    spawn.create(agent.mode, created, config, spec, plan, pod.containers, pod.own_pid_ns, agent.log)
    pod.containers[container_id] = created
    watch.lap("container built, its process prepared")
    return {"timings": watch.laps}


def op_network(agent: Agent, message: dict[str, Any]) -> dict[str, Any]:
    """Give the VM (the pod) its network: after the prestart hooks made the interfaces."""
    watch = Stopwatch()
    if agent.network_done:
        raise Refused("the network is already configured")
    network = message.get("network")
    if not isinstance(network, dict):
        raise Refused("network: network must be an object")
    addresses: list[dict[str, Any]] = []
    if agent.mode.guest_wide:
        try:
            configure_network(network, agent.log)
            addressing = network.get("addressing") or []
            if not isinstance(addressing, list):
                raise Refused("network: addressing must be a list")
            if addressing:
                roots = [c.init_pid for c in agent.sandbox.containers.values() if c.init_pid]
                taken = tuple(
                    str(i.get("mac", "")).lower() for i in network.get("interfaces") or []
                )
                addresses = address_nics(addressing, roots, agent.log, taken)
        except OSError as exc:
            raise Refused(f"configure the network: {errtext(exc)}") from exc
    relays = [str(a) for a in network.get("dnsRelay") or []]
    if relays:
        try:
            agent.dns = DnsRelay(relays)
        except OSError as exc:
            raise Refused(f"relay DNS on {', '.join(relays)}: {errtext(exc)}") from exc
    agent.watching_ports = bool(network.get("watchPorts"))
    agent.network_done = True
    watch.lap("network")
    return {"timings": watch.laps, "addresses": addresses}


def op_start(agent: Agent, message: dict[str, Any]) -> dict[str, Any]:
    """Let a created container's init go."""
    watch = Stopwatch()
    target = agent.sandbox.container(message)
    if target.exited:
        raise Refused("cannot start a container that has stopped")
    if target.prepared is None:
        raise Refused("container already started")
    terminal = target.prepared.spec.terminal
    try:
        pid, fds = spawn.start(target)
    except Refused:
        # runc: a container whose process cannot start is stopped.
        target.exited = True
        with contextlib.suppress(ChildProcessError):
            os.waitpid(target.init_pid, os.WNOHANG)
        raise
    watch.lap("child setup and execve")
    proc = agent.sandbox.track(target, target.stream, pid, fds, terminal, True)
    proc.init = True
    return {"pid": pid, "timings": watch.laps}


def op_exec(agent: Agent, message: dict[str, Any]) -> dict[str, Any]:
    """Start a process in a running container; its output and exit follow as frames."""
    watch = Stopwatch()
    pod = agent.sandbox
    target = pod.container(message)
    ident = int(message["id"])
    pod.stream_free(ident)
    if target.exited or target.prepared is not None or not target.init_pid:
        raise Refused("cannot exec in a container that is not running")
    spec = ExecSpec(message["process"], bool(message.get("stdin")), pod.cap_last)
    spec.seccomp = target.seccomp  # runc applies the container's profile to exec too
    pid, fds = spawn.exec_process(agent.mode, target, spec, pod.own_pid_ns)
    watch.lap("child setup and execve")
    pod.track(target, ident, pid, fds, spec.terminal, spec.want_stdin)
    return {"pid": pid, "timings": watch.laps}


def op_signal(agent: Agent, message: dict[str, Any]) -> dict[str, Any]:
    """kill(2) one process (by stream), or every process of a container."""
    sig = int(message["signal"])
    target = agent.sandbox.container(message)
    if message.get("all"):
        target.kill(sig)
        return {}
    ident = message.get("id")
    if ident is None:
        ident = target.stream
    proc = agent.sandbox.procs.get(int(ident))
    if proc is None or proc.container != target.id:
        raise Refused("no such process")
    try:
        os.kill(proc.pid, sig)
    except ProcessLookupError as exc:
        raise Refused("no such process") from exc
    return {}


def op_resize(agent: Agent, message: dict[str, Any]) -> dict[str, Any]:
    """Window size of a process's pty."""
    proc = agent.sandbox.procs.get(int(message["id"]))
    if proc is None:
        raise Refused("no such process")
    if not proc.terminal or not proc.outputs:
        raise Refused(f"process {proc.id} has no terminal")
    set_winsize(next(iter(proc.outputs)), int(message["rows"]), int(message["cols"]))
    return {}


def op_ps(agent: Agent, message: dict[str, Any]) -> dict[str, Any]:
    """Guest pids of a container's processes."""
    return {"pids": agent.sandbox.container(message).pids()}


def op_update(agent: Agent, message: dict[str, Any]) -> dict[str, Any]:
    """Change a container's cgroup limits (already converted and checked by the host)."""
    files = message.get("resources")
    if not isinstance(files, dict):
        raise Refused("update: resources must be an object")
    agent.mode.set_limits(agent.sandbox.container(message).cgroup, files)
    return {}


def op_stats(agent: Agent, message: dict[str, Any]) -> dict[str, Any]:
    """The text of a container cgroup's statistics files (the host parses them)."""
    cgroup = agent.sandbox.container(message).cgroup
    if cgroup is None:
        raise Refused("statistics come from the VM's cgroups (host mode has none)")
    files = {}
    for name in protocol.CGROUP_STATS_FILES:
        try:
            with open(f"{cgroup}/{name}") as f:
                files[name] = f.read().strip()
        except OSError:
            continue  # e.g. memory.peak, newer than some kernels
    return {"stats": files}


def op_pause(agent: Agent, message: dict[str, Any]) -> dict[str, Any]:
    """Freeze a container's processes (its cgroup), as runc's pause does."""
    agent.sandbox.container(message).freeze(True)
    return {}


def op_resume(agent: Agent, message: dict[str, Any]) -> dict[str, Any]:
    agent.sandbox.container(message).freeze(False)
    return {}


def op_remove(agent: Agent, message: dict[str, Any]) -> dict[str, Any]:
    """End a container's processes and free what it holds in the VM; the host then takes
    its tree out of the share."""
    pod = agent.sandbox
    target = pod.container(message)
    if target.cgroup is not None:
        with contextlib.suppress(OSError):
            target.freeze(False)  # a frozen cgroup's processes cannot die
    containers.remove(target, pod.reap)
    del pod.containers[target.id]
    return {}


def op_online(agent: Agent, message: dict[str, Any]) -> dict[str, Any]:
    """Bring the RAM and vCPUs the host just plugged in online."""
    if not agent.mode.pid1:
        raise Refused("host mode has no hardware to plug")
    return hotplug.online(int(message.get("memory_mib") or 0), int(message.get("vcpus") or 0))


def op_connect(agent: Agent, message: dict[str, Any]) -> dict[str, Any]:
    """Connect to a port the guest listens on; the stream ``id`` carries the connection
    (STDIN frames to it, STDOUT frames from it, end of file both ways, then ``closed``)."""
    ident = int(message["id"])
    agent.sandbox.stream_free(ident)
    if ident in agent.tunnels:
        raise Refused(f"process id {ident} is already in use")
    port = int(message["port"])
    if not 0 < port < 65536:
        raise Refused(f"not a port: {port}")
    address = str(message.get("address") or "127.0.0.1")
    agent.tunnels[ident] = Tunnel(ident, tunnel_connect(address, port))
    return {}


def op_dns_answer(agent: Agent, message: dict[str, Any]) -> dict[str, Any]:
    """The host's answer to a DNS query the relay passed on (a notification)."""
    if agent.dns is not None:
        agent.dns.answer(int(message["id"]), base64.b64decode(message.get("data") or ""))
    return {}


def op_shutdown(agent: Agent, message: dict[str, Any]) -> dict[str, Any]:
    """Power off after the reply went out."""
    agent.after_reply = agent.shutdown
    return {}


HANDLERS: dict[str, Handler] = {
    "hello": op_hello,
    "create": op_create,
    "network": op_network,
    "start": op_start,
    "exec": op_exec,
    "signal": op_signal,
    "resize": op_resize,
    "ps": op_ps,
    "update": op_update,
    "stats": op_stats,
    "pause": op_pause,
    "resume": op_resume,
    "remove": op_remove,
    "online": op_online,
    "connect": op_connect,
    "dns-answer": op_dns_answer,
    "shutdown": op_shutdown,
}
