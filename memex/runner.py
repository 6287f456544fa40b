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
  2. dispatch the rest: one Ray task each, or a Ray Data actor pool (model in `__init__`);
  3. each unit, when done, writes its files then its marker (`mark_rank_as_completed`);
  4. check that none is missing: a unit that did not complete fails the stage, naming the fix.
The stage writes its own `_SUCCESS.json` (its summary) after that; it knows what to count.

Ray is imported inside the functions below and nowhere else in memex/, so every module, and the
unit functions themselves, import and test without a cluster.
"""

from __future__ import annotations

import logging
import time
from typing import Any, Callable, Sequence

import pyarrow as pa

from memex.config import ResourcesConfig
from memex.storage import StageFolder, StorageError

log = logging.getLogger("memex.runner")


def init(resources: ResourcesConfig) -> None:
    """Connect to resources.address ($RAY_ADDRESS under `ray job submit`), or start a local Ray, once."""
    import ray

    if not ray.is_initialized():
        ray.init(address=resources.address, log_to_driver=True)


def remote_options(resources: ResourcesConfig, gpu: bool = True) -> dict[str, float]:
    """Ray resources of one task or actor. gpu=False: steps with no model (FAISS search, counting)."""
    return {"num_cpus": resources.num_cpus, "num_gpus": resources.num_gpus if gpu else 0}


def do_unit(folder: StageFolder, index: int, fn: Callable[..., Any], kwargs: dict[str, Any]) -> dict:
    """One unit, in whatever process runs it: skipped when already complete (a retried task, a
    second driver), else done, its output written, then its marker. Returns the marker."""
    done = folder.read_marker(index)
    if done is not None:
        return done
    t0 = time.perf_counter()
    out = fn(index, **kwargs)
    seconds = {"seconds": round(time.perf_counter() - t0, 2)}
    if isinstance(out, tuple):  # (table, metadata): e.g. a generation shard and the UNet work it took
        return folder.write_shard(index, out[0], {**seconds, **out[1]})
    if isinstance(out, pa.Table):
        return folder.write_shard(index, out, seconds)
    meta = {**seconds, **(out or {})}
    folder.mark_complete(index, meta)
    return meta


def check_complete(folder: StageFolder, units: Sequence[int]) -> None:
    """Step 4: every unit has its marker (one listing, not one request per unit)."""
    missing = sorted(set(units) - set(folder.complete()))
    if missing:
        raise StorageError(f"{folder.name} units {missing[:10]} of {folder.store.uri_of(folder.path)} did not "
                           "complete; rerun the same command to resume")


def run_tasks(folder: StageFolder, units: dict[int, dict[str, Any]], fn: Callable[..., Any],
              resources: ResourcesConfig, gpu: bool = True, **shared: Any) -> int:
    """Each unit `index -> kwargs` not yet complete as one Ray task `fn(index, **kwargs, **shared)`.
    Returns how many units ran now."""
    done = set(folder.complete())
    todo = [i for i in units if i not in done]
    if todo:
        import ray

        init(resources)
        task = ray.remote(**remote_options(resources, gpu))(do_unit)
        ray.get([task.remote(folder, i, fn, {**shared, **units[i]}) for i in todo])
    check_complete(folder, list(units))
    return len(todo)


def call_all(fn: Callable[..., Any], calls: list[dict[str, Any]], resources: ResourcesConfig,
             gpu: bool = True) -> list[Any]:
    """`fn(**kwargs)` for each kwargs as one Ray task; results in order. For steps whose results are
    small and go back to the driver (the match stage's query embedding and per-shard search), so
    there is nothing to mark: a rerun redoes them, as their unit is redone."""
    import ray

    init(resources)
    task = ray.remote(**remote_options(resources, gpu))(fn)
    return ray.get([task.remote(**kw) for kw in calls])


class _ActorUnits:
    """Ray Data callable class around a plain worker class: the worker (a model) is built once per
    actor in `__init__`; each call does whole units through `do_unit` (one unit per batch)."""

    def __init__(self, folder: StageFolder, worker_cls: type, worker_kwargs: dict[str, Any]):
        self.folder = folder
        self.worker = worker_cls(**worker_kwargs)

    def __call__(self, batch: dict) -> dict:
        rows = [{k: getattr(v[j], "item", lambda: v[j])() for k, v in batch.items()}
                for j in range(len(batch["index"]))]
        metas = [do_unit(self.folder, r.pop("index"), self.worker, r) for r in rows]
        return {"rows": [m.get("rows", 0) for m in metas], "seconds": [m.get("seconds", 0.0) for m in metas]}


def run_actor_pool(folder: StageFolder, units: dict[int, dict[str, Any]], worker_cls: type,
                   worker_kwargs: dict[str, Any], resources: ResourcesConfig) -> int:
    """Units not yet complete through a Ray Data actor pool of `worker_cls(**worker_kwargs)`
    (resources.min_actors..max_actors actors, autoscaled); `worker(index, **unit)` does a unit.

    Why actors write their own units instead of `Dataset.write_parquet`: a unit must be named by
    its plan index and marked complete only after its file is in place, so a rerun skips finished
    units and never duplicates rows. Ray's datasinks name files per write task and have no
    per-file marker. Only a one-line summary per unit returns to the driver. Returns how many ran."""
    done = set(folder.complete())
    todo = [{"index": i, **units[i]} for i in units if i not in done]
    if todo:
        import ray

        init(resources)
        ds = ray.data.from_items(todo, override_num_blocks=len(todo)).map_batches(
            _ActorUnits,
            fn_constructor_kwargs={"folder": folder, "worker_cls": worker_cls, "worker_kwargs": worker_kwargs},
            batch_size=1,  # one unit per call: a unit is the unit of work and of resume
            compute=ray.data.ActorPoolStrategy(min_size=resources.min_actors, max_size=resources.max_actors),
            **remote_options(resources),
        )
        for row in ds.iter_rows():  # tiny summary rows only; images never reach the driver
            log.info("%s: unit done, %d rows in %.1fs", folder.name, row["rows"], row["seconds"])
    check_complete(folder, list(units))
    return len(todo)
