"""Fleet mode on Ray Core: the same `map_unordered` as the local process pool, one task per item.

`RayBackend` is the distributed backend of `onnxshrink optimize-many` (issue 13). It schedules
nothing itself: every item is a Ray task, and Ray places it, retries it and streams it back.

1. Connection. `address=None` starts a local Ray instance with `num_cpus` CPUs (all of the
   machine's when None) and one `onnxshrink_timing` resource; `"auto"` joins the cluster
   running on this machine; `"ray://HOST:PORT"` joins a remote one through Ray Client (the
   `ray[client]` extra). `close()` shuts down only what this backend started: a Ray that the
   caller had already initialized is left as it was.
2. Tasks. `fn(item)` runs in a Ray worker as `num_cpus=cpus_per_item, max_retries=retries`: a
   worker process that dies mid-task (killed, out of memory, `os._exit`) is retried by Ray that
   many times. An exception raised by `fn` is caught in the worker and comes back as that
   item's result, never as a crash of the driver, and it is not retried (it would fail again).
   A worker still dead after its retries comes back as Ray's `WorkerCrashedError` for that item.
3. Timings never share a node. An item with `exclusive(item)` true also asks for one unit of
   the custom resource `onnxshrink_timing`, of which every node has exactly one: a local
   instance started here gets it from `ray.init(resources=...)`; cluster nodes must be started
   with `ray start ... --resources '{"onnxshrink_timing": 1}'`. A cluster without it falls back,
   with a warning, to submitting exclusive items one at a time from the driver (so at most one
   runs in the whole cluster). A node with more than one unit is warned about.
4. Streaming. Results come back with `ray.wait` as tasks finish, in no set order. Closing the
   iterator early cancels the tasks still pending.
5. Shared inputs. `put_shared(obj)` puts a large input (the calibration `.npz` bytes, say) into
   the object store once and returns a reference. The fleet core places that reference in each
   item, at the top level or inside a tuple, list, dict value or dataclass field; the backend
   hands those references to Ray as task arguments, so every task's `fn` sees the object itself
   in their place, fetched once per node (numpy arrays zero-copy and read-only). The local
   backend's `put_shared` returns the object unchanged, so the fleet core's code is the same.
"""

from __future__ import annotations

import dataclasses
import importlib
import logging
import os
import pickle
from collections.abc import Callable, Generator, Iterable
from typing import Any, TypeVar

from onnxshrink.errors import UsageError, first_line

logger = logging.getLogger(__name__)

#: the custom Ray resource that exclusive (timing) items take; each node must have exactly one
TIMING_RESOURCE = "onnxshrink_timing"
#: the one-line error when ray is not installed
RAY_MISSING = "--ray needs the ray extra: pip install 'onnxshrink[ray]'"

Item = TypeVar("Item")


def _import_ray() -> Any:
    """Import ray, or raise the one-line UsageError that names the extra to install."""
    try:
        return importlib.import_module("ray")
    except ImportError as exc:
        raise UsageError(RAY_MISSING) from exc


@dataclasses.dataclass(frozen=True)
class _RefSlot:
    """Stands in an item, in the driver, for the `index`-th shared reference (case 5)."""

    index: int


def _extract_refs(value: Any, object_ref_type: type, refs: list[Any]) -> Any:
    """Copy `value` with every ObjectRef replaced by a `_RefSlot`, appending the refs to `refs`.

    Ray resolves only references passed as top-level task arguments; one nested in an item
    would reach `fn` as a bare reference. Pulling them out to the top level lets Ray fetch
    them before the task starts, and lets the worker put the objects back (`_restore_refs`).
    """
    if isinstance(value, object_ref_type):
        refs.append(value)
        return _RefSlot(len(refs) - 1)
    if isinstance(value, list):
        return [_extract_refs(v, object_ref_type, refs) for v in value]
    if isinstance(value, tuple):
        items = [_extract_refs(v, object_ref_type, refs) for v in value]
        return type(value)(*items) if hasattr(value, "_fields") else tuple(items)
    if isinstance(value, dict):
        return {k: _extract_refs(v, object_ref_type, refs) for k, v in value.items()}
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        changes = {
            f.name: _extract_refs(getattr(value, f.name), object_ref_type, refs)
            for f in dataclasses.fields(value)
            if f.init
        }
        return dataclasses.replace(value, **changes)
    return value


