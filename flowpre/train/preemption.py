"""Preemption: SIGTERM or SIGUSR1 ends the run cleanly at the next step boundary.

Clusters give notice before they take nodes away: SLURM sends SIGTERM (or, with
`--signal=USR1@120`, SIGUSR1 two minutes ahead) and kills the job after a grace period;
Kubernetes sends SIGTERM. The handler only records the signal. The training loop folds
the record into the one all-reduce it does each step (nonfinite.StepGuard.agree), so all
ranks learn it at the same step even when only some of them were signalled (a node-local
launcher, a signal racing a step), finish that step, write a checkpoint, print where it is
and exit 0; `train.resume=auto` continues exactly (bitwise on CPU).

Checking every step rather than every few: the check is a 2-float all-reduce that shares a
step's existing host sync (DeepSpeed syncs on the grad norm each step), microseconds against
a step of tenths of a second, and every step of delay is taken from the grace period.
"""
import signal
import sys

SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


class Preemption:
    def __init__(self, rank=0):
        self.rank, self.signal, self._previous = rank, None, {}
        for sig in SIGNALS:
            try:
                self._previous[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread (an embedding application): leave signals alone
                pass

    def _handle(self, signum, frame):
        if self.signal is None:
            self.signal = signal.Signals(signum).name
            # one write, so that ranks signalled together keep their lines apart (as flowpre.cli)
            sys.stderr.write(f"flowpre: rank {self.rank} got {self.signal}: finishing this step, then checkpointing\n")
            sys.stderr.flush()

    @property
    def requested(self):
        return self.signal is not None

    def restore(self):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous = {}
