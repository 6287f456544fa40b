"""The one executor: every stage runs its units through here, and only here is Ray started.

A stage is a list of numbered units (a shard of samples, a chunk of prompts, an index shard) and
a function, or a class for a model loaded once per actor, that does one unit:

    fn(index, **kwargs) -> pa.Table | (pa.Table, dict) | dict

A returned table is written here as the unit's Parquet file (a dict beside it goes into the
unit's marker: what the unit cost, say); a dict alone means the function wrote
the unit's files itself (e.g. a FAISS shard) and is the unit's metadata. Either way the runner
writes the unit's marker afterwards (memex/storage.py StageFolder), the same convention for run
folders and the index. `run_tasks` / `run_actor_pool` are datatrove's executor loop on Ray:

  1. skip units whose marker exists (`is_rank_completed`);
  2. dispatch the rest: one Ray task each (a window of them in flight, `window_for`), or a Ray Data
     actor pool (model in `__init__`);
  3. each unit, when done, writes its files then its marker (`mark_rank_as_completed`);
  4. check that none is missing (a unit whose task returned its marker counts without a listing): a unit
     that did not complete fails the stage, naming the fix.
The stage writes its own `_SUCCESS.json` (its summary) after that; it knows what to count.
`resources.executor=local` swaps step 2 for a loop in this process (`run_here`; an actor pool's
worker built once): the same units, files and markers, and no Ray (datatrove's local executor).

Units done in the driver (`run_here`: the match stage's, whose steps go to Ray) call a `Resident`
worker for their heavy steps: one long-lived Ray actor that loads its model or data once (the
match stage's embedder and index), where a task per unit would reload it per unit.

Ray is imported inside the functions below and nowhere else in memex/, so every module, and the
unit functions themselves, import and test without a cluster.

The console (memex/console.py): each stage is one progress line; under the `memex` command Ray's
own output (start-up, Ray Data's logs and progress, the workers' stdout and stderr, the raylet's
error reports) goes to the command's log file instead. A unit that fails on Ray fails the stage
with one line naming the root cause, `<stage> failed: OSError: ... (full traceback: <file>)`, the
full traceback written to <run folder>/logs/ (memex/layout.py `log_path`): `UnitFailed`.
"""

from __future__ import annotations

import importlib
import itertools
import logging
import os
import re
import socket
import time
import traceback
import uuid
from contextlib import contextmanager
from typing import Any, Callable, Iterable, Iterator, Sequence

import pyarrow as pa

from memex import console
from memex.config import ConfigError, ExecutorKind, MemexError, ResourcesConfig, StorageConfig
from memex.storage import RAY_JOB_CONFIG, StageFolder, StorageError, Store, in_job_working_dir, unreachable_storage

log = logging.getLogger("memex.runner")

# The stage a folder's units make up, as the console names it (memex/layout.py names the folders).
STAGE_LABELS = {"samples": "generate", "candidates": "filter", "matches": "match", "triage": "triage",
                "quantizer": "index quantizer", "shards": "index", "dups": "near-duplicates",
                "scores": "membership scores", "shadows": "shadow models"}


class UnitFailed(MemexError):
    """A unit raised on Ray (in a task, an actor's __init__ or call): one line naming the root cause;
    the full traceback is in the file named at its end."""


class WorkerDeaths(UnitFailed):
    """A unit whose worker process died every time it was started (`MAX_STARTS`)."""


class RayStartError(MemexError):
    """Ray could not be started or reached."""


def init(resources: ResourcesConfig, storage: StorageConfig | None = None, index_root: str | None = None) -> None:
    """Connect to resources.address ($RAY_ADDRESS under `ray job submit`), or start a new local Ray, once.

    None and no $RAY_ADDRESS means a new local instance, as documented (memex/config.py), and not
    Ray's own default of joining whatever `ray start` left on this machine (/tmp/ray/ray_current_cluster),
    which hangs when that one is gone. With `storage` (a stage's entry): `check_storage_reachable`
    once Ray is up: now if it already is, else when the first unit starts it (still before any write);
    `index_root` (index.root, the audit's): the same for where the index units write.
    A root inside a Ray job's working_dir copy is refused first, executor=local too: Ray deletes the copy once
    the job is done (`ray job submit --working-dir . -- memex generate resources.executor=local` wrote its
    run folder into it and exited 0)."""
    if storage is not None:
        job = os.environ.get(RAY_JOB_CONFIG)
        for key, root in (("storage.root", storage.root), ("index.root", index_root)):
            why = in_job_working_dir(root, key, job, os.getcwd()) if root else None
            if why:
                raise ConfigError(why)
    if resources.executor == ExecutorKind.local:
        return  # no Ray: one process on one machine, so any storage.root it can write to will do
    import ray

    if storage is not None:
        roots = [("storage.root", storage.root, storage.shared_mount)]
        if index_root:
            roots.append(("index.root", index_root, storage.shared_mount))
        _UNCHECKED[:] = roots
        _STORAGE[:] = roots
        if not ray.is_initialized():
            return  # no Ray before the first unit (preflight errors come first): checked when Ray starts
    if not ray.is_initialized():
        _start(resources)
    while _UNCHECKED:
        key, root, shared = _UNCHECKED.pop(0)
        check_storage_reachable(root, shared, key)


