"""The training loop: gradient accumulation equals a larger batch, the loss
scaler's skipped steps stay out of the logged loss, and under DDP a rank
without images neither hangs the others nor feeds a blank image to BatchNorm."""

from __future__ import annotations

import os
import socket
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
from torch import nn

from gkg_pyg.builder import build_model
from gkg_pyg.config import load_config
from gkg_pyg.loss import GKGNetLoss
from gkg_pyg.training import distributed, loops, optim, precision

# End-to-end runs of whole scripts: the quick run (-m "not slow") leaves them out.
pytestmark = pytest.mark.slow

SINGLE = distributed.DistInfo(0, 1, 0, torch.device("cpu"))
NUM_CLASSES = 5


def batches(sizes, seed=0, size=33):
    gen = torch.Generator().manual_seed(seed)
    return [{"image": torch.randn(n, 3, size, size, generator=gen),
             "target": (torch.rand(n, NUM_CLASSES, generator=gen) > 0.6).float(), "num_skipped": 0}
            for n in sizes]  # fmt: skip


def merged(parts):
    """The batches of ``parts`` as one batch."""
    return {"image": torch.cat([b["image"] for b in parts]), "target": torch.cat([b["target"] for b in parts]),
            "num_skipped": 0}  # fmt: skip


def mlp(seed=0):
    """A model without BatchNorm (and without randomness in its forward pass)."""
    torch.manual_seed(seed)
    return nn.Sequential(nn.AvgPool2d(3), nn.Flatten(), nn.Linear(3 * 11 * 11, 32), nn.GELU(), nn.Linear(32, 5))


def run(model, data, accumulate, scaler=None, clip=None, lr=1e-3):
    opt_cfg = {"optim": {"lr": lr, "betas": [0.9, 0.999], "weight_decay": 0.05, "eps": 1e-8,
                         "decay_embeddings": True}}  # fmt: skip
    optimizer = optim.build_optimizer(opt_cfg, model)
    steps = loops.steps_per_epoch(len(data), accumulate)
    schedule = optim.LRSchedule(optimizer, steps, 1)  # constant rate
    amp = precision.Precision(None, scaler or torch.amp.GradScaler("cpu", enabled=False), "cpu")
    stats = loops.train_one_epoch(model, data, GKGNetLoss(), optimizer, schedule, amp, SINGLE, clip,
                                  accumulate=accumulate, progress=False)  # fmt: skip
    assert schedule.step_count == steps
    return stats, {n: p.grad.clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("sizes, accumulate", [([4, 4, 4, 4], 4), ([4, 4, 2], 3)])
def test_accumulation_equals_one_large_batch_without_batchnorm(sizes, accumulate):
    data = batches(sizes)
    small, big = mlp(), mlp()
    stats_small, grads_small = run(small, data, accumulate, clip=5.0)
    stats_big, grads_big = run(big, [merged(data)], 1, clip=5.0)
    assert stats_small["images"] == stats_big["images"] == sum(sizes)
    assert stats_small["loss"] == pytest.approx(stats_big["loss"], rel=1e-6)
    for name, grad in grads_big.items():
        torch.testing.assert_close(grads_small[name], grad, rtol=1e-5, atol=1e-7, msg=name)
    for (name, p), q in zip(small.named_parameters(), big.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-7, msg=name)


def test_accumulation_two_steps_and_the_schedule():
    """8 batches of 4, accumulate 4: two optimizer steps, equal to two batches of 16."""
    data = batches([4] * 8, seed=1)
    small, big = mlp(), mlp()
    run(small, data, 4)
    run(big, [merged(data[:4]), merged(data[4:])], 1)
    for (name, p), q in zip(small.named_parameters(), big.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-7, msg=name)
    assert loops.steps_per_epoch(9, 4) == 3 and loops.steps_per_epoch(8, 4) == 2


def test_accumulation_with_batchnorm():
    """GKGNet normalises each batch of 4 with its own statistics, so accumulating
    4 x 4 is not one batch of 16: its gradient is exactly the mean of the four
    batches' gradients, and its loss is close to the batch of 16's (measured:
    within 7%, while the gradients' cosine similarity at initialisation on random
    data is only about 0.1: BatchNorm couples the images of a batch)."""
    cfg = load_config(None, ["model.name=gkgnet_ti", "model.img_size=33", "model.k=3", "model.drop_path=0"])
    data = batches([4, 4, 4, 4], seed=2)

    def fresh():
        torch.manual_seed(0)
        return build_model(cfg, list("abcde"))

    stats, accumulated = run(fresh(), data, 4, lr=1e-12)
    singles = [run(fresh(), [batch], 1, lr=1e-12)[1] for batch in data]
    for name, grad in accumulated.items():
        mean = sum(single[name] for single in singles) / 4
        torch.testing.assert_close(grad, mean, rtol=1e-4, atol=1e-6, msg=name)
    big_stats, big = run(fresh(), [merged(data)], 1, lr=1e-12)
    assert stats["loss"] == pytest.approx(big_stats["loss"], rel=0.1)
    assert not torch.allclose(accumulated["head_patch.weight"], big["head_patch.weight"], rtol=1e-2)


def test_skipped_fp16_step_stays_out_of_the_logged_loss():
    """A step whose gradients are not finite is skipped by the loss scaler: the
    weights do not change and its loss does not enter the epoch's mean."""
    good = batches([4, 4], seed=3)
    poisoned = {**good[0], "image": torch.full_like(good[0]["image"], float("nan"))}
    scaled, plain = mlp(), mlp()
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**12, enabled=True)
    stats, _ = run(scaled, [good[0], poisoned, good[1]], 1, scaler=scaler)
    expected, _ = run(plain, good, 1)
    assert stats["skipped_steps"] == 1 and expected["skipped_steps"] == 0
    assert stats["loss"] == pytest.approx(expected["loss"], rel=1e-6)  # not NaN, and the mean of two steps
    for (name, p), q in zip(scaled.named_parameters(), plain.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7, msg=name)
    assert scaler.get_scale() == 2.0**11


