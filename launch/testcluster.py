#!/usr/bin/env python3
"""A small cluster of "hosts" on this machine, for multi-host runs: network namespaces with sshd.

    sudo launch/testcluster.py up [--hosts 2] [--rate 10gbit]   # make hvdet-h1 .. hvdet-hN
    launch/testcluster.py status                                # hosts, sshd, links, as JSON
    launch/testcluster.py shape --rate 1gbit [--host N]         # tbf on both ends of a link
    launch/testcluster.py cut N | heal N                        # take host N's link down / up
    launch/testcluster.py kill N [--match train.py]             # SIGKILL host N's processes but sshd
    launch/testcluster.py down                                  # remove everything it made

Each host is what a cluster node is to a launcher: its own network namespace (a veth ``eth0`` on
the private bridge ``hvdet-br0``, address 10.77.0.N/24, the machine's side 10.77.0.254), its own
hostname (a UTS namespace: ``socket.gethostname()`` differs per host) and its own ``/dev/shm`` (a
mount namespace with a private tmpfs, so shared memory does not cross hosts, as on a real cluster),
and an sshd that accepts the cluster's generated key. Everything else is shared, as a cluster's
shared file system is: the repository and ``.venv`` are at the same path on every host.

Names resolve through a marked block in ``/etc/hosts`` and ``~/.ssh/config`` (key, no host-key
prompts) which ``down`` removes; the key and sshd files live in ``/run/hvdet-testcluster``.
``up`` is idempotent (an existing cluster of the same size is kept) and tears down what it made
when it fails. Link shaping is by rate only: this kernel has no ``netem``, so latency is the
unshaped veth's (``status`` measures it: the median TCP connect time to each host) and cannot be added (DESIGN.md).
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

STATE = Path(os.environ.get("HVDET_TESTCLUSTER_DIR", "/run/hvdet-testcluster"))
BRIDGE = "hvdet-br0"
SUBNET = "10.77.0"
GATEWAY = f"{SUBNET}.254"
MAX_HOSTS = 4
MARK_BEGIN, MARK_END = "# >>> hvdet-testcluster", "# <<< hvdet-testcluster"
ETC_HOSTS = Path("/etc/hosts")
SSH_CONFIG = Path.home() / ".ssh" / "config"
# Which Debian package provides each command the cluster needs.
PREREQUISITES = {"ip": "iproute2", "tc": "iproute2", "unshare": "util-linux", "nsenter": "util-linux",
                 "sshd": "openssh-server", "ssh": "openssh-client", "ssh-keygen": "openssh-client"}


class ClusterError(RuntimeError):
    """A prerequisite is missing or a step failed; the message says which and what to do."""


def host_name(index: int) -> str:
    return f"hvdet-h{index}"


def host_addr(index: int) -> str:
    return f"{SUBNET}.{index}"


def _veth(index: int) -> str:
    return f"hvdet-v{index}"  # the machine's end; the host's end is renamed eth0


def sh(*cmd: str, check: bool = True, netns: str | None = None, capture: bool = True) -> str:
    """Run a command (inside network namespace ``netns`` if given); its stdout, or ClusterError."""
    full = (["ip", "netns", "exec", netns] if netns else []) + list(cmd)
    proc = subprocess.run(full, capture_output=capture, text=True, check=False)
    if check and proc.returncode:
        raise ClusterError(f"`{' '.join(full)}` failed ({proc.returncode}): {(proc.stderr or '').strip()}")
    return proc.stdout or ""


def check_prerequisites() -> None:
    if os.geteuid() != 0:
        raise ClusterError("testcluster needs root (network namespaces, veths, a bridge); run it as root")
    missing = {PREREQUISITES[c] for c in PREREQUISITES if not _which(c)}
    if missing:
        raise ClusterError(f"testcluster needs {', '.join(sorted(missing))}: "
                           f"apt-get install -y {' '.join(sorted(missing))}")
    probe = "hvdet-probe"
    proc = subprocess.run(["ip", "netns", "add", probe], capture_output=True, text=True, check=False)
    if proc.returncode:
        raise ClusterError(f"this machine cannot make network namespaces: {proc.stderr.strip()}")
    sh("ip", "netns", "del", probe)


def _which(command: str) -> str | None:
    return shutil.which(command) or next(
        (str(p) for p in (Path("/usr/sbin") / command, Path("/sbin") / command) if p.exists()), None)


def hosts() -> list[int]:
    """The indices of the hosts that exist now."""
    names = sh("ip", "netns", "list", check=False).split()
    return sorted(int(n[len("hvdet-h"):]) for n in names if n.startswith("hvdet-h") and n[7:].isdigit())


def _replace_block(path: Path, lines: list[str], top: bool = False) -> None:
    """Write (or with no lines, remove) the marked block in ``path``; the rest of the file is kept."""
    text = path.read_text() if path.exists() else ""
    kept, inside = [], False
    for line in text.splitlines():
        if line == MARK_BEGIN:
            inside = True
        elif line == MARK_END:
            inside = False
        elif not inside:
            kept.append(line)
    block = [MARK_BEGIN, *lines, MARK_END] if lines else []
    # ssh takes the first value it reads for an option: the cluster's block goes first in its config.
    out = block + kept if top else kept + block
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".hvdet-tmp")
    tmp.write_text("\n".join(out) + ("\n" if out else ""))
    if path.exists():
        shutil.copymode(path, tmp)
    os.replace(tmp, path)


def _write_keys() -> None:
    STATE.mkdir(mode=0o700, parents=True, exist_ok=True)
    for name in ("id_ed25519", "host_ed25519"):
        if not (STATE / name).exists():
            sh("ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", f"hvdet-testcluster {name}",
               "-f", str(STATE / name))
    shutil.copy(STATE / "id_ed25519.pub", STATE / "authorized_keys")


def _sshd_config(index: int) -> Path:
    path = STATE / f"sshd_{index}.conf"
    path.write_text("\n".join([
        f"ListenAddress {host_addr(index)}", "Port 22",
        f"HostKey {STATE / 'host_ed25519'}", f"AuthorizedKeysFile {STATE / 'authorized_keys'}",
        f"PidFile {STATE / f'sshd_{index}.pid'}",
        "PermitRootLogin prohibit-password", "PasswordAuthentication no", "KbdInteractiveAuthentication no",
        "UsePAM no", "StrictModes no", "PrintMotd no",
        # horovodrun and mpirun open one ssh per rank at once.
        "MaxStartups 200", "MaxSessions 200", "UseDNS no", ""]))
    return path


def _start_host(index: int) -> None:
    name, veth = host_name(index), _veth(index)
    sh("ip", "netns", "add", name)
    sh("ip", "link", "add", veth, "type", "veth", "peer", "name", f"hvdet-p{index}")
    sh("ip", "link", "set", f"hvdet-p{index}", "netns", name)
    sh("ip", "link", "set", veth, "master", BRIDGE, "up")
    sh("ip", "link", "set", f"hvdet-p{index}", "name", "eth0", netns=name)
    sh("ip", "addr", "add", f"{host_addr(index)}/24", "dev", "eth0", netns=name)
    sh("ip", "link", "set", "eth0", "up", netns=name)
    sh("ip", "link", "set", "lo", "up", netns=name)
    Path("/run/sshd").mkdir(exist_ok=True)  # sshd's privilege-separation directory
    # The host's own hostname and /dev/shm, then sshd in the foreground as the namespaces' anchor:
    # every session it starts (a launched rank) lives in the same namespaces.
    script = (f"hostname {name} && mount -t tmpfs -o mode=1777,size=1g tmpfs /dev/shm && "
              f"exec {_which('sshd')} -D -e -f {_sshd_config(index)}")
    with open(STATE / f"sshd_{index}.log", "ab") as log:  # the child keeps its own descriptor
        subprocess.Popen(["ip", "netns", "exec", name, "unshare", "--uts", "--mount", "--propagation", "private",
                          "sh", "-c", script], stdout=log, stderr=log, start_new_session=True)


def _wait_ssh(index: int, timeout_s: float = 20.0) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        proc = subprocess.run(["ssh", "-o", "ConnectTimeout=2", "-o", "BatchMode=yes", host_name(index), "hostname"],
                              capture_output=True, text=True, check=False)
        if proc.returncode == 0 and proc.stdout.strip() == host_name(index):
            return
        if time.monotonic() > deadline:
            log = (STATE / f"sshd_{index}.log").read_text(errors="replace")[-800:]
            raise ClusterError(f"{host_name(index)}: no ssh after {timeout_s:.0f} s "
                               f"({proc.stderr.strip() or proc.stdout.strip()}); sshd log: {log}")
        time.sleep(0.2)


def up(n_hosts: int, rate: str | None = None) -> None:
    if not 1 <= n_hosts <= MAX_HOSTS:
        raise ClusterError(f"--hosts must be 1..{MAX_HOSTS}, got {n_hosts}")
    check_prerequisites()
    if hosts() == list(range(1, n_hosts + 1)) and all(_sshd_alive(i) for i in hosts()):
        print(f"testcluster: {n_hosts} hosts up already")
    else:
        down(quiet=True)
        try:
            _write_keys()
            sh("ip", "link", "add", BRIDGE, "type", "bridge")
            sh("ip", "addr", "add", f"{GATEWAY}/24", "dev", BRIDGE)
            sh("ip", "link", "set", BRIDGE, "up")
            _replace_block(ETC_HOSTS, [f"{host_addr(i)} {host_name(i)}" for i in range(1, n_hosts + 1)])
            _replace_block(SSH_CONFIG, ["Host hvdet-h*", f"  IdentityFile {STATE / 'id_ed25519'}",
                                        "  StrictHostKeyChecking no", "  UserKnownHostsFile /dev/null",
                                        "  LogLevel ERROR", ""], top=True)
            for i in range(1, n_hosts + 1):
                _start_host(i)
            for i in range(1, n_hosts + 1):
                _wait_ssh(i)
        except BaseException:
            down(quiet=True)
            raise
        print(f"testcluster: up: {', '.join(host_name(i) for i in range(1, n_hosts + 1))} "
              f"on {BRIDGE} ({SUBNET}.0/24)")
    if rate:
        shape(rate)


def _sshd_alive(index: int) -> bool:
    try:
        pid = int((STATE / f"sshd_{index}.pid").read_text())
        os.kill(pid, 0)
        return True
    except (OSError, ValueError):
        return False


def host_pids(index: int) -> list[int]:
    """Every process in host ``index``'s network namespace (sshd, its sessions, launched ranks)."""
    out = sh("ip", "netns", "pids", host_name(index), check=False)
    return [int(p) for p in out.split()]