# The storage a stage entry named (init(resources, storage, index_root)), as (key, root, shared_mount), checked
# once Ray is up, before any unit.
_UNCHECKED: list[tuple[str, str, bool]] = []
# ... and kept: checked again when a node joins while check_fits waits (an autoscaler's first worker)
_STORAGE: list[tuple[str, str, bool]] = []


def ray_client() -> bool:
    """Whether this driver is connected through Ray Client (a ray:// address): it runs off the cluster."""
    from ray.util.client import ray as client

    return client.is_connected()


def alive_nodes() -> int:
    """How many nodes the connected Ray cluster has alive."""
    import ray

    return sum(1 for n in ray.nodes() if n.get("Alive"))


def worker_request(resources: ResourcesConfig, gpu: bool = True) -> dict[str, float]:
    """One task's or actor's Ray resources as a node lists them: {"CPU": 2.0, "GPU": 1.0}, zeros left out."""
    opts = remote_options(resources, gpu)
    return {k: float(v) for k, v in (("CPU", opts["num_cpus"]), ("GPU", opts["num_gpus"])) if v > 0}


def _amount(kind: str, v: float) -> str:
    return f"{v:g} {kind}" + ("s" if v != 1 else "")


def shortfall(request: dict[str, float], nodes: list[dict[str, float]]) -> str | None:
    """None when some node's total resources hold `request`, else what is asked, naming the keys:
    "resources.num_gpus=1 asks for 1 GPU per worker". Totals, not what is free now: a busy node
    frees its resources, a too-small one never grows."""
    if any(all(n.get(k, 0.0) >= v for k, v in request.items()) for n in nodes):
        return None
    key = {"CPU": "resources.num_cpus", "GPU": "resources.num_gpus"}
    short = [k for k in request if not any(n.get(k, 0.0) >= request[k] for n in nodes)] or list(request)
    return (f"{' and '.join(f'{key[k]}={request[k]:g}' for k in short)} ask{'s' if len(short) == 1 else ''} "
            f"for {' and '.join(_amount(k, request[k]) for k in short)} per worker")


def _largest(nodes: list[dict[str, float]]) -> str:
    """"2 CPUs, 0 GPUs": the node with the most GPUs, then CPUs."""
    best = max(nodes, key=lambda n: (n.get("GPU", 0.0), n.get("CPU", 0.0)), default={})
    return ", ".join(_amount(k, best.get(k, 0.0)) for k in ("CPU", "GPU"))


_NEVER_JOINED: set[tuple] = set()  # worker shapes this process waited for in vain


def check_fits(resources: ResourcesConfig, gpu: bool = True) -> None:
    """A worker (task or actor) that fits no node of the Ray cluster is never scheduled: Ray waits
    for such a node forever, silently (resources.num_gpus=1 on a laptop hung `memex generate` at
    "1 unit to run"). Checked before each stage dispatches its units. On a Ray instance memex started
    on this machine: a ConfigError at once. On a cluster: a placement group of one worker's shape is
    demand an autoscaler answers by launching a node; it is waited for up to resources.start_timeout_s,
    then removed (the units themselves then ask for their resources as usual)."""
    import ray

    request = worker_request(resources, gpu)
    nodes = [{k: float(v) for k, v in n.get("Resources", {}).items()} for n in ray.nodes() if n.get("Alive")]
    asks = shortfall(request, nodes) if request else None
    if asks is None:
        return
    fix = ("set resources.num_gpus=0 to run on CPU, or resources.address to a Ray cluster with GPU nodes"
           if "num_gpus" in asks else "lower resources.num_cpus to what a node has")
    if _STARTED_HERE:
        raise ConfigError(f"{asks}, and this machine's Ray instance has {_largest(nodes)}: {fix}")
    where = f"no node of the Ray cluster has that (the largest: {_largest(nodes)})"
    shape = tuple(sorted(request.items()))
    if resources.start_timeout_s > 0 and shape not in _NEVER_JOINED:  # waited for once per command
        # (`memex nightly` audits checkpoint after checkpoint: one wait, not one per checkpoint)
        from ray.util.placement_group import placement_group, remove_placement_group

        log.warning("%s, and %s yet: waiting up to %gs (resources.start_timeout_s) for an autoscaler to add one",
                    asks, where, resources.start_timeout_s)
        pg = placement_group([request])
        try:
            if pg.wait(timeout_seconds=resources.start_timeout_s):
                # a node joined: with min_workers 0 only the head was alive when the storage was checked,
                # and a local storage.root passed; the units would write to the new node's own disk
                for key, root, shared in _STORAGE:
                    check_storage_reachable(root, shared, key)
                return
        finally:
            remove_placement_group(pg)
        _NEVER_JOINED.add(shape)
    raise ConfigError(f"{asks}, and {where}, and none joined within resources.start_timeout_s="
                      f"{resources.start_timeout_s:g}: {fix}, or add a node type of that size (cluster.yaml)")


