"""The launcher: results per rank, pool reuse, failures, timeouts, and no process left behind."""

import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest
import torch
import torch.distributed as dist

from autoep import launch
from autoep.groups import build_groups, check_autoep_size, layout, valid_autoep_sizes
from autoep.config import AutoEPConfigError

pytestmark = pytest.mark.xdist_group("ranks")


def rank_facts(offset: float) -> dict:
    value = torch.tensor([dist.get_rank() + offset])
    dist.all_reduce(value)
    return {"rank": dist.get_rank(), "world": dist.get_world_size(), "backend": dist.get_backend(),
            "sum": float(value), "pid": os.getpid(), "threads": torch.get_num_threads()}


def fail_on_rank_one() -> int:
    if dist.get_rank() == 1:
        raise ValueError("deliberate failure on rank 1")
    dist.barrier()  # the others block here until the pool is killed
    return 0


def sleep(seconds: float) -> None:
    time.sleep(seconds)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    with open(f"/proc/{pid}/stat") as stat:  # a zombie (exited, not yet reaped) counts as gone
        return stat.read().split(")")[-1].split()[0] != "Z"


def _wait_gone(pids, seconds=15.0) -> list[int]:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline and any(_alive(pid) for pid in pids):
        time.sleep(0.1)
    return [pid for pid in pids if _alive(pid)]


def test_results_in_rank_order_and_pool_reused():
    first = launch.run(4, rank_facts, 1.0)
    assert [r["rank"] for r in first] == [0, 1, 2, 3]
    assert {r["world"] for r in first} == {4} and {r["backend"] for r in first} == {"gloo"}
    assert {r["sum"] for r in first} == {10.0}  # 1+2+3+4: one process group over all ranks
    assert {r["threads"] for r in first} == {1}
    second = launch.run(4, "test_launch:rank_facts", 0.0)
    assert [r["pid"] for r in second] == [r["pid"] for r in first]  # the same warm processes


def test_backend_is_chosen_in_one_place():
    assert (launch.backend_for("cpu"), launch.backend_for("cuda")) == ("gloo", "nccl")
    with pytest.raises(ValueError, match="device='tpu'"):
        launch.backend_for("tpu")


def test_targets_must_be_importable_by_name():
    def local():
        pass

    with pytest.raises(ValueError, match="module-level function"):
        launch.target_name(local)
    with pytest.raises(ValueError, match="'module:function'"):
        launch.target_name("no_colon")


def test_rank_failure_returns_traceback_and_replaces_the_pool():
    pool = launch.shared_pool(2)
    pids = pool.pids
    with pytest.raises(launch.RankError) as raised:
        launch.run(2, fail_on_rank_one)
    message = str(raised.value)
    assert "ValueError: deliberate failure on rank 1" in message and "fail_on_rank_one" in message
    kinds = [kind for kind, _ in raised.value.outcomes]
    assert kinds == ["killed", "error"]  # rank 0 was blocked in the barrier
    assert pool.closed and _wait_gone(pids) == []
    assert [r["rank"] for r in launch.run(2, rank_facts, 0.0)] == [0, 1]  # a fresh pool


def fail_everywhere() -> None:
    raise RuntimeError(f"deliberate failure on rank {dist.get_rank()}")


def test_a_failure_on_every_rank_keeps_the_pool():
    pids = launch.shared_pool(2).pids
    with pytest.raises(launch.RankError) as raised:
        launch.run(2, fail_everywhere)
    assert [kind for kind, _ in raised.value.outcomes] == ["error", "error"]
    assert launch.shared_pool(2).pids == pids  # every rank came back: nothing to kill
    assert [r["rank"] for r in launch.run(2, rank_facts, 0.0)] == [0, 1]


def test_timeout_kills_the_pool():
    pool = launch.shared_pool(2)
    pids = pool.pids
    with pytest.raises(launch.RankTimeout, match="did not finish within 1 s"):
        launch.run(2, sleep, 30, timeout=1)
    assert _wait_gone(pids) == []


# The driver stands for a user's foreground job: Ctrl-C raises KeyboardInterrupt there. A job started in
# the background of a non-interactive shell (`cmd &`, as a CI script may) inherits SIGINT ignored, and
# Python then leaves it ignored (measured: the ctrl-c case timed out only in runs started that way).
_DRIVER = textwrap.dedent("""
    import signal, sys, time
    signal.signal(signal.SIGINT, signal.default_int_handler)
    sys.path.insert(0, {tests!r})
    from autoep import launch
    pool = launch.shared_pool(2)
    print(" ".join(map(str, pool.pids)), flush=True)
    launch.run(2, "test_launch:sleep", 60)
""")


