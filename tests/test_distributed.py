"""util/distributed.py: single-process fallbacks, and a real 2-process gloo group."""
import os
import socket

import pytest
import torch
import torch.multiprocessing as mp

from util import distributed as dist_util
from util.cli import UserError


def test_without_torchrun_everything_is_one_process(monkeypatch):
    for var in ("WORLD_SIZE", "RANK", "LOCAL_RANK"):
        monkeypatch.delenv(var, raising=False)
    info, device = dist_util.init_distributed(torch.device("cpu"))
    assert (info.rank, info.world_size, info.local_rank, info.enabled, info.is_main) == (0, 1, 0, False, True)
    assert device == torch.device("cpu")
    assert not dist_util.is_initialized()
    t = torch.tensor([1.0, 2.0])
    assert torch.equal(dist_util.all_reduce_(t.clone()), t)
    assert dist_util.all_gather_objects({"a": 1}) == [{"a": 1}]
    dist_util.barrier()
    dist_util.cleanup()  # no-ops without a process group


def test_world_size_one_is_not_distributed(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "1")
    info, _ = dist_util.init_distributed(torch.device("cpu"))
    assert not info.enabled and not dist_util.is_initialized()


def test_bad_environment_is_a_user_error(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "two")
    with pytest.raises(UserError, match="WORLD_SIZE"):
        dist_util.init_distributed(torch.device("cpu"))


def test_fingerprint_sees_one_ulp():
    a = {"w": torch.randn(4, 4), "b": torch.randn(4)}
    b = {k: v.clone() for k, v in a.items()}
    assert dist_util.parameter_fingerprint(a.items()) == dist_util.parameter_fingerprint(b.items())
    b["w"][1, 2] = torch.nextafter(b["w"][1, 2], torch.tensor(float("inf")))
    assert dist_util.parameter_fingerprint(a.items()) != dist_util.parameter_fingerprint(b.items())


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world_size: int, port: int, results) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    try:
        info, _ = dist_util.init_distributed(torch.device("cpu"), timeout_s=60)
        total = dist_util.all_reduce_(torch.tensor([float(rank + 1)]))
        smallest = dist_util.all_reduce_(torch.tensor([rank + 5]), op="min")
        gathered = dist_util.all_gather_objects(f"rank{rank}")
        same = torch.nn.Linear(3, 3)
        torch.nn.init.constant_(same.weight, 0.5)
        torch.nn.init.zeros_(same.bias)
        in_sync = dist_util.check_replicas_in_sync(same)
        torch.manual_seed(rank)  # different weights on each rank: must be caught
        try:
            dist_util.check_replicas_in_sync(torch.nn.Linear(3, 3))
            diverged = "not caught"
        except RuntimeError as e:
            diverged = str(e)
        results.put((rank, info.rank, info.world_size, total.item(), smallest.item(), gathered, in_sync, diverged))
    finally:
        dist_util.cleanup()


@pytest.mark.slow
def test_two_process_gloo_group():
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    port = _free_port()
    procs = [ctx.Process(target=_worker, args=(r, 2, port, results)) for r in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=120)
    assert [p.exitcode for p in procs] == [0, 0]
    out = sorted(results.get(timeout=5) for _ in range(2))
    for rank, (r, info_rank, world, total, smallest, gathered, in_sync, diverged) in enumerate(out):
        assert (r, info_rank, world) == (rank, rank, 2)
        assert total == 3.0 and smallest == 5
        assert gathered == ["rank0", "rank1"]
        assert "replicas diverged" in diverged
    assert out[0][6] == out[1][6]  # the same fingerprint on both ranks
