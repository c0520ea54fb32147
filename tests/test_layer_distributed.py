"""The budget controller across ranks (config.budget_sync): two gloo processes on the CPU.

With budget_sync every rank steers by the Avg-K of all ranks' tokens, so the biases stay
identical across ranks, without DDP's buffer broadcast (as under FSDP), and equal to one
process's on the concatenated batch."""
from __future__ import annotations

import copy
import pickle

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from anyexperts_ops.layer import AnyExpertsMoE
from test_layer import H, _layer

pytestmark = pytest.mark.skipif(not (dist.is_available() and dist.is_gloo_available()),
                                reason="needs torch.distributed with gloo")

WORLD = 2


def _batches(seed):
    """One batch per rank, rank 0's tokens far more important than rank 1's (scaled), and
    an empty batch for rank 1 in the third step."""
    g = torch.Generator().manual_seed(seed)
    steps = [[torch.randn(48, H, generator=g) * 3.0, torch.randn(32, H, generator=g) * 0.3]
             for _ in range(3)]
    steps[2][1] = steps[2][1][:0]
    calib = [torch.randn(64, H, generator=g) * 3.0, torch.randn(40, H, generator=g) * 0.3]
    return steps, calib


def _run(layer, steps, calib, rank=None):
    """Training forwards (no backward: only the controller moves), then a calibration.
    rank None: one process on the concatenated batches. A manual controller steps after
    every two forwards, the two halves of a rank's batch."""
    pick = (lambda xs: torch.cat(xs)) if rank is None else (lambda xs: xs[rank])
    manual = layer.config.controller_step == "manual"
    biases = []
    layer.train()
    for xs in steps:
        x = pick(xs)
        with torch.no_grad():
            for part in (x.tensor_split(2) if manual else (x,)):
                layer(part)
        if manual:
            layer.step_budget()
        biases.append(layer.importance_bias.clone())
    reached = layer.set_budget(3.0, pick(calib))
    return torch.stack(biases), layer.importance_bias.clone(), layer.avg_real_ema.clone(), reached


def _worker(rank, init, out_dir, state, seed, explicit_group, step):
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=WORLD)
    try:
        torch.set_num_threads(1)
        only_rank0 = dist.new_group([0])  # every rank creates every group
        if rank == 1:  # a group this rank is not in is refused
            outsider = _layer(target_avg_k=2.5, budget_sync=True, controller_step=step)
            outsider.budget_group = only_rank0
            with pytest.raises(RuntimeError, match="not in the layer's budget_group"):
                _run(outsider, *_batches(seed), rank)
        layer = _layer(target_avg_k=2.5, budget_sync=True, controller_step=step)
        layer.load_state_dict(state)
        if explicit_group:
            layer.budget_group = dist.new_group(list(range(WORLD)))
            layer = copy.deepcopy(layer)  # a copy shares the group (it cannot be pickled)
            assert layer.budget_group is not None
            with pytest.raises(TypeError, match="budget_group"):
                pickle.dumps(layer)
        steps, calib = _batches(seed)
        torch.save(_run(layer, steps, calib, rank), f"{out_dir}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("explicit_group,step", [(False, "forward"), (True, "forward"),
                                                (False, "manual")])
def test_budget_sync_steers_every_rank_by_the_global_avg_k(tmp_path, explicit_group, step):
    seed = int(torch.randint(0, 2**31, ()))
    layer = _layer(target_avg_k=2.5, budget_sync=True, controller_step=step)
    state = copy.deepcopy(layer.state_dict())
    mp.spawn(_worker, args=(f"file://{tmp_path}/store", str(tmp_path), state, seed,
                                 explicit_group, step),
             nprocs=WORLD, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(WORLD)]
    # one process (torch.distributed not initialised: budget_sync reduces over itself)
    single = _run(layer, *_batches(seed))
    for r, got in enumerate(ranks):
        biases, bias, ema, reached = got
        assert torch.equal(biases, single[0]), f"rank {r}: controller steps"
        assert torch.equal(bias, single[1]), f"rank {r}: calibrated bias"
        assert torch.equal(ema, single[2]), f"rank {r}: running mean"
        assert reached == single[3]
    # the ranks' batches differ enough that a per-rank controller would have diverged (over
    # all steps: on one step a rank's Avg-K can equal the global one, and then both ranks' do)
    local = _layer(target_avg_k=2.5, controller_step=step)
    local.load_state_dict(state)
    assert not torch.equal(_run(local, *_batches(seed), rank=1)[0], single[0])


