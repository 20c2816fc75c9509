#!/usr/bin/env bash
# Try, on the running test cluster, the Slurm commands a lorascope backend
# needs, and print each command line with its output and exit status (the
# reference in tests/slurm/README.md was made from this). Takes ~3 minutes
# (the TIMEOUT case waits for Slurm's time-limit check). Run as root after
# up.sh; it makes and removes a user "lsprobe" for the non-admin cases.
#
#   bash tests/slurm/facts.sh 2>&1 | tee /tmp/slurm-facts.txt
set -uo pipefail
W=$(mktemp -d /tmp/lorascope-slurm-facts.XXXXXX); chmod 0777 "$W"
cd "$W"
run() { echo "\$ $*"; eval "$@"; echo "[rc=$?]"; echo; }
as_user() { runuser -u lsprobe -- "$@"; }
section() { echo; echo "=================== $*"; echo; }
wait_state() {  # wait_state JOBID STATE... (up to 150 s)
  local j=$1; shift
  for _ in $(seq 300); do
    s=$(squeue -h -j "$j" -t all -o '%T' 2>/dev/null | head -n1)
    for want in "$@"; do [ "$s" = "$want" ] && return 0; done
    sleep 0.5
  done
  echo "(gave up waiting for $j to be $*; it is '$s')"
}
wait_gone() {  # until no task of JOB is pending/running
  for _ in $(seq 300); do
    squeue -h -j "$1" -t PD,R,CG,S -o %i 2>/dev/null | grep -q . || return 0; sleep 0.5
  done
}

section version
run sinfo -V
run 'scontrol show config | grep -E "^(SLURM_VERSION|MinJobAge|MaxArraySize|SchedulerParameters|PriorityType|AccountingStorageType|SelectType|ProctrackType|TaskPlugin|JobAcctGatherParams) "'
run sinfo
run 'sinfo -h -N -o "%N %T %c %m %E"'

section "environment of a task"
cat >env.sh <<'EOF'
#!/bin/sh
env | grep -E '^SLURM(D)?_' | sort
EOF
j=$(sbatch --parsable --array=5-6 -o "$W/env-%A_%a.out" env.sh)
wait_gone "$j"; sleep 1
run "cat $W/env-${j}_5.out"

section "sbatch: output and errors"
run "sbatch --array=0-1 --wrap true"
run "sbatch --parsable --array=0-1 --wrap true"
run "sbatch -p nosuchpart --wrap true"
run "sbatch --time=abc --wrap true"
run "sbatch --array=0-200000 --wrap true"
run "sbatch --gres=gpu:1 --wrap true"
run "sbatch --mem=100000000 --wrap true"
run "sbatch -c 64 --wrap true"
run "sbatch -A nosuchaccount --wrap true"
run "sbatch --qos=nosuchqos --wrap true"
run "sbatch /nonexistent/script.sh"
run "sbatch -D /nonexistent --wrap true"
run "sbatch --wrap true --extra-bogus-flag"
run "env PATH=/nonexistent sbatch --wrap true 2>&1; echo \"sh exit \$?\""
scancel -u root 2>/dev/null; sleep 2   # the jobs above (e.g. -c 64 pends forever)
run "sbatch --test-only --array=0-3%2 -p debug --wrap true"
run "sbatch --test-only -p nosuchpart --wrap true"
run "sinfo -h -p nosuchpart -o %P"
run "sinfo -h -o '%P %a %l %D %c %m %G'"
run "scontrol show partition nosuchpart"
j=$(sbatch --parsable --array=0-1 -o /nonexistent/dir/x.out --wrap true); sleep 3
echo "(job $j: sbatch --array=0-1 -o /nonexistent/dir/x.out --wrap true)"
run "squeue -h -j $j -t all -o '%i %T %r'; scontrol -o show job ${j}_0 | tr ' ' '\\n' | grep -E '^(JobState|Reason|ExitCode)='"
scancel -u root 2>/dev/null; sleep 1

section "final states: exit 3, OOM, scancel of a running task, TIMEOUT, a signal"
cat >states.sh <<'EOF'
#!/bin/sh
case $SLURM_ARRAY_TASK_ID in
  0) exit 0 ;;
  1) exit 3 ;;
  2) { head -c 400M /dev/zero; sleep 5; } | tail >/dev/null ;;  # tail holds the whole "line": 400 MB > --mem
  3) sleep 300 ;;                                  # cancelled below
  4) sleep 300 ;;                                  # --time=1: TIMEOUT
  5) kill -9 $$ ;;                                 # dies of a signal