def kill_host(index: int, match: str | None = None, sig: int = signal.SIGKILL) -> list[int]:
    """Kill host ``index``'s processes whose command line holds ``match`` (None: all but its sshd, as
    a node that loses everything but stays on the network); returns the PIDs signalled."""
    listener = {p for p in host_pids(index) if _comm(p) == "sshd" and _is_listener(p)}
    keep = listener | {_parent(p) for p in listener}  # and the unshare/sh anchor it was exec'd from
    killed = []
    for pid in host_pids(index):
        if pid in keep or (match is not None and match not in _cmdline(pid)):
            continue
        try:
            os.kill(pid, sig)
            killed.append(pid)
        except ProcessLookupError:
            pass
    return killed


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def _comm(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/comm").read_text().strip()
    except OSError:
        return ""


def _parent(pid: int) -> int:
    try:
        return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
    except (OSError, IndexError, ValueError):
        return -1


def _is_listener(pid: int) -> bool:
    """The listening sshd is the one whose parent is not an sshd (sessions are its children)."""
    return _comm(_parent(pid)) != "sshd"


def cut(index: int, down_: bool = True) -> None:
    """Take host ``index``'s link down (the host stays, unreachable) or bring it back up."""
    sh("ip", "link", "set", _veth(index), "down" if down_ else "up")


def shape(rate: str, index: int | None = None, burst: str = "256kb") -> None:
    """A token-bucket rate limit on both directions of host links (all hosts unless ``index``).

    ``rate`` in tc's units (``1gbit``, ``200mbit``); ``none`` removes the limit. tbf queues at most
    ``latency`` worth of data; the burst must hold a packet plus what arrives between timer ticks.
    """
    for i in [index] if index else hosts():
        for dev, netns in ((_veth(i), None), ("eth0", host_name(i))):
            sh("tc", "qdisc", "del", "dev", dev, "root", check=False, netns=netns)
            if rate != "none":
                sh("tc", "qdisc", "add", "dev", dev, "root", "tbf", "rate", rate, "burst", burst,
                   "latency", "100ms", netns=netns)


def tcp_rtt_ms(addr: str, port: int = 22, n: int = 20) -> float | None:
    """Median TCP connect time to ``addr`` (one round trip: SYN, SYN-ACK), in ms; None if unreachable.

    No ping here (iputils is not installed); sshd's port answers on every host.
    """
    times = []
    for _ in range(n):
        start = time.perf_counter()
        try:
            with socket.create_connection((addr, port), timeout=1.0):
                times.append((time.perf_counter() - start) * 1e3)
        except OSError:
            return None
    return round(sorted(times)[n // 2], 4)


def status() -> dict:
    out = {"hosts": []}
    for i in hosts():
        link = sh("ip", "-br", "link", "show", _veth(i), check=False).split()
        qdisc = sh("tc", "qdisc", "show", "dev", _veth(i), check=False).strip()
        rtt = tcp_rtt_ms(host_addr(i)) if link and link[1] == "UP" else None
        out["hosts"].append({"name": host_name(i), "addr": host_addr(i), "sshd": _sshd_alive(i),
                             "link": link[1] if len(link) > 1 else "missing",
                             "shaping": qdisc if "tbf" in qdisc else "none", "tcp_connect_ms": rtt,
                             "processes": len(host_pids(i))})
    return out


def down(quiet: bool = False) -> None:
    """Remove every host, the bridge, the name and ssh blocks and the state directory."""
    for i in hosts():
        for pid in host_pids(i):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        sh("ip", "netns", "del", host_name(i), check=False)
    if sh("ip", "link", "show", BRIDGE, check=False):
        sh("ip", "link", "del", BRIDGE, check=False)
    for i in range(1, MAX_HOSTS + 1):  # a veth left by a start that failed half-way
        if sh("ip", "link", "show", _veth(i), check=False):
            sh("ip", "link", "del", _veth(i), check=False)
    _replace_block(ETC_HOSTS, [])
    if SSH_CONFIG.exists():
        _replace_block(SSH_CONFIG, [], top=True)
    shutil.rmtree(STATE, ignore_errors=True)
    if not quiet:
        print("testcluster: down")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="cmd", required=True)
    p_up = sub.add_parser("up", help="make the hosts (idempotent)")
    p_up.add_argument("--hosts", type=int, default=2)
    p_up.add_argument("--rate", help="shape every link, e.g. 10gbit (tc tbf)")
    sub.add_parser("down", help="remove everything up made")
    sub.add_parser("status", help="hosts, sshd, links, rtt (JSON)")
    p_shape = sub.add_parser("shape", help="rate-limit links (none: remove)")
    p_shape.add_argument("--rate", required=True)
    p_shape.add_argument("--host", type=int)
    for name in ("cut", "heal"):
        sub.add_parser(name).add_argument("host", type=int)
    p_kill = sub.add_parser("kill", help="SIGKILL a host's processes (all but sshd, or those matching)")
    p_kill.add_argument("host", type=int)
    p_kill.add_argument("--match", help="only processes whose command line holds this, e.g. train.py")
    args = parser.parse_args(argv)
    try:
        if args.cmd == "up":
            up(args.hosts, args.rate)
        elif args.cmd == "down":
            check_prerequisites()
            down()
        elif args.cmd == "status":
            print(json.dumps(status(), indent=1))
        elif args.cmd == "shape":
            shape(args.rate, args.host)
        elif args.cmd in ("cut", "heal"):
            cut(args.host, args.cmd == "cut")
        elif args.cmd == "kill":
            print(f"testcluster: killed {len(kill_host(args.host, args.match))} processes on {host_name(args.host)}")
    except ClusterError as err:
        print(f"testcluster: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
