"""The watchdog process of hvdet.comm.watchdog (run by path, with ``python -S``: no torch, no
Horovod, a few MB). Arguments: PID TIMEOUT_S GRACE_S EXIT_CODE BEAT_DIR. Each line on stdin is a beat
"RANK<TAB>WHERE"; at most once a second it is also written to BEAT_DIR/rank<RANK> as
"TIME<TAB>HOST<TAB>WHERE" (every rank's watchdog writes its own file there: the run directory, on a
file system the ranks share). After TIMEOUT_S + GRACE_S without a beat it reports, with the other
ranks' last progress and the hosts that do not answer, records EXIT_CODE in $HVDET_EXIT_FILE and
kills PID. End of input after the line END: the rank finished (the file goes); without it, the rank
was killed (the file stays, marked, so the survivors can name it); either way exit quietly."""
import contextlib
import os
import select
import signal
import socket
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
from hvdet import exit_codes


def main() -> int:
    # Signals meant for the rank (Ctrl-C to the process group, a launcher's SIGTERM, SLURM's SIGUSR1)
    # are not for this process: it ends when the rank does (its input closes).
    for s in (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1):
        signal.signal(s, signal.SIG_IGN)
    pid, timeout_s, grace_s, code = int(sys.argv[1]), float(sys.argv[2]), float(sys.argv[3]), int(sys.argv[4])
    beats = sys.argv[5]
    limit, fd, started = timeout_s + grace_s, sys.stdin.fileno(), time.time()
    last, last_wall, written, flushed = time.monotonic(), time.time(), 0.0, 0.0
    rank, where, pending, was_stopped = "?", "starting", b"", False
    ended = False
    while True:
        ready, _, _ = select.select([fd], [], [], min(1.0, limit / 10))
        if ready:
            data = os.read(fd, 65536)
            if not data:
                # The rank said it ends (it finished, or raised and said why): its file goes. Input
                # that ends without that word is a rank killed (SIGKILL, the OOM killer): the file
                # stays and says so, for the survivors' message. Not told by /proc: the kernel closes
                # a killed process's pipes before it shows as a zombie, so it may still look alive.
                path = os.path.join(beats, f"rank{rank}")
                if ended:
                    with contextlib.suppress(OSError):
                        os.unlink(path)
                else:
                    _write(path, f"{last_wall}\t{HOST}\t{where}{DIED}")
                return 0
            pending += data
            *lines, pending = pending.split(b"\n")
            ended = ended or END in lines
            lines = [line for line in lines if line != END]
            if lines:
                rank, _, where = lines[-1].decode(errors="replace").partition("\t")
                last, last_wall = time.monotonic(), time.time()
        # At most once a second, the time of the latest beat (not of the write): the others compare it;
        # and whether the rank's process is stopped (SIGSTOP, a debugger, a frozen node), which tells
        # the stalled rank from the ranks that wait for it.
        stopped = _stopped(pid)
        if (last_wall > written or stopped != was_stopped) and time.monotonic() - flushed >= 1.0:
            written, flushed, was_stopped = last_wall, time.monotonic(), stopped
            _write(os.path.join(beats, f"rank{rank}"), f"{last_wall}\t{HOST}\t{where}{STOPPED if stopped else ''}")
        idle = time.monotonic() - last
        if idle > limit:
            cause = "its process is stopped" if _stopped(pid) else "a peer is dead or stalled"
            print(f"hvdet: rank {rank} on {HOST}: no progress for {idle:.1f} s while {where} "
                  f"(comm.timeout_s={timeout_s:g}): "
                  f"{cause}{others(beats, rank, started, timeout_s)}; ending this rank (exit code {code})",
                  file=sys.stderr, flush=True)
            exit_codes.record(code)
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
            return code


END = b"\x04"  # the rank's last line before it closes its end: "I am ending" (hvdet.comm.watchdog)
STOPPED = " [process stopped]"
DIED = " [process died]"
HOST = socket.gethostname()
PROBE_PORT = 22  # sshd's: every node a launcher reaches over ssh answers on it


def _stopped(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] in ("T", "t")
    except (OSError, IndexError):
        return False


def _write(path: str, text: str) -> None:
    tmp = f"{path}.{os.getpid()}.tmp"
    with contextlib.suppress(OSError):
        with open(tmp, "w") as f:
            f.write(text)
        os.replace(tmp, path)


def beats_of_others(beats: str, me: str, started: float, timeout_s: float) -> list[tuple[float, str, str, str]]:
    """(seconds since the last beat, rank, host, where) of every other rank of this job, from their files
    (each holds the time of its rank's latest beat, refreshed within a second)."""
    now, found = time.time(), []
    try:
        names = os.listdir(beats)
    except OSError:
        names = []
    for name in names:
        if not name.startswith("rank") or name.endswith(".tmp") or name == f"rank{me}":
            continue
        try:
            with open(os.path.join(beats, name)) as f:
                stamp, host, where = f.read().split("\t", 2)
            t = float(stamp)
        except (OSError, ValueError):
            continue
        if t >= started - timeout_s:  # this job's file, not an older run's
            found.append((now - t, name[4:], host, where))
    return found


def others(beats: str, me: str, started: float, timeout_s: float) -> str:
    """The other ranks' last progress, dead or stopped first, then the oldest, and the other hosts
    that do not answer on the network: " (last progress: rank 1 on h2 15.3 s ago, in iteration 5;
    ...; unreachable from h1: h2 (timed out))"."""
    ages = beats_of_others(beats, me, started, timeout_s)
    if not ages:
        return ""
    ages.sort(key=lambda a: (DIED not in a[3], STOPPED not in a[3], -a[0]))
    text = "; ".join(f"rank {r} on {h} {age:.1f} s ago, {w}" for age, r, h, w in ages[:4])
    down = unreachable(sorted({h for _, _, h, _ in ages} - {HOST})[:4])
    return f" (last progress: {text}" + (f"; unreachable from {HOST}: {', '.join(down)}" if down else "") + ")"


def unreachable(hosts: list[str], timeout_s: float = 1.0, port: int = PROBE_PORT) -> list[str]:
    """The hosts that do not complete a TCP handshake on ``port`` (a refused connection is
    an answer: the host is up). A cut link or a dead node times out."""
    down = []
    for host in hosts:
        try:
            socket.create_connection((host, port), timeout=timeout_s).close()
        except ConnectionRefusedError:
            continue
        except OSError as err:
            down.append(f"{host} ({type(err).__name__ if not str(err) else err})")
    return down


if __name__ == "__main__":
    sys.exit(main())
