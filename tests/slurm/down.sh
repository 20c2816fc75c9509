#!/usr/bin/env bash
# Stop the one-node test cluster that tests/slurm/up.sh started.
#
#   down.sh          cancel all jobs, stop slurmd, slurmctld, slurmdbd, MariaDB
#                    and munged; keep the state dir (configs, the accounting
#                    database, logs), so the next up.sh starts in seconds
#   down.sh --purge  the same, then remove the state dir and the
#                    /etc/slurm/slurm.conf and slurmdbd.conf links up.sh made
#                    (the packages stay installed)
#
# Only processes named by up.sh's pid files are stopped.
set -uo pipefail

STATE=${LORASCOPE_SLURM_STATE:-/var/lib/lorascope-slurm}
MARK='Written by lorascope tests/slurm/up.sh'
purge=0
case "${1:-}" in
  --purge) purge=1 ;;
  "") ;;
  *) echo "usage: $0 [--purge]" >&2; exit 2 ;;
esac
[ "$(id -u)" = 0 ] || { echo "down.sh: must be root" >&2; exit 1; }

# alive PIDFILE: the pid in it runs the program the file is named for (so a
# stale pid file whose pid was reused by another program does not count).
alive() {
  local pid want
  [ -s "$1" ] || return 1
  pid=$(cat "$1" 2>/dev/null); want=$(basename "$1" .pid)
  [ "$want" = mysqld ] && want=mariadbd
  [ -n "$pid" ] && kill -0 "$pid" 2>/dev/null && [ "$(cat "/proc/$pid/comm" 2>/dev/null)" = "$want" ]
}
stop_pidfile() {  # stop_pidfile NAME PIDFILE
  local name=$1 f=$2 pid
  alive "$f" || return 0
  pid=$(cat "$f"); echo "down.sh: stopping $name ($pid)" >&2
  kill "$pid" 2>/dev/null
  for _ in $(seq 150); do kill -0 "$pid" 2>/dev/null || { rm -f "$f"; return 0; }; sleep 0.1; done
  echo "down.sh: $name ($pid) still there after 15s, SIGKILL" >&2
  kill -9 "$pid" 2>/dev/null; rm -f "$f"
}

# Cancel every job first, so that no slurmstepd or job process outlives slurmd.
if alive "$STATE/run/slurmctld.pid" && command -v squeue >/dev/null; then
  jobs=$(squeue -h -t PD,R,CG,S,CF,RQ -o '%A' 2>/dev/null | sort -u)
  if [ -n "$jobs" ]; then
    echo "down.sh: cancelling $(echo "$jobs" | wc -l) job(s)" >&2
    scancel $jobs 2>/dev/null
    for _ in $(seq 60); do
      squeue -h -t R,CG,S,CF -o '%A' 2>/dev/null | grep -q . || break
      sleep 0.5
    done
  fi
fi

stop_pidfile slurmd    "$STATE/run/slurmd.pid"
stop_pidfile slurmctld "$STATE/run/slurmctld.pid"
stop_pidfile slurmdbd  "$STATE/run/slurmdbd.pid"
stop_pidfile mariadbd  "$STATE/run/mysql/mysqld.pid"
stop_pidfile munged    /run/munge/munged.pid

if [ "$purge" = 1 ]; then
  for l in /etc/slurm/slurm.conf /etc/slurm/slurmdbd.conf; do
    if [ -L "$l" ] && [ "$(readlink "$l")" = "$STATE/etc/$(basename "$l")" ]; then rm -f "$l"
    elif [ -f "$l" ] && grep -q "$MARK" "$l"; then rm -f "$l"; fi
  done
  case "$STATE" in /|"") echo "down.sh: refusing to remove '$STATE'" >&2; exit 1 ;; esac
  rm -rf "$STATE"
  rm -rf /tmp/lorascope-slurm-smoke.*
  echo "down.sh: removed $STATE" >&2
fi
echo "slurm down"
