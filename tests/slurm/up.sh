#!/usr/bin/env bash
# Start a one-node Slurm cluster on this machine for lorascope's Slurm tests.
#
# Idempotent: installs Debian's Slurm and munge (and slurmdbd + MariaDB, so
# that sacct works) only when missing, rewrites the configs only when they
# changed, starts only the daemons that are not running, waits for the node
# to be idle and runs a smoke test (a 4-task array, 2 at a time).
#
# Exit codes:
#   0   cluster up, smoke test passed
#   77  skipped: Slurm cannot be started here; one line
#       "skipped: cannot start Slurm here: <why>" on stderr
#       (not root, no apt, install failed, a daemon would not start or died)
#   1   Slurm started but misbehaved (the smoke test failed): a real failure
#
# Environment:
#   LORASCOPE_SLURM_STATE  state dir (default /var/lib/lorascope-slurm)
#   LORASCOPE_SLURM_DBD=0  no slurmdbd/MariaDB (sacct then shows nothing)
#   LORASCOPE_SLURM_DB_PORT  the private MariaDB's port (default 3307)
#   LORASCOPE_SLURM_CGROUP=auto|1|0  confine jobs with cgroup v1 (auto: when
#                          usable; falls back to /proc tracking if slurmd fails)
#
# Everything it writes lives under the state dir, except:
#   /etc/slurm/{slurm,slurmdbd,cgroup}.conf  symlinks into $STATE/etc
#                              (so sbatch, squeue, sacct... need no SLURM_CONF)
#   /etc/munge/munge.key       munge's key (made by the munge package or here)
#   /run/munge, /var/log/munge munged's socket and log (munge's defaults)
# See tests/slurm/README.md.
set -uo pipefail

STATE=${LORASCOPE_SLURM_STATE:-/var/lib/lorascope-slurm}
DBD=${LORASCOPE_SLURM_DBD:-1}
CGROUP=${LORASCOPE_SLURM_CGROUP:-auto}
DB_PORT=${LORASCOPE_SLURM_DB_PORT:-3307}
DB_PASS=lorascope-test          # test cluster only; MariaDB listens on 127.0.0.1 only
PARTITION=debug
CLUSTER=lorascope
SMOKE_TIMEOUT=${LORASCOPE_SLURM_SMOKE_TIMEOUT:-120}
MARK='Written by lorascope tests/slurm/up.sh'

skip() { echo "skipped: cannot start Slurm here: $*" >&2; exit 77; }
fail() { echo "slurm up.sh: FAILED: $*" >&2; exit 1; }
log() { echo "slurm up.sh: $*" >&2; }
t0=$(date +%s.%N)
elapsed() { awk -v a="$t0" -v b="$(date +%s.%N)" 'BEGIN{printf "%.1f", b-a}'; }
# alive PIDFILE: the pid in it runs the program the file is named for (so a
# stale pid file whose pid was reused by another program does not count).
alive() {
  local pid want
  [ -s "$1" ] || return 1
  pid=$(cat "$1" 2>/dev/null); want=$(basename "$1" .pid)
  [ "$want" = mysqld ] && want=mariadbd
  [ -n "$pid" ] && kill -0 "$pid" 2>/dev/null && [ "$(cat "/proc/$pid/comm" 2>/dev/null)" = "$want" ]
}
stop_pidfile() {
  local f=$1 pid
  alive "$f" || return 0
  pid=$(cat "$f"); kill "$pid" 2>/dev/null
  for _ in $(seq 150); do kill -0 "$pid" 2>/dev/null || return 0; sleep 0.1; done
  kill -9 "$pid" 2>/dev/null; return 0
}
lastlog() { grep -ihE 'error|fatal' "$@" 2>/dev/null | grep -v -e pmix -e 'MPI:' | tail -n1; }
# write_if_changed FILE CONTENT -> returns 0 when it wrote (content changed)
write_if_changed() {
  if [ -f "$1" ] && [ "$(cat "$1")" = "$2" ]; then return 1; fi
  printf '%s\n' "$2" >"$1"
}
# link_conf /etc/slurm/NAME TARGET: point the default config path at ours,
# refusing to touch a config that up.sh did not write.
link_conf() {
  local link=$1 target=$2
  if [ -L "$link" ]; then
    [ "$(readlink "$link")" = "$target" ] || ln -sfn "$target" "$link"
  elif [ -e "$link" ]; then
    grep -q "$MARK" "$link" || skip "$link exists and was not written by up.sh (a real Slurm install? not touching it)"
    ln -sfn "$target" "$link"
  else
    ln -s "$target" "$link"
  fi
}

