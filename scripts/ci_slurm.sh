#!/usr/bin/env bash
# Bring up (or tear down) a real one-node SLURM cluster on this machine, so the SLURM template
# (slurm/resume_chain.sh) can be tested end to end. Meant for CI and for a developer box; never for a
# real cluster.
#
#   scripts/ci_slurm.sh up       install slurm + munge from apt if missing (root), write a one-node
#                                slurm.conf, start munged/slurmctld/slurmd, wait until the node is idle
#   scripts/ci_slurm.sh down     stop the daemons this script started (found through its pid files)
#   scripts/ci_slurm.sh check    exit 0 when a partition answers and a node is idle, else 1
#
# Exit codes of `up`: 0 ready; 77 impossible here (not root, no apt-get, install refused) -> callers
# should skip; 1 installed but did not come up (a real failure: read $CI_SLURM_DIR/log).
# State, logs and pid files live under $CI_SLURM_DIR (default /tmp/gpt-simple-slurm).
# Debian 12 ships Slurm 22.05, which does not export SLURM_JOB_END_TIME to jobs; the template derives it.
set -euo pipefail

DIR=${CI_SLURM_DIR:-/tmp/gpt-simple-slurm}
CONF=/etc/slurm/slurm.conf

say() { echo "ci_slurm: $*" >&2; }

is_ready() {
  command -v sinfo >/dev/null 2>&1 || return 1
  sinfo -h -o %t 2>/dev/null | grep -qE '^(idle|mix)' 
}

alive() {  # alive PIDFILE
  [ -f "$1" ] && kill -0 "$(cat "$1")" 2>/dev/null
}

install_packages() {
  if command -v slurmctld >/dev/null 2>&1 && command -v slurmd >/dev/null 2>&1 \
     && command -v sbatch >/dev/null 2>&1 && command -v munged >/dev/null 2>&1; then
    return 0
  fi
  if ! command -v apt-get >/dev/null 2>&1; then
    say "slurm is not installed and there is no apt-get to install it"; exit 77
  fi
  say "installing slurmctld slurmd slurm-client munge with apt-get"
  if ! apt-get update -qq >"$DIR/log/apt.log" 2>&1 \
     || ! DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends \
            slurmctld slurmd slurm-client munge >>"$DIR/log/apt.log" 2>&1; then
    tail -n 20 "$DIR/log/apt.log" >&2 || true
    say "apt-get could not install slurm (see $DIR/log/apt.log)"; exit 77
  fi
}

write_conf() {
  local host cpus mem_mb
  host=$(hostname -s)
  cpus=$(nproc)
  mem_mb=$(awk '/^MemTotal:/ {print int($2 / 1024 * 3 / 4)}' /proc/meminfo)
  mkdir -p /etc/slurm
  # NodeAddr/ctld address pinned to loopback: a CI container's hostname need not resolve.
  cat >"$CONF" <<CONF
# Written by gpt-simple scripts/ci_slurm.sh: a throw-away one-node test cluster.
ClusterName=gptsimple
SlurmctldHost=${host}(127.0.0.1)
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
StateSaveLocation=${DIR}/state
SlurmdSpoolDir=${DIR}/spool
SlurmctldPidFile=${DIR}/slurmctld.pid
SlurmdPidFile=${DIR}/slurmd.pid
SlurmctldLogFile=${DIR}/log/slurmctld.log
SlurmdLogFile=${DIR}/log/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SchedulerType=sched/backfill
JobCompType=jobcomp/filetxt
JobCompLoc=${DIR}/log/jobcomp.txt
AccountingStorageType=accounting_storage/none
KillWait=10
MinJobAge=600
ReturnToService=2
NodeName=${host} NodeAddr=127.0.0.1 CPUs=${cpus} RealMemory=${mem_mb} State=UNKNOWN
PartitionName=debug Nodes=${host} Default=YES MaxTime=INFINITE State=UP
CONF
}

up() {
  if [ "$(id -u)" != 0 ]; then
    if is_ready; then say "a SLURM cluster already answers"; return 0; fi
    say "needs root to install and start SLURM"; exit 77
  fi
  mkdir -p "$DIR"/{state,spool,log}
  install_packages
  write_conf
  mkdir -p /run/munge /etc/munge
  if [ ! -s /etc/munge/munge.key ]; then
    if [ -x /usr/sbin/mungekey ]; then /usr/sbin/mungekey -c -k /etc/munge/munge.key
    else dd if=/dev/urandom of=/etc/munge/munge.key bs=1 count=1024 status=none; fi
  fi
  chown munge:munge /run/munge /etc/munge/munge.key
  chmod 0400 /etc/munge/munge.key
  if ! pgrep -x munged >/dev/null; then
    runuser -u munge -- /usr/sbin/munged --pid-file=/run/munge/munged.pid
    echo started >"$DIR/munged.ours"
  fi
  alive "$DIR/slurmctld.pid" || /usr/sbin/slurmctld
  alive "$DIR/slurmd.pid" || /usr/sbin/slurmd
  local i
  for i in $(seq 90); do
    if is_ready; then sinfo >&2; return 0; fi
    # a node left DOWN/DRAIN by an earlier run of this script: put it back
    if [ "$i" = 10 ]; then scontrol update nodename="$(hostname -s)" state=resume 2>/dev/null || true; fi
    sleep 1
  done
  say "the node did not become idle; logs under $DIR/log"
  tail -n 20 "$DIR/log/slurmctld.log" "$DIR/log/slurmd.log" >&2 2>/dev/null || true
  exit 1
}

stop_pidfile() {
  local f=$1 pid
  [ -f "$f" ] || return 0
  pid=$(cat "$f")
  if kill "$pid" 2>/dev/null; then
    for _ in $(seq 40); do kill -0 "$pid" 2>/dev/null || break; sleep 0.25; done
  fi
  rm -f "$f"
}

down() {
  stop_pidfile "$DIR/slurmd.pid"
  stop_pidfile "$DIR/slurmctld.pid"
  if [ -f "$DIR/munged.ours" ]; then stop_pidfile /run/munge/munged.pid; rm -f "$DIR/munged.ours"; fi
}

case "${1:-up}" in
  up) up ;;
  down) down ;;
  check) is_ready ;;
  *) echo "usage: $0 up|down|check" >&2; exit 2 ;;
esac