def test_budget_group_needs_budget_sync():
    with pytest.raises(ValueError, match="budget_sync"):
        AnyExpertsMoE(_layer().config, budget_group=object())


def _ddp_worker(rank, init, out_dir, state, seed):
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=WORLD)
    try:
        torch.set_num_threads(1)
        layer = _layer(target_avg_k=2.5, budget_sync=True, controller_step="manual")
        layer.load_state_dict(state)
        ddp = torch.nn.parallel.DistributedDataParallel(layer)  # broadcasts buffers
        steps, _ = _batches(seed)
        for x in steps[0][rank].tensor_split(2):  # micro-batches, gradients synced each
            out, aux = ddp(x)
            (out.square().mean() + aux.loss).backward()
        layer.step_budget()
        torch.save(layer.importance_bias.clone(), f"{out_dir}/ddp{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_manual_counts_are_not_broadcast_by_ddp(tmp_path):
    """DDP copies rank 0's buffers to every rank before each forward: the manual
    controller's counts must not be among them, or rank 1's first micro-batch is lost."""
    seed = int(torch.randint(0, 2**31, ()))
    layer = _layer(target_avg_k=2.5, budget_sync=True, controller_step="manual")
    state = copy.deepcopy(layer.state_dict())
    mp.spawn(_ddp_worker, args=(f"file://{tmp_path}/store", str(tmp_path), state, seed),
             nprocs=WORLD, join=True)
    layer.train()
    with torch.no_grad():
        layer(torch.cat(_batches(seed)[0][0]))
    layer.step_budget()
    for r in range(WORLD):
        assert torch.equal(torch.load(tmp_path / f"ddp{r}.pt"), layer.importance_bias), r


def _options_worker(rank, init, out_dir, state, seed):
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=WORLD)
    try:
        torch.set_num_threads(1)
        layer = _options_layer()
        layer.load_state_dict(state)
        ddp = torch.nn.parallel.DistributedDataParallel(layer)  # buckets per dtype
        out, aux = ddp(_batches(seed)[0][0][rank].bfloat16())
        (out.float().square().mean() + aux.loss).backward()
        torch.save({n: p.grad for n, p in layer.named_parameters()}, f"{out_dir}/grad{rank}.pt")
    finally:
        dist.destroy_process_group()


def _options_layer():
    return _layer(recompute_activations=True, router_dtype="float32").to(torch.bfloat16)


def test_ddp_with_recompute_and_fp32_routing(tmp_path):
    """DDP over a bf16 layer whose router and importance predictor stay fp32 (two dtypes,
    two gradient buckets) and whose backward recomputes x_perm and h: every rank ends with
    the mean of the ranks' gradients, each parameter's in its own dtype."""
    seed = int(torch.randint(0, 2**31, ()))
    layer = _options_layer()
    state = copy.deepcopy(layer.state_dict())
    mp.spawn(_options_worker, args=(f"file://{tmp_path}/store", str(tmp_path), state, seed),
             nprocs=WORLD, join=True)
    want = {}
    for x in _batches(seed)[0][0]:
        m = _options_layer()
        m.load_state_dict(state)
        out, aux = m(x.bfloat16())
        (out.float().square().mean() + aux.loss).backward()
        for n, p in m.named_parameters():
            want[n] = want.get(n, 0) + p.grad.double() / WORLD
    got = [torch.load(tmp_path / f"grad{r}.pt") for r in range(WORLD)]
    for n, w in want.items():
        assert got[0][n].dtype == dict(layer.named_parameters())[n].dtype, n
        assert torch.equal(got[0][n], got[1][n]), n
        err = float((got[0][n].double() - w).norm() / w.norm().clamp_min(1e-30))
        assert err < 1e-2, (n, err)
