#!/usr/bin/env bash
# gpt-simple: a self-continuing SLURM job. Each job trains until its time limit is near, saves, exits 0;
# the next job of the chain (queued as soon as this one starts) resumes from the newest checkpoint.
#
# Submit (from the repository root, or anywhere; paths below are relative to the submit directory):
#     GPT_SIMPLE_CONFIG=configs/gpt2.toml GPT_SIMPLE_OUTPUT_DIR=outputs/gpt2 sbatch slurm/resume_chain.sh
# or, so that sbatch options given on the command line also apply to every later job of the chain:
#     GPT_SIMPLE_CONFIG=configs/gpt2.toml bash slurm/resume_chain.sh submit --time=04:00:00 --nodes=2
#
# Settings (environment variables; sbatch passes the submitting shell's environment to every job):
#   GPT_SIMPLE_CONFIG        config file                        (default configs/gpt2.toml)
#   GPT_SIMPLE_OUTPUT_DIR    run directory (training.output_dir) (default outputs/<job name>)
#   GPT_SIMPLE_EXTRA_ARGS    extra train.py arguments, shell-quoted, e.g. "--training.max_steps 5000"
#   GPT_SIMPLE_MAX_ATTEMPTS  most jobs in one chain              (default 20)
#   GPT_SIMPLE_SBATCH_ARGS   extra sbatch options for the successor jobs (set by `submit`)
#   NPROC                    training processes per node         (default: GPUs on the node, else 1)
#   PYTHON                   python interpreter                  (default python)
#   GPT_SIMPLE_HOME          repository with train.py/status.py  (default: this script's ../)
#   GPT_SIMPLE_SHUTDOWN_TIMEOUT  seconds torchrun waits for workers after forwarding a stop signal
#                            before it SIGKILLs them; keep it >= training.walltime_reserve_seconds (600)
# Internal: GPT_SIMPLE_CHAIN_ATTEMPT (this job's place in the chain, 1 for the first job).
#
# What one job does:
#   1. asks `status.py <output_dir> --decision` what to do: done (COMPLETED), halted (HALTED) or failed
#      (ERROR, CRASHED, unreadable state) end the chain here; start or resume go on;
#   2. queues its successor right away (--dependency=afterany:<this job>), so the chain survives this job
#      being killed hard; the successor re-checks the status before it trains;
#   3. trains in the background; USR1/USR2/TERM/INT reaching this shell are forwarded to the trainer;
#      SLURM_JOB_END_TIME (the trainer's deadline) is exported when this Slurm does not set it;
#   4. asks again: done/halted/failed (or no state at all) cancel the successor; resume (STOPPED) and held
#      (another live job holds the run's lease) leave it.
# held at step 1 (a second chain on the same run, e.g. a double sbatch): the job waits up to
# GPT_SIMPLE_HELD_WAIT seconds (default 600) for the holder to end or go stale (a job killed hard on another
# node); still held, it ends, exit 0, without training and without queuing a successor, so the duplicate chain
# ends and the live one goes on.
#
# Logs: Slurm's output file (below) gets this script's decisions and a copy of the training output;
# <output_dir>/logs/slurm-<jobid>.log keeps the training output of each job next to the run, and
# <output_dir>/logs/chain.log gets one line per decision of every job.
#
#SBATCH --job-name=gpt-simple
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=1
#SBATCH --time=04:00:00
# USR1 to this batch shell (B:) 300 s before the time limit; Slurm may deliver it up to a minute early.
#SBATCH --signal=B:USR1@300
#SBATCH --output=gpt-simple-%j.out
#SBATCH --open-mode=append
#
# ---- SITE-SPECIFIC: adapt or delete (examples only; gpt-simple depends on none of them) ----------
##SBATCH --account=my_account
##SBATCH --partition=gpu
##SBATCH --gpus-per-node=8
##SBATCH --cpus-per-task=64
##SBATCH --exclusive
##SBATCH --mem=0
# module load cuda/12.4 nccl
# source /path/to/venv/bin/activate
# export NCCL_SOCKET_IFNAME=ib0
# ---- end of site-specific lines ------------------------------------------------------------------