# ---------------------------------------------------------------- preflight
[ "$(id -u)" = 0 ] || skip "not root (need root to install packages and run slurmd)"
[ "$(uname -s)" = Linux ] || skip "not Linux"
mkdir -p "$STATE/log" || skip "cannot create $STATE"

# ---------------------------------------------------------------- install
PKGS="slurmctld slurmd slurm-client munge"
[ "$DBD" = 1 ] && PKGS="$PKGS slurmdbd mariadb-server"
missing=""
for p in $PKGS; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || missing="$missing $p"
done
if [ -n "$missing" ]; then
  command -v apt-get >/dev/null || skip "packages missing ($missing ) and no apt-get"
  log "installing$missing"
  export DEBIAN_FRONTEND=noninteractive
  apt_log=$STATE/log/apt.log
  # Try with the package lists there are; update them only if that fails.
  if ! apt-get install -y -q --no-install-recommends $missing >"$apt_log" 2>&1; then
    apt-get update -q >>"$apt_log" 2>&1 || skip "apt-get update failed (see $apt_log)"
    apt-get install -y -q --no-install-recommends $missing >>"$apt_log" 2>&1 \
      || skip "apt-get install$missing failed: $(tail -n1 "$apt_log")"
  fi
  log "installed in $(elapsed)s"
fi
bins="slurmctld slurmd munged sbatch squeue scontrol sinfo sacct"
[ "$DBD" = 1 ] && bins="$bins slurmdbd sacctmgr mariadbd mariadb-install-db mariadb"
for b in $bins; do
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
munge_ok() { munge -n 2>/dev/null | unmunge >/dev/null 2>&1; }
if ! munge_ok; then
  rm -f /run/munge/munged.pid
  runuser -u munge -- /usr/sbin/munged >/dev/null 2>&1 \
    || skip "munged failed to start: $(tail -n1 /var/log/munge/munged.log 2>/dev/null)"
  for _ in $(seq 50); do munge_ok && break; sleep 0.1; done
  munge_ok || skip "munged not answering: $(tail -n1 /var/log/munge/munged.log 2>/dev/null)"
fi

# ---------------------------------------------------------------- dirs
install -d -m 0755 "$STATE" "$STATE/etc" "$STATE/slurmd" /etc/slurm
# slurmctld and slurmdbd run as user slurm and write here:
install -d -o slurm -g slurm -m 0755 "$STATE/log" "$STATE/run" "$STATE/ctld" "$STATE/jobcomp"

# ---------------------------------------------------------------- slurm.conf
HOST=$(hostname -s)
# The node line exactly as slurmd sees this machine (CPUs, sockets, cores,
# threads, RealMemory); a node declared bigger than it is gets drained.
NODE=$(slurmd -C 2>/dev/null | head -n1)
case "$NODE" in NodeName=*) ;; *) skip "slurmd -C failed: $NODE" ;; esac
CPUS=$(sed -n 's/.* CPUs=\([0-9]*\).*/\1/p' <<<"$NODE")
MEM=$(sed -n 's/.* RealMemory=\([0-9]*\).*/\1/p' <<<"$NODE")
# A job that asks for no memory gets this much per CPU, so that jobs without
# --mem do not each claim the whole node (CR_Core_Memory counts memory).
DEFMEM=$(( MEM / CPUS / 2 )); [ "$DEFMEM" -gt 0 ] || DEFMEM=1

