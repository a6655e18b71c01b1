"""The shared training harness (orbit_pyg.training): determinism, resume, atomic checkpoints, DDP.

The tiny runs come from tests/_train_worker.py, which the DDP and crash tests also launch as
separate processes (torchrun with the gloo backend on CPU; a process that SIGKILLs itself in the
middle of writing a checkpoint).
"""
from __future__ import annotations

import contextlib
import glob
import json
import math
import os
import pathlib
import signal
import subprocess
import sys

import pytest
import torch
from torch import nn
from torch_geometric.data import Data

from orbit_pyg.training import (
    DeterministicBatchSampler,
    ExponentialMovingAverage,
    Trainer,
    atomic_save,
    derive_seed,
    load_checkpoint,
    loss_scale,
    read_metrics,
    shard_indices,
)

ROOT = pathlib.Path(__file__).resolve().parents[1]
WORKER = ROOT / "tests" / "_train_worker.py"
sys.path.insert(0, str(WORKER.parent))
import _train_worker as worker  # noqa: E402

# Stated tolerance of the 1-process vs 2-process (DDP, gloo) comparison of the logged losses:
# float32 model, the two runs sum the same per-node terms in a different order.
DDP_LOSS_RTOL = 1e-5
DDP_STEPS = 10

ORBIT_STEPS = 12  # the stochastic run used by the resume tests (OrbitDiffusionLoss, SO(3), cosine lr)


@contextlib.contextmanager
def single_thread():
    """Same intra-op thread count as the worker processes, so in-process runs are bit-comparable."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(old)


def train_records(path) -> list[dict]:
    """Train and val records of a metrics log without the wall-clock field."""
    return [{k: v for k, v in r.items() if k != "elapsed"} for r in read_metrics(str(path))]


def subprocess_env() -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    env["OMP_NUM_THREADS"] = "1"
    return env


def run_process(cmd: list, timeout: float = 180) -> subprocess.CompletedProcess:
    """Run ``cmd`` in its own process group; on timeout kill the whole group (torchrun's workers too)."""
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=subprocess_env(),
                            cwd=ROOT, start_new_session=True)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        pytest.fail(f"{cmd[2:5]} did not finish within {timeout} s:\n{out[-2000:]}\n{err[-4000:]}")
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


@pytest.fixture(scope="module")
def orbit_straight(tmp_path_factory):
    """The uninterrupted stochastic run: ORBIT_STEPS steps, checkpoint every 4."""
    out = tmp_path_factory.mktemp("straight")
    with single_thread():
        trainer = worker.build("orbit", str(out), ORBIT_STEPS, checkpoint_every=4)
        trainer.fit()
    return out, trainer


# --- data order and the DDP weighting ------------------------------------------------------------
def test_global_batches_depend_on_seed_and_epoch_only_and_shards_partition_them():
    n, b = 23, 5
    one = DeterministicBatchSampler(n, b, seed=3, num_steps=12)
    assert one.steps_per_epoch == 4
    for world in (2, 3):
        shards = [list(DeterministicBatchSampler(n, b, seed=3, rank=r, world_size=world, num_steps=12)) for r in range(world)]
        for step, batch in enumerate(one):
            assert batch == one.global_batch(step)
            assert sum((s[step] for s in shards), []) == batch  # contiguous shards, in rank order
            assert max(len(s[step]) for s in shards) - min(len(s[step]) for s in shards) <= 1
    # every epoch visits distinct samples; epochs and seeds differ; a restart at step k continues the sequence
    for epoch in range(3):
        seen = sum((one.global_batch(epoch * 4 + i) for i in range(4)), [])
        assert len(set(seen)) == 20
    assert one.global_batch(0) != one.global_batch(4)
    assert one.global_batch(0) != DeterministicBatchSampler(n, b, seed=4).global_batch(0)
    assert list(DeterministicBatchSampler(n, b, seed=3, start_step=5, num_steps=12)) == list(one)[5:]
    assert shard_indices([0, 1, 2, 3, 4], 1, 2) == [3, 4]
    with pytest.raises(ValueError, match="at least the number of processes"):
        DeterministicBatchSampler(n, 1, rank=0, world_size=2)
    with pytest.raises(ValueError, match="smaller than one global batch"):
        DeterministicBatchSampler(3, 5)


