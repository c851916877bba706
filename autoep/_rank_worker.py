"""The rank process started by :class:`autoep.launch.RankPool` (``python -m autoep._rank_worker``).

It connects back to the parent, receives the path of the pool's FileStore over that
(authenticated) connection, joins the default process group through it, then runs ``(target, args, kwargs)`` requests until told
to stop. Every outcome goes back as ``("ok", result)`` or ``("error", traceback)``.
"""

from __future__ import annotations

import importlib
import os
import signal
import threading
import time
import traceback
from datetime import timedelta
from multiprocessing.connection import Client

from autoep.launch import receive, send


def ended_unreaped(pid: int) -> bool:
    """True when ``pid`` has exited but was not reaped (a zombie): its pid then stays our
    parent's pid, so ``getppid()`` alone cannot tell (measured in a container whose init does not
    reap: the ranks of a killed pool ran on for half an hour)."""
    try:
        with open(f"/proc/{pid}/stat") as handle:
            # "pid (comm) state ...": comm may hold spaces and parentheses, so split after the last ')'
            return handle.read().rpartition(")")[2].split()[0] in ("Z", "X")
    except (OSError, IndexError):  # no /proc (not Linux), or the entry vanished
        return False


def parent_gone(parent_pid: int) -> bool:
    """True once the pool's process has ended: this process was re-parented, or the parent is a
    zombie nobody reaps."""
    return os.getppid() != parent_pid or ended_unreaped(parent_pid)


def end_everything(*_signal) -> None:
    """End this rank and everything it started: its descendants (also those that left its process
    group, found through /proc), its process group, itself."""
    from autoep.launch import descendants

    for pid in descendants(os.getpid()):
        try:
            os.kill(pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
    if os.getpgrp() == os.getpid():
        os.killpg(os.getpid(), signal.SIGKILL)  # the group, this process included
    os._exit(3)


def _guard_against_orphans(parent_pid: int) -> None:
    """Linux: this process adopts what its children leave behind (a child subreaper, so every
    descendant stays in its tree) and gets SIGTERM from the kernel when the parent dies, whatever
    killed it (PR_SET_PDEATHSIG); the handler ends everything. Elsewhere the watchdog thread alone."""
    signal.signal(signal.SIGTERM, end_everything)
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(36, 1, 0, 0, 0)  # PR_SET_CHILD_SUBREAPER
        libc.prctl(1, signal.SIGTERM, 0, 0, 0)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass
    if parent_gone(parent_pid):  # it died before the death signal was armed
        end_everything()


def _exit_when_parent_dies(parent_pid: int) -> None:
    # A rank blocked in a collective never reads its connection again; this thread ends the
    # process once the parent is gone (killed, crashed, Ctrl-C), so no rank outlives its pool,
    # and with it every process it started (the pool starts each rank as a process group leader).
    while True:
        if parent_gone(parent_pid):
            end_everything()
        time.sleep(0.5)


def _resolve(name: str):
    module_name, _, qualname = name.partition(":")
    target = importlib.import_module(module_name)
    for part in qualname.split("."):
        target = getattr(target, part)
    return target


def _without_deepspeed_shm_kernel() -> None:
    """CPU ranks: DeepSpeed builds its shared-memory allreduce kernel (a C++ JIT build: 90-120 s
    per fresh environment on 2 cores) when its comm backend starts, but only
    ``inference_all_reduce`` uses it; training reduces through torch.distributed. A build
    killed midway leaves a lock on which every later DeepSpeed start waits. The ranks of this
    launcher therefore start DeepSpeed's backend without it (deepspeed.comm.torch.build_shm_op)."""
    try:
        import deepspeed.comm.torch as deepspeed_torch_comm
    except ImportError:
        return
    deepspeed_torch_comm.build_shm_op = lambda: None


def main() -> None:
    env = os.environ
    rank, world_size = int(env["RANK"]), int(env["WORLD_SIZE"])
    _guard_against_orphans(int(env["AUTOEP_RANK_PARENT_PID"]))
    threading.Thread(target=_exit_when_parent_dies, args=(int(env["AUTOEP_RANK_PARENT_PID"]),),
                     daemon=True).start()
    host, port = env["AUTOEP_RANK_PARENT"].rsplit(":", 1)
    connection = Client((host, int(port)), authkey=bytes.fromhex(env["AUTOEP_RANK_AUTHKEY"]))
    send(connection, rank)
    store_path = receive(connection)  # the job's FileStore, in a directory only this user can enter
    try:
        import torch
        import torch.distributed as dist

        torch.set_num_threads(int(env["AUTOEP_THREADS"]))
        if env["AUTOEP_DEVICE"] == "cuda":
            torch.cuda.set_device(rank)
        store = dist.FileStore(store_path, world_size)
        dist.init_process_group(env["AUTOEP_BACKEND"], store=store, rank=rank, world_size=world_size,
                                timeout=timedelta(seconds=1800))
        if env["AUTOEP_DEVICE"] == "cpu":
            _without_deepspeed_shm_kernel()
        send(connection, ("ok", None))
    except BaseException:
        send(connection, ("error", traceback.format_exc()))
        return
    while True:
        try:
            request = receive(connection)
        except (EOFError, OSError, KeyboardInterrupt):
            break
        if request is None:
            break
        name, args, kwargs = request
        try:
            outcome = ("ok", _resolve(name)(*args, **kwargs))
        except BaseException:
            outcome = ("error", traceback.format_exc())
        try:
            send(connection, outcome)
        except Exception:  # an unpicklable result
            send(connection, ("error", traceback.format_exc()))
    try:
        dist.destroy_process_group()
    except Exception:
        pass


if __name__ == "__main__":
    main()