# cgroups (v1, as on this kind of machine) when they can be used: a task over
# its --mem is then OOM-killed by the kernel and ends OUT_OF_MEMORY, as on a
# real cluster. Without them, /proc tracking: a task over its --mem is killed
# by slurmstepd's sampler and ends FAILED (0:9).
cgroup_usable() {
  [ "$(stat -f -c %T /sys/fs/cgroup 2>/dev/null)" = tmpfs ] || return 1   # v1/hybrid only, tried
  local c
  for c in memory freezer cpuset devices; do
    mkdir "/sys/fs/cgroup/$c/lorascope-probe.$$" 2>/dev/null || return 1
    rmdir "/sys/fs/cgroup/$c/lorascope-probe.$$"
  done
}
case "$CGROUP" in
  auto) if cgroup_usable; then CGROUP=1; else CGROUP=0; fi ;;
  1|0) ;;
  *) fail "LORASCOPE_SLURM_CGROUP must be auto, 1 or 0, not '$CGROUP'" ;;
esac
make_track() {
  if [ "$CGROUP" = 1 ]; then
    TRACK="# cgroup v1: jobs are confined to their cores and --mem (kernel OOM kill).
ProctrackType=proctrack/cgroup
TaskPlugin=task/cgroup,task/affinity
JobAcctGatherType=jobacct_gather/cgroup
JobAcctGatherFrequency=task=1"
  else
    TRACK="# No cgroups: processes are tracked through /proc, tasks are not confined;
# memory is sampled every second and a step over its --mem is killed.
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/linux
JobAcctGatherFrequency=task=1
JobAcctGatherParams=OverMemoryKill"
  fi
}
make_track
cgroup_conf="# $MARK
CgroupPlugin=cgroup/v1
CgroupMountpoint=/sys/fs/cgroup
IgnoreSystemd=yes
ConstrainCores=yes
ConstrainRAMSpace=yes
ConstrainDevices=no"

if [ "$DBD" = 1 ]; then
  ACCT="# Accounting through slurmdbd (MariaDB): sacct works.
AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost=127.0.0.1
AccountingStoragePort=6819
JobCompType=jobcomp/none"
else
  ACCT="# No slurmdbd: plain sacct has nothing; sacct -c reads this file (badly for arrays).
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/filetxt
JobCompLoc=$STATE/jobcomp/jobcomp.log"
fi

make_slurm_conf() {
slurm_conf=$(cat <<EOF
# $MARK -- a one-node test cluster.
# Regenerated by every up.sh; edit up.sh, not this file.
ClusterName=$CLUSTER
SlurmctldHost=$HOST(127.0.0.1)
SlurmUser=slurm
AuthType=auth/munge
CredType=cred/munge
MpiDefault=none
MailProg=/bin/true
StateSaveLocation=$STATE/ctld
SlurmdSpoolDir=$STATE/slurmd
SlurmctldPidFile=$STATE/run/slurmctld.pid
SlurmdPidFile=$STATE/run/slurmd.pid
SlurmctldLogFile=$STATE/log/slurmctld.log
SlurmdLogFile=$STATE/log/slurmd.log
SlurmctldDebug=info
SlurmdDebug=info
$TRACK
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
DefMemPerCPU=$DEFMEM
SchedulerType=sched/backfill
# enable_user_top: non-root users may "scontrol top" their own jobs.
SchedulerParameters=enable_user_top
PriorityType=priority/basic
$ACCT
# Finished jobs stay visible to squeue/scontrol for an hour.
MinJobAge=3600
MaxJobCount=100000
MaxArraySize=100001
ReturnToService=2
SlurmdTimeout=60
KillWait=5
InactiveLimit=0
Waittime=0
$NODE NodeAddr=127.0.0.1 State=UNKNOWN
PartitionName=$PARTITION Nodes=ALL Default=YES MaxTime=INFINITE State=UP
EOF
)
}
make_slurm_conf
write_if_changed "$STATE/etc/cgroup.conf" "$cgroup_conf"
chmod 0644 "$STATE/etc/cgroup.conf"
link_conf /etc/slurm/cgroup.conf "$STATE/etc/cgroup.conf"
if write_if_changed "$STATE/etc/slurm.conf" "$slurm_conf"; then
  # A new config (first run, up.sh changed, another machine): restart.
  stop_pidfile "$STATE/run/slurmd.pid"
  stop_pidfile "$STATE/run/slurmctld.pid"