def test_loss_scale_makes_the_ddp_average_the_global_batch_gradient():
    """Two shards with 3 and 9 nodes: (1/W) sum_r c_r grad L_r equals the gradient of the global mean."""
    torch.manual_seed(0)
    net = nn.Linear(3, 3).double()
    x = torch.randn(12, 3, dtype=torch.float64)
    y = torch.randn(12, 3, dtype=torch.float64)
    shards = [slice(0, 3), slice(3, 12)]

    def grad(loss):
        net.zero_grad()
        loss.backward()
        return torch.cat([p.grad.flatten() for p in net.parameters()])

    def mean_loss(sl):
        return ((net(x[sl]) - y[sl]) ** 2).sum(-1).mean()

    g_global = grad(mean_loss(slice(None)))
    weights = [3.0, 9.0]
    g_ddp = sum(grad(loss_scale(w, sum(weights), 2) * mean_loss(sl)) for w, sl in zip(weights, shards)) / 2
    g_naive = sum(grad(mean_loss(sl)) for sl in shards) / 2
    torch.testing.assert_close(g_ddp, g_global, rtol=1e-12, atol=1e-12)
    assert (g_naive - g_global).abs().max() > 1e-3  # the unweighted average really is different


def test_derive_seed_is_stable_and_separates_streams():
    assert derive_seed(0, 1, 0) == derive_seed(0, 1, 0)
    assert len({derive_seed(0, s, r) for s in range(50) for r in range(4)}) == 200
    assert 0 <= derive_seed(2**40, 7) < 2**63


# --- EMA, schedules, clipping ----------------------------------------------------------------
def test_ema_follows_its_recursion_with_warmup():
    net = nn.Linear(2, 1)
    ema = ExponentialMovingAverage(net, decay=0.95, warmup=True)
    ref = {k: v.clone() for k, v in net.state_dict().items()}
    for n in range(30):
        with torch.no_grad():
            for p in net.parameters():
                p.add_(0.1 * (n + 1))
        d = min(0.95, (1 + n) / (10 + n))
        assert ema.current_decay() == pytest.approx(d)
        ema.update(net)
        for k, v in net.state_dict().items():
            ref[k] = d * ref[k] + (1 - d) * v
    for k in ref:
        torch.testing.assert_close(ema.shadow[k], ref[k], rtol=1e-5, atol=1e-6)
    live = {k: v.clone() for k, v in net.state_dict().items()}
    with ema.average_parameters(net):
        torch.testing.assert_close(net.weight.detach(), ema.shadow["weight"])
    torch.testing.assert_close(net.weight.detach(), live["weight"])  # live weights restored


def test_fit_logs_each_step_and_validates_with_ema_weights(tmp_path):
    seen = []

    def val_fn(model):
        seen.append({k: v.clone() for k, v in model.state_dict().items()})
        return {"val_loss": float(sum(p.abs().sum() for p in model.parameters()))}

    trainer = worker.build("regression", str(tmp_path), steps=9, checkpoint_every=4)
    trainer.val_fn, trainer.val_every = val_fn, 3
    history = trainer.fit()
    train = [r for r in history if r["kind"] == "train"]
    val = [r for r in history if r["kind"] == "val"]
    assert [r["step"] for r in train] == list(range(1, 10))
    assert [r["step"] for r in val] == [3, 6, 9]
    for r in train:
        assert {"loss", "lr", "grad_norm", "mae", "epoch", "elapsed"} <= set(r) and math.isfinite(r["loss"])
    assert train[-1]["epoch"] == 2  # 24 samples, global batch 5: 4 steps per epoch; step 9 is in epoch 2 (0-based)
    assert sum(r["loss"] for r in train[-3:]) < sum(r["loss"] for r in train[:3])  # it learns
    # the last validation saw the EMA weights, which differ from the live ones
    for k, v in seen[-1].items():
        torch.testing.assert_close(v, trainer.ema.shadow[k])
    assert not torch.equal(trainer.model.net[0].weight, trainer.ema.shadow["net.0.weight"])
    # the log file holds exactly the in-memory records; checkpoints carry EMA; best.pt is the best val
    assert train_records(trainer.metrics_path) == [{k: v for k, v in r.items() if k != "elapsed"} for r in history]
    fresh = worker.NodeMLP()
    ckpt = load_checkpoint(trainer.last_checkpoint, fresh)
    assert ckpt["step"] == 9
    torch.testing.assert_close(fresh.net[0].weight, trainer.ema.shadow["net.0.weight"])
    best = load_checkpoint(str(tmp_path / "best.pt"))
    assert best["best"] == min(r["val_loss"] for r in val)


