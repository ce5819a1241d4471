#!/usr/bin/env bash
# A real SLURM on this one machine, for the tests in tests/slurm (and for trying launch/pretrain.sh):
# Debian's slurm-wlm 22.05 with munge, no systemd, no cgroups, no accounting; two emulated nodes
# (`slurmd -N node1`, `slurmd -N node2`, ports 17001/17002, both 127.0.0.1) in one partition, so a job
# asks for one node or for two.
#
#   tests/slurm/cluster.sh install   # apt-get install slurm-wlm munge, if missing (root; idempotent)
#   tests/slurm/cluster.sh start     # start whatever of munged/slurmctld/slurmd is not running; print the
#                                    # SLURM_CONF to export; exit 0 once both nodes are idle
#   tests/slurm/cluster.sh stop      # stop only the daemons this script started
#   tests/slurm/cluster.sh env       # the line to eval: export SLURM_CONF=...
#
# State, logs and slurm.conf live in $MEGAMOBI_SLURM_DIR (default /tmp/megamobi-slurm). Exit status
# 3 from install/start means SLURM cannot be installed or started here (the tests then skip, saying why).
set -euo pipefail

dir=${MEGAMOBI_SLURM_DIR:-/tmp/megamobi-slurm}
conf=$dir/slurm.conf
export SLURM_CONF=$conf
nodes="node1 node2"
conf_changed=""

say() { echo "tests/slurm/cluster.sh: $*" >&2; }

install_slurm() {
  if command -v slurmctld >/dev/null && command -v slurmd >/dev/null && command -v sbatch >/dev/null \
     && command -v munged >/dev/null; then
    return 0
  fi
  if [ "$(id -u)" != 0 ] || ! command -v apt-get >/dev/null; then
    say "slurm-wlm is not installed and cannot be installed here (needs root and apt-get)"
    exit 3
  fi
  say "installing slurm-wlm and munge (apt-get, about 15 s)"
  if ! { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
         slurm-wlm munge; } >"${TMPDIR:-/tmp}/megamobi-slurm-apt.log" 2>&1; then
    say "apt-get could not install slurm-wlm munge; see ${TMPDIR:-/tmp}/megamobi-slurm-apt.log"
    exit 3
  fi
}

write_conf() {
  mkdir -p "$dir/state" "$dir/spool" "$dir/log"
  local host
  host=$(hostname -s)
  cat >"$conf.tmp" <<EOF
# Written by tests/slurm/cluster.sh: one host, two emulated nodes, no cgroups, no accounting.
ClusterName=megamobi-ci
SlurmctldHost=$host(127.0.0.1)
SlurmctldPort=16817
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
# A requeued job waits cred_expire seconds before it may start again (default 120): short for tests.
AuthInfo=cred_expire=10
StateSaveLocation=$dir/state
SlurmdSpoolDir=$dir/spool/%n
SlurmctldPidFile=$dir/slurmctld.pid
SlurmdPidFile=$dir/slurmd-%n.pid
SlurmctldLogFile=$dir/log/slurmctld.log
SlurmdLogFile=$dir/log/slurmd-%n.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SchedulerType=sched/backfill
# Schedule every 2 s (default 60): a requeued job's begin time passes without an event that would wake it.
SchedulerParameters=sched_interval=2,bf_interval=2
SlurmdParameters=config_overrides
MpiDefault=none
MailProg=/bin/true
ReturnToService=2
# Time the ranks get between a cancel's SIGTERM and SIGKILL (a checkpoint save must fit).
KillWait=60
# A requeued job may start again at once (the tests wait for it).
MinJobAge=300
NodeName=node1 NodeHostname=$host NodeAddr=127.0.0.1 Port=17001 CPUs=2 State=UNKNOWN
NodeName=node2 NodeHostname=$host NodeAddr=127.0.0.1 Port=17002 CPUs=2 State=UNKNOWN
PartitionName=ci Nodes=node1,node2 Default=YES MaxTime=INFINITE State=UP OverSubscribe=FORCE:4
EOF
  if ! cmp -s "$conf.tmp" "$conf"; then
    mv "$conf.tmp" "$conf"
    conf_changed=1
  else
    rm -f "$conf.tmp"
  fi
}