def check_storage_reachable(root: str, shared_mount: bool = False, key: str = "storage.root") -> None:
    """Refuse a node-local storage.root (or index.root: `key`) on a cluster of more than one node (memex/storage.py
    `unreachable_storage`): ConfigError naming object storage or storage.shared_mount."""
    why = (in_job_working_dir(root, key, os.environ.get(RAY_JOB_CONFIG), os.getcwd())
           or unreachable_storage(root, shared_mount, alive_nodes(), client=ray_client(), key=key))
    if why:
        raise ConfigError(why)


def probe_address(address: str, timeout_s: float = 10.0) -> None:
    """Fail in seconds on a cluster address nothing listens at. ray.init retries an unreachable GCS
    20 times, 20-35 s each (over 7 minutes of C++ warnings on the console before its RuntimeError,
    measured with Ray 2.60), and no setting shortens one attempt, so the driver first checks that the
    GCS port accepts a TCP connection. local, auto and ray:// (Ray Client) addresses go to Ray as given."""
    if address in ("local", "auto") or "://" in address:
        return
    try:  # what ray.init connects to: 127.0.0.1 becomes this host's interface address, as Ray binds it
        from ray._private.services import canonicalize_bootstrap_address

        bootstrap = canonicalize_bootstrap_address(address) or address
    except (ImportError, AttributeError):  # another Ray: probe the address as given
        bootstrap = address
    except ValueError as e:
        raise RayStartError(f"resources.address={address} is not a Ray address (host:port, auto or local): {e}") from e
    host, _, port = bootstrap.rpartition(":")
    try:
        with socket.create_connection((host.strip("[]"), int(port)), timeout=timeout_s):
            pass
    except (OSError, ValueError) as e:
        raise RayStartError(f"cannot reach Ray at {address} (resources.address, $RAY_ADDRESS): nothing accepts "
                            f"connections at {bootstrap} ({e}); start the cluster (`ray start --head`, `ray up "
                            "cluster.yaml`) or correct the address") from e


# True once this process started its own Ray instance (resources.address unset): one machine,
# no autoscaler, so a worker that fits none of its nodes never will.
_STARTED_HERE: list[bool] = []


def _start(resources: ResourcesConfig) -> None:
    import ray

    address = resources.address or os.environ.get("RAY_ADDRESS") or "local"
    if address == "local":
        _STARTED_HERE[:] = [True]
    probe_address(address)
    managed = console.log_file() is not None  # under the `memex` command: its console and log file
    if managed:
        _route_raylet_errors()
        ray_log = logging.getLogger("ray")  # `import ray` gave it its own stderr handler, not propagating
        ray_log.handlers.clear()
        ray_log.propagate = True
    try:
        # configure_logging=False: Ray's loggers propagate to the command's handlers (the log file)
        ray.init(address=address, log_to_driver=True, configure_logging=not managed)
    except ConnectionError as e:
        raise RayStartError(f"cannot reach Ray at {address} (resources.address, $RAY_ADDRESS): {e}") from e
    if managed:
        _route_worker_output()


def _route_worker_output() -> None:
    """The workers' stdout and stderr into the log file (logger `ray.workers`), not the console."""
    try:
        from ray._private.ray_logging import global_worker_stdstream_dispatcher as dispatcher
    except ImportError:  # another Ray: its own printing stays
        return
    try:
        from ray._private.worker import filter_autoscaler_events
    except ImportError:
        filter_autoscaler_events = None
    out = logging.getLogger("ray.workers")

    def to_log(data: dict) -> None:
        who = data.get("actor_name") or data.get("task_name") or ""
        lines = data.get("lines", [])
        if data.get("pid") == "autoscaler":  # its events only, as Ray prints them (not the status tables)
            lines = list(filter_autoscaler_events(lines)) if filter_autoscaler_events else []
        for line in lines:
            out.info("(%s pid=%s) %s", who, data.get("pid"), _ANSI.sub("", line))

    dispatcher.remove_handler("ray_print_logs")
    dispatcher.add_handler("memex_worker_logs", to_log)


def _route_raylet_errors() -> None:
    """The raylet's error reports (a task retried, an actor that died: a traceback each, hundreds of
    lines when an actor pool keeps failing) into the log file: the failure itself is reported once,
    by `UnitFailed`."""
    try:
        import ray._private.worker as w
    except ImportError:
        return
    if getattr(w.print_to_stdstream, "_memex", False):
        return
    out = logging.getLogger("ray.raylet")

    def to_log(data: dict, ignore_prefix: bool = False) -> None:
        for line in data.get("lines", []):
            out.info("(%s) %s", data.get("pid"), _ANSI.sub("", line))

    to_log._memex = True
    w.print_to_stdstream = to_log


def _quiet_ray_data() -> None:
    """Ray Data's logger into the command's handlers (not its own console handler), and, unless
    verbose, no progress bars or per-10-second progress logs: the runner draws one line per stage."""
    import ray.data

    lg = logging.getLogger("ray.data")
    for h in list(lg.handlers):
        if h.get_name() == "console":
            lg.removeHandler(h)
    lg.propagate = True
    if not console.verbose():
        ctx = ray.data.DataContext.get_current()
        ctx.enable_progress_bars = False
        ctx.print_on_execution_start = False


