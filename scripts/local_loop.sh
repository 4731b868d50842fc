#!/usr/bin/env bash
# gpt-simple: train on one machine in a loop of time-boxed attempts until the run is finished.
#
#   scripts/local_loop.sh [extra train.py arguments ...]
#   GPT_SIMPLE_CONFIG=configs/tiny.toml GPT_SIMPLE_MAX_RUNTIME=600 scripts/local_loop.sh --training.max_steps 2000
#
# Every attempt runs the same command; the trainer resumes from the newest checkpoint by itself. What
# happens next is decided by `status.py <output_dir> --decision`, never from the exit code (a graceful stop
# and a finished run both exit 0). Its action (status words in parentheses):
#   done    (COMPLETED)                    -> stop, exit 0
#   halted  (HALTED)                       -> stop, exit 3 (a data bucket ran dry: a human must decide)
#   failed  (ERROR, CRASHED, unreadable)   -> stop, exit 1, with the status' reason
#   resume  (STOPPED, RUNNING)             -> run the next attempt (after GPT_SIMPLE_RETRY_DELAY seconds)
#   held    (another live job holds the run's lease, or the trainer exited 75 for that reason)
#                                          -> do not train, exit 5 (neither success nor failure)
#   start   (no run yet)                   -> the first attempt; after an attempt: exit 1 (no state was written)
# More than GPT_SIMPLE_MAX_ATTEMPTS attempts -> stop, exit 4 (the run is resumable: start the loop again).
# SIGINT/SIGTERM/SIGUSR1 to this script: the trainer is asked to save and stop, and the loop ends with
# exit 128+signal once it has (run the loop again to resume).
#
# Settings (environment):
#   GPT_SIMPLE_CONFIG        config file                          (default configs/tiny.toml)
#   GPT_SIMPLE_OUTPUT_DIR    run directory (training.output_dir)   (default outputs/local)
#   GPT_SIMPLE_MAX_RUNTIME   seconds per attempt; read by the trainer itself (default: unset, no limit)
#   GPT_SIMPLE_MAX_ATTEMPTS  attempts of this loop                  (default 100)
#   GPT_SIMPLE_RETRY_DELAY   seconds between attempts               (default 5)
#   GPT_SIMPLE_EXTRA_ARGS    more train.py arguments, shell-quoted (in addition to the command line)
#   NPROC                    processes; > 1 launches torchrun --standalone (default 1)
#   GPT_SIMPLE_SHUTDOWN_TIMEOUT  torchrun's wait for workers after a forwarded signal (default 600)
#   PYTHON                   python interpreter                   (default python)
#   GPT_SIMPLE_HOME          repository with train.py/status.py     (default: this script's ../)
# Logs: <output_dir>/logs/attempt-NNN.log per attempt (numbering continues across loops), also shown on
# stdout; <output_dir>/logs/loop.log gets one line per decision.
set -uo pipefail

PYTHON=${PYTHON:-python}
GPT_SIMPLE_HOME=${GPT_SIMPLE_HOME:-$(cd "$(dirname "$(readlink -f "${BASH_SOURCE[0]}")")/.." && pwd)}
TEMPLATE_LIB=$GPT_SIMPLE_HOME/scripts/template_lib.sh  # read_status, run_trainer: shared with the other templates
if [ ! -r "$TEMPLATE_LIB" ] || ! . "$TEMPLATE_LIB"; then
  echo "[local_loop] cannot load $TEMPLATE_LIB (GPT_SIMPLE_HOME must be the gpt-simple repository); not training" >&2
  exit 1
fi
CONFIG=${GPT_SIMPLE_CONFIG:-configs/tiny.toml}
OUTDIR=${GPT_SIMPLE_OUTPUT_DIR:-outputs/local}
MAX_ATTEMPTS=${GPT_SIMPLE_MAX_ATTEMPTS:-100}
RETRY_DELAY=${GPT_SIMPLE_RETRY_DELAY:-5}
NPROC=${NPROC:-1}
SHUTDOWN_TIMEOUT=${GPT_SIMPLE_SHUTDOWN_TIMEOUT:-600}
eval "EXTRA_ARGS=(${GPT_SIMPLE_EXTRA_ARGS:-} \"\$@\")"