# A daemon is alive when its pid file names a running process (a killed daemon that nobody reaped
# is a zombie: kill -0 still succeeds on it, so ask ps for its state).
alive() { [ -f "$1" ] && ps -o stat= -p "$(cat "$1")" 2>/dev/null | grep -qv '^Z'; }

# Remember what this script started, so that `stop` never touches anyone else's daemons.
started() { echo "$1" >>"$dir/started"; }

start_munge() {
  if munge -n 2>/dev/null | unmunge >/dev/null 2>&1; then return 0; fi
  [ -f /etc/munge/munge.key ] || { mungekey --create 2>/dev/null || dd if=/dev/urandom of=/etc/munge/munge.key bs=1024 count=1 status=none; }
  chown munge:munge /etc/munge/munge.key && chmod 400 /etc/munge/munge.key
  install -d -o munge -g munge -m 755 /run/munge
  install -d -o munge -g munge -m 700 /var/lib/munge /var/log/munge
  su -s /bin/sh munge -c "/usr/sbin/munged --pid-file=/run/munge/munged.pid" || { say "munged did not start"; exit 3; }
  started /run/munge/munged.pid
  for _ in $(seq 50); do munge -n 2>/dev/null | unmunge >/dev/null 2>&1 && return 0; sleep 0.1; done
  say "munged started but does not answer"; exit 3
}

hosts_entries() {
  # c10d needs the node names to resolve; otherwise a rendezvous on node1 cannot find its master.
  for n in $nodes; do
    getent hosts "$n" >/dev/null || echo "127.0.0.1 $n  # added by megamobi tests/slurm/cluster.sh" >>/etc/hosts
  done
}

start() {
  install_slurm
  write_conf
  hosts_entries
  start_munge
  if [ -n "${conf_changed:-}" ] && alive "$dir/slurmctld.pid"; then
    scontrol reconfigure >/dev/null 2>&1 || true
  fi
  if ! alive "$dir/slurmctld.pid"; then
    # -c: forget jobs and node states of an earlier cluster whose daemons were killed (a CI machine
    # reused after a session): a stale pending or requeued job must not take the nodes.
    slurmctld -c -f "$conf" || { say "slurmctld did not start; see $dir/log/slurmctld.log"; exit 3; }
    started "$dir/slurmctld.pid"
  fi
  for n in $nodes; do
    if ! alive "$dir/slurmd-$n.pid"; then
      mkdir -p "$dir/spool/$n"
      slurmd -c -f "$conf" -N "$n" || { say "slurmd -N $n did not start; see $dir/log/slurmd-$n.log"; exit 3; }
      started "$dir/slurmd-$n.pid"
    fi
  done
  for _ in $(seq 150); do
    if [ "$(sinfo -h -N -o '%N %t' 2>/dev/null | grep -cE ' (idle|mix|alloc)$' || true)" = 2 ]; then
      echo "export SLURM_CONF=$conf"
      return 0
    fi
    scontrol update nodename=node1,node2 state=resume >/dev/null 2>&1 || true
    sleep 0.2
  done
  say "the nodes did not become idle: $(sinfo -N 2>&1 | tr '\n' ' '); see $dir/log"
  exit 3
}

stop() {
  [ -f "$dir/started" ] || return 0
  tac "$dir/started" | while read -r pidfile; do
    if alive "$pidfile"; then kill "$(cat "$pidfile")" 2>/dev/null || true; fi
  done
  rm -f "$dir/started"
}

case "${1:-}" in
  install) install_slurm ;;
  start) start ;;
  stop) stop ;;
  env) echo "export SLURM_CONF=$conf" ;;
  *) sed -n '2,15p' "$0" | cut -c3-; exit 2 ;;
esac