# ---- one-line failures ---------------------------------------------------------------------
MAX_MESSAGE = 600  # characters of the cause's message on the console; the file has all of it
_ANSI = re.compile(r"\x1b\[[0-9;]*m")
# the line that ends a traceback: `pkg.mod.SomeError: message`, `SomeError(Wrapped): message`, `KeyError`
_EXC_LINE = re.compile(r"^([A-Za-z_][\w.]*)(\([\w.]+\))?(?::\s?(.*))?$")


def _is_exception_name(name: str) -> bool:
    import builtins

    short = name.rsplit(".", 1)[-1]
    if short.endswith(("Error", "Exception", "Exit", "Interrupt", "Failure", "Timeout")):
        return True
    if name.startswith("memex.") and _memex_class(name) is not None:  # UnitFailed, WorkerDeaths
        return True
    b = getattr(builtins, short, None)
    return isinstance(b, type) and issubclass(b, BaseException)


def exception_lines(text: str) -> list[tuple[str, str]]:
    """(qualified type name, message) of each exception a traceback text ends with, in the text's
    order: a chain prints its root cause first ("The above exception was the direct cause ...")."""
    out = []
    for line in _ANSI.sub("", text).splitlines():
        if not line or line[0].isspace() or line.startswith(("Traceback", "ray::", "During handling", "The above")):
            continue
        m = _EXC_LINE.match(line)
        if m and (m.group(3) is not None or m.group(2) is None) and _is_exception_name(m.group(1)):
            if m.group(1).startswith("ray.exceptions.") and m.group(2):  # RayTaskError(X): the wrapper's line
                continue
            out.append((m.group(1), (m.group(3) or "").strip()))
    return out


def root_cause(exc: BaseException) -> tuple[str, str, BaseException | None]:
    """(type name, message, the exception object where there is one) of what made a Ray call fail.

    Ray keeps the remote exception as text (RayTaskError's traceback, an ActorDiedError's message
    holds its creation task's), and an object only for a task's own exception (`.cause`); a
    chain's root cause prints first. A memex error in the chain wins over its own causes: its
    message is the one written for users (e.g. a StorageError naming the path, not the botocore
    error under it); otherwise the innermost exception is the cause."""
    obj = exc
    for _ in range(10):  # RayTaskError(.cause) -> the task's own exception, when it is one
        cause = getattr(obj, "cause", None)
        if not isinstance(cause, BaseException) or cause is obj:
            break
        obj = cause
    found = exception_lines(str(exc))
    memex = [f for f in found if f[0].startswith("memex.")]
    if isinstance(obj, MemexError):
        return type(obj).__name__, str(obj), obj
    if memex:
        return memex[0][0], memex[0][1], None
    if found:
        return found[0][0], found[0][1], None
    first = (_ANSI.sub("", str(obj)).strip().splitlines() or [""])[0]
    return type(obj).__name__, first, obj


def _ray_errors() -> tuple[type, ...]:
    """The exceptions a Ray call raises for a failure inside a task or actor (Ray Data's too)."""
    import ray.exceptions as rex

    errors: list[type] = [rex.RayError]
    try:
        from ray.data.exceptions import SystemException, UserCodeException

        errors += [SystemException, UserCodeException]
    except ImportError:
        pass
    return tuple(errors)


def _traceback_file(store: Store | None, label: str, text: str) -> str:
    """Write the full traceback into <folder>/logs/ (or, without a folder or when it cannot be
    written, next to the command's log file); returns where it is."""
    from memex.layout import log_path
    from memex.redact import redact_text

    text = redact_text(_ANSI.sub("", text))
    name = f"{label.replace(' ', '-')}-{time.strftime('%Y%m%dT%H%M%SZ', time.gmtime())}-traceback.txt"
    try:
        if store is None:
            raise StorageError("no run folder")
        path = log_path(store, name)
        store.write_bytes(path, text.encode())
        return store.uri_of(path)
    except Exception as e:  # noqa: BLE001 - the folder's storage may be what failed: keep it locally
        local = console.log_dir() / name
        local.parent.mkdir(parents=True, exist_ok=True)
        local.write_text(text)
        if store is not None:
            log.warning("could not write the traceback to %s (%s: %s)", store.uri, type(e).__name__, e)
        return str(local)


def failed(exc: BaseException, label: str, store: Store | None) -> MemexError:
    """The one-line error for a Ray failure of stage `label` in folder `store` (the full traceback
    is written to a file first). A memex error keeps its type (StorageError, ModelError, ...)."""
    text = "".join(traceback.format_exception(exc))
    where = _traceback_file(store, label, text)
    log.info("%s failed (traceback also in %s):\n%s", label, where, _ANSI.sub("", text))  # the log file only
    name, msg, obj = root_cause(exc)
    msg = " ".join(msg.split())  # one line
    if len(msg) > MAX_MESSAGE:
        msg = msg[:MAX_MESSAGE] + " ..."
    cls = type(obj) if isinstance(obj, MemexError) else _memex_class(name)
    if cls is WorkerDeaths:
        msg += _why_workers_died(BATCH_KEYS.get(folder_name(label)))
    line = f"{label} failed: {name.rsplit('.', 1)[-1]}: {msg} (full traceback: {where})"
    if cls is not None:
        err = cls.__new__(cls)
        err.args = (line,)
        return err
    return UnitFailed(line)