# ---------------------------------------------------------------------------
# DDP: two CPU processes with gloo
# ---------------------------------------------------------------------------
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def bn_net(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                         nn.Linear(8, NUM_CLASSES))  # fmt: skip


def empty_batch():
    return {"image": None, "target": None, "num_skipped": 2}


def _ddp_worker(rank: int, world: int, port: int, out_dir: str) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))  # fmt: skip
    torch.set_num_threads(1)
    info = distributed.init_distributed()
    data = batches([2, 2, 2, 2, 2, 2], seed=10)
    results = {}
    # (a) No BatchNorm: 2 ranks x accumulate 2 x batches of 2 equal one process with batches of 8:
    # step 1 averages (d0, d1) of rank 0 and (d2, d3) of rank 1, step 2 (d4, d5) and (d5, d4).
    model = nn.parallel.DistributedDataParallel(mlp())
    shard = data[rank * 2 : rank * 2 + 2] + data[4 + rank : 5 + rank] + [data[5 - rank]]
    run_ddp(model, shard, 2, info)
    results["mlp"] = {n: p.detach().clone() for n, p in model.module.named_parameters()}
    results["mlp_grad"] = {n: p.grad.clone() for n, p in model.module.named_parameters()}
    # (b) Rank 0 has an empty batch (all its images unreadable) in the second group: every rank
    # skips that group; no blank image reaches BatchNorm.
    model = nn.parallel.DistributedDataParallel(bn_net())
    shard = [data[0], empty_batch()] if rank == 0 else [data[1], data[2]]
    stats = run_ddp(model, shard, 1, info)
    results["bn"] = {k: v.clone() for k, v in model.module.state_dict().items()}
    results["bn_stats"] = stats
    torch.save(results, Path(out_dir) / f"rank{rank}.pt")
    distributed.cleanup_distributed()


def run_ddp(model, shard, accumulate, info):
    opt_cfg = {"optim": {"lr": 1e-3, "betas": [0.9, 0.999], "weight_decay": 0.05, "eps": 1e-8,
                         "decay_embeddings": True}}  # fmt: skip
    optimizer = optim.build_optimizer(opt_cfg, model)
    schedule = optim.LRSchedule(optimizer, loops.steps_per_epoch(len(shard), accumulate), 1)
    amp = precision.Precision(None, torch.amp.GradScaler("cpu", enabled=False), "cpu")
    return loops.train_one_epoch(model, shard, GKGNetLoss(), optimizer, schedule, amp, info, 5.0,
                                 accumulate=accumulate, progress=False)  # fmt: skip


def test_ddp_accumulation_and_a_rank_without_images(tmp_path):
    mp.spawn(_ddp_worker, args=(2, free_port(), str(tmp_path)), nprocs=2, join=True)
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1))
    data = batches([2, 2, 2, 2, 2, 2], seed=10)

    # (a) The global batch of step 1 is data[0:4] (ranks 0 and 1, two batches each), of step 2 data[4:6].
    # The gradients (of the last step) agree tightly; the weights up to AdamW's amplification of
    # rounding differences in near-zero gradients (measured: 9e-7, against 2e-3 per update).
    reference = mlp()
    _, grads = run(reference, [merged(data[0:4]), merged(data[4:6])], 1, clip=5.0)
    for name, p in reference.named_parameters():
        torch.testing.assert_close(r0["mlp_grad"][name], grads[name], rtol=1e-5, atol=1e-7, msg=name)
        torch.testing.assert_close(r0["mlp"][name], p.detach(), rtol=0, atol=1e-5, msg=name)
        assert torch.equal(r0["mlp"][name], r1["mlp"][name]), name

    # (b) One step on data[0] (rank 0) and data[1] (rank 1); the second group is skipped by both.
    assert r0["bn_stats"]["images"] == 4 and r0["bn_stats"]["num_skipped"] == 2
    for key in ("0.weight", "0.bias", "1.weight", "1.bias", "5.weight", "5.bias"):
        assert torch.equal(r0["bn"][key], r1["bn"][key]), key
    # DDP broadcasts rank 0's buffers: its BatchNorm statistics saw data[0] once, never a blank image.
    expected = bn_net()
    expected.train()
    expected(data[0]["image"])
    torch.testing.assert_close(r0["bn"]["1.running_mean"], expected[1].running_mean)
    torch.testing.assert_close(r0["bn"]["1.running_var"], expected[1].running_var)
    assert int(r0["bn"]["1.num_batches_tracked"]) == 1


def test_evaluation_leaves_batchnorm_statistics_alone():
    """Evaluation (also of the distributed sampler's padding repeats) runs in evaluation mode: BatchNorm's
    running statistics and every other tensor of the model stay as they were."""
    model = bn_net()
    model.num_classes = NUM_CLASSES  # what evaluate reads of a model
    model.train()
    model(torch.randn(4, 3, 33, 33))  # statistics away from their initial values
    before = {k: v.clone() for k, v in model.state_dict().items()}
    data = [{**b, "area": torch.zeros_like(b["target"]), "index": torch.arange(i * 3, i * 3 + 3)}
            for i, b in enumerate(batches([3, 3], seed=4))]  # fmt: skip
    result = loops.evaluate(model, data, SINGLE, progress=False)
    assert result["scores"].shape == (6, NUM_CLASSES)
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key]), key
