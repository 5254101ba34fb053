"""The three roles of the training function, correct under at-least-once delivery.

    {"start": true, "workers": N}                        -> run_start    (roles/start.py)
    {"workerno": i, "workers": N, "epochsdone": e}       -> run_worker   (roles/worker.py)
    {"combine": true, "workers": N, "epochsdone": e}     -> run_combine  (roles/combine.py)

Triggers: a worker publishes its result, then adds its id to the round's ArrivalSet; whoever
sees the set complete (the completing add, or a later duplicate that still finds the combine
unclaimed) tries ``claim(combine-<r>)``; only the winner invokes the combine. The combine is
idempotent; whoever completes it tries ``claim(fanout-<r+1>)`` and only the winner invokes the
N workers of the next round. The combine of round ``r`` turns weights ``r`` into ``r + 1`` and,
after the fan-out, deletes weights and results older than the ``history`` newest rounds; round
``r`` counts as done while weights ``r + 1`` exist or once ``fanout-<r+1>`` is claimed (pruning
comes later), so a late duplicate of any old round is recognised and ignored.
"""

from __future__ import annotations

from simulator.roles.combine import evaluate as evaluate
from simulator.roles.combine import run_combine as run_combine
from simulator.roles.start import run_start as run_start
from simulator.roles.worker import Deadline as Deadline
from simulator.roles.worker import run_worker as run_worker

__all__ = ["Deadline", "evaluate", "run_combine", "run_start", "run_worker"]