def _restore_refs(value: Any, objects: tuple[Any, ...]) -> Any:
    """Undo `_extract_refs` in the worker: each `_RefSlot` becomes its resolved object."""
    if isinstance(value, _RefSlot):
        return objects[value.index]
    if isinstance(value, list):
        return [_restore_refs(v, objects) for v in value]
    if isinstance(value, tuple):
        items = [_restore_refs(v, objects) for v in value]
        return type(value)(*items) if hasattr(value, "_fields") else tuple(items)
    if isinstance(value, dict):
        return {k: _restore_refs(v, objects) for k, v in value.items()}
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        changes = {
            f.name: _restore_refs(getattr(value, f.name), objects)
            for f in dataclasses.fields(value)
            if f.init
        }
        return dataclasses.replace(value, **changes)
    return value


def _run_item(fn: Callable[[Any], Any], skeleton: Any, *objects: Any) -> Any:
    """The Ray task body: run `fn` on the item, returning an exception instead of raising it.

    `objects` are the shared references, already resolved by Ray (case 5). Returning the
    exception keeps it out of Ray's error path: the driver gets it as the item's result, and
    Ray does not retry it (only a dead worker is retried, case 2).
    """
    item = _restore_refs(skeleton, objects) if objects else skeleton
    try:
        return fn(item)
    except Exception as exc:
        logger.debug("item failed in a Ray worker", exc_info=True)
        try:
            pickle.dumps(exc)
        except Exception:
            # an exception that cannot cross processes still reports its type and message
            return RuntimeError(f"{type(exc).__name__}: {exc}")
        return exc