mkdir -p "$OUTDIR/logs"
log() {
  echo "[local_loop] $*"
  echo "$(date '+%Y-%m-%d %H:%M:%S') $*" >>"$OUTDIR/logs/loop.log"
}

# Returns from the loop when the run needs no further attempt (prints why, sets EXIT).
finished() {
  case $ACTION in
    start|resume) return 1 ;;
    held) log "not training: $REASON (another job trains this run; this loop ends)"; EXIT=5 ;;
    done) log "run $STATUS"; EXIT=0 ;;
    halted) log "run HALTED: a data bucket ran dry and a human must decide (see $OUTDIR/HALTED)."
            log "to continue with the remaining buckets: rerun with --data.allow_bucket_exhaustion true"; EXIT=3 ;;
    *) log "run $STATUS: $REASON"; log "not resuming; inspect $OUTDIR/logs"; EXIT=1 ;;  # failed, or unknown
  esac
}

STOP_SIGNAL=""
PENDING=""
on_signal() {
  log "received SIG$1: asking the trainer to save and stop; the loop ends after this attempt"
  [ -n "$STOP_SIGNAL" ] || STOP_SIGNAL=$1
  PENDING="$PENDING $1"
}
for s in INT TERM USR1 USR2; do trap "on_signal $s" "$s"; done
# A signal ignored when this shell started (inherited: e.g. a `loop.sh &` in a script ignores SIGINT) cannot be
# trapped: say so, rather than let a Ctrl-C or a scheduler's signal be lost without a word.
for s in INT TERM USR1 USR2; do
  if signal_lost "$s"; then
    log "warning: SIG$s is ignored in this shell (inherited from its parent): it cannot stop this loop"
  fi
done

train=("$GPT_SIMPLE_HOME/train.py" --config "$CONFIG" --training.output_dir "$OUTDIR" "${EXTRA_ARGS[@]}")
if [ "$NPROC" -gt 1 ]; then
  cmd=("$PYTHON" -m torch.distributed.run --standalone --nproc-per-node="$NPROC" --max-restarts=0
       --signals-to-handle=SIGTERM,SIGINT,SIGUSR1,SIGUSR2 --shutdown-timeout="$SHUTDOWN_TIMEOUT" "${train[@]}")
else
  cmd=("$PYTHON" "${train[@]}")
fi

EXIT=""
read_status
if finished; then exit "$EXIT"; fi
log "run status: $STATUS; config $CONFIG; output $OUTDIR; GPT_SIMPLE_MAX_RUNTIME=${GPT_SIMPLE_MAX_RUNTIME:-unset}"

attempt=0
while :; do
  if [ -n "$STOP_SIGNAL" ]; then
    log "stopped on SIG$STOP_SIGNAL; the run is $STATUS: start the loop again to resume"
    exit $((128 + $(kill -l "$STOP_SIGNAL")))
  fi
  attempt=$((attempt + 1))
  if [ "$attempt" -gt "$MAX_ATTEMPTS" ]; then
    log "attempt cap reached (GPT_SIMPLE_MAX_ATTEMPTS=$MAX_ATTEMPTS); run is $STATUS and resumable: start the loop again"
    exit 4
  fi
  n=$(( $(find "$OUTDIR/logs" -maxdepth 1 -name 'attempt-*.log' | wc -l) + 1 ))
  logfile=$(printf '%s/logs/attempt-%03d.log' "$OUTDIR" "$n")
  log "attempt $attempt/$MAX_ATTEMPTS: ${cmd[*]} (log $logfile)"
  run_trainer "$logfile" "${cmd[@]}"
  read_status
  held_after  # exit 75: another job held the run; not progress, not a failure
  log "attempt $attempt: trainer exit code $RC; run status $STATUS"
  if finished; then exit "$EXIT"; fi
  if [ "$ACTION" = start ]; then
    log "the trainer left no run state (exit code $RC); see $logfile"
    exit 1
  fi
  [ -n "$STOP_SIGNAL" ] || [ "$RETRY_DELAY" = 0 ] || sleep "$RETRY_DELAY"
done
