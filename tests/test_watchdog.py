"""hvdet.comm.watchdog: a rank whose main thread blocks with the GIL held (as Horovod's enqueue does
when a peer's Horovod thread stopped answering) is still ended, with one line and exit code 3."""
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.harness import ROOT

# Each test starts a rank process and its watchdog and waits out a timer: seconds each, not for the
# fast loop (make test runs them).
pytestmark = pytest.mark.slow

BLOCKED_RANK = r'''
import ctypes, sys
sys.path.insert(0, sys.argv[1])
from hvdet.comm.watchdog import Watchdog
import time, pathlib
with Watchdog(1.0, rank=5, beat_dir=sys.argv[2], grace_s=0.5) as w:
    # Another rank's watchdog noted its last progress now, and then that rank stopped.
    import socket
    pathlib.Path(sys.argv[2], "rank2").write_text(f"{time.time()}\t{socket.gethostname()}\tin iteration 6")
    time.sleep(0.3)  # this rank went on a little longer
    w.beat("in iteration 7")
    ctypes.PyDLL(None).sleep(60)  # a C call that keeps the GIL: no Python thread can run
'''


def test_a_rank_blocked_with_the_gil_held_is_ended_and_says_where(tmp_path):
    exit_file = tmp_path / "exit"
    start = time.monotonic()
    beats = tmp_path / "beats"
    out = subprocess.run([sys.executable, "-c", BLOCKED_RANK, str(ROOT), str(beats)], capture_output=True, text=True,
                         check=False, env={**os.environ, "HVDET_EXIT_FILE": str(exit_file)}, timeout=60)
    assert time.monotonic() - start < 30  # ended by the watchdog, not by the 60 s sleep
    assert out.returncode == -9, out
    assert f"hvdet: rank 5 on {socket.gethostname()}: no progress for" in out.stderr, out.stderr
    assert "while in iteration 7" in out.stderr and "unreachable" not in out.stderr, out.stderr
    assert (f"(last progress: rank 2 on {socket.gethostname()} " in out.stderr
            and " s ago, in iteration 6)" in out.stderr), out.stderr
    assert exit_file.read_text() == "3\n"  # what launch/*.sh report


def test_the_watchdog_leaves_with_its_rank(tmp_path):
    code = ("import sys; sys.path.insert(0, sys.argv[1]); from hvdet.comm.watchdog import Watchdog\n"
            "with Watchdog(60.0, rank=0, beat_dir=sys.argv[2]) as w:\n    w.beat('x'); print(w._proc.pid)")
    out = subprocess.run([sys.executable, "-c", code, str(ROOT), str(tmp_path)], capture_output=True, text=True,
                         check=True, timeout=60)
    child = int(out.stdout.strip())
    time.sleep(0.2)
    stat = Path(f"/proc/{child}/stat")
    assert not stat.exists() or stat.read_text().split(")")[1].split()[0] == "Z"
    assert not (tmp_path / "rank0").exists()  # a rank that ended leaves no mark


def test_input_that_ends_without_the_word_marks_the_rank_killed(tmp_path):
    """A killed process's pipes close before /proc shows it gone (the kernel closes its files, then
    makes it a zombie): the child must not ask /proc whether the rank still runs. Here the rank's end
    of the pipe closes while it lives on, as in that moment; its file says it died."""
    code = ("import os, sys, time; sys.path.insert(0, sys.argv[1]); from hvdet.comm.watchdog import Watchdog\n"
            "w = Watchdog(60.0, rank=2, beat_dir=sys.argv[2]).__enter__(); w.beat('in iteration 4')\n"
            "time.sleep(1.2); os.close(w._proc.stdin.fileno()); w._proc.wait(timeout=30); print('closed')")
    out = subprocess.run([sys.executable, "-c", code, str(ROOT), str(tmp_path)], capture_output=True, text=True,
                         check=True, timeout=60)
    assert "closed" in out.stdout, out.stderr
    assert (tmp_path / "rank2").read_text().endswith("in iteration 4 [process died]")


def test_a_stopped_rank_is_named_as_stopped(tmp_path):
    """SIGSTOP (a debugger, a frozen node): the rank's own watchdog says so, and notes it for the others."""
    import signal

    code = ("import sys, time; sys.path.insert(0, sys.argv[1]); from hvdet.comm.watchdog import Watchdog\n"
            "with Watchdog(1.0, rank=1, beat_dir=sys.argv[2], grace_s=0.5) as w:\n"
            "    w.beat('in iteration 3'); print('ready', flush=True); time.sleep(60)")
    proc = subprocess.Popen([sys.executable, "-c", code, str(ROOT), str(tmp_path)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "ready"
    proc.send_signal(signal.SIGSTOP)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == -9
    assert f"hvdet: rank 1 on {socket.gethostname()}: no progress for" in err and "its process is stopped" in err, err
    assert "[process stopped]" in (tmp_path / "rank1").read_text()


def test_a_killed_peer_is_named_with_its_host(tmp_path):
    """SIGKILL (the OOM killer, a crash): the rank's watchdog marks its file, and a survivor whose
    collective broke says which rank on which host was killed, and where it was."""
    import signal

    from hvdet.comm import watchdog

    code = ("import sys, time; sys.path.insert(0, sys.argv[1]); from hvdet.comm.watchdog import Watchdog\n"
            "with Watchdog(30.0, rank=3, beat_dir=sys.argv[2]) as w:\n"
            "    w.beat('in iteration 9'); time.sleep(1.2); print('ready', flush=True); time.sleep(60)")
    proc = subprocess.Popen([sys.executable, "-c", code, str(ROOT), str(tmp_path)], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "ready"
    with watchdog.Watchdog(30.0, rank=0, beat_dir=tmp_path) as survivor:
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
        peer_lost = type("HorovodInternalError", (RuntimeError,), {})("Horovod has been shut down")
        err = survivor.explain(peer_lost)
    assert isinstance(err, watchdog.PeerDiedError), err
    assert f"rank 3 on {socket.gethostname()} was killed" in str(err) and "last seen in iteration 9" in str(err), err
    assert survivor.explain(ValueError("x")).args == ("x",)  # not a peer loss: unchanged


def test_unreachable_hosts_are_told_from_refusing_ones():
    """A refused connection is an answer (the host is up); a handshake that never completes is not:
    here a listener whose accept queue is full drops the SYN, as a cut link does."""
    import socket as sk

    from hvdet.comm import _watchdog_child

    with sk.socket() as closed:
        closed.bind(("127.0.0.1", 0))  # bound, not listening: refuses
        assert _watchdog_child.unreachable(["127.0.0.1"], port=closed.getsockname()[1]) == []
    with sk.socket() as full:
        full.bind(("127.0.0.1", 0))
        full.listen(0)
        port = full.getsockname()[1]
        queued = [sk.create_connection(("127.0.0.1", port), timeout=1) for _ in range(1)]
        down = _watchdog_child.unreachable(["127.0.0.1"], timeout_s=0.3, port=port)
        for c in queued:
            c.close()
    assert len(down) == 1 and down[0].startswith("127.0.0.1 ("), down
