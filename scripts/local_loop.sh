#!/usr/bin/env bash
# gpt-simple: train on one machine in a loop of time-boxed attempts until the run is finished.
#
#   scripts/local_loop.sh [extra train.py arguments ...]
#   GPT_SIMPLE_CONFIG=configs/tiny.toml GPT_SIMPLE_MAX_RUNTIME=600 scripts/local_loop.sh --training.max_steps 2000
#
# Every attempt runs the same command; the trainer resumes from the newest checkpoint by itself. What
# happens next is decided from `status.py <output_dir>`, never from the exit code (a graceful stop and a
# finished run both exit 0):
#   COMPLETED          -> stop, exit 0
#   HALTED             -> stop, exit 3 (a data bucket ran dry: a human must decide; see docs/orchestration.md)
#   ERROR / CRASHED    -> stop, exit 1, with the status' reason
#   STOPPED / RUNNING  -> run the next attempt (after GPT_SIMPLE_RETRY_DELAY seconds)
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

status_word() {  # sets STATUS (NONE: no run yet; UNREADABLE: corrupt state) and STATUS_TEXT
  local rc
  STATUS_TEXT=$("$PYTHON" "$GPT_SIMPLE_HOME/status.py" "$OUTDIR" 2>&1)
  rc=$?
  case $rc in
    0) STATUS=$(printf '%s\n' "$STATUS_TEXT" | head -n 1 | tr -d '[:space:]') ;;
    3) STATUS=NONE ;;
    *) STATUS=UNREADABLE ;;
  esac
}
reason_line() {
  local r
  r=$(printf '%s\n' "$STATUS_TEXT" | grep -i -m 1 'reason' || true)
  [ -n "$r" ] || r=$(printf '%s\n' "$STATUS_TEXT" | sed -n 2p)
  printf '%s' "$r"
}

# Returns from the loop when the run needs no further attempt (prints why, sets EXIT).
finished() {
  case $STATUS in
    COMPLETED) log "run COMPLETED"; EXIT=0 ;;
    HALTED) log "run HALTED: a data bucket ran dry and a human must decide (see $OUTDIR/HALTED)."
            log "to continue with the remaining buckets: rerun with --data.allow_bucket_exhaustion true"; EXIT=3 ;;
    ERROR|CRASHED) log "run $STATUS: $(reason_line)"; log "not resuming; inspect $OUTDIR/logs"; EXIT=1 ;;
    UNREADABLE) log "cannot read the run status: $(printf '%s' "$STATUS_TEXT" | tail -n 1)"; EXIT=1 ;;
    *) return 1 ;;
  esac
}

STOP_SIGNAL=""
PENDING=""
TRAINER_PID=""
on_signal() {
  log "received SIG$1: asking the trainer to save and stop; the loop ends after this attempt"
  [ -n "$STOP_SIGNAL" ] || STOP_SIGNAL=$1
  PENDING="$PENDING $1"
}
for s in INT TERM USR1 USR2; do trap "on_signal $s" "$s"; done

caught() {  # caught PID SIGNAME: has PID installed a handler for the signal?
  local num mask
  num=$(kill -l "$2" 2>/dev/null) || return 1
  mask=$(awk '/^SigCgt:/ {print $2}' "/proc/$1/status" 2>/dev/null)
  [ -n "$mask" ] && (( (16#$mask >> (num - 1)) & 1 ))
}
ready_for() {  # the trainer (and torchrun's workers) handle the signal: forwarding it is safe
  local c
  caught "$TRAINER_PID" "$1" || return 1
  for c in $(pgrep -P "$TRAINER_PID" 2>/dev/null); do caught "$c" "$1" || return 1; done
}
forward_pending() {
  local s waited=$1
  for s in $PENDING; do
    if ready_for "$s" || [ "$waited" -ge 180 ]; then
      # INT goes out as TERM: a Ctrl-C in a terminal also reaches the trainer itself, and a second
      # SIGINT tells it to exit at once without saving.
      if [ "$s" = INT ]; then kill -s TERM "$TRAINER_PID" 2>/dev/null; else kill -s "$s" "$TRAINER_PID" 2>/dev/null; fi
      PENDING=${PENDING/ $s/}
    fi
  done
}

run_attempt() {  # run_attempt LOGFILE: one training process, signals forwarded; sets RC
  local logfile=$1 tail_pid waited=0 r
  "${cmd[@]}" >>"$logfile" 2>&1 &
  TRAINER_PID=$!
  tail -n +1 -F --pid="$TRAINER_PID" "$logfile" 2>/dev/null &
  tail_pid=$!
  RC=""
  while kill -0 "$TRAINER_PID" 2>/dev/null; do
    if [ -n "$PENDING" ]; then
      forward_pending "$waited"
      if [ -n "$PENDING" ]; then sleep 1; waited=$((waited + 1)); continue; fi
    fi
    wait "$TRAINER_PID"
    RC=$?
  done
  if [ -z "$RC" ] || [ "$RC" -gt 128 ]; then
    wait "$TRAINER_PID" 2>/dev/null
    r=$?
    [ "$r" = 127 ] || RC=$r
  fi
  wait "$tail_pid" 2>/dev/null
  TRAINER_PID=""
}

train=("$GPT_SIMPLE_HOME/train.py" --config "$CONFIG" --training.output_dir "$OUTDIR" "${EXTRA_ARGS[@]}")
if [ "$NPROC" -gt 1 ]; then
  cmd=("$PYTHON" -m torch.distributed.run --standalone --nproc-per-node="$NPROC" --max-restarts=0
       --signals-to-handle=SIGTERM,SIGINT,SIGUSR1,SIGUSR2 --shutdown-timeout="$SHUTDOWN_TIMEOUT" "${train[@]}")
else
  cmd=("$PYTHON" "${train[@]}")
fi

EXIT=""
status_word
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
  run_attempt "$logfile"
  status_word
  log "attempt $attempt: trainer exit code $RC; run status $STATUS"
  if finished; then exit "$EXIT"; fi
  if [ "$STATUS" = NONE ]; then
    log "the trainer left no run state (exit code $RC); see $logfile"
    exit 1
  fi
  [ -n "$STOP_SIGNAL" ] || [ "$RETRY_DELAY" = 0 ] || sleep "$RETRY_DELAY"
done