set -uo pipefail

PYTHON=${PYTHON:-python}
MAX_ATTEMPTS=${GPT_SIMPLE_MAX_ATTEMPTS:-20}
ATTEMPT=${GPT_SIMPLE_CHAIN_ATTEMPT:-1}
SHUTDOWN_TIMEOUT=${GPT_SIMPLE_SHUTDOWN_TIMEOUT:-600}

# ---------------------------------------------------------------------------------------------------
# `bash slurm/resume_chain.sh submit [sbatch options]`: submit the first job and remember the options
# so that every successor is submitted with them too.
if [ "${1:-}" = submit ]; then
  shift
  self=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)/$(basename "${BASH_SOURCE[0]}")
  GPT_SIMPLE_SBATCH_ARGS=$(printf '%q ' "$@")
  export GPT_SIMPLE_SBATCH_ARGS
  unset GPT_SIMPLE_CHAIN_ATTEMPT
  exec sbatch "$@" "$self"
fi

if [ -z "${SLURM_JOB_ID:-}" ]; then
  echo "resume_chain.sh: not inside a SLURM job; submit it with sbatch, or: bash $0 submit [sbatch options]" >&2
  exit 2
fi
JOB=$SLURM_JOB_ID

# $0 is Slurm's spooled copy; the successor is submitted from the path the job was submitted with.
job_field() {  # job_field NAME -> value of NAME= in `scontrol show job`
  scontrol show job "$JOB" 2>/dev/null | tr ' ' '\n' | sed -n "s/^$1=//p" | head -n 1
}
SCRIPT=${GPT_SIMPLE_CHAIN_SCRIPT:-}
if [ -z "$SCRIPT" ]; then
  SCRIPT=$(job_field Command)
  if [ -z "$SCRIPT" ] || [ ! -f "$SCRIPT" ]; then SCRIPT=${SLURM_SUBMIT_DIR:-$PWD}/slurm/resume_chain.sh; fi
fi
GPT_SIMPLE_HOME=${GPT_SIMPLE_HOME:-$(cd "$(dirname "$(readlink -f "$SCRIPT")")/.." && pwd)}
CONFIG=${GPT_SIMPLE_CONFIG:-configs/gpt2.toml}
OUTDIR=${GPT_SIMPLE_OUTPUT_DIR:-outputs/${SLURM_JOB_NAME:-gpt-simple}}
eval "EXTRA_ARGS=(${GPT_SIMPLE_EXTRA_ARGS:-})"
mkdir -p "$OUTDIR/logs"
JOBLOG=$OUTDIR/logs/slurm-$JOB.log

log() {
  local line
  line="$(date '+%Y-%m-%d %H:%M:%S') job=$JOB attempt=$ATTEMPT/$MAX_ATTEMPTS $*"
  echo "[resume_chain] $line"
  echo "$line" >>"$OUTDIR/logs/chain.log"
}

# read_status, run_trainer: shared with the other templates. Loaded from GPT_SIMPLE_HOME, not next to $0
# (Slurm's spooled copy); without it the job fails here, before it queues a successor.
TEMPLATE_LIB=$GPT_SIMPLE_HOME/scripts/template_lib.sh
if [ ! -r "$TEMPLATE_LIB" ] || ! . "$TEMPLATE_LIB"; then
  log "cannot load $TEMPLATE_LIB (GPT_SIMPLE_HOME must be the gpt-simple repository); chain ends" >&2
  exit 1
fi

SUCCESSOR=""
cancel_successor() {
  if [ -n "$SUCCESSOR" ]; then
    scancel "$SUCCESSOR" 2>/dev/null && log "cancelled successor job $SUCCESSOR"
    SUCCESSOR=""
  fi
}