@pytest.mark.parametrize("signal_number", [signal.SIGINT, signal.SIGKILL], ids=["ctrl-c", "kill-9"])
def test_no_rank_outlives_its_parent(signal_number):
    """Ctrl-C in the parent ends its ranks; so does the parent dying without any cleanup."""
    driver = subprocess.Popen([sys.executable, "-c", _DRIVER.format(tests=os.path.dirname(__file__))],
                              stdout=subprocess.PIPE, text=True, env={**os.environ, "PYTHONPATH": os.getcwd()})
    pids = [int(pid) for pid in driver.stdout.readline().split()]
    assert len(pids) == 2 and all(_alive(pid) for pid in pids)
    time.sleep(0.5)  # the ranks are inside sleep(60)
    driver.send_signal(signal_number)
    driver.wait(timeout=30)
    assert _wait_gone(pids) == []


def test_group_layout_arithmetic():
    assert layout((0, 1, 2, 3), 2) == ([(0, 1), (2, 3)], [(0, 2), (1, 3)])
    assert layout((0, 1, 2, 3), 4) == ([(0, 1, 2, 3)], [(0,), (1,), (2,), (3,)])
    assert layout((0, 1, 2, 3), 1) == ([(0,), (1,), (2,), (3,)], [(0, 1, 2, 3)])
    assert layout((4, 5, 6, 7, 8, 9), 3) == ([(4, 5, 6), (7, 8, 9)], [(4, 7), (5, 8), (6, 9)])
    assert valid_autoep_sizes(8, [8, 4]) == [1, 2, 4]
    assert valid_autoep_sizes(None, [6]) == [1, 2, 3, 6]


@pytest.mark.parametrize("size,world,counts,message", [
    (3, 4, {"l0": 4}, r"autoep_size=3 does not divide the 4 experts of 'l0'; valid sizes for this model and "
                      r"world size 4: \[1, 2, 4\]"),
    (4, 2, {"l0": 4}, r"autoep_size=4 does not divide the data-parallel world size 2; valid sizes .*: \[1, 2\]"),
    (4, 8, {"l0": 8, "l1": 6}, r"does not divide the 6 experts of 'l1'; .*: \[1, 2\]"),
])
def test_autoep_size_validation_lists_valid_sizes(size, world, counts, message):
    with pytest.raises(AutoEPConfigError, match=message):
        check_autoep_size(size, world, counts)


def groups_on_rank(autoep_size: int) -> dict:
    groups = build_groups(autoep_size)
    again = build_groups(autoep_size)
    # A collective over each group proves membership: sum of the members' global ranks.
    sums = []
    for group in (groups.ep_group, groups.edp_group):
        value = torch.tensor([float(dist.get_rank())])
        if group is not None:
            dist.all_reduce(value, group=group)
        sums.append(float(value))
    return {"ep_rank": groups.ep_rank, "ep_ranks": groups.ep_ranks, "edp_ranks": groups.edp_ranks,
            "sums": sums, "cached": again is groups}


def test_groups_on_four_ranks():
    result = launch.run(4, groups_on_rank, 2)
    assert [r["ep_ranks"] for r in result] == [(0, 1), (0, 1), (2, 3), (2, 3)]
    assert [r["edp_ranks"] for r in result] == [(0, 2), (1, 3), (0, 2), (1, 3)]
    assert [r["ep_rank"] for r in result] == [0, 1, 0, 1]
    assert [r["sums"] for r in result] == [[1.0, 2.0], [1.0, 4.0], [5.0, 2.0], [5.0, 4.0]]
    assert all(r["cached"] for r in result)


# ------------------------------------------------------------ process groups and the store secret

def spawn_sleeper() -> int:
    """Start a grandchild (like a data-loader worker) that outlives this call; return its pid."""
    return subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"]).pid


@pytest.mark.parametrize("kill", [False, True], ids=["close", "close-kill"])
def test_close_ends_every_process_a_rank_started(kill):
    pool = launch.RankPool(2)
    try:
        sleepers = pool.run(spawn_sleeper)
        assert all(_alive(pid) for pid in sleepers)
    finally:
        pool.close(kill=kill)
    assert _wait_gone(pool.pids + sleepers) == []  # before the fix, the sleepers lived on


def store_exchange(role: str, value: str = "") -> str | None:
    """Rank 0 publishes ``value`` through the job's store; later rank 1 reads it back."""
    store = dist.distributed_c10d._get_default_store()
    if role == "publish" and dist.get_rank() == 0:
        store.set("payload", value)
    if role == "read" and dist.get_rank() == 1:
        return store.get("payload").decode()
    return None


def new_group_sum() -> float:
    """A new process group's rendezvous goes through the store; rank 1 comes late, so rank 0
    reads rank 1's address key before rank 1 writes it (it would read a planted one)."""
    if dist.get_rank() == 1:
        time.sleep(1.0)
    group = dist.new_group([0, 1])
    value = torch.tensor([dist.get_rank() + 1.0])
    dist.all_reduce(value, group=group)
    return float(value)


def store_kind() -> str:
    """The kind of the store this rank's default process group rendezvoused through."""
    store = dist.distributed_c10d._get_default_store()
    while hasattr(store, "underlying_store"):  # (torch wraps it in PrefixStores)
        store = store.underlying_store
    return type(store).__name__