def oom_kills(tries: int = 3) -> int | None:
    """Workers Ray's memory monitor killed (exit type NODE_OUT_OF_MEMORY) since this command
    started, on the whole cluster (Ray's state API lists workers by node, not by job); None where
    the state API does not answer (it is served by the dashboard). Asked up to `tries` times, 10 s each: a
    dashboard on a loaded node (a 2-core CI machine running a stage's workers) can miss one 10 s window, and the
    stage's one failure line then said only "the log names why"; ~30 s at most, once, for a stage that failed."""
    try:
        from ray.util.state import list_workers
    except Exception:  # noqa: BLE001 - an older Ray: the message says where to look instead
        return None
    for attempt in range(tries):
        try:
            dead = list_workers(filters=[("exit_type", "=", "NODE_OUT_OF_MEMORY")], detail=True, limit=10_000,
                                raise_on_missing_output=False, timeout=10)
            return sum(1 for w in dead if (w.end_time_ms or 0) >= _STARTED_MS)
        except Exception:  # noqa: BLE001 - no dashboard, or a slow one: asked again, then the log is named
            if attempt + 1 < tries:
                time.sleep(1)
    return None


def _why_workers_died(key: str | None) -> str:
    """The end of a WorkerDeaths line: what killed the workers, and the setting to change."""
    lower = f"lower {key} or give the workers more memory" if key else "give the workers more memory"
    n = oom_kills()
    if n:
        return f": Ray's memory monitor killed {n} worker(s) for running their node out of memory meanwhile; {lower}"
    if n == 0:
        return ": none was killed for memory (a lost node, a crash: the log has the workers' last output)"
    return f": the log names why (a lost node, Ray's memory monitor: then {lower})"


def folder_name(label: str) -> str:
    """The stage folder a console label names ("generate" -> "samples"), else the label."""
    return next((f for f, lab in STAGE_LABELS.items() if lab == label), label)


def _memex_class(name: str) -> type | None:
    """memex.storage.StorageError -> the class, when it is a MemexError (a chain seen only as text)."""
    mod, _, cls = name.rpartition(".")
    if not mod.startswith("memex"):
        return None
    try:
        c = getattr(importlib.import_module(mod), cls, None)
    except ImportError:
        return None
    return c if isinstance(c, type) and issubclass(c, MemexError) else None


def remote_options(resources: ResourcesConfig, gpu: bool = True) -> dict[str, float]:
    """Ray resources of one task or actor. gpu=False: steps with no model (FAISS search, counting)."""
    return {"num_cpus": resources.num_cpus, "num_gpus": resources.num_gpus if gpu else 0}


def node_id() -> str | None:
    """The Ray node this process runs on, or None outside Ray. Every unit's marker records it:
    which machine wrote a shard (on a cluster: a node that was lost, a slow GPU)."""
    import ray

    return ray.get_runtime_context().get_node_id() if ray.is_initialized() else None


# Ray restarts a worker that dies (its node lost, killed by Ray's memory monitor, a crash) and
# starts its unit again, forever (Ray Data's actor pools, OOM-killed tasks): a unit that runs its
# node out of memory every time kept `memex generate` at "1 unit to run" for as long as it was let
# run (7 min, 4 kills a minute, when it was found). A unit this command started MAX_STARTS times
# without finishing is not started again: the stage fails, naming the batch size to lower. A lost
# node costs its units one start each, so 3 leaves room for two losses of the same unit.
# The starts are counted per dispatch (a token each run_tasks / run_actor_pool call makes), not per process:
# `memex nightly` audits every checkpoint in one process against one shared index, and a per-process
# token carried one audit's starts of a unit (its ordinary failures too) into the next, which then
# failed at once as "its worker died each time".
MAX_STARTS = 3

# the setting that sizes a unit's memory, by stage folder (memex/layout.py names the folders)
BATCH_KEYS = {"samples": "sampling.batch_size (a latent model's VAE decode alone: sampling.decode_batch_size)",
              "triage": "sampling.batch_size", "previews": "sampling.batch_size",
              "shards": "embedder.batch_size", "scores": "mia.batch_size"}
_STARTED_MS = time.time() * 1000  # when this command started: Ray's OOM kills since then are counted


def do_unit(folder: StageFolder, index: int, fn: Callable[..., Any], kwargs: dict[str, Any],
            command: str | None = None) -> dict:
    """One unit, in whatever process runs it: skipped when already complete (a retried task, a
    second driver), else done, its output written, then its marker. Returns the marker.
    `command` (on Ray): the dispatch's token, under which the unit's starts are counted."""
    done = folder.read_marker(index)
    if done is not None:
        return done
    if command is not None and (starts := folder.count_start(index, command)) > MAX_STARTS:
        raise WorkerDeaths(f"unit {index} was started {starts - 1} times by this command, and its worker died "
                           "each time before finishing it, so it is not started again")
    t0 = time.perf_counter()
    out = fn(index, **kwargs)
    seconds = {"seconds": round(time.perf_counter() - t0, 2), "node_id": node_id()}
    if isinstance(out, tuple):  # (table, metadata): e.g. a generation shard and the UNet work it took
        meta = folder.write_shard(index, out[0], {**seconds, **out[1]})
    elif isinstance(out, pa.Table):
        meta = folder.write_shard(index, out, seconds)
    else:
        meta = {**seconds, **(out or {})}
        folder.mark_complete(index, meta)
    # marked: the count has done its job (also one a Ray run left before a local rerun did the unit: one
    # request a unit, next to a whole shard written)
    try:
        folder.clear_starts(index)
    except Exception as e:  # noqa: BLE001 - the unit is complete; a marked unit's count is never read
        log.warning("unit %d is complete, but its start count %s could not be removed (%s: %s); it is "
                    "harmless", index, folder.store.uri_of(folder.attempts(index)), type(e).__name__, e)
    return meta


