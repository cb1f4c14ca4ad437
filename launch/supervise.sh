# Sourced by launch/horovodrun.sh and launch/mpirun.sh: run a launcher, forward preemption signals to
# it, and exit with the first failing rank's code.
#
#   source "$(dirname "$0")/supervise.sh"; supervise SIGNAL COMMAND...
#
# COMMAND runs in the background; TERM, INT and USR1 sent to this script reach it as SIGNAL (each
# launcher forwards a different one to its ranks without killing them first). Launchers turn every
# rank failure into their own code (horovodrun: 1), so the ranks append theirs (hvdet/cli.py: 2
# config, 3 stalled, 75 preempted) to HVDET_EXIT_FILE, created here in $TMPDIR unless set (on several
# nodes, point it at a shared file system); the first line wins.
export HVDET_EXIT_FILE=${HVDET_EXIT_FILE:-$(mktemp "${TMPDIR:-/tmp}/hvdet-exit.XXXXXX")}

supervise() {
  local sig=$1 pid rc=0 code
  shift
  set -x
  "$@" &
  pid=$!
  { set +x; } 2>/dev/null
  # shellcheck disable=SC2064  # the pid is fixed now
  trap "kill -$sig $pid 2>/dev/null || true" TERM INT USR1
  while :; do
    if wait "$pid"; then rc=0; break; else rc=$?; fi
    kill -0 "$pid" 2>/dev/null || break  # else a trapped signal interrupted the wait: wait again
  done
  code=$(head -n 1 "$HVDET_EXIT_FILE" 2>/dev/null || true)
  rm -f "$HVDET_EXIT_FILE"
  if [ "$rc" -ne 0 ] && [ -n "$code" ]; then exit "$code"; fi
  exit "$rc"
}