# Signals reaching this shell before or while the trainer runs. They are forwarded once the trainer
# has installed its handlers (a python process that has not would be killed by USR1).
PENDING=""
on_signal() {
  log "received SIG$1"
  PENDING="$PENDING $1"
}
for s in USR1 USR2 TERM INT; do trap "on_signal $s" "$s"; done

# ---------------------------------------------------------------------------------------------------
# 1. Is there anything left to do?
read_status
# held: another live job holds the run's lease. It may be this chain's previous job, killed hard on another
# node, whose lease turns stale within the run's stale limit: wait for that (GPT_SIMPLE_HELD_WAIT seconds).
waited=0
while [ "$ACTION" = held ] && [ "$waited" -lt "${GPT_SIMPLE_HELD_WAIT:-600}" ]; do
  [ "$waited" = 0 ] && log "run held: $REASON; waiting up to ${GPT_SIMPLE_HELD_WAIT:-600}s for it to end"
  sleep 15; waited=$((waited + 15))
  read_status
done
log "start on ${SLURM_JOB_NODELIST:-?} ($SLURM_JOB_NUM_NODES node(s)); run status at start: $STATUS"
case $ACTION in
  start|resume) ;;
  held)   log "not training: $REASON; this job ends without training (its successor, if one is queued, checks again)"
          exit 0 ;;
  done)   log "run already $STATUS; chain ends"; exit 0 ;;
  halted) log "run is HALTED: a human must decide (see $OUTDIR/HALTED); chain ends without training"; exit 0 ;;
  *)      log "run is $STATUS ($REASON); refusing to resume; chain ends"; exit 1 ;;  # failed, or unknown
esac

# 2. Queue the successor now: if this job is killed hard, the chain still goes on.
if [ "$ATTEMPT" -lt "$MAX_ATTEMPTS" ]; then
  sb=(--parsable --dependency="afterany:$JOB" --job-name="${SLURM_JOB_NAME:-gpt-simple}"
      --nodes="${SLURM_JOB_NUM_NODES:-1}")
  limit=$(squeue -h -j "$JOB" -o %l 2>/dev/null)
  case $limit in ''|UNLIMITED|NOT_SET|INVALID) ;; *) sb+=(--time="$limit") ;; esac
  [ -n "${SLURM_JOB_PARTITION:-}" ] && sb+=(--partition="$SLURM_JOB_PARTITION")
  [ -n "${SLURM_JOB_ACCOUNT:-}" ] && sb+=(--account="$SLURM_JOB_ACCOUNT")
  eval "sb+=(${GPT_SIMPLE_SBATCH_ARGS:-})"
  if SUCCESSOR=$(env -u SLURM_JOB_END_TIME GPT_SIMPLE_CHAIN_ATTEMPT=$((ATTEMPT + 1)) \
                 sbatch "${sb[@]}" "$SCRIPT" 2>&1); then
    SUCCESSOR=${SUCCESSOR%%;*}
    log "queued successor job $SUCCESSOR (attempt $((ATTEMPT + 1)), after this job ends)"
  else
    log "WARNING: could not queue a successor ($SUCCESSOR); the chain ends after this job"
    SUCCESSOR=""
  fi
else
  log "attempt cap reached (GPT_SIMPLE_MAX_ATTEMPTS=$MAX_ATTEMPTS): no successor will be queued"
fi

# 3. The deadline. Newer Slurm exports SLURM_JOB_END_TIME; older (e.g. 22.05) does not, and a value
# inherited from the submitting environment would be stale, so this job's own end time wins.
end=$(squeue -h -j "$JOB" -o %e 2>/dev/null)
if end_s=$(date -d "$end" +%s 2>/dev/null) && [ "$end_s" -gt "$(date +%s)" ]; then
  export SLURM_JOB_END_TIME=$end_s
fi
log "deadline: SLURM_JOB_END_TIME=${SLURM_JOB_END_TIME:-unset} (${end:-?})"