esac
EOF
j=$(sbatch --parsable --array=0-5 --mem=100M --time=1 -o "$W/st-%A_%a.out" states.sh)
echo "job $j submitted $(date +%T)"
wait_state "${j}_3" RUNNING; sleep 2
run "scancel ${j}_3"
sleep 5
run "squeue -j $j -t all -o '%i %A %T %r %N %k'"
t=$(date +%s); wait_state "${j}_4" TIMEOUT
echo "TIMEOUT came $(( $(date +%s) - t ))s after the scancel step ($(date +%T)); --time=1 means 1 minute"
echo
run "squeue -h -j $j -t all -o '%i %T %r'"
run "squeue -j $j -t all -O 'JobArrayID:16,JobID:8,ArrayJobID:8,ArrayTaskID:6,State:14,Reason:20,NodeList:8,ExitCode:6'"
for k in 0 1 2 3 4 5; do run "scontrol -o show job ${j}_$k | tr ' ' '\n' | grep -E '^(JobId|ArrayJobId|ArrayTaskId|JobState|Reason|ExitCode|DerivedExitCode|NodeList|RunTime|TimeLimit|StdOut)='"; done
sleep 2
run "sacct -X -j $j -o JobID,JobIDRaw,State,ExitCode,DerivedExitCode,NodeList,Elapsed"
run "sacct -j $j -o JobID,State,ExitCode,MaxRSS,ReqMem"
run "sacct -n -X -P -j $j -o JobID,State,ExitCode,NodeList"
run "cat $W/st-${j}_2.out $W/st-${j}_3.out $W/st-${j}_4.out"
run "sacct -X -j ${j}_1 -n -P -o JobID,State,ExitCode"
run "squeue -j ${j}_1 --json | python3 -c 'import json,sys; print(len(json.load(sys.stdin)[\"jobs\"]), \"jobs in squeue -j ${j}_1 --json\")'"
run "squeue -h -t all | wc -l"
run "squeue -j ${j}_1 --json | python3 -c 'import json,sys; d=json.load(sys.stdin); print(sorted(d)); j=d[\"jobs\"][0]; print({k: j[k] for k in (\"job_id\",\"array_job_id\",\"array_task_id\",\"job_state\",\"state_reason\",\"exit_code\",\"nodes\",\"array_task_string\") if k in j})'"
run "sacct -j ${j}_1 -X --json | python3 -c 'import json,sys; d=json.load(sys.stdin); j=d[\"jobs\"][0]; print({k: j[k] for k in (\"job_id\",\"array\",\"state\",\"exit_code\",\"derived_exit_code\",\"nodes\") if k in j})'"

section "queue control on an array with pending tasks (%1)"
j=$(sbatch --parsable --array=0-5%1 -o /dev/null --wrap 'sleep 45')
wait_state "${j}_0" RUNNING
run "squeue -j $j -o '%i %T %r %N'"
run "squeue -r -j $j -o '%i %T %r %N'"
run "squeue -h -r -j $j -o '%i %A %F %K %T %r %N %Q %y'"
run "scontrol hold ${j}_2"
run "squeue -h -r -j $j -o '%i %T %r'"
run "scontrol release ${j}_2"
run "scontrol hold $j"
run "squeue -h -r -j $j -o '%i %T %r'"
run "scontrol release $j"
run "squeue -h -r -j $j -o '%i %T %r'"
run "scontrol hold ${j}_[3-4]"
run "squeue -h -r -j $j -o '%i %T %r'"
run "scontrol release ${j}_[3-4]"
run "scontrol hold ${j}_0"
run "scontrol update jobid=${j}_4 nice=100"
run "squeue -h -r -j $j -o '%i %T %r %Q %y'"
run "scontrol update jobid=${j}_5 nice=-100"
run "squeue -h -r -j $j -o '%i %T %r %Q %y'"
run "scontrol top ${j}_4"
run "squeue -h -r -j $j -o '%i %T %r %Q %y'"
run "scancel ${j}_3"
run "squeue -h -r -j $j -t all -o '%i %T %r'"
run "scancel ${j}_99"
run "scontrol hold ${j}_99"
run "scontrol hold 999999"
run "scancel 999999"
run "scancel -v 999999"
run "squeue -j 999999"
scancel "$j"; wait_gone "$j"

section "the same as a user who is not an admin"
useradd -M -r -s /bin/sh lsprobe 2>/dev/null
j=$(as_user sbatch --parsable --array=0-4%1 -o /dev/null -D "$W" --wrap 'sleep 45')
wait_state "${j}_0" RUNNING
run "runuser -u lsprobe -- scontrol hold ${j}_2"
run "squeue -h -r -j $j -o '%i %T %r'"
run "runuser -u lsprobe -- scontrol release ${j}_2"
run "runuser -u lsprobe -- scontrol update jobid=${j}_4 nice=50"
run "runuser -u lsprobe -- scontrol update jobid=${j}_4 nice=-50"
run "runuser -u lsprobe -- scontrol top ${j}_4"
run "squeue -h -r -j $j -o '%i %T %r %Q %y'"
# Without SchedulerParameters=enable_user_top (Slurm's default):
conf=$(readlink -f /etc/slurm/slurm.conf)
cp "$conf" "$W/slurm.conf.saved"
sed -i 's/^SchedulerParameters=enable_user_top$/#&/' "$conf"
run "scontrol reconfigure"
sleep 2
run "scontrol show config | grep ^SchedulerParameters"
run "runuser -u lsprobe -- scontrol top ${j}_3"
run "scontrol top ${j}_3"
run "squeue -h -r -j $j -o '%i %T %r %Q %y'"
cp "$W/slurm.conf.saved" "$conf"
run "scontrol reconfigure"
sleep 2
run "scontrol show config | grep ^SchedulerParameters"
run "runuser -u lsprobe -- scancel ${j}_1"
run "runuser -u lsprobe -- sacct -X -j $j -n -P -o JobID,State"
scancel "$j"; wait_gone "$j"
userdel lsprobe 2>/dev/null

cd /; rm -rf "$W"
echo "facts.sh done"
