#!/usr/bin/env bash
# Start a one-node Slurm cluster on this machine for lorascope's Slurm tests.
#
# Idempotent: installs Debian's slurmctld/slurmd/slurm-client/munge only when
# missing, (re)writes the config only when it changed, starts only the daemons
# that are not running, then waits for the node to be idle and runs a smoke
# test (a 4-task array, 2 at a time).
#
# Exit codes:
#   0   cluster up, smoke test passed
#   77  skipped: Slurm cannot be started here (one line "skipped: cannot start
#       Slurm here: <why>" on stderr) -- not root, no apt, a daemon died, ...
#   1   Slurm started but misbehaved (the smoke test failed): a real failure
#
# Everything it writes lives under $LORASCOPE_SLURM_STATE (default
# /var/lib/lorascope-slurm), except:
#   /etc/slurm/slurm.conf      symlink to $STATE/etc/slurm.conf (so sbatch,
#                              squeue, ... find it with no SLURM_CONF)
#   /etc/munge/munge.key       munge's key (made by the munge package or here)
#   /run/munge, /var/log/munge munged's socket and log (munge's defaults)
# See tests/slurm/README.md.
set -uo pipefail

STATE=${LORASCOPE_SLURM_STATE:-/var/lib/lorascope-slurm}
PARTITION=debug
CONF_LINK=/etc/slurm/slurm.conf
SMOKE_TIMEOUT=${LORASCOPE_SLURM_SMOKE_TIMEOUT:-120}

skip() { echo "skipped: cannot start Slurm here: $*" >&2; exit 77; }
fail() { echo "slurm up.sh: FAILED: $*" >&2; exit 1; }
log() { echo "slurm up.sh: $*" >&2; }
t0=$(date +%s.%N)
elapsed() { awk -v a="$t0" -v b="$(date +%s.%N)" 'BEGIN{printf "%.1f", b-a}'; }

# ---------------------------------------------------------------- preflight
[ "$(id -u)" = 0 ] || skip "not root (need root to install packages and run slurmd)"
[ "$(uname -s)" = Linux ] || skip "not Linux"

# ---------------------------------------------------------------- install
mkdir -p "$STATE/log" || skip "cannot create $STATE"
PKGS="slurmctld slurmd slurm-client munge"
missing=""
for p in $PKGS; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || missing="$missing $p"
done
if [ -n "$missing" ]; then
  command -v apt-get >/dev/null || skip "packages missing ($missing ) and no apt-get"
  log "installing$missing"
  export DEBIAN_FRONTEND=noninteractive
  # Debian's package lists may be absent on a fresh machine.
  if ! apt-get install -y -q --no-install-recommends $missing >"$STATE/log/apt.log" 2>&1; then
    apt-get update -q >>"$STATE/log/apt.log" 2>&1 || skip "apt-get update failed (see $STATE.apt.log)"
    apt-get install -y -q --no-install-recommends $missing >>"$STATE/log/apt.log" 2>&1 \
      || skip "apt-get install$missing failed: $(tail -n1 "$STATE/log/apt.log")"
  fi
  log "installed in $(elapsed)s"
fi
for b in slurmctld slurmd munged sbatch squeue scontrol sinfo sacct; do
  command -v "$b" >/dev/null || skip "$b not on PATH after install"
done

# ---------------------------------------------------------------- munge
if [ ! -s /etc/munge/munge.key ]; then
  install -d -o munge -g munge -m 0700 /etc/munge
  if command -v mungekey >/dev/null; then
    mungekey --create --keyfile=/etc/munge/munge.key >/dev/null 2>&1 || skip "mungekey failed"
  else
    dd if=/dev/urandom of=/etc/munge/munge.key bs=1 count=1024 status=none
  fi
  chown munge:munge /etc/munge/munge.key && chmod 0400 /etc/munge/munge.key
fi
install -d -o munge -g munge -m 0755 /run/munge
install -d -o munge -g munge -m 0700 /var/log/munge /var/lib/munge
if ! munge -n 2>/dev/null | unmunge >/dev/null 2>&1; then
  rm -f /run/munge/munged.pid
  runuser -u munge -- /usr/sbin/munged >/dev/null 2>&1 || skip "munged failed to start: $(tail -n1 /var/log/munge/munged.log 2>/dev/null)"
  for _ in $(seq 50); do munge -n 2>/dev/null | unmunge >/dev/null 2>&1 && break; sleep 0.1; done
  munge -n 2>/dev/null | unmunge >/dev/null 2>&1 || skip "munged not answering: $(tail -n1 /var/log/munge/munged.log 2>/dev/null)"
fi

