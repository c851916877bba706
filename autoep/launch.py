"""The one launcher for multi-process runs: tests, conformance, benchmarks and examples.

``RankPool(world_size)`` starts ``world_size`` rank processes on 127.0.0.1, each joined
to one ``torch.distributed`` default process group, and runs named functions on every
rank::

    with RankPool(2) as pool:
        results = pool.run("mypackage.cases:step", 3, timeout=60)  # one result per rank

- Device and backend are chosen in one place, :func:`backend_for`: gloo on CPU, NCCL on
  CUDA (rank r uses ``cuda:r``).
- The rendezvous is a ``FileStore`` in a directory of its own that only this user can enter
  (mode 0700, made by this process and removed when the pool closes); its path reaches the
  ranks over their authenticated connections. There is no store port: no other local client
  can list, read or overwrite the job's keys (a TCPStore serves anyone who reaches its port,
  and lists its keys to them).
- A rank that raises sends back its traceback; the call raises :class:`RankError` with
  every rank's outcome. When every rank came back (each raised or returned), the pool stays
  usable; when a rank had to be killed (still running after another failed), or the call
  ran past its timeout (:class:`RankTimeout`), or on Ctrl-C, the pool's processes are
  killed, since ranks left inside a collective cannot be reused; :func:`shared_pool` then
  starts a fresh pool on next use.
- Rank processes exit when this process exits or dies (a watchdog thread polls the parent
  pid), so no process is ever left behind. Each rank runs in its own session (process
  group), and closing the pool (or the watchdog) ends the whole group: what a rank started
  (a data-loader worker, a subprocess) goes with it, unless it left the group itself
  (``setsid``).
- Pools are reused: :func:`shared_pool` keeps one pool per (world size, device) for the
  life of the process; starting ranks (interpreter + torch import) costs seconds, a call
  on a warm pool milliseconds.

Targets are named ``"module:function"`` (or given as a module-level function) so that a
rank process can import them; arguments and results travel pickled.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import pickle
import secrets
import signal
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from multiprocessing.connection import Connection, Listener, wait
from typing import Any, Callable

from autoep.processes import alive

HOST = "127.0.0.1"
DEFAULT_TIMEOUT_S = 300.0
START_TIMEOUT_S = 120.0
# After one rank failed, how long the others get to finish (they may be blocked in a
# collective with the failed rank, and are then killed).
FAILURE_GRACE_S = 5.0


def backend_for(device: str) -> str:
    """The collective backend for a device type: the only place this choice is made (with the
    matching DeepSpeed accelerator, set in the rank processes' environment)."""
    if device == "cpu":
        return "gloo"
    if device == "cuda":
        return "nccl"
    raise ValueError(f"device={device!r}: the launcher supports 'cpu' (gloo) and 'cuda' (nccl)")


def send(connection: Connection, message: Any) -> None:
    # Plain pickle: Connection.send's pickler shares tensor storage through file descriptors
    # (torch.multiprocessing's reductions), which needs a multiprocessing-started peer.
    # Rank processes are plain subprocesses, so tensors travel as bytes.
    connection.send_bytes(pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL))


def receive(connection: Connection) -> Any:
    return pickle.loads(connection.recv_bytes())


def target_name(target: str | Callable) -> str:
    if isinstance(target, str):
        if ":" not in target:
            raise ValueError(f"target {target!r} must be 'module:function'")
        return target
    module, qualname = target.__module__, target.__qualname__
    if module == "__main__" or "<locals>" in qualname:
        raise ValueError(f"target {qualname!r} must be a module-level function of an importable module "
                         f"(got module {module!r}); rank processes import it by name")
    return f"{module}:{qualname}"


class RankError(RuntimeError):
    """At least one rank raised. ``outcomes[r]`` is ``("ok", result)`` or ``("error", traceback)``
    or ``("killed", why)`` for each rank."""

    def __init__(self, target: str, outcomes: list[tuple[str, Any]]):
        self.outcomes = outcomes
        lines = [f"{target} failed on rank(s) "
                 f"{[r for r, (kind, _) in enumerate(outcomes) if kind != 'ok']} of {len(outcomes)}:"]
        for rank, (kind, detail) in enumerate(outcomes):
            if kind != "ok":
                lines.append(f"--- rank {rank} ({kind}) ---\n{detail}".rstrip())
        super().__init__("\n".join(lines))


class RankTimeout(TimeoutError):
    """A call did not finish on every rank within its timeout; the pool was killed."""


@dataclass
class _Rank:
    process: subprocess.Popen
    connection: Connection | None = None