def test_the_store_is_private_to_the_pool():
    """No store port: a FileStore in a directory only this user can enter (a TCPStore lists its keys to
    any local client of its port, torch 2.13's list_keys), removed when the pool closes; ranks still
    rendezvous through it for new groups."""
    import stat

    with launch.RankPool(2) as pool:
        mode = stat.S_IMODE(os.stat(pool._store_dir).st_mode)
        assert mode == 0o700 and os.stat(pool._store_dir).st_uid == os.getuid()
        assert pool.run(store_kind) == ["FileStore", "FileStore"]
        pool.run(store_exchange, "publish", "genuine")
        assert pool.run(store_exchange, "read") == [None, "genuine"]
        assert pool.run(new_group_sum, timeout=60) == [3.0, 3.0]
        folder = pool._store_dir
    assert not os.path.exists(folder)


def spawn_session_sleeper() -> int:
    """A grandchild that leaves the rank's process group (a new session), as a detached worker would."""
    return subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"], start_new_session=True).pid


_SESSION_DRIVER = textwrap.dedent("""
    import sys, time
    sys.path.insert(0, {tests!r})
    from autoep import launch
    pool = launch.shared_pool(2)
    print(" ".join(map(str, pool.pids + launch.run(2, "test_launch:spawn_session_sleeper"))), flush=True)
    launch.run(2, "test_launch:sleep", 60)
""")


@pytest.mark.parametrize("signal_number", [signal.SIGTERM, signal.SIGKILL], ids=["term", "kill-9"])
def test_nothing_a_rank_started_outlives_the_launcher(signal_number):
    """The launching process killed by any signal: its ranks end, and so does what they started, also a
    process that left their process group (the kernel's parent-death signal, and the rank adopting its
    descendants as a child subreaper)."""
    driver = subprocess.Popen([sys.executable, "-c", _SESSION_DRIVER.format(tests=os.path.dirname(__file__))],
                              stdout=subprocess.PIPE, text=True, env={**os.environ, "PYTHONPATH": os.getcwd()})
    pids = [int(pid) for pid in driver.stdout.readline().split()]
    assert len(pids) == 4 and all(_alive(pid) for pid in pids)
    time.sleep(0.5)
    driver.send_signal(signal_number)
    driver.wait(timeout=30)
    assert _wait_gone(pids) == []


def test_a_zombie_parent_counts_as_gone():
    """A rank's watchdog must notice a pool process that died but was never reaped (a container
    init that does not reap keeps it as a zombie, and getppid() still names it): ranks of a
    killed pool ran on for half an hour before this check."""
    from autoep._rank_worker import ended_unreaped, parent_gone

    child = subprocess.Popen([sys.executable, "-c", "pass"])
    try:
        deadline = time.monotonic() + 30
        while not ended_unreaped(child.pid) and time.monotonic() < deadline:
            time.sleep(0.05)  # exited, not yet reaped: a zombie
        assert ended_unreaped(child.pid), "an exited, unreaped process was not seen as ended"
        assert not ended_unreaped(os.getpid()), "a running process was seen as ended"
        assert not parent_gone(os.getppid()) and parent_gone(os.getpid())
    finally:
        child.wait()


def deepspeed_backend_kernel_on_rank() -> tuple:
    import deepspeed.comm.torch as deepspeed_torch_comm

    return deepspeed_torch_comm.build_shm_op(), dist.get_backend()


def test_cpu_ranks_start_deepspeed_without_its_shared_memory_inference_kernel():
    """DeepSpeed's CPU backend JIT-builds a shared-memory allreduce kernel (90-120 s per fresh
    environment here) that only inference_all_reduce uses; the launcher's CPU ranks skip it and
    train through the process group (gloo)."""
    assert launch.run(2, deepspeed_backend_kernel_on_rank) == [(None, "gloo"), (None, "gloo")]


def test_store_folders_of_dead_owners_are_removed_by_the_next_pool(tmp_path, monkeypatch):
    """A pool's rendezvous folder is named after its owner's pid; one whose owner is gone (killed before
    close) is removed when the next pool starts, a running owner's is kept."""
    import tempfile

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    dead = tmp_path / f"{launch.STORE_PREFIX}{1 << 22}-abc"  # beyond PID_MAX_LIMIT: no process has it
    running = tmp_path / f"{launch.STORE_PREFIX}{os.getpid()}-def"
    unnamed = tmp_path / f"{launch.STORE_PREFIX}xyz"  # an older pool's (no pid): left alone
    for folder in (dead, running, unnamed):
        folder.mkdir()
        (folder / "store").write_text("x")
    with launch.RankPool(1) as pool:
        assert pool.run(rank_facts, 0.0)[0]["rank"] == 0
        assert not dead.exists() and running.exists() and unnamed.exists()
        own = [p for p in tmp_path.iterdir() if p.name.startswith(f"{launch.STORE_PREFIX}{os.getpid()}-")
               and p != running]
        assert len(own) == 1  # this pool's
    assert not own[0].exists()  # removed by close
