"""The output's lease: one run at a time annotates an output.

A run cuts the images that no committed shard holds into shards when it plans. Two runs of one
output that overlap would each cut what they found uncommitted into shards of their own (other
ids where the first had committed some shards by then, or where their pools differ) and both
commit them: images annotated twice. Shard ids cannot be made independent of that timing for
incremental runs, whose new images are cut among themselves so that a grown input does not
scatter them over many small files, nor for an input that changes between two runs' listings;
so an output is annotated by one run at a time, and a run that finds another says so and waits.

Protocol, on ``ROOT/_lease/<n>.json`` (``n`` of 12 digits; the highest ``n`` holds the output):

- **acquire**: create ``n + 1`` exclusively (a conditional PUT; a hard link on local disks)
  when the highest is released, stale or absent; of two runs racing for ``n + 1`` exactly one
  creates it, the other looks again;
- **renew**: the holder rewrites its object every quarter of ``--lease-seconds`` (``beat``
  counts up) from a driver thread, after checking that its ``n`` is still the highest;
- **stale**: a waiting run saw the highest object unchanged for the holder's ``seconds`` on
  its own monotonic clock (no two machines' clocks are compared), or the holder ran on this
  machine (same boot, same pid namespace) and its process is gone;
- **fence**: a worker starts a shard only while its run's lease is the highest and running,
  and commits only while it is the highest and not released
  (:meth:`.output.OutputStore.commit_shard`), so a run taken over after a stall commits
  nothing more;
- **stop**: an interrupted run marks its lease stopping: shards in flight still commit, no new
  one starts;
- **release**: the holder rewrites its object as released. The highest object is never
  deleted, so numbers are never reused; the next holder deletes the ones below its own.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import socket
import sys
import threading
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .output import OutputStore

RUNNING, STOPPING, RELEASED = "running", "stopping", "released"


def _say(line: str) -> None:
    print(f"annotate: {line}", flush=True)


def _warn(line: str) -> None:
    print(f"annotate: warning: {line}", file=sys.stderr, flush=True)


class RunLease:
    """This run's hold on an output (see the module docstring); ``token`` is what the workers'
    fence compares, ``lost_to`` the record of the run that took the output over, if one did."""

    def __init__(self, store: OutputStore, run_id: str, seconds: float, number: int) -> None:
        self.store = store
        self.seconds = seconds
        self.number = number
        self.token = uuid.uuid4().hex
        now = _now()
        self.record: dict[str, Any] = {
            "token": self.token,
            "run_id": run_id,
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "machine": _machine(),
            "process_started": _started(os.getpid()),
            "acquired": now,
            "renewed": now,
            "beat": 0,
            "seconds": seconds,
            "state": RUNNING,
        }
        self.lost_to: dict[str, Any] | None = None
        self._stopping = False
        self._closed = False
        self._wake = threading.Event()
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._beat, name="annotate-lease", daemon=True)

    @property
    def name(self) -> str:
        return self.store.lease_name(self.number)

    @classmethod
    def acquire(cls, store: OutputStore, run_id: str, seconds: float, say: Callable[[str], None] = _say) -> RunLease:
        """Hold ``store``'s output for run ``run_id``, renewed every ``seconds / 4``: at once if
        no run holds it, else once the holder releases it or goes stale (see the module docstring)."""
        seen: tuple[int, bytes | None] | None = None
        since = time.monotonic()
        waiting = False
        while True:
            number, data = store.newest_lease()
            if (number, data) != seen:
                seen, since = (number, data), time.monotonic()
            holder = _record(data)
            free = _why_free(data, holder, time.monotonic() - since, seconds)
            if free is None:
                if not waiting:
                    limit = float(holder.get("seconds", seconds)) if holder else seconds
                    say(
                        f"output {store.uri} is being annotated by run {_who(holder)}; waiting for it to end "
                        f"(a lease not renewed for {limit:g} s is taken over)"
                    )
                    waiting = True
                time.sleep(max(0.05, min(5.0, seconds / 4)))
                continue
            if holder is not None and holder.get("state") != RELEASED:
                say(f"taking over the lease of run {_who(holder)}: {free}")
            lease = cls(store, run_id, seconds, number + 1)
            if store.create_json(lease.name, lease.record):
                lease._thread.start()
                try:
                    store.remove_leases_below(lease.number)
                except Exception as exc:  # old lease objects are only clutter
                    _warn(f"could not remove old lease objects ({type(exc).__name__}: {exc})")
                return lease
            # Another run created that number first: look again.

    @property
    def lost(self) -> bool:
        return self.lost_to is not None

    def stop(self) -> None:
        """Start no new shard (shards in flight still commit); safe in a signal handler: the
        lease thread writes the change at once."""
        self._stopping = True
        self._wake.set()

    def release(self) -> None:
        """Mark the lease released (unless another run took it over) and stop renewing it."""
        if self._closed:
            return
        self._closed = True
        self._wake.set()
        if self._thread.is_alive():
            self._thread.join(self.seconds)
        if not self.lost:
            self._renew(RELEASED)

    def _beat(self) -> None:
        while not self._closed and not self.lost:
            self._wake.wait(self.seconds / 4)
            self._wake.clear()
            if not self._closed:
                self._renew()

    def _renew(self, state: str | None = None) -> None:
        with self._lock:
            try:
                number, data = self.store.newest_lease()
                if number != self.number:
                    self.lost_to = _record(data) or {}
                    _warn(f"run {_who(self.lost_to)} took over the lease of output {self.store.uri}; no new shard starts")
                    return
                state = state or (STOPPING if self._stopping else RUNNING)
                self.record.update(beat=self.record["beat"] + 1, renewed=_now(), state=state)
                self.store.write_json(self.name, self.record)
            except Exception as exc:  # a store failing now and then: the next beat tries again
                _warn(f"could not renew the lease of output {self.store.uri} ({type(exc).__name__}: {exc})")


def _why_free(data: bytes | None, holder: dict[str, Any] | None, unchanged: float, seconds: float) -> str | None:
    """Why the newest lease object (``data``, its record ``holder``, seen unchanged for
    ``unchanged`` seconds) may be taken, or None while its run holds the output."""
    if data is None:
        return "no lease"
    if holder is not None and holder.get("state") == RELEASED:
        return "released"
    if holder is not None and _process_gone(holder):
        return "its process is gone"
    limit = float(holder.get("seconds", seconds)) if holder is not None else seconds
    if unchanged >= limit:
        return f"not renewed for {unchanged:.0f} s"
    return None


def _record(data: bytes | None) -> dict[str, Any] | None:
    try:
        record = json.loads(data) if data is not None else None
    except ValueError:
        return None
    return record if isinstance(record, dict) else None


def _who(holder: dict[str, Any] | None) -> str:
    if not holder:
        return "(unknown)"
    return f"{holder.get('run_id')} (pid {holder.get('pid')} on {holder.get('host')}, since {holder.get('acquired')})"


def _now() -> str:
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")


def _machine() -> str | None:
    """This machine's boot and pid namespace, within which a pid names one process (Linux)."""
    try:
        return f"{Path('/proc/sys/kernel/random/boot_id').read_text().strip()}/{os.readlink('/proc/self/ns/pid')}"
    except OSError:
        return None


def _started(pid: int) -> str | None:
    """When process ``pid`` started (clock ticks after boot), None if there is none or it has exited."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat[stat.rindex(")") + 2 :].split()
    return None if fields[0] in ("Z", "X") else fields[19]


def _process_gone(holder: dict[str, Any]) -> bool:
    """Whether the holder ran in this machine's pid namespace and its process no longer runs
    (a pid since reused by another process counts as gone: it started at another time)."""
    machine = _machine()
    if machine is None or holder.get("machine") != machine or not isinstance(holder.get("pid"), int):
        return False
    return _started(holder["pid"]) != holder.get("process_started")