class RankPool:
    """``world_size`` rank processes in one default process group (see module docstring)."""

    def __init__(self, world_size: int, device: str = "cpu", threads_per_rank: int = 1,
                 env: dict[str, str] | None = None, start_timeout: float = START_TIMEOUT_S):
        if world_size < 1:
            raise ValueError(f"world_size must be >= 1, got {world_size}")

        self.world_size = world_size
        self.device = device
        self.backend = backend_for(device)
        self.closed = False
        remove_stale_store_folders()
        self._store_dir = tempfile.mkdtemp(prefix=f"{STORE_PREFIX}{os.getpid()}-")  # mode 0700 (module docstring)
        self._store_path = os.path.join(self._store_dir, "store")
        authkey = secrets.token_bytes(16)
        self._listener = Listener((HOST, 0), authkey=authkey)
        child_env = {**os.environ, **(env or {}),
                     "AUTOEP_RANK_PARENT": f"{HOST}:{self._listener.address[1]}",
                     "AUTOEP_RANK_AUTHKEY": authkey.hex(), "AUTOEP_RANK_PARENT_PID": str(os.getpid()),
                     "WORLD_SIZE": str(world_size), "AUTOEP_DEVICE": device, "AUTOEP_BACKEND": self.backend,
                     "AUTOEP_THREADS": str(threads_per_rank), "OMP_NUM_THREADS": str(threads_per_rank),
                     "DS_ACCELERATOR": device,
                     "PYTHONPATH": os.pathsep.join(p for p in sys.path if p)}
        self._ranks: list[_Rank] = []
        try:
            for rank in range(world_size):
                process = subprocess.Popen([sys.executable, "-m", "autoep._rank_worker"], start_new_session=True,
                                           env={**child_env, "RANK": str(rank), "LOCAL_RANK": str(rank)})
                self._ranks.append(_Rank(process))
            self._accept(start_timeout)
            self._collect("<start>", start_timeout)  # every rank joined the process group
        except BaseException:
            self.close(kill=True)
            raise

    @property
    def pids(self) -> list[int]:
        return [rank.process.pid for rank in self._ranks]

    def _accept(self, timeout: float) -> None:
        import threading

        by_rank: dict[int, Connection] = {}
        errors: list[BaseException] = []

        def accept_all() -> None:
            try:
                while len(by_rank) < self.world_size:
                    connection = self._listener.accept()
                    by_rank[receive(connection)] = connection
                    send(connection, self._store_path)
            except BaseException as error:  # the listener was closed below, or a bad handshake
                errors.append(error)

        acceptor = threading.Thread(target=accept_all, daemon=True)
        acceptor.start()
        deadline = time.monotonic() + timeout
        while acceptor.is_alive():
            acceptor.join(0.1)
            dead = [r for r, rank in enumerate(self._ranks) if rank.process.poll() is not None]
            if dead or time.monotonic() > deadline:
                self._listener.close()  # ends the acceptor thread
                acceptor.join()
                if dead:
                    raise RuntimeError(f"rank process(es) {dead} exited during start-up (exit codes "
                                       f"{[self._ranks[r].process.returncode for r in dead]})")
                raise RankTimeout(f"rank processes did not connect within {timeout:.0f} s")
        if errors:
            raise RuntimeError(f"rank start-up handshake failed: {errors[0]!r}")
        for rank, connection in by_rank.items():
            self._ranks[rank].connection = connection

    def run(self, target: str | Callable, *args, timeout: float = DEFAULT_TIMEOUT_S, **kwargs) -> list[Any]:
        """Run ``target(*args, **kwargs)`` on every rank; returns the results in rank order."""
        return self.run_per_rank(target, [(args, kwargs)] * self.world_size, timeout=timeout)

    def run_per_rank(self, target: str | Callable, calls: list[tuple[tuple, dict]],
                     timeout: float = DEFAULT_TIMEOUT_S) -> list[Any]:
        """Like :meth:`run`, with its own ``(args, kwargs)`` for each rank."""
        if self.closed:
            raise RuntimeError("this RankPool was closed (after a failure, timeout or close())")
        if len(calls) != self.world_size:
            raise ValueError(f"{len(calls)} calls for {self.world_size} ranks")
        name = target_name(target)
        try:
            for rank, (args, kwargs) in zip(self._ranks, calls):
                send(rank.connection, (name, args, kwargs))
            return self._collect(name, timeout)
        except RankError as error:
            # Every rank came back (raised or returned): the pool is reusable. A rank that had
            # to be killed may have left the others mid-collective: start afresh.
            if any(kind == "killed" for kind, _ in error.outcomes):
                self.close(kill=True)
            raise
        except BaseException:
            self.close(kill=True)  # timeout or Ctrl-C: ranks may be inside a collective
            raise

    def _collect(self, name: str, timeout: float) -> list[Any]:
        outcomes: dict[int, tuple[str, Any]] = {}
        pending = {rank.connection: r for r, rank in enumerate(self._ranks)}
        deadline = time.monotonic() + timeout
        while pending:
            failed = any(kind != "ok" for kind, _ in outcomes.values())
            remaining = deadline - time.monotonic()
            if failed:
                remaining = min(remaining, FAILURE_GRACE_S)
            ready = wait(list(pending), timeout=max(remaining, 0.0))
            if not ready:
                if failed:
                    for r in pending.values():
                        outcomes[r] = ("killed", f"still running {FAILURE_GRACE_S:.0f} s after another rank "
                                                 "failed (blocked in a collective with it?)")
                    break
                raise RankTimeout(f"{name} did not finish within {timeout:.0f} s on rank(s) "
                                  f"{sorted(pending.values())} of {self.world_size}; the pool was killed")
            for connection in ready:
                rank = pending.pop(connection)
                try:
                    outcomes[rank] = receive(connection)
                except (EOFError, OSError):
                    code = self._ranks[rank].process.wait(timeout=10)
                    outcomes[rank] = ("killed", f"rank process exited with code {code}")
        ordered = [outcomes[r] for r in range(self.world_size)]
        if any(kind != "ok" for kind, _ in ordered):
            raise RankError(name, ordered)
        return [result for _, result in ordered]

    def close(self, kill: bool = False) -> None:
        """Stop every rank process: politely (they leave the process group) unless ``kill``."""
        if self.closed:
            return
        self.closed = True
        if not kill:
            for rank in self._ranks:
                try:
                    send(rank.connection, None)
                except Exception:
                    kill = True
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline and not all(_exited(rank.process.pid) for rank in self._ranks):
                time.sleep(0.05)
        for rank in self._ranks:
            # The rank (if still running) and whatever it started, also what left its process group
            # (a new session): the rank is not reaped yet, so its pid, which is its process group's id,
            # cannot have been reused, and its descendants are found through /proc.
            for pid in descendants(rank.process.pid):
                with contextlib.suppress(ProcessLookupError, PermissionError):  # gone, or not ours
                    os.kill(pid, signal.SIGKILL)
            _kill_process_group(rank.process.pid)
            rank.process.wait()
            if rank.connection is not None:
                rank.connection.close()
        self._listener.close()
        shutil.rmtree(self._store_dir, ignore_errors=True)
        for pool_key, pool in list(_SHARED.items()):
            if pool is self:
                del _SHARED[pool_key]

    def __enter__(self) -> "RankPool":
        return self

    def __exit__(self, *exc) -> None:
        self.close(kill=exc[0] is not None)