fi
chmod 0644 "$STATE/etc/slurm.conf"
link_conf /etc/slurm/slurm.conf "$STATE/etc/slurm.conf"

# ---------------------------------------------------------------- MariaDB + slurmdbd
if [ "$DBD" = 1 ]; then
  # A private MariaDB: its own data dir, socket and port, on 127.0.0.1 only;
  # a system MariaDB (if any) is left alone.
  install -d -o mysql -g mysql -m 0750 "$STATE/mysql"
  install -d -o mysql -g mysql -m 0755 "$STATE/run/mysql"
  if [ ! -d "$STATE/mysql/mysql" ]; then
    log "initialising MariaDB in $STATE/mysql"
    mariadb-install-db --no-defaults --user=mysql --datadir="$STATE/mysql" \
      --auth-root-authentication-method=socket --skip-test-db >"$STATE/log/mariadb-install.log" 2>&1 \
      || { rm -rf "$STATE/mysql"; skip "mariadb-install-db failed: $(tail -n1 "$STATE/log/mariadb-install.log")"; }
  fi
  dbsock=$STATE/run/mysql/mysqld.sock
  sql() { mariadb --no-defaults -S "$dbsock" -u root -N -B -e "$1"; }
  if ! alive "$STATE/run/mysql/mysqld.pid"; then
    log "starting MariaDB on 127.0.0.1:$DB_PORT"
    setsid mariadbd --no-defaults --user=mysql --datadir="$STATE/mysql" \
      --socket="$dbsock" --pid-file="$STATE/run/mysql/mysqld.pid" \
      --bind-address=127.0.0.1 --port="$DB_PORT" --log-error="$STATE/log/mariadb.log" \
      --innodb-buffer-pool-size=512M --innodb-lock-wait-timeout=900 \
      </dev/null >/dev/null 2>&1 &
    for _ in $(seq 150); do sql 'select 1' >/dev/null 2>&1 && break; sleep 0.2; done
  fi
  sql 'select 1' >/dev/null 2>&1 || skip "MariaDB did not start: $(lastlog "$STATE/log/mariadb.log")"
  sql "CREATE USER IF NOT EXISTS 'slurm'@'127.0.0.1' IDENTIFIED BY '$DB_PASS';
       GRANT ALL ON slurm_acct_db.* TO 'slurm'@'127.0.0.1';" \
    || skip "cannot create the MariaDB user for slurmdbd"

  dbd_conf=$(cat <<EOF
# $MARK -- slurmdbd of the test cluster.
AuthType=auth/munge
DbdHost=localhost
DbdAddr=127.0.0.1
DbdPort=6819
SlurmUser=slurm
DebugLevel=info
LogFile=$STATE/log/slurmdbd.log
PidFile=$STATE/run/slurmdbd.pid
StorageType=accounting_storage/mysql
StorageHost=127.0.0.1
StoragePort=$DB_PORT
StorageUser=slurm
StoragePass=$DB_PASS
StorageLoc=slurm_acct_db
EOF
)
  if write_if_changed "$STATE/etc/slurmdbd.conf" "$dbd_conf"; then
    stop_pidfile "$STATE/run/slurmdbd.pid"
  fi
  # slurmdbd refuses a config that others can read or that slurm does not own.
  chown slurm:slurm "$STATE/etc/slurmdbd.conf"; chmod 0600 "$STATE/etc/slurmdbd.conf"
  link_conf /etc/slurm/slurmdbd.conf "$STATE/etc/slurmdbd.conf"
  if ! alive "$STATE/run/slurmdbd.pid"; then
    log "starting slurmdbd"
    slurmdbd >>"$STATE/log/slurmdbd.start" 2>&1 \
      || skip "slurmdbd failed to start: $(tail -n2 "$STATE/log/slurmdbd.start" 2>/dev/null | tr '\n' ' ')"
  fi
  dbd_ok() { sacctmgr -n -P list cluster format=cluster >/dev/null 2>&1; }
  for _ in $(seq 150); do dbd_ok && break; alive "$STATE/run/slurmdbd.pid" || break; sleep 0.2; done
  dbd_ok || skip "slurmdbd not answering: $(lastlog "$STATE/log/slurmdbd.log" "$STATE/log/slurmdbd.start")"
  sacctmgr -n -P list cluster format=cluster | grep -qx "$CLUSTER" \
    || sacctmgr -i add cluster "$CLUSTER" >/dev/null || skip "sacctmgr add cluster $CLUSTER failed"