def sweep(folder: StageFolder) -> None:
    """Before a folder's units are dispatched: the temp files of a killed run's writes go (storage.py)."""
    n = folder.sweep_temp()
    if n:
        log.info("%s: removed %d temp file(s) that writes of an interrupted run left", folder.name, n)


def check_complete(folder: StageFolder, units: Sequence[int], returned: Iterable[int] = ()) -> None:
    """Step 4: every unit has its marker. A unit whose task `returned` its marker (written before do_unit
    returns it) counts as marked; the others are looked up in one listing, not one request per unit, and
    only when there are any. Not a listing alone: where listings are cached (NFS with
    storage.shared_mount=true, an object store's listing cache) the markers other nodes wrote last can be
    missing from one taken right after their tasks returned, and a finished stage was reported incomplete."""
    missing = set(units) - set(returned)
    if missing:
        missing -= set(folder.complete())
    missing = sorted(missing)
    if missing:
        raise StorageError(f"{folder.name} units {missing[:10]} of {folder.store.uri_of(folder.path)} did not "
                           "complete; rerun the same command to resume")


# run_tasks keeps a window of a stage's tasks in flight, not all of them: WINDOW_PER_SLOT x how many of
# its tasks the alive nodes hold at once (at least MIN_WINDOW), topped up as tasks finish. Submitting every
# unit at once made each ray.wait (Ray 2.60) loop in Python over every pending ref (29 ms a call at 100k
# refs: ~25 min of driver CPU for a 100k-unit stage), and a failed stage left all its other units
# running (the note below _watched). Twice the slots keeps each slot's next task queued at its node
# while the driver tops up, and shows an autoscaler pending demand; the window is sized again every
# WINDOW_REFRESH_S seconds (a node that joined).
WINDOW_PER_SLOT = 2
MIN_WINDOW = 4
WINDOW_REFRESH_S = 10.0


def window_for(request: dict[str, float], nodes: list[dict[str, float]]) -> int:
    """How many tasks asking `request` ({"CPU": 1.0, "GPU": 1.0}) run_tasks keeps in flight on alive
    nodes of these total resources: WINDOW_PER_SLOT x the tasks they hold at once, at least MIN_WINDOW.
    A task that asks for nothing: per CPU."""
    request = request or {"CPU": 1.0}
    slots = sum(int(min(n.get(k, 0.0) / v for k, v in request.items()) + 1e-9) for n in nodes)
    return max(WINDOW_PER_SLOT * slots, MIN_WINDOW)


def _window(request: dict[str, float]) -> int:
    import ray

    nodes = [{k: float(v) for k, v in n.get("Resources", {}).items()} for n in ray.nodes() if n.get("Alive")]
    return window_for(request, nodes)


def windowed(submit: Callable[[int], Any], todo: Iterable[int], size: Callable[[], int]) -> Iterator[list[int]]:
    """Each unit of `todo` as `submit(unit)` (a Ray task: its ObjectRef), at most `size()` of them in flight (sized
    again every WINDOW_REFRESH_S seconds), topped up as they finish; yields the units that finished, as they
    finish. A task that failed raises its error (`ray.get`); the tasks still in flight are left to run."""
    import ray

    window, sized = size(), time.monotonic()
    queue = iter(todo)
    in_flight: dict[Any, int] = {}  # task ref -> unit
    while True:
        if time.monotonic() - sized > WINDOW_REFRESH_S:
            window, sized = size(), time.monotonic()
        for i in itertools.islice(queue, max(window - len(in_flight), 0)):
            in_flight[submit(i)] = i
        if not in_flight:
            return
        refs = list(in_flight)
        # every task of the window finished by now, one call for all; else the next one to finish
        ready, _ = ray.wait(refs, num_returns=len(refs), timeout=0)
        if not ready:
            ready, _ = ray.wait(refs, num_returns=1, timeout=WINDOW_REFRESH_S)
        if ready:
            ray.get(ready)  # their markers (do_unit's); the first failure raises
            yield [in_flight.pop(r) for r in ready]


