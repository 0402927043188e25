#!/usr/bin/env bash
# A real single-machine Slurm cluster (munge, slurmctld, two slurmd "nodes" node1 and node2 on
# this host) runs slurm/train.sbatch with examples/configs/tiny.yaml:
#   1. sbatch -N 2 (LAUNCHER=mpirun, --stop-after 10): trains, writes metrics and a checkpoint;
#   2. scontrol requeue of that job: it resumes at step 10 (not 0) and trains to step 20;
#   3. a new job (LAUNCHER=srun) gets SIGUSR1 early (scancel --signal=USR1 --batch): every rank
#      stops at the same step with a checkpoint, the job exits 0 and requeues itself, and the
#      requeued run resumes from that checkpoint;
#   4. RESUME_FROM naming a missing directory: a clear message in the job output;
#   5. slurm/scaling.sbatch over 1, 2 and 4 ranks with 2 experts: metrics per count, and a clear
#      message that 4 ranks cannot hold 2 experts;
#   6. a job with --time=1 and --signal=B:USR1@50: stops on the signal with a checkpoint, exit 0;
#   7. slurm/serve.sbatch serves job 1's checkpoint on 2 nodes: /healthz, one completion, scancel.
# Every job is cancelled and every daemon started here stopped (by its pid file) on exit, also on
# failure or after the script's own deadline (SLURM_TEST_LIMIT, 200 s).
# Usage: run_slurm_test.sh <bin dir with moe-train> <token file>
# Needs root and the packages slurmctld slurmd slurm-client munge (scripts/test.sh --with-slurm).
set -euo pipefail
BIN=$(realpath "$1")
DATA=$(realpath "$2")
ROOT=$(realpath "$(dirname "$0")/../..")
T=$(mktemp -d /tmp/moe-slurm.XXXXXX)
chmod 755 "$T"
START=$(date +%s)