fi

# ---------------------------------------------------------------- slurmctld, slurmd
ctld_was_down=0
if ! alive "$STATE/run/slurmctld.pid"; then
  ctld_was_down=1
  log "starting slurmctld"
  # -i: ignore state files that do not match (e.g. half-written ones).
  slurmctld -i >>"$STATE/log/slurmctld.start" 2>&1 \
    || skip "slurmctld failed to start: $(tail -n2 "$STATE/log/slurmctld.start" 2>/dev/null | tr '\n' ' ')"
fi
for _ in $(seq 100); do scontrol ping 2>/dev/null | grep -q 'is UP' && break; sleep 0.2; done
scontrol ping 2>/dev/null | grep -q 'is UP' \
  || skip "slurmctld not answering: $(lastlog "$STATE/log/slurmctld.log")"

start_slurmd() {
  alive "$STATE/run/slurmd.pid" && return 0
  log "starting slurmd"
  slurmd >>"$STATE/log/slurmd.start" 2>&1 || return 1
  sleep 1; alive "$STATE/run/slurmd.pid"
}
if ! start_slurmd; then
  why="$(tail -n2 "$STATE/log/slurmd.start" 2>/dev/null | tr '\n' ' ') $(lastlog "$STATE/log/slurmd.log")"
  [ "$CGROUP" = 1 ] && [ "${LORASCOPE_SLURM_CGROUP:-auto}" = auto ] || skip "slurmd failed to start: $why"
  log "slurmd would not start with cgroups ($why); falling back to /proc tracking"
  CGROUP=0; make_track; make_slurm_conf
  write_if_changed "$STATE/etc/slurm.conf" "$slurm_conf"
  stop_pidfile "$STATE/run/slurmctld.pid"
  slurmctld -i >>"$STATE/log/slurmctld.start" 2>&1 || skip "slurmctld failed to restart"
  for _ in $(seq 100); do scontrol ping 2>/dev/null | grep -q 'is UP' && break; sleep 0.2; done
  start_slurmd || skip "slurmd failed to start: $(tail -n2 "$STATE/log/slurmd.start" 2>/dev/null | tr '\n' ' ') $(lastlog "$STATE/log/slurmd.log")"
fi

# Wait for the node to be idle (or mixed/allocated when jobs are running).
state=""
for _ in $(seq 150); do
  state=$(sinfo -h -N -n "$HOST" -o '%T' 2>/dev/null | head -n1)
  case "$state" in idle|mixed|allocated|completing) break ;; esac
  # A node left down/drained by an earlier run comes back here.
  case "$state" in down*|drain*|fail*) scontrol update nodename="$HOST" state=resume >/dev/null 2>&1 ;; esac
  alive "$STATE/run/slurmd.pid" || skip "slurmd died: $(lastlog "$STATE/log/slurmd.log")"
  sleep 0.2
done
case "$state" in
  idle|mixed|allocated|completing) ;;
  *) skip "node $HOST not idle after 30s (state '$state'): $(sinfo -h -N -o '%E' 2>/dev/null | head -n1)" ;;