def run_tasks(folder: StageFolder, units: dict[int, dict[str, Any]], fn: Callable[..., Any],
              resources: ResourcesConfig, gpu: bool = True, **shared: Any) -> int:
    """Each unit `index -> kwargs` not yet complete as one Ray task `fn(index, **kwargs, **shared)`,
    a window of them in flight at a time (`window_for`). Returns how many units ran now."""
    if resources.executor == ExecutorKind.local:
        return run_here(folder, units, fn, **shared)
    done = set(folder.complete())
    todo = [i for i in units if i not in done]
    returned: set[int] = set()  # units whose task returned their marker
    if todo:
        import ray

        init(resources)
        check_fits(resources, gpu)
        sweep(folder)
        console.note_folder(folder.store)
        label = STAGE_LABELS.get(folder.name, folder.name)
        task = ray.remote(**remote_options(resources, gpu))(do_unit)
        command = uuid.uuid4().hex  # this dispatch: a rerun, or the next audit of a nightly, counts afresh
        request = worker_request(resources, gpu)
        with _watched(folder, label, len(todo), len(done & set(units))) as progress:
            for finished in windowed(lambda i: task.remote(folder, i, fn, {**shared, **units[i]}, command), todo,
                                     lambda: _window(request)):
                returned.update(finished)
                progress.update(len(finished))
    else:
        _all_complete(folder, units)
    check_complete(folder, list(units), returned)
    return len(todo)


@contextmanager
def _watched(folder: StageFolder, label: str, n: int, done_before: int):
    """The stage's progress line around its units; a Ray failure becomes one line (`failed`). The
    stage's other units are not cancelled (see below)."""
    progress = console.Progress(label, n, done_before)
    try:
        yield progress
    except _ray_errors() as e:
        progress.close(ok=False)
        raise failed(e, label, folder.store) from None
    except BaseException:  # Ctrl-C, a MemexError: the ticker stopped (it redrew its line every second on)
        progress.close(ok=False)
        raise
    progress.close()


def _all_complete(folder: StageFolder, units) -> None:
    if units:
        logging.getLogger(console.PROGRESS).info("%s: all %d units complete from an earlier run",
                                                 STAGE_LABELS.get(folder.name, folder.name), len(units))


# A failed stage's other tasks are not cancelled. Ray 2.60's ray.cancel of a task that finishes at
# that moment aborts the calling process (RAY_CHECK "it != submissible_tasks_.end()" in
# TaskManager::CompletePendingTask; the race of ray-project/ray#54798): it killed a pytest worker
# of this suite, where units of one stage fail together, as they do in production (a corrupt
# model, a full disk). Left alone, each finishes or fails its own unit (written atomically, marked
# only when complete), and a `memex` command's exit ends its job's tasks anyway. What is left is at
# most run_tasks' window (WINDOW_PER_SLOT x the cluster's slots for the task): the stage's units past
# it were never submitted, so a driver that goes on (`memex nightly`'s next audit) finds the cluster
# free within about two units' time, not after every unit of the failed stage.


def release_failed_pools() -> None:
    """End a failed actor pool's actors (and free their GPUs) now; call it once the failure has
    been handled, outside the `except` block that handled it.

    Ray Data (2.60) shuts a failed execution down without force: it drops its handles to the
    actors, which end only when a reference cycle around the executor is garbage-collected, at a
    time of Python's choosing (a failed pool's actor was still alive 8 s after its error was
    handled). A driver that goes on after a failed stage, `memex nightly` auditing one checkpoint
    after another, calls this so the next audit finds the GPUs free. One collection, ~0.1 s."""
    import gc

    gc.collect()


def run_here(folder: StageFolder, units: dict[int, dict[str, Any]], fn: Callable[..., Any], **shared: Any) -> int:
    """`run_tasks` in this process (units whose heavy step is a call to a `Resident` worker, e.g.
    the match stage's embed and search): skip the complete ones, do the rest in order, one progress line.
    Returns how many units ran now."""
    done = set(folder.complete())
    todo = [i for i in units if i not in done]
    returned: set[int] = set()
    if todo:
        sweep(folder)
        console.note_folder(folder.store)  # as run_tasks does: a failure's log goes to this run folder
        progress = console.Progress(STAGE_LABELS.get(folder.name, folder.name), len(todo), len(done & set(units)))
        try:
            for i in todo:
                do_unit(folder, i, fn, {**shared, **units[i]})
                returned.add(i)
                progress.update()
        except BaseException:
            progress.close(ok=False)
            raise
        progress.close()
    else:
        _all_complete(folder, units)
    check_complete(folder, list(units), returned)
    return len(todo)


def call_all(fn: Callable[..., Any], calls: list[dict[str, Any]], resources: ResourcesConfig,
             gpu: bool = True) -> list[Any]:
    """`fn(**kwargs)` for each kwargs as one Ray task; results in order. For one-off steps whose
    results are small and go back to the driver, so there is nothing to mark (a worker's memory, in
    bench/bench_scale.py). Steps called once per unit with a model or data to load use `Resident`."""
    if resources.executor == ExecutorKind.local:
        return [fn(**kw) for kw in calls]
    import ray

    init(resources)
    check_fits(resources, gpu)
    task = ray.remote(**remote_options(resources, gpu))(fn)
    refs = [task.remote(**kw) for kw in calls]
    try:
        return ray.get(refs)
    except _ray_errors() as e:  # the other calls are left to finish: see the note below _watched
        raise failed(e, fn.__name__, console.noted_folder()) from None