def test_cosine_schedule_with_warmup_logs_the_lr_of_each_step(tmp_path):
    data = worker.make_dataset()
    trainer = Trainer(worker.NodeMLP(), worker.regression_loss, data, batch_size=4, lr=0.02, scheduler="cosine",
                      warmup_steps=3, min_lr_ratio=0.1, max_steps=10, log_every=1, ema_decay=None, progress=False)
    lrs = [r["lr"] for r in trainer.fit()]

    def expected(s):  # s = completed steps
        if s < 3:
            return 0.02 * (s + 1) / 3
        return 0.02 * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * (s - 3) / 7)))

    assert lrs == pytest.approx([expected(s) for s in range(10)], rel=1e-12)


@pytest.mark.parametrize("improving", [False, True])
def test_plateau_scheduler_lowers_lr_only_when_the_metric_stalls(improving):
    values = iter([1.0 / (i + 1) if improving else 1.0 for i in range(100)])
    trainer = Trainer(worker.NodeMLP(), worker.regression_loss, worker.make_dataset(), batch_size=4, lr=0.01,
                      scheduler="plateau", plateau_patience=1, plateau_factor=0.5, val_fn=lambda m: {"val_loss": next(values)},
                      val_every=1, max_steps=6, log_every=1, ema_decay=None, progress=False)
    lrs = [r["lr"] for r in trainer.fit() if r["kind"] == "train"]
    if improving:
        assert lrs == [0.01] * 6
    else:  # bad validations at steps 2 and 3 exceed patience 1: the lr halves from step 4 on
        assert lrs == pytest.approx([0.01] * 3 + [0.005] * 2 + [0.0025])


@pytest.mark.parametrize("clip", [1.0, None])
def test_gradient_clipping_bounds_the_update(clip):
    net = nn.Linear(1, 1, bias=False)
    nn.init.zeros_(net.weight)
    data = [Data(pos=torch.zeros(1, 3)) for _ in range(4)]
    trainer = Trainer(net, lambda m, b, g: 1000.0 * m.weight.sum(), data, batch_size=2, max_steps=1, log_every=1,
                      optimizer=lambda p: torch.optim.SGD(p, lr=0.1), grad_clip=clip, ema_decay=None, progress=False)
    (record,) = trainer.fit()
    assert record["grad_norm"] == pytest.approx(1000.0)  # logged before clipping
    assert float(net.weight.detach()) == pytest.approx(-0.1 if clip else -100.0)


def test_nonfinite_loss_raises_naming_the_step_or_is_skipped():
    data = worker.make_dataset()
    calls = {"n": 0}

    def loss_fn(model, batch, generator):
        calls["n"] += 1
        loss, metrics = worker.regression_loss(model, batch, generator)
        return (loss * float("nan") if calls["n"] == 2 else loss), metrics

    t = Trainer(worker.NodeMLP(), loss_fn, data, batch_size=4, max_steps=4, log_every=1, ema_decay=None, progress=False)
    with pytest.raises(FloatingPointError, match="step 2"):
        t.fit()
    calls["n"] = 0
    snapshots = []
    t = Trainer(worker.NodeMLP(), loss_fn, data, batch_size=4, max_steps=4, log_every=1, nonfinite="skip",
                ema_decay=None, progress=False)
    t.attach(lambda tr: snapshots.append(tr.model.net[0].weight.detach().clone()))
    history = t.fit()
    assert history[1]["skipped_steps"] == 1 and math.isnan(history[1]["loss"])
    assert torch.equal(snapshots[0], snapshots[1]) and not torch.equal(snapshots[1], snapshots[2])