esac
# After slurmctld was killed (e.g. the machine's processes were all ended
# between a session and its CI run), its saved state can hold jobs "RUNNING"
# whose processes are gone; they would hold a CPU until their time limit.
# Cancel those: started before this up.sh, and no processes on the node.
if [ "$ctld_was_down" = 1 ]; then
  start_epoch=${t0%.*}
  squeue -h -t R,CG,S -o '%A %S' 2>/dev/null | while read -r id started; do
    se=$(date -d "$started" +%s 2>/dev/null) || continue
    [ "$se" -lt "$start_epoch" ] || continue
    if ! scontrol listpids "$id" >/dev/null 2>&1; then
      log "cancelling job $id: recorded running, but it has no processes (left from before a restart)"
      scancel "$id"
    fi
  done
fi
log "cluster up in $(elapsed)s (node $HOST $state, $CPUS CPUs, ${MEM} MB, $([ "$CGROUP" = 1 ] && echo 'cgroup v1' || echo 'no cgroups'))"

# ---------------------------------------------------------------- smoke test
smoke=$(mktemp -d /tmp/lorascope-slurm-smoke.XXXXXX)
chmod 0755 "$smoke"
cat >"$smoke/task.sh" <<'EOF'
#!/bin/sh
echo "$SLURM_ARRAY_JOB_ID $SLURM_ARRAY_TASK_ID $SLURMD_NODENAME" >"$SMOKE_DIR/out.$SLURM_ARRAY_TASK_ID.tmp"
mv "$SMOKE_DIR/out.$SLURM_ARRAY_TASK_ID.tmp" "$SMOKE_DIR/out.$SLURM_ARRAY_TASK_ID"
EOF
out=$(sbatch --parsable --array=0-3%2 --job-name=lorascope-smoke \
  --output="$smoke/slurm-%A_%a.out" --chdir="$smoke" --time=0:02:00 \
  --export=ALL,SMOKE_DIR="$smoke" "$smoke/task.sh" 2>&1) || fail "smoke sbatch: $out"
jobid=${out%%;*}
tasks() { squeue -h -j "$jobid" -t all -o '%i %T %r' | tr '\n' ';'; }
deadline=$(( $(date +%s) + SMOKE_TIMEOUT ))
while squeue -h -j "$jobid" -t PD,R,CG,CF,S -o '%i' 2>/dev/null | grep -q .; do
  [ "$(date +%s)" -lt "$deadline" ] || { scancel "$jobid"; fail "smoke job $jobid not done after ${SMOKE_TIMEOUT}s: $(tasks)"; }
  sleep 0.5
done
for i in 0 1 2 3; do
  [ -s "$smoke/out.$i" ] || fail "smoke task $i wrote no file (job $jobid: $(tasks))"
  read -r a t n <"$smoke/out.$i"
  [ "$a" = "$jobid" ] && [ "$t" = "$i" ] && [ "$n" = "$HOST" ] \
    || fail "smoke task $i wrote '$a $t $n', expected '$jobid $i $HOST'"
done
bad=$(squeue -h -j "$jobid" -t all -o '%T' | grep -vx COMPLETED)
[ -z "$bad" ] || fail "smoke job $jobid: tasks not all COMPLETED: $(tasks)"
if [ "$DBD" = 1 ]; then
  # The accounting record can lag the end of the job by a moment.
  n=0
  for _ in $(seq 50); do
    n=$(sacct -n -X -P -j "$jobid" -o JobID,State 2>/dev/null | grep -c '|COMPLETED$')
    [ "$n" = 4 ] && break; sleep 0.2
  done
  [ "$n" = 4 ] || fail "sacct shows $n of 4 COMPLETED tasks of job $jobid: $(sacct -n -X -P -j "$jobid" -o JobID,State 2>&1 | tr '\n' ';')"
fi
rm -rf "$smoke"
log "smoke test passed (array job $jobid, 4 tasks$([ "$DBD" = 1 ] && echo ', sacct agrees')) in $(elapsed)s total"
echo "slurm up: $(sinfo -V), node $HOST, partition $PARTITION, accounting $([ "$DBD" = 1 ] && echo slurmdbd || echo none), $([ "$CGROUP" = 1 ] && echo cgroup || echo proctrack/linuxproc), state dir $STATE"