class RayBackend:
    """Run fleet items as Ray tasks on a local instance or an existing cluster (module docstring).

    Use as a context manager, or call `close()`: it shuts down the Ray this backend started.
    """

    def __init__(self, address: str | None = None, num_cpus: int | None = None) -> None:
        self._ray = _import_ray()
        ray = self._ray
        if address is not None and num_cpus is not None:
            raise UsageError(
                "a CPU count applies only to a local Ray instance: a cluster brings its own CPUs"
            )
        if address is not None and address != "auto" and not address.startswith("ray://"):
            raise UsageError(f"Ray address {address!r}: use 'auto' or 'ray://HOST:PORT'")
        #: warnings about the cluster (a missing timing resource, say), for the CLI to show
        self.warnings: list[str] = []
        #: tasks meant to run at once (`optimize_many` gives each CPUs / workers): the local
        #: instance's CPU count, or what the caller sets for a cluster
        self.workers: int | None = num_cpus
        self.address = address
        self._owns_ray = not ray.is_initialized()
        if not self._owns_ray:
            logger.info("Ray is already initialized: using it, and leaving it running")
        elif address is None:
            ray.init(
                num_cpus=num_cpus,
                include_dashboard=False,
                resources={TIMING_RESOURCE: 1},
                log_to_driver=False,
                logging_level=logging.WARNING,  # Ray's own start-up lines; the CLI owns the terminal
            )
        else:
            try:
                ray.init(address=address, log_to_driver=False, logging_level=logging.WARNING)
            except ImportError as exc:  # ray:// without grpcio (the `client` extra of ray)
                raise UsageError(
                    f"{address} needs Ray Client: pip install 'ray[client]' ({exc})"
                ) from exc
            except (ConnectionError, RuntimeError, ValueError) as exc:
                hint = ""
                if address.startswith("ray://") and not os.environ.get("RAY_AUTH_MODE"):
                    # Ray Client sends the cluster's token only when told to (recent Ray turns
                    # token authentication on by default); without it the connection times out
                    hint = (
                        " (a cluster with token authentication also needs RAY_AUTH_MODE=token "
                        "and its token in RAY_AUTH_TOKEN or ~/.ray/auth_token)"
                    )
                raise UsageError(
                    f"cannot join the Ray cluster at {address}: {first_line(exc)}{hint}"
                ) from exc
        self._timing_slots = self._count_timing_slots()

    def _count_timing_slots(self) -> int:
        """The number of `onnxshrink_timing` units in the cluster; warns on nodes with more than one."""
        total = 0
        for node in self._ray.nodes():
            if not node.get("Alive", False):
                continue
            units = node.get("Resources", {}).get(TIMING_RESOURCE, 0)
            total += int(units)
            if units > 1:
                self._warn(
                    f"Ray node {node.get('NodeManagerAddress', '?')} has {units:g} "
                    f"{TIMING_RESOURCE} units: two timings could share it; start it with "
                    f"--resources '{{\"{TIMING_RESOURCE}\": 1}}'"
                )
        return total

    def _warn(self, message: str) -> None:
        self.warnings.append(message)
        logger.warning("%s", message)

    def put_shared(self, obj: Any) -> Any:
        """Put `obj` into Ray's object store once; place the returned reference in items.

        Each task's `fn` sees `obj` where its item held the reference (module docstring, 5).
        """
        return self._ray.put(obj)

    def map_unordered(
        self,
        fn: Callable[[Item], Any],
        items: Iterable[Item],
        *,
        cpus_per_item: int,
        exclusive: Callable[[Item], bool],
        retries: int,
    ) -> Generator[tuple[Item, Any], None, None]:
        """Run `fn(item)` for every item as a Ray task; yield `(item, result or exception)`.

        `fn` must be a picklable top-level function. Results arrive as tasks finish.
        """
        ray = self._ray
        items = list(items)
        if not items:
            return
        self._check_cpus(cpus_per_item)
        task = ray.remote(_run_item)
        options = {"num_cpus": cpus_per_item, "max_retries": retries, "retry_exceptions": False}
        plain = task.options(**options)
        serial = self._timing_slots == 0
        timed = plain if serial else task.options(**options, resources={TIMING_RESOURCE: 1})
        is_exclusive = [bool(exclusive(item)) for item in items]
        if serial and any(is_exclusive):
            self._warn(
                f"the Ray cluster has no {TIMING_RESOURCE} resource: timing work runs one "
                f"model at a time (start each node with --resources "
                f"'{{\"{TIMING_RESOURCE}\": 1}}')"
            )

        def submit(remote: Any, item: Item) -> Any:
            refs: list[Any] = []
            skeleton = _extract_refs(item, ray.ObjectRef, refs)
            return remote.remote(fn, skeleton, *refs)

        pending: dict[Any, Item] = {}
        waiting_exclusive: list[Item] = []
        for item, alone in zip(items, is_exclusive, strict=True):
            if alone and serial:
                waiting_exclusive.append(item)
            else:
                pending[submit(timed if alone else plain, item)] = item
        running_exclusive: Any = None
        try:
            while pending or waiting_exclusive:
                if serial and running_exclusive is None and waiting_exclusive:
                    next_item = waiting_exclusive.pop(0)
                    running_exclusive = submit(timed, next_item)
                    pending[running_exclusive] = next_item
                ready, _ = ray.wait(list(pending), num_returns=1)
                ref = ready[0]
                item = pending.pop(ref)
                if ref == running_exclusive:
                    running_exclusive = None
                try:
                    result = ray.get(ref)
                except Exception as exc:  # the worker died after its retries, or was cancelled
                    result = exc
                yield item, result
        finally:
            for ref in pending:
                ray.cancel(ref, force=True)

    def _check_cpus(self, cpus_per_item: int) -> None:
        """Refuse (local instance) or warn (cluster) when no node has `cpus_per_item` CPUs.

        Ray would otherwise hold such a task forever, waiting for a node that never comes.
        """
        most = max(
            (n.get("Resources", {}).get("CPU", 0) for n in self._ray.nodes() if n.get("Alive")),
            default=0,
        )
        if cpus_per_item <= most:
            return
        message = (
            f"each model asks for {cpus_per_item} CPUs, but no Ray node has more than {most:g}"
        )
        if self.address is None and self._owns_ray:
            raise UsageError(message)
        self._warn(message + ": the tasks wait until one joins")

    def close(self) -> None:
        """Shut down Ray if this backend started it (a local instance or its cluster connection)."""
        if self._owns_ray and self._ray.is_initialized():
            self._ray.shutdown()
        self._owns_ray = False

    def __enter__(self) -> RayBackend:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