# Launch: one process per GPU on every node; torchrun on each node via srun when there are several.
NNODES=${SLURM_JOB_NUM_NODES:-${SLURM_NNODES:-1}}
if [ -z "${NPROC:-}" ]; then
  if [ -n "${SLURM_GPUS_ON_NODE:-}" ]; then NPROC=$SLURM_GPUS_ON_NODE
  elif command -v nvidia-smi >/dev/null 2>&1; then NPROC=$(nvidia-smi -L 2>/dev/null | grep -c '^GPU')
  fi
  [ "${NPROC:-0}" -ge 1 ] 2>/dev/null || NPROC=1
fi
train=("$GPT_SIMPLE_HOME/train.py" --config "$CONFIG" --training.output_dir "$OUTDIR" "${EXTRA_ARGS[@]}")
torchrun=("$PYTHON" -m torch.distributed.run --nproc-per-node="$NPROC" --max-restarts=0
          --signals-to-handle=SIGTERM,SIGINT,SIGUSR1,SIGUSR2 --shutdown-timeout="$SHUTDOWN_TIMEOUT")
USE_SRUN=0
if [ "$NNODES" -gt 1 ] || [ "${GPT_SIMPLE_USE_SRUN:-0}" = 1 ]; then
  USE_SRUN=1
  MASTER_ADDR=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
  MASTER_PORT=${MASTER_PORT:-$((29500 + JOB % 1000))}
  cmd=(srun --nodes="$NNODES" --ntasks="$NNODES" --ntasks-per-node=1 --kill-on-bad-exit=1
       "${torchrun[@]}" --nnodes="$NNODES" --rdzv-backend=c10d --rdzv-id="$JOB"
       --rdzv-endpoint="$MASTER_ADDR:$MASTER_PORT" "${train[@]}")
elif [ "$NPROC" -gt 1 ]; then
  cmd=("${torchrun[@]}" --standalone "${train[@]}")
else
  cmd=("$PYTHON" "${train[@]}")
fi

ready_for() {  # replaces template_lib.sh's: with srun, the trainers run on other nodes
  if [ "$USE_SRUN" = 1 ]; then
    # wait until one of them has written the run state
    [ "$OUTDIR/run_state.json" -nt "$LAUNCH_MARK" ]
  else
    trainer_handles "$1"
  fi
}

LAUNCH_MARK=$OUTDIR/logs/.launch-$JOB
touch "$LAUNCH_MARK"
log "launch: ${cmd[*]}"
log "training output: $JOBLOG"
# Train in the background; a trapped signal is forwarded once the trainer is ready.
run_trainer "$JOBLOG" "${cmd[@]}"
rm -f "$LAUNCH_MARK"

# 4. Decide from the status, not from the exit code (but for 75: another job held the run, see held_after).
read_status
held_after
log "trainer exited with code $RC; run status: $STATUS"
case $ACTION in
  held)  # another job took the run before this one could: not a failure of the run; the successor stays
    log "trainer did not train: $REASON; successor ${SUCCESSOR:-none} stays queued"
    exit 0 ;;
  resume)
    if [ -n "$SUCCESSOR" ]; then log "run $STATUS; successor job $SUCCESSOR resumes it"
    else log "run $STATUS but no successor is queued; resubmit to continue"; fi
    exit 0 ;;
  done)
    log "run $STATUS; chain ends"
    cancel_successor; exit 0 ;;
  halted)
    log "run HALTED: a human must decide (see $OUTDIR/HALTED and docs/orchestration.md); chain ends"
    cancel_successor; exit 0 ;;
  start)
    log "no run state after training (exit code $RC); not resubmitting; inspect $JOBLOG"
    cancel_successor; exit 1 ;;
  *)  # failed, or an action this script does not know
    log "run $STATUS: $REASON; not resubmitting; inspect $JOBLOG"
    cancel_successor; exit 1 ;;
esac
