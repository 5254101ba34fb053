"""The training protocol: one Lambda function, three roles, correct under at-least-once delivery.

Roles and their events (design §1; the thesis's keys plus optional ``run``, ``round``, ``mount``
and, on start, ``config``)::

    {"start": true, "workers": N}                        -> run_start
    {"workerno": i, "workers": N, "epochsdone": e}       -> run_worker
    {"combine": true, "workers": N, "epochsdone": e}     -> run_combine
    {"aggregate": true, "shard": s, "workers": N, "epochsdone": e}
                                                         -> run_aggregate (sharded aggregation)
    {"check": true}                                      -> check_stalled (the watchdog)

Events are parsed in :mod:`simulator.handler`. This module is the protocol's public face; each
concept lives in its own module, whose docstring has the details:

* :mod:`simulator.training_config`: TrainingConfig, Schedule (epoch accounting), EventError;
* :mod:`simulator.workspace`: Workspace, the run directory on EFS (layout, first-wins publish);
* :mod:`simulator.invoke`: the events roles send, the Invoker (boto3 by default), the fan-out;
* :mod:`simulator.run_state`: per-process state kept across warm invocations;
* :mod:`simulator.roles`: start, worker and combine, and how they trigger each other;
* :mod:`simulator.watchdog`: check_stalled, the liveness rule;
* :mod:`simulator.progress`: the progress table.
"""

from __future__ import annotations

# A test patches time through this module (simulator.protocol.time.perf_counter).
import time as time

from simulator.invoke import FANOUT_THREADS as FANOUT_THREADS
from simulator.invoke import Boto3Invoker as Boto3Invoker
from simulator.invoke import Context as Context
from simulator.invoke import FanOutError as FanOutError
from simulator.invoke import Invoker as Invoker
from simulator.invoke import aggregate_event as aggregate_event
from simulator.invoke import combine_event as combine_event
from simulator.invoke import fan_out as fan_out
from simulator.invoke import inject_fault as inject_fault
from simulator.invoke import invoke_all as invoke_all
from simulator.invoke import resolve_round as resolve_round
from simulator.invoke import start_event as start_event
from simulator.invoke import target_function as target_function
from simulator.invoke import worker_event as worker_event
from simulator.roles import Deadline as Deadline
from simulator.roles import evaluate as evaluate
from simulator.roles import run_combine as run_combine
from simulator.roles import run_start as run_start
from simulator.roles import run_worker as run_worker
from simulator.roles.combine import fail_run as fail_run
from simulator.roles.combine import run_aggregate as run_aggregate
from simulator.run_state import RunPlan as RunPlan
from simulator.run_state import RunState as RunState
from simulator.run_state import build_model as build_model
from simulator.run_state import load_plan as load_plan
from simulator.run_state import load_run as load_run
from simulator.run_state import progress_for as progress_for
from simulator.training_config import AGGREGATIONS as AGGREGATIONS
from simulator.training_config import DEFAULT_MOUNT as DEFAULT_MOUNT
from simulator.training_config import DEFAULT_RUN as DEFAULT_RUN
from simulator.training_config import FAULT_ACTIONS as FAULT_ACTIONS
from simulator.training_config import FAULT_POINTS as FAULT_POINTS
from simulator.training_config import FUNCTION_NAME as FUNCTION_NAME
from simulator.training_config import MAX_WORKERS as MAX_WORKERS
from simulator.training_config import MOUNT_PATH as MOUNT_PATH
from simulator.training_config import RETRY_DELAYS_S as RETRY_DELAYS_S
from simulator.training_config import RUN_ID as RUN_ID
from simulator.training_config import STALL_SLACK_S as STALL_SLACK_S
from simulator.training_config import EventError as EventError
from simulator.training_config import Fault as Fault
from simulator.training_config import InjectedFault as InjectedFault
from simulator.training_config import Schedule as Schedule
from simulator.training_config import TrainingConfig as TrainingConfig
from simulator.training_config import ceil_div as ceil_div
from simulator.training_config import check_mount as check_mount
from simulator.training_config import check_run_id as check_run_id
from simulator.training_config import default_shards as default_shards
from simulator.watchdog import check_stalled as check_stalled
from simulator.workspace import Workspace as Workspace
from simulator.workspace import finite_or_none as finite_or_none