def test_clear_errors_for_bad_configuration():
    data = worker.make_dataset()
    with pytest.raises(ValueError, match="scalar"):
        Trainer(worker.NodeMLP(), lambda m, b, g: m(b.pos), data, batch_size=4, max_steps=1, progress=False).fit()
    with pytest.raises(ValueError, match="optimizer"):
        Trainer(worker.NodeMLP(), worker.regression_loss, data, batch_size=4, optimizer="lbfgs")
    with pytest.raises(ValueError, match="needs a `val_fn`"):
        Trainer(worker.NodeMLP(), worker.regression_loss, data, batch_size=4, scheduler="plateau")
    with pytest.raises(ValueError, match="smaller than one global batch"):
        Trainer(worker.NodeMLP(), worker.regression_loss, data[:3], batch_size=4)
    with pytest.raises(FileNotFoundError):
        Trainer(worker.NodeMLP(), worker.regression_loss, data, batch_size=4, progress=False).fit(resume=True)


def test_progress_bar_only_when_asked_or_on_a_tty(capsys):
    data = worker.make_dataset()
    Trainer(worker.NodeMLP(), worker.regression_loss, data, batch_size=4, max_steps=3, progress=True).fit()
    assert "3/3" in capsys.readouterr().err
    Trainer(worker.NodeMLP(), worker.regression_loss, data, batch_size=4, max_steps=3).fit()  # stderr is no TTY here
    assert capsys.readouterr().err == ""


# --- checkpoints and resume ----------------------------------------------------------------------
def test_a_failing_save_leaves_the_previous_checkpoint_intact(tmp_path, monkeypatch):
    path = str(tmp_path / "last.pt")
    atomic_save({"step": 1, "w": torch.arange(1000.0)}, path)
    real_save = torch.save

    def half_then_fail(obj, f, *args, **kwargs):
        real_save(obj, f, *args, **kwargs)
        f.seek(0)
        f.truncate(100)  # a partial file, as a crash mid-write would leave
        raise OSError("disk full (simulated)")

    monkeypatch.setattr(torch, "save", half_then_fail)
    with pytest.raises(OSError, match="simulated"):
        atomic_save({"step": 2, "w": torch.zeros(1000)}, path)
    monkeypatch.undo()
    ckpt = torch.load(path, weights_only=True)
    assert ckpt["step"] == 1 and torch.equal(ckpt["w"], torch.arange(1000.0))
    assert sorted(os.listdir(tmp_path)) == ["last.pt"]  # no temporary left behind

    # the same inside a run: the checkpoint of step 8 fails, last.pt still holds step 4
    trainer = worker.build("regression", str(tmp_path / "run"), steps=12, checkpoint_every=4)

    def fail_at_8(obj, f, *args, **kwargs):
        if isinstance(obj, dict) and obj.get("step") == 8:
            f.write(b"\0" * 64)
            raise OSError("crash at step 8 (simulated)")
        return real_save(obj, f, *args, **kwargs)

    monkeypatch.setattr(torch, "save", fail_at_8)
    with pytest.raises(OSError, match="step 8"):
        trainer.fit()
    monkeypatch.undo()
    assert load_checkpoint(trainer.last_checkpoint)["step"] == 4
    assert not glob.glob(str(tmp_path / "run" / ".*.tmp"))


def test_resume_after_an_interruption_continues_the_same_loss_sequence(tmp_path, orbit_straight):
    straight_dir, straight = orbit_straight
    expected = train_records(straight_dir / "metrics.jsonl")
    assert [r["step"] for r in expected if r["kind"] == "train"] == list(range(1, ORBIT_STEPS + 1))

    class Killed(RuntimeError):
        pass

    def kill(trainer):
        if trainer.step == 7:
            raise Killed

    with single_thread():
        first = worker.build("orbit", str(tmp_path), ORBIT_STEPS, checkpoint_every=4)
        first.attach(kill)
        with pytest.raises(Killed):
            first.fit()
        assert load_checkpoint(first.last_checkpoint)["step"] == 4
        assert max(r["step"] for r in read_metrics(first.metrics_path)) == 7  # steps 5-7 logged, not checkpointed
        with open(first.metrics_path, "a") as f:
            f.write('{"kind": "train", "st')  # a torn line, as a kill mid-write leaves
        torch.manual_seed(999)  # a different init and global RNG state: resume must not depend on them
        second = worker.build("orbit", str(tmp_path), ORBIT_STEPS, checkpoint_every=4)
        torch.manual_seed(999)
        second.fit()
    got = train_records(tmp_path / "metrics.jsonl")
    steps = [r["step"] for r in got if r["kind"] == "train"]
    assert steps == list(range(1, ORBIT_STEPS + 1))  # no step duplicated, none missing
    assert got == expected  # bit-identical losses, grad norms, lrs and validations
    for (k, a), b in zip(straight.model.state_dict().items(), second.model.state_dict().values()):
        assert torch.equal(a, b), k
    for k, v in straight.ema.shadow.items():
        assert torch.equal(v, second.ema.shadow[k]), k
    # a finished run resumes to a no-op
    assert second.fit() == [] and second.step == ORBIT_STEPS