# ---------------------------------------------------------------- config
install -d -m 0755 "$STATE" "$STATE/etc" "$STATE/log" "$STATE/run" "$STATE/slurmd"
install -d -o slurm -g slurm -m 0755 "$STATE/ctld" "$STATE/jobcomp"
chown slurm:slurm "$STATE/log" "$STATE/run"   # slurmctld runs as slurm and writes here

HOST=$(hostname -s)
# The node line exactly as slurmd sees this machine (CPUs, sockets, cores,
# threads, RealMemory); a node declared bigger than it is gets drained.
NODE=$(slurmd -C 2>/dev/null | head -n1)
case "$NODE" in NodeName=*) ;; *) skip "slurmd -C failed: $NODE" ;; esac
NODE="$NODE NodeAddr=127.0.0.1 State=UNKNOWN"
CPUS=$(sed -n 's/.* CPUs=\([0-9]*\).*/\1/p' <<<"$NODE")
MEM=$(sed -n 's/.* RealMemory=\([0-9]*\).*/\1/p' <<<"$NODE")
# A job that asks for no memory gets this much per CPU, so that jobs without
# --mem do not each claim the whole node (CR_Core_Memory counts memory).
DEFMEM=$(( MEM / CPUS / 2 )); [ "$DEFMEM" -gt 0 ] || DEFMEM=1

new_conf=$(cat <<EOF
# Written by lorascope tests/slurm/up.sh -- a one-node test cluster.
# Regenerated on every up.sh; edit up.sh, not this file.
ClusterName=lorascope
SlurmctldHost=$HOST(127.0.0.1)
SlurmUser=slurm
AuthType=auth/munge
CredType=cred/munge
MpiDefault=none
StateSaveLocation=$STATE/ctld
SlurmdSpoolDir=$STATE/slurmd
SlurmctldPidFile=$STATE/run/slurmctld.pid
SlurmdPidFile=$STATE/run/slurmd.pid
SlurmctldLogFile=$STATE/log/slurmctld.log
SlurmdLogFile=$STATE/log/slurmd.log
SlurmctldDebug=info
SlurmdDebug=info
# No cgroups: processes are tracked through /proc, tasks are not confined.
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
# Memory is sampled from /proc every second; a step over its --mem is killed
# (state OUT_OF_MEMORY).
JobAcctGatherType=jobacct_gather/linux
JobAcctGatherFrequency=task=1
JobAcctGatherParams=OverMemoryKill
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
DefMemPerCPU=$DEFMEM
SchedulerType=sched/backfill
SchedulerParameters=enable_user_top
PriorityType=priority/basic
# No slurmdbd: sacct reads the job completion file (sacct -c) instead.
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/filetxt
JobCompLoc=$STATE/jobcomp/jobcomp.log
# Finished jobs stay visible to squeue/scontrol for an hour.
MinJobAge=3600
MaxJobCount=100000
MaxArraySize=100001
ReturnToService=2
SlurmdTimeout=60
KillWait=5
InactiveLimit=0
Waittime=0
$NODE
PartitionName=$PARTITION Nodes=ALL Default=YES MaxTime=INFINITE State=UP
EOF
)

conf_changed=0
if [ ! -f "$STATE/etc/slurm.conf" ] || [ "$(cat "$STATE/etc/slurm.conf")" != "$new_conf" ]; then
  printf '%s\n' "$new_conf" >"$STATE/etc/slurm.conf"
  conf_changed=1
fi
chmod 0644 "$STATE/etc/slurm.conf"
install -d -m 0755 /etc/slurm
if [ -L "$CONF_LINK" ]; then
  [ "$(readlink "$CONF_LINK")" = "$STATE/etc/slurm.conf" ] || ln -sfn "$STATE/etc/slurm.conf" "$CONF_LINK"
elif [ -e "$CONF_LINK" ]; then
  if grep -q 'Written by lorascope tests/slurm/up.sh' "$CONF_LINK"; then
    ln -sfn "$STATE/etc/slurm.conf" "$CONF_LINK"
  else
    skip "$CONF_LINK exists and was not written by up.sh (a real Slurm install? not touching it)"
  fi
else
  ln -s "$STATE/etc/slurm.conf" "$CONF_LINK"
fi

# ---------------------------------------------------------------- daemons
alive() { [ -s "$1" ] && kill -0 "$(cat "$1")" 2>/dev/null; }
stop_pidfile() {
  local f=$1 pid
  alive "$f" || return 0
  pid=$(cat "$f"); kill "$pid" 2>/dev/null
  for _ in $(seq 100); do kill -0 "$pid" 2>/dev/null || return 0; sleep 0.1; done
  kill -9 "$pid" 2>/dev/null; return 0
}
if [ "$conf_changed" = 1 ]; then
  # A new config (first run, or this machine changed): restart what runs.
  stop_pidfile "$STATE/run/slurmd.pid"
  stop_pidfile "$STATE/run/slurmctld.pid"