# isort: split
# Everything else the single-module protocol.py had at its top level stays importable from here,
# so code written against it keeps working: first its private helpers under their old names...
from simulator.invoke import _base as _base
from simulator.roles.combine import _combine_round as _combine_round
from simulator.roles.combine import _decide as _decide
from simulator.roles.combine import _finish as _finish
from simulator.roles.start import _diff as _diff
from simulator.roles.start import _resolve_config as _resolve_config
from simulator.roles.worker import _compute as _compute
from simulator.run_state import _MODEL_INPUTS as _MODEL_INPUTS
from simulator.run_state import _STATES as _STATES
from simulator.run_state import _STATES_GUARD as _STATES_GUARD
from simulator.run_state import _TABLES as _TABLES
from simulator.training_config import _choice as _choice
from simulator.training_config import _int as _int
from simulator.training_config import _real as _real
from simulator.watchdog import _rescue as _rescue
from simulator.watchdog import _rescue_count as _rescue_count
from simulator.workspace import _json_bytes as _json_bytes
from simulator.workspace import _write_file as _write_file

# isort: split
# ...then the names it imported from elsewhere.
from lambda_runtime.efs import ArrivalSet as ArrivalSet
from lambda_runtime.efs import claim as claim
from lambda_runtime.efs import read_json as read_json
from lambda_runtime.efs import read_npy as read_npy
from lambda_runtime.efs import safe_join as safe_join
from simulator.aggregate import combine_gradient_averaging as combine_gradient_averaging
from simulator.aggregate import combine_model_averaging as combine_model_averaging
from simulator.aggregate import partial_sums as partial_sums
from simulator.aggregate import shard_of as shard_of
from simulator.algorithms import ALGORITHMS as ALGORITHMS
from simulator.algorithms import Contribution as Contribution
from simulator.algorithms import SGDConfig as SGDConfig
from simulator.algorithms import SGDConfigError as SGDConfigError
from simulator.algorithms import gradient_contribution as gradient_contribution
from simulator.algorithms import local_sgd_contribution as local_sgd_contribution
from simulator.data import MANIFEST as MANIFEST
from simulator.data import Dataset as Dataset
from simulator.data import batches as batches
from simulator.data import get_dataset as get_dataset
from simulator.data import open_from_efs as open_from_efs
from simulator.data import prepare_on_efs as prepare_on_efs
from simulator.data import shard_indices as shard_indices
from simulator.models import MODEL_NAMES as MODEL_NAMES
from simulator.models import Array as Array
from simulator.models import Model as Model
from simulator.models import get_model as get_model
from simulator.progress import ProgressTable as ProgressTable
from simulator.progress import open_progress as open_progress

# Private helpers that other modules now share, public there, under their old names here too.
_ceil_div = ceil_div
_fail = fail_run
_fault = inject_fault
_finite = finite_or_none
_function = target_function
_invoke_all = invoke_all

__all__ = [
    "DEFAULT_MOUNT",
    "DEFAULT_RUN",
    "Boto3Invoker",
    "Context",
    "Deadline",
    "EventError",
    "FanOutError",
    "Fault",
    "InjectedFault",
    "Invoker",
    "RunPlan",
    "RunState",
    "Schedule",
    "TrainingConfig",
    "Workspace",
    "aggregate_event",
    "check_stalled",
    "combine_event",
    "evaluate",
    "fan_out",
    "load_plan",
    "load_run",
    "run_aggregate",
    "run_combine",
    "run_start",
    "run_worker",
    "worker_event",
]