def test_sigkill_in_the_middle_of_a_checkpoint_then_resume(tmp_path, orbit_straight):
    """A real crash: the worker SIGKILLs itself with half of the step-8 checkpoint written."""
    straight_dir, _ = orbit_straight
    out = tmp_path / "run"
    proc = run_process([sys.executable, str(WORKER), "--loss", "orbit", "--out", str(out), "--steps", str(ORBIT_STEPS),
                        "--checkpoint-every", "4", "--kill-at-save", "8", "--watchdog", "120"])
    assert proc.returncode == -9, proc.stderr[-3000:]
    stale = glob.glob(str(out / ".last.pt.*.tmp"))
    assert len(stale) == 1 and os.path.getsize(stale[0]) > 0  # the half-written temporary
    assert load_checkpoint(str(out / "last.pt"))["step"] == 4  # the previous checkpoint is intact
    with single_thread():
        resumed = worker.build("orbit", str(out), ORBIT_STEPS, checkpoint_every=4)
        resumed.fit()
    assert not glob.glob(str(out / ".*.tmp"))
    assert train_records(out / "metrics.jsonl") == train_records(straight_dir / "metrics.jsonl")


# --- data parallel -------------------------------------------------------------------------------
def test_two_process_gloo_run_matches_one_process_run(tmp_path):
    """torchrun --nproc_per_node 2 on CPU (gloo) vs one process, same global batch (5 ragged graphs: shards 3 / 2)."""
    out2 = tmp_path / "ddp"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(WORKER),
           "--loss", "regression", "--out", str(out2), "--steps", str(DDP_STEPS), "--batch-size", "5", "--watchdog", "120"]
    proc = run_process(cmd)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    with single_thread():
        single = worker.build("regression", str(tmp_path / "one"), DDP_STEPS, batch_size=5)
        single.fit()
    one = [r for r in read_metrics(single.metrics_path) if r["kind"] == "train"]
    two = [r for r in read_metrics(str(out2 / "metrics.jsonl")) if r["kind"] == "train"]
    assert [r["step"] for r in two] == list(range(1, DDP_STEPS + 1))  # rank 0 alone wrote the log: no duplicates
    rel = max(abs(a["loss"] - b["loss"]) / abs(a["loss"]) for a, b in zip(one, two))
    print(f"\nDDP vs 1 process: max relative loss difference over {DDP_STEPS} steps = {rel:.3g} (tolerance {DDP_LOSS_RTOL})")
    assert rel <= DDP_LOSS_RTOL
    for a, b in zip(one, two):
        assert b["grad_norm"] == pytest.approx(a["grad_norm"], rel=DDP_LOSS_RTOL)
        assert b["mae"] == pytest.approx(a["mae"], rel=DDP_LOSS_RTOL)
    assert sum(r["loss"] for r in two[-3:]) < 0.7 * sum(r["loss"] for r in two[:3])  # the 2-process run trains

    ranks = [json.loads((out2 / f"worker_rank{r}.json").read_text()) for r in range(2)]
    assert [r["world_size"] for r in ranks] == [2, 2]
    assert ranks[0]["params"] == ranks[1]["params"]  # DDP kept the replicas identical
    flat_two = torch.tensor(sum(ranks[0]["params"], []))
    flat_one = torch.cat([p.detach().flatten() for p in single.model.parameters()])
    torch.testing.assert_close(flat_two, flat_one, rtol=DDP_LOSS_RTOL, atol=1e-5)
    ckpt = load_checkpoint(str(out2 / "last.pt"))
    assert ckpt["config"]["world_size"] == 2 and ckpt["step"] == DDP_STEPS
