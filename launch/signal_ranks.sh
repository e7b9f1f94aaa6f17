#!/usr/bin/env bash
# Send a signal (default USR1) to this node's training ranks of a run, found by the pid files each rank writes
# (<run dir>/pids/rank<R>.pid = "<hostname> <pid>"). The ranks then checkpoint at the next step boundary and exit 0.
# Launchers (deepspeed, torchrun) kill their children on SIGTERM instead of forwarding it: signal the ranks.
#   launch/signal_ranks.sh RUN_DIR [SIGNAL]
#   srun --overlap --ntasks-per-node=1 launch/signal_ranks.sh /shared/runs/exp1 USR1    # every node of a job
set -uo pipefail
run_dir=${1:?usage: launch/signal_ranks.sh RUN_DIR [SIGNAL]}
sig=${2:-USR1}
host=$(hostname)
sent=0
for f in "$run_dir"/pids/rank*.pid; do
  [[ -f "$f" ]] || continue
  read -r pid_host pid < "$f" || continue
  if [[ "$pid_host" == "$host" ]] && kill -0 "$pid" 2>/dev/null; then
    kill -s "$sig" "$pid" && sent=$((sent + 1))
  fi
done
echo "signal_ranks: sent SIG$sig to $sent rank(s) on $host"