class Resident:
    """One long-lived worker `cls(**kwargs)`, built at the first call and called many times:
    `worker(*args)` runs its `__call__` (a model, or index shards, loaded once instead of per unit).
    A Ray actor of the pool's shape (`remote_options`), or with resources.executor=local an object
    in this process. `close()` (or leaving the `with` block) releases it, and with it a GPU.

    Why an actor and not a Ray Data pool: the calls come from the driver's own loop over units (the
    match stage, triage=preview), one small request and reply each, not a stream of rows.
    max_restarts/max_task_retries: a worker lost with its node is rebuilt (its `__init__` rerun) and
    the call retried, as a task would be; an exception in `__init__` or a call is not retried.
    A failure's traceback goes into `<store>/logs/` (the run folder whose stage calls the worker;
    default: the folder the command noted last, else beside the command's log)."""

    RESTARTS = 3

    def __init__(self, cls: type, kwargs: dict[str, Any], resources: ResourcesConfig, gpu: bool = True,
                 label: str = "worker", store: Store | None = None):
        self.cls, self.kwargs, self.resources, self.gpu, self.label = cls, kwargs, resources, gpu, label
        self.store = store
        self._worker: Any = None

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        if self.resources.executor == ExecutorKind.local:
            if self._worker is None:
                self._worker = self.cls(**self.kwargs)
            return self._worker(*args, **kwargs)
        import ray

        if self._worker is None:
            init(self.resources)
            check_fits(self.resources, self.gpu)
            actor = ray.remote(max_restarts=self.RESTARTS, max_task_retries=self.RESTARTS,
                               **remote_options(self.resources, self.gpu))(self.cls)
            self._worker = actor.remote(**self.kwargs)
        try:
            return ray.get(self._worker.__call__.remote(*args, **kwargs))
        except _ray_errors() as e:
            self.close()  # a failed worker is not reused: the next call (a rerun's) builds a new one
            raise failed(e, self.label, self.store or console.noted_folder()) from None

    def close(self) -> None:
        if self._worker is not None and self.resources.executor != ExecutorKind.local:
            import ray

            try:
                ray.kill(self._worker)
            except Exception:  # noqa: BLE001 - already dead (its node lost, its __init__ failed)
                pass
        self._worker = None

    def __enter__(self) -> "Resident":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


class _ActorUnits:
    """Ray Data callable class around a plain worker class: the worker (a model) is built once per
    actor in `__init__`; each call does whole units through `do_unit` (one unit per batch)."""

    def __init__(self, folder: StageFolder, worker_cls: type, worker_kwargs: dict[str, Any], command: str):
        self.folder, self.command = folder, command
        self.worker = worker_cls(**worker_kwargs)

    def __call__(self, batch: dict) -> dict:
        rows = [{k: getattr(v[j], "item", lambda: v[j])() for k, v in batch.items()}
                for j in range(len(batch["index"]))]
        index = [r.pop("index") for r in rows]
        metas = [do_unit(self.folder, i, self.worker, r, self.command) for i, r in zip(index, rows)]
        return {"index": index, "rows": [m.get("rows", 0) for m in metas],
                "seconds": [m.get("seconds", 0.0) for m in metas]}


def run_actor_pool(folder: StageFolder, units: dict[int, dict[str, Any]], worker_cls: type,
                   worker_kwargs: dict[str, Any], resources: ResourcesConfig) -> int:
    """Units not yet complete through a Ray Data actor pool of `worker_cls(**worker_kwargs)`
    (resources.min_actors..max_actors actors, autoscaled); `worker(index, **unit)` does a unit.

    Why actors write their own units instead of `Dataset.write_parquet`: a unit must be named by
    its plan index and marked complete only after its file is in place, so a rerun skips finished
    units and never duplicates rows. Ray's datasinks name files per write task and have no
    per-file marker. Only a one-line summary per unit returns to the driver. Returns how many ran.
    resources.executor=local: one worker in this process does the units in order."""
    done = set(folder.complete())
    todo = [{"index": i, **units[i]} for i in units if i not in done]
    returned: set[int] = set()  # units whose actor returned (after their marker was written)
    if resources.executor == ExecutorKind.local:  # no worker built when every unit is complete already
        return run_here(folder, units, worker_cls(**worker_kwargs) if todo else None)
    if todo:
        import ray
        import ray.data

        init(resources)
        check_fits(resources)
        sweep(folder)
        if console.log_file() is not None:
            _quiet_ray_data()
        console.note_folder(folder.store)
        label = STAGE_LABELS.get(folder.name, folder.name)
        ds = ray.data.from_items(todo, override_num_blocks=len(todo)).map_batches(
            _ActorUnits,
            fn_constructor_kwargs={"folder": folder, "worker_cls": worker_cls, "worker_kwargs": worker_kwargs,
                                   "command": uuid.uuid4().hex},  # this dispatch (see MAX_STARTS)
            batch_size=1,  # one unit per call: a unit is the unit of work and of resume
            compute=ray.data.ActorPoolStrategy(min_size=resources.min_actors, max_size=resources.max_actors),
            **remote_options(resources),
        )
        with _watched(folder, label, len(todo), len(done & set(units))) as progress:
            for row in ds.iter_rows():  # tiny summary rows only; images never reach the driver
                log.info("%s: unit done, %d rows in %.1fs", label, row["rows"], row["seconds"])
                returned.add(int(row["index"]))  # its marker written (check_complete)
                progress.update()
    else:
        _all_complete(folder, units)
    check_complete(folder, list(units), returned)
    return len(todo)
