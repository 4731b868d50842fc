# shellcheck shell=bash
# gpt-simple: shell functions shared by the orchestrator templates (scripts/local_loop.sh,
# slurm/resume_chain.sh, and the entrypoint in k8s/job.yaml). Sourced, never run:
#     . "$GPT_SIMPLE_HOME/scripts/template_lib.sh"
# (from GPT_SIMPLE_HOME, never relative to $0: under SLURM, $0 is Slurm's spooled copy of the script).
#
# The sourcing script provides:
#   PYTHON, GPT_SIMPLE_HOME, OUTDIR   the interpreter, the repository (status.py), the run directory
#   log MESSAGE...                    its own logger
#   PENDING=""                        signal names its traps append (" USR1"), forwarded by run_trainer
#   ready_for SIGNAME                 optional: replaces the definition below, after sourcing this file
# and gets:
#   read_status                       sets STATUS, ACTION, REASON
#   run_trainer LOGFILE COMMAND...    sets RC (and TRAINER_PID while the trainer runs)
#   held_after                        after run_trainer + read_status: ACTION=held when the trainer exited 75

# STATUS (word), ACTION and REASON from the one line `status.py OUTDIR --decision` prints (docs/orchestration.md)
read_status() {
  IFS=$'\t' read -r STATUS ACTION REASON <<<"$("$PYTHON" "$GPT_SIMPLE_HOME/status.py" "$OUTDIR" --decision)"
  [ -n "$REASON" ] || { STATUS=UNREADABLE ACTION=failed REASON="status.py gave no decision (its error is above)"; }
}

EXIT_HELD=75  # the trainer's exit code when another live job holds the run's lease (gpt_simple/lease.py)

# After an attempt (run_trainer, then read_status): a trainer that exited EXIT_HELD found another live job
# holding the run and wrote nothing. read_status says `held` while that job lives; if it has ended since (or
# never wrote a state), the status alone would read resume or start, and the attempt would count as progress,
# or as a failure (no state after an attempt). It was neither. Under torchrun RC is torchrun's own (1), so
# only the lease, through read_status, tells.
held_after() {
  if [ "${RC:-}" = "$EXIT_HELD" ] && { [ "$ACTION" = start ] || [ "$ACTION" = resume ]; }; then
    ACTION=held
    REASON="the trainer found another live job holding this run (exit $EXIT_HELD) and did not train; the run is now $STATUS"
  fi
}

TRAINER_PID=""

caught() {  # caught PID SIGNAME: has PID installed a handler for the signal?
  local num mask
  num=$(kill -l "$2" 2>/dev/null) || return 1
  mask=$(awk '/^SigCgt:/ {print $2}' "/proc/$1/status" 2>/dev/null)
  [ -n "$mask" ] && (( (16#$mask >> (num - 1)) & 1 ))
}

signal_lost() {  # signal_lost SIGNAME: this shell inherited SIGNAME ignored (a trap cannot catch it)
  local num ign
  num=$(kill -l "$1" 2>/dev/null) || return 1
  ign=$(awk '/^SigIgn:/ {print $2}' "/proc/$$/status" 2>/dev/null)
  [ -n "$ign" ] && (( (16#$ign >> (num - 1)) & 1 ))
}

trainer_handles() {  # trainer_handles SIGNAME: the trainer (and torchrun's workers) handle the signal
  local c
  caught "$TRAINER_PID" "$1" || return 1
  for c in $(pgrep -P "$TRAINER_PID" 2>/dev/null); do caught "$c" "$1" || return 1; done
}

ready_for() {  # ready_for SIGNAME: may the signal be forwarded to the trainer now? (a script may redefine it)
  trainer_handles "$1"
}

# Forward the signals in PENDING that the trainer is ready for (a python process that has not installed
# its handlers yet would be killed by USR1), or all of them once WAITED reaches 180 seconds.
forward_pending() {  # forward_pending WAITED
  local s target waited=$1
  for s in $PENDING; do
    if ready_for "$s" || [ "$waited" -ge 180 ]; then
      target=$s
      # INT goes out as TERM: the trainer reads a second SIGINT as "exit now, no save" (a Ctrl-C in a
      # terminal reaches the trainer itself too), and srun answers a single SIGINT with a status report.
      [ "$s" = INT ] && target=TERM
      log "forwarding SIG$target to the trainer (pid $TRAINER_PID)"
      kill -s "$target" "$TRAINER_PID" 2>/dev/null
      PENDING=${PENDING/ $s/}
    fi
  done
}

# run_trainer LOGFILE COMMAND...: run COMMAND in the background, its output appended to LOGFILE and shown
# on stdout; forward trapped signals (PENDING) once the trainer is ready; wait. Sets RC, COMMAND's exit code.
run_trainer() {
  local logfile=$1 tail_pid waited=0 r
  shift
  "$@" >>"$logfile" 2>&1 &
  TRAINER_PID=$!
  # -s: how often tail checks that the trainer is alive (its default, a second, delayed every attempt's end)
  tail -n +1 -F -s 0.1 --pid="$TRAINER_PID" "$logfile" 2>/dev/null &
  tail_pid=$!
  # A trapped signal interrupts `wait`; it is forwarded once the trainer is ready.
  RC=""
  while kill -0 "$TRAINER_PID" 2>/dev/null; do
    if [ -n "$PENDING" ]; then
      forward_pending "$waited"
      if [ -n "$PENDING" ]; then sleep 1; waited=$((waited + 1)); continue; fi
    fi
    wait "$TRAINER_PID"
    RC=$?
  done
  if [ -z "$RC" ] || [ "$RC" -gt 128 ]; then  # the last wait was interrupted, or never ran
    wait "$TRAINER_PID" 2>/dev/null
    r=$?
    [ "$r" = 127 ] || RC=$r
  fi
  wait "$tail_pid" 2>/dev/null  # tail stops by itself once the trainer is gone
  TRAINER_PID=""
}