say() { echo "slurm-test [$(($(date +%s) - START))s]: $*"; }
fail() {
  echo "slurm-test: FAIL: $*" >&2
  for f in "$T"/job*.out; do [ -f "$f" ] && { echo "--- $f" >&2; tail -30 "$f" >&2; }; done
  for f in "$T"/log/*.log; do [ -f "$f" ] && { echo "--- $f" >&2; tail -15 "$f" >&2; }; done
  exit 1
}

stop_daemons() {
  local pid f
  # Jobs first (their slurmstepd and ranks outlive slurmd), then the daemons.
  if [ -s "$T/run/slurmctld.pid" ] && [ -n "$(squeue -h -o %i 2>/dev/null)" ]; then
    # shellcheck disable=SC2046  # one argument per job id
    scancel --full $(squeue -h -o %i 2>/dev/null) 2>/dev/null || true
    for _ in $(seq 50); do [ -z "$(squeue -h -o %i 2>/dev/null)" ] && break; sleep 0.2; done
  fi
  for f in "$T"/run/slurmd-*.pid "$T"/run/slurmctld.pid "$T"/munge/munged.pid; do
    [ -s "$f" ] || continue
    pid=$(cat "$f")
    kill "$pid" 2>/dev/null || continue
    for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    kill -9 "$pid" 2>/dev/null || true
  done
  # Launchers a job left behind (an srun that mpirun started inside a batch script can outlive
  # its daemons) carry this cluster's SLURM_CONF in their environment: end them too.
  for p in /proc/[0-9]*; do
    [ "${p#/proc/}" = "$$" ] && continue
    if tr '\0' '\n' <"$p/environ" 2>/dev/null | grep -qxF "SLURM_CONF=$T/slurm.conf"; then
      kill -9 "${p#/proc/}" 2>/dev/null
    fi
  done
}
cleanup() {
  local rc=$?
  set +e # every step of the clean-up runs, whatever fails
  if [ -n "${WATCHDOG:-}" ]; then
    # shellcheck disable=SC2046  # the watchdog's sleep, then the watchdog
    kill $(pgrep -P "$WATCHDOG") "$WATCHDOG" 2>/dev/null
  fi
  stop_daemons
  if [ "$rc" -eq 0 ] && [ -z "${KEEP_SLURM_TEST_DIR:-}" ]; then rm -rf "$T"; else
    echo "slurm-test: files kept in $T" >&2
  fi
  exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT TERM
# Own deadline below ctest's TIMEOUT (which kills without a trap): fail and clean up in time.
LIMIT=${SLURM_TEST_LIMIT:-200}
trap 'echo "slurm-test: FAIL: not done after ${LIMIT}s" >&2; exit 124' USR2
(sleep "$LIMIT" && kill -USR2 $$) >/dev/null 2>&1 &
WATCHDOG=$!

for p in munged slurmctld slurmd sbatch; do
  command -v "$p" >/dev/null || [ -x "/usr/sbin/$p" ] || fail "$p not installed (scripts/test.sh --with-slurm installs it)"
done
[ "$(id -u)" -eq 0 ] || fail "needs root (slurmd runs jobs as their user)"
export PATH=$PATH:/usr/sbin

# -- munge: own key, socket and pid file, running as user munge --------------------------------
mkdir -p "$T/munge" "$T/log" "$T/run" "$T/state" "$T/spool" "$T/tmpfs"
dd if=/dev/urandom of="$T/munge/munge.key" bs=1 count=128 status=none
chown -R munge:munge "$T/munge"
chmod 711 "$T/munge"
chmod 400 "$T/munge/munge.key"
SOCK=$T/munge/munge.socket
runuser -u munge -- munged --key-file="$T/munge/munge.key" --socket="$SOCK" \
  --pid-file="$T/munge/munged.pid" --log-file="$T/munge/munged.log" \
  --seed-file="$T/munge/munged.seed" || fail "munged did not start"

# -- slurm.conf: two nodes on this host, ports chosen from the process id ----------------------
# Below Linux's ephemeral range (32768 and up), where the sockets of tests running alongside
# (servers on free ports, MPI's TCP connections) take theirs, and free when chosen: a slurmd
# once failed with "Address already in use" on a port above 32768.
ports_free() {  # BASE: ports BASE .. BASE+5 can be bound on 127.0.0.1 now
  python3 - "$1" <<'PY'
import socket, sys
b = int(sys.argv[1])
for p in range(b, b + 6):
    s = socket.socket()
    try:
        s.bind(("127.0.0.1", p))
    except OSError:
        sys.exit(1)
    finally:
        s.close()
PY
}
base=$((20000 + ($$ % 1500) * 8))
for _ in $(seq 1 50); do
  ports_free "$base" && break
  base=$((20000 + (base - 20000 + 8 * 97) % 12000))
done
HOST=$(hostname -s)
cat >"$T/slurm.conf" <<EOF
ClusterName=moetest
SlurmctldHost=$HOST(127.0.0.1)
SlurmctldPort=$base
AuthType=auth/munge
AuthInfo=socket=$SOCK
CredType=cred/munge
MpiDefault=pmix
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SchedulerType=sched/builtin
SlurmUser=root
SlurmdUser=root
ReturnToService=2
MailProg=/bin/true
SlurmdParameters=config_overrides
EnforcePartLimits=ALL
JobCompType=jobcomp/none
StateSaveLocation=$T/state
SlurmdSpoolDir=$T/spool/%n
SlurmctldPidFile=$T/run/slurmctld.pid
SlurmdPidFile=$T/run/slurmd-%n.pid
SlurmctldLogFile=$T/log/slurmctld.log
SlurmdLogFile=$T/log/slurmd-%n.log
TmpFS=$T/tmpfs/%n
KillWait=5
MinJobAge=600
NodeName=node[1-2] NodeHostname=$(hostname) NodeAddr=127.0.0.1 Port=[$((base + 1))-$((base + 2))] CPUs=4 State=UNKNOWN
PartitionName=test Nodes=node[1-2] Default=YES MaxTime=10 State=UP
EOF
export SLURM_CONF=$T/slurm.conf
mkdir -p "$T/spool/node1" "$T/spool/node2" "$T/tmpfs/node1" "$T/tmpfs/node2"

slurmctld -c -i -f "$SLURM_CONF" || fail "slurmctld did not start"
for n in node1 node2; do slurmd -N "$n" -f "$SLURM_CONF" || fail "slurmd -N $n did not start"; done
for _ in $(seq 100); do
  idle=$(sinfo -h -N -t idle -o %N 2>/dev/null | sort -u | wc -l)
  [ "$idle" -eq 2 ] && break
  sleep 0.2
done
[ "$idle" -eq 2 ] || fail "the two nodes did not become idle: $(sinfo -N 2>&1)"
say "cluster up: $(sinfo -h -N -o '%N %T %c' | tr '\n' ' ')"

# -- helpers -------------------------------------------------------------------------------------
# Open MPI as root, and mpirun across two "nodes" of one host: TCP on loopback only.
export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1
export OMPI_MCA_rmaps_base_oversubscribe=1 OMPI_MCA_btl=self,tcp
export OMPI_MCA_btl_tcp_if_include=lo OMPI_MCA_oob_tcp_if_include=lo
export MOE_ROOT=$ROOT MOE_BIN=$BIN

job_state() { squeue -h -j "$1" -o %T 2>/dev/null || true; }
# wait_job ID SECONDS [STATE...]: until the job is in one of the states (default: finished).
wait_job() {
  local id=$1 limit=$2 s
  shift 2
  local end=$(($(date +%s) + limit))
  while [ "$(date +%s)" -lt "$end" ]; do
    s=$(job_state "$id")
    if [ $# -gt 0 ]; then
      for want in "$@"; do [ "$s" = "$want" ] && return 0; done
    else
      case "$s" in "" | COMPLETED | FAILED | CANCELLED | TIMEOUT | NODE_FAIL | OUT_OF_MEMORY) return 0 ;; esac
    fi
    sleep 0.3
  done
  fail "job $id still '$s' after ${limit}s (wanted ${*:-finished})"
}
exit_code() { scontrol show job "$1" | grep -o ' ExitCode=[0-9:]*' | cut -d= -f2; }
submit() { sbatch --parsable -N 2 --ntasks-per-node=1 --cpus-per-task=1 --time=5 "$@" \
  "$ROOT/slurm/train.sbatch"; }
# A requeued job waits for a begin time Slurm sets; start it now, but not within the second in
# which its previous run's credential was revoked (a start then is refused as "revoked").
release_requeued() {
  wait_job "$1" 30 PENDING
  sleep 2
  scontrol update jobid="$1" StartTime=now || fail "cannot set StartTime=now for job $1"
}
restarts() { scontrol show job "$1" | grep -o 'Restarts=[0-9]*' | cut -d= -f2; }

cd "$T"
# -- 1. train and checkpoint (mpirun across the two nodes) ---------------------------------------
R1=$T/run1
id=$(LAUNCHER=mpirun RUN_DIR=$R1 CKPT_DIR=$R1/ck \
  EXTRA_ARGS="--set data.path=$DATA --stop-after 10" submit --output="$T/job1.out")
say "job $id submitted (mpirun, steps 0 -> 10)"
wait_job "$id" 60
[ "$(exit_code "$id")" = 0:0 ] || fail "job $id: exit code $(exit_code "$id")"
grep -q 'starting from step 0' "$T/job1.out" || fail "job 1 did not start from step 0"
grep -q '"step":10,' "$R1/metrics.jsonl" || fail "no metrics for step 10 in $R1/metrics.jsonl"
[ "$(cat "$R1/ck/latest")" = step-00000010 ] || fail "latest is not step-00000010"
say "job $id trained to step 10: $(cat "$R1/ck/latest")"

# -- 2. requeue: the same job resumes at step 10 -------------------------------------------------
scontrol requeue "$id" || fail "scontrol requeue $id failed"
say "job $id requeued: $(job_state "$id")"
release_requeued "$id"
wait_job "$id" 120
[ "$(exit_code "$id")" = 0:0 ] || fail "requeued job $id: exit code $(exit_code "$id")"
grep -q "resumed from $R1/ck at step 10" "$T/job1.out" || fail "the requeued job did not resume at step 10"
grep -q '"first_step":10' "$R1/metrics.jsonl" || fail "the second run's summary does not start at step 10"
[ "$(grep -c '"step":1,' "$R1/metrics.jsonl")" = 1 ] || fail "step 1 ran twice: not resumed"
[ "$(cat "$R1/ck/latest")" = step-00000020 ] || fail "latest is not step-00000020 after the resume"
say "job $id resumed at step 10 and finished at $(cat "$R1/ck/latest")"

# -- 3. SIGUSR1 early (srun): checkpoint, exit 0, requeue itself, resume -------------------------
R3=$T/run3
id=$(LAUNCHER=srun RUN_DIR=$R3 CKPT_DIR=$R3/ck \
  EXTRA_ARGS="--set data.path=$DATA --set train.steps=100000 --set log.every=1" \
  submit --output="$T/job3.out")
say "job $id submitted (srun, 100000 steps)"
end=$(($(date +%s) + 60))
until grep -q '^step [0-9]*/100000' "$T/job3.out" 2>/dev/null; do
  [ "$(date +%s)" -lt "$end" ] || fail "job $id never printed a step"
  [ -n "$(job_state "$id")" ] || fail "job $id ended before its first step"
  sleep 0.2
done
scancel --signal=USR1 --batch "$id" || fail "scancel --signal=USR1 --batch $id failed"
say "job $id got SIGUSR1"
end=$(($(date +%s) + 60))
until grep -q 'requeueing job' "$T/job3.out" 2>/dev/null; do
  [ "$(date +%s)" -lt "$end" ] || fail "job $id did not stop and requeue itself after SIGUSR1"
  sleep 0.2
done
line=$(grep -m1 'stopping at step [0-9]* on signal SIGUSR1: checkpoint ' "$T/job3.out") ||
  fail "no 'stopping at step N on signal SIGUSR1' line"
n=${line#*stopping at step }
n=${n%% *}
[ "$(cat "$R3/ck/latest")" = "$(printf 'step-%08d' "$n")" ] || fail "latest is not step $n"
[ "$n" -lt 100000 ] || fail "stopped at the end, not on the signal"
say "job $id stopped at step $n on SIGUSR1 with a checkpoint and requeued itself"
# The requeued run resumes from that step; stop it for good once it does.
release_requeued "$id"
end=$(($(date +%s) + 90))
until grep -q "resumed from $R3/ck at step $n " "$T/job3.out" 2>/dev/null; do
  [ "$(date +%s)" -lt "$end" ] || fail "the requeued job $id did not resume at step $n"
  sleep 0.3
done
say "job $id (restart $(restarts "$id")) resumed at step $n"
scancel "$id"
wait_job "$id" 30

# -- 4. bad input: RESUME_FROM naming a missing checkpoint directory ----------------------------
id=$(RUN_DIR=$T/run4 RESUME_FROM=$T/no-such-ck EXTRA_ARGS="--set data.path=$DATA" \
  submit --output="$T/job4.out" --no-requeue)
wait_job "$id" 30
grep -q "train.sbatch: error: RESUME_FROM=$T/no-such-ck: no such checkpoint directory" \
  "$T/job4.out" || fail "no clear message for a missing checkpoint directory"
[ "$(exit_code "$id")" = 1:0 ] || fail "job $id: exit code $(exit_code "$id"), expected 1:0"
say "a missing checkpoint directory: '$(grep -m1 error: "$T/job4.out")'"

# -- 5. scaling.sbatch over 1, 2 and 4 ranks with 2 experts: 4 ranks cannot hold them ----------
id=$(RANKS="1 2 4" OUT_DIR=$T/scaling EXTRA_ARGS="--set data.path=$DATA --set train.steps=4
  --set model.moe.num_experts=2" sbatch --parsable -N 2 --ntasks-per-node=2 --cpus-per-task=1 \
  --time=5 --output="$T/job5.out" "$ROOT/slurm/scaling.sbatch")
wait_job "$id" 90
for n in 1 2; do
  grep -q '"summary":true' "$T/scaling/np$n/metrics.jsonl" || fail "scaling: no metrics for np $n"
done
grep -q 'np 4: FAILED with exit code 1: .*2 experts cannot be spread over 4 ranks' "$T/job5.out" ||
  fail "scaling: no clear message for 4 ranks and 2 experts"
say "scaling: np 1 and 2 measured; '$(grep -m1 'np 4: FAILED' "$T/job5.out")'"

# -- 6. a real time limit (SLURM_TEST_TIME_LIMIT=0 skips it) -------------------------------------
# --time=1 with the signal 50 s before it: the job stops itself with a checkpoint before Slurm
# would kill it, and exits 0 (REQUEUE_ON_SIGNAL=0 here, so it is not requeued). slurmctld checks
# time limits every 30 s or so, so this takes 3 to 40 s.
if [ "${SLURM_TEST_TIME_LIMIT:-1}" = 1 ]; then
  R6=$T/run6
  id=$(LAUNCHER=srun RUN_DIR=$R6 CKPT_DIR=$R6/ck REQUEUE_ON_SIGNAL=0 \
    EXTRA_ARGS="--set data.path=$DATA --set train.steps=100000" \
    sbatch --parsable -N 2 --ntasks-per-node=1 --cpus-per-task=1 --time=1 \
    --signal=B:USR1@50 --output="$T/job6.out" "$ROOT/slurm/train.sbatch")
  say "job $id submitted (--time=1, SIGUSR1 50 s before the limit)"
  wait_job "$id" 75
  grep -q 'stopping at step [0-9]* on signal SIGUSR1' "$T/job6.out" ||
    fail "job $id did not stop on SIGUSR1 before its time limit"
  [ "$(exit_code "$id")" = 0:0 ] || fail "job $id: exit code $(exit_code "$id")"
  say "time limit: '$(grep -m1 'stopping at step' "$T/job6.out")', $(scontrol show job "$id" |
    grep -o 'RunTime=[0-9:]*')"
fi
# -- 7. serve.sbatch: moe-serve on 2 nodes from job 1's checkpoint, one completion, scancel -----
PORT=$((base + 5))
id=$(CHECKPOINT=$R1/ck PORT=$PORT LAUNCHER=srun sbatch --parsable -N 2 --ntasks-per-node=1 \
  --cpus-per-task=1 --time=5 --output="$T/job7.out" "$ROOT/slurm/serve.sbatch")
say "job $id submitted (serve.sbatch on port $PORT)"
end=$(($(date +%s) + 45))
until curl -sf "http://127.0.0.1:$PORT/healthz" 2>/dev/null | grep -q '"ok"'; do
  [ "$(date +%s)" -lt "$end" ] || fail "serve job $id: no /healthz on port $PORT after 45 s"
  [ -n "$(job_state "$id")" ] || fail "serve job $id ended before serving"
  sleep 0.3
done
out=$(curl -sf "http://127.0.0.1:$PORT/v1/completions" -H 'Content-Type: application/json' \
  -d '{"prompt": "In the beginning", "max_tokens": 4, "temperature": 0}') ||
  fail "serve job $id: the completion request failed"
echo "$out" | grep -q '"completion_tokens":4' || fail "serve job $id: unexpected reply: $out"
grep -q "rank 0 on node1 serves http://127.0.0.1:$PORT" "$T/job7.out" ||
  fail "serve job $id: the output does not say where the server is"
scancel "$id"
wait_job "$id" 30
grep -q 'got SIGTERM: stopping the server' "$T/job7.out" || fail "serve job $id: no SIGTERM seen on scancel"
say "serve: /healthz ok, a 4-token completion, stopped by scancel"
say "PASS in $(($(date +%s) - START))s"