STORE_PREFIX = "autoep-store-"  # + the owner's pid + "-" + random: the rendezvous folder of one pool


def remove_stale_store_folders() -> list[str]:
    """Remove this user's store folders (in the temporary directory) whose owner process is gone: a
    pool's ``close`` removes its own, but an owner killed (SIGKILL, or SIGTERM, which skips ``atexit``)
    leaves it (measured: 26 left in /tmp by an afternoon of killed runs). Returns the paths removed."""
    removed, folder = [], tempfile.gettempdir()
    try:
        entries = os.listdir(folder)
    except OSError:
        return removed
    for entry in entries:
        owner = entry[len(STORE_PREFIX):].partition("-")[0]
        if not entry.startswith(STORE_PREFIX) or not owner.isdigit() or alive(int(owner)):
            continue
        path = os.path.join(folder, entry)
        # A folder removed meanwhile by another pool, or one we may not read: left as it is.
        with contextlib.suppress(FileNotFoundError, PermissionError):
            if os.lstat(path).st_uid != os.getuid() or os.path.islink(path):
                continue
            shutil.rmtree(path)
            removed.append(path)
    return removed


def _exited(pid: int) -> bool:
    """Whether child ``pid`` has exited, without reaping it."""
    try:
        return os.waitid(os.P_PID, pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is not None
    except ChildProcessError:  # already reaped
        return True



def descendants(pid: int) -> list[int]:
    """Every live descendant of ``pid`` (children, theirs ...), read from /proc (Linux); [] elsewhere."""
    children: dict[int, list[int]] = {}
    try:
        entries = os.listdir("/proc")
    except OSError:
        return []
    for entry in entries:
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as handle:
                fields = handle.read().rpartition(")")[2].split()
            children.setdefault(int(fields[1]), []).append(int(entry))
        except (OSError, IndexError, ValueError):
            continue
    found, stack = [], list(children.get(pid, []))
    while stack:
        child = stack.pop()
        found.append(child)
        stack.extend(children.get(child, []))
    return found


def _kill_process_group(pgid: int) -> None:
    try:
        os.killpg(pgid, signal.SIGKILL)
    except ProcessLookupError:  # every process of the group is gone
        pass


_SHARED: dict[tuple[int, str], RankPool] = {}


def shared_pool(world_size: int, device: str = "cpu") -> RankPool:
    """The process-wide pool for ``(world_size, device)``, started on first use and again
    after a failure killed it."""
    key = (world_size, device)
    pool = _SHARED.get(key)
    if pool is None or pool.closed:
        pool = _SHARED[key] = RankPool(world_size, device)
    return pool


def close_shared_pools() -> None:
    for pool in list(_SHARED.values()):
        pool.close()


atexit.register(close_shared_pools)


def run(world_size: int, target: str | Callable, *args, device: str = "cpu",
        timeout: float = DEFAULT_TIMEOUT_S, **kwargs) -> list[Any]:
    """Run ``target`` on every rank of the shared pool of ``world_size``."""
    return shared_pool(world_size, device).run(target, *args, timeout=timeout, **kwargs)
