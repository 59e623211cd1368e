#!/bin/bash
# One node's share of a job (srun runs it once per node): starts torchrun and passes SIGUSR1 and
# SIGTERM on to the training processes, torchrun's children, which then save and exit 0
# (ratplus-pretrain --exit-signal-handler). torchrun itself is not signalled: it would stop
# its workers with a short grace period instead of letting them finish the checkpoint.
"$@" &
launcher=$!
forward() { pkill "-$1" -P "$launcher" 2>/dev/null || true; }
trap 'forward USR1' USR1
trap 'forward TERM' TERM
while true; do
  wait "$launcher"; status=$?
  kill -0 "$launcher" 2>/dev/null || break
done
exit "$status"