fi

if ! alive "$STATE/run/slurmctld.pid"; then
  log "starting slurmctld"
  # -i: ignore a state file that does not match (e.g. a half-written one).
  slurmctld -i >>"$STATE/log/slurmctld.start" 2>&1 \
    || skip "slurmctld failed to start: $(tail -n2 "$STATE/log/slurmctld.start" "$STATE/log/slurmctld.log" 2>/dev/null | tr '\n' ' ')"
fi
for _ in $(seq 100); do scontrol ping 2>/dev/null | grep -q 'is UP' && break; sleep 0.2; done
scontrol ping 2>/dev/null | grep -q 'is UP' \
  || skip "slurmctld not answering: $(grep -iE 'error|fatal' "$STATE/log/slurmctld.log" 2>/dev/null | tail -n1)"

if ! alive "$STATE/run/slurmd.pid"; then
  log "starting slurmd"
  slurmd >>"$STATE/log/slurmd.start" 2>&1 \
    || skip "slurmd failed to start: $(tail -n2 "$STATE/log/slurmd.start" "$STATE/log/slurmd.log" 2>/dev/null | tr '\n' ' ')"
fi

# Wait for the node to be idle (or mixed/allocated when jobs are running).
state=""
for _ in $(seq 150); do
  state=$(sinfo -h -N -n "$HOST" -o '%T' 2>/dev/null | head -n1)
  case "$state" in idle|mixed|allocated|completing) break ;; esac
  # A node drained/down by an earlier run (e.g. a restart) comes back here.
  case "$state" in down*|drain*|fail*) scontrol update nodename="$HOST" state=resume >/dev/null 2>&1 ;; esac
  alive "$STATE/run/slurmd.pid" || skip "slurmd died: $(grep -iE 'error|fatal' "$STATE/log/slurmd.log" 2>/dev/null | tail -n1)"
  sleep 0.2
done
case "$state" in
  idle|mixed|allocated|completing) ;;
  *) skip "node $HOST not idle after 30s (state '$state'): $(sinfo -h -N -o '%E' 2>/dev/null | head -n1)" ;;
esac
log "cluster up in $(elapsed)s (node $HOST $state, $CPUS CPUs, ${MEM} MB)"

# ---------------------------------------------------------------- smoke test
smoke=$(mktemp -d /tmp/lorascope-slurm-smoke.XXXXXX)
chmod 0755 "$smoke"
cat >"$smoke/task.sh" <<'EOF'
#!/bin/sh
echo "$SLURM_ARRAY_JOB_ID $SLURM_ARRAY_TASK_ID $SLURMD_NODENAME" >"$SMOKE_DIR/out.$SLURM_ARRAY_TASK_ID.tmp"
mv "$SMOKE_DIR/out.$SLURM_ARRAY_TASK_ID.tmp" "$SMOKE_DIR/out.$SLURM_ARRAY_TASK_ID"
EOF
out=$(SMOKE_DIR=$smoke sbatch --parsable --array=0-3%2 --job-name=lorascope-smoke \
  --output="$smoke/slurm-%A_%a.out" --chdir="$smoke" --time=0:02:00 \
  --export=ALL,SMOKE_DIR="$smoke" "$smoke/task.sh" 2>&1) || fail "smoke sbatch: $out"
jobid=${out%%;*}
deadline=$(( $(date +%s) + SMOKE_TIMEOUT ))
while squeue -h -j "$jobid" -t PD,R,CG,CF -o '%i' 2>/dev/null | grep -q .; do
  [ "$(date +%s)" -lt "$deadline" ] || { scancel "$jobid"; fail "smoke job $jobid still queued/running after ${SMOKE_TIMEOUT}s: $(squeue -h -j "$jobid" -t all -o '%i %T %r' | tr '\n' ';')"; }
  sleep 0.5
done
for i in 0 1 2 3; do
  [ -s "$smoke/out.$i" ] || fail "smoke task $i wrote no file (job $jobid: $(squeue -h -j "$jobid" -t all -o '%i %T %r' | tr '\n' ';'))"
  read -r a t n <"$smoke/out.$i"
  [ "$a" = "$jobid" ] && [ "$t" = "$i" ] && [ "$n" = "$HOST" ] \
    || fail "smoke task $i wrote '$a $t $n', expected '$jobid $i $HOST'"
done
bad=$(squeue -h -j "$jobid" -t all -o '%T' | grep -vx COMPLETED)
[ -z "$bad" ] || fail "smoke job $jobid tasks not all COMPLETED: $bad"
rm -rf "$smoke"
log "smoke test passed (array job $jobid, 4 tasks) in $(elapsed)s total"
echo "slurm up: $(sinfo -V) node $HOST, partition $PARTITION, state dir $STATE"
