"""Stacked training (based/mqar/stacked.py) against the runs trained one by one (train.fit)."""

import dataclasses
import gc
import math
import weakref

import pytest
import torch

from based.mqar import MQARRun, MQARTask
from based.mqar.stacked import StackedTrainer, group_runs, train_stacked
from based.mqar.train import fit

TINY = dict(train=(MQARTask(16, 2, 40), MQARTask(24, 3, 24)), test=(MQARTask(16, 2, 8),), vocab_size=32, epochs=2,
            batch_size=16, warmup_frac=0.3)
# Up to 1e-2: at 3e-2 RWKV's parameters drift apart by 2e-5 in 10 steps. Adam divides each gradient by its
# own running size, so elements whose gradients are ~0 take full steps of any sign, and the last-bit
# differences of a batched matmul against an unbatched one show up at the scale of lr there.
LRS = (1e-3, 3e-3, 1e-2)


@pytest.mark.parametrize("mixer, d_model, kwargs", [
    ("linear_attn", 16, {"feature_dim": 4}),
    ("mamba", 16, {"ssm_state_size": 4}),
    ("rwkv", 64, {}),
])
def test_stacked_runs_equal_runs_trained_one_by_one(mixer, d_model, kwargs):
    """Same losses at every step and same final parameters (fp32, within 1e-5), k = 3 learning rates;
    batches of two lengths and a short last batch per task (40 = 16 + 16 + 8), so three shapes per task."""
    runs = [MQARRun(mixer, d_model, lr, kwargs, **TINY) for lr in LRS]
    trainer = StackedTrainer(runs)
    stacked_losses = []
    for _ in range(trainer.total_steps):
        trainer.step()
        stacked_losses.append(trainer.losses.tolist())
    assert trainer.total_steps == 2 * (3 + 2)
    for i, run in enumerate(runs):
        losses = []
        model, _ = fit(run, step_losses=losses)
        assert [s[i] for s in stacked_losses] == pytest.approx(losses, abs=1e-5, rel=1e-5)
        stacked = trainer.load_run(i).state_dict()
        for name, p in model.state_dict().items():
            torch.testing.assert_close(stacked[name], p, atol=1e-5, rtol=1e-5, msg=f"{run.lr} {name}")
    assert losses[-1] < losses[0]  # something was learned, so the comparison is not between two inits


def test_a_trainer_is_freed_as_soon_as_it_is_dropped():
    """No reference cycle: a sweep trains group after group in one process, and a trainer's device memory
    (data, CUDA graphs) must go with it, not wait for the garbage collector (on an H100 the groups' leftovers
    filled the card)."""
    trainer = StackedTrainer([MQARRun("linear_attn", 16, lr, {"feature_dim": 4}, **TINY) for lr in LRS[:2]])
    trainer.step()
    gone = weakref.ref(trainer)
    gc.disable()
    try:
        del trainer
        assert gone() is None
    finally:
        gc.enable()


def test_fit_stops_where_asked_with_the_steps_it_took_so_far():
    # benchmarks/mqar_stacked.py times the first steps of fit's own loop through `stop`.
    run = MQARRun("linear_attn", 16, 1e-3, {"feature_dim": 4}, **TINY)
    everything, first = [], []
    fit(run, step_losses=everything)
    asked = []
    fit(run, step_losses=first, stop=lambda s: asked.append(s) or s == 3)
    assert asked == [0, 1, 2, 3] and first == everything[:3]


def test_train_stacked_rows():
    runs = [MQARRun("attention", 16, lr, **TINY) for lr in LRS[:2]]
    rows = train_stacked(runs)
    assert [r["lr"] for r in rows] == list(LRS[:2]) and [r["run_id"] for r in rows] == [r.run_id for r in runs]
    assert all(r["stacked"] == 2 and set(r["accuracy"]) == {"T16_kv2"} and r["train_steps"] == 10 for r in rows)
    assert rows[0]["final_train_loss"] != rows[1]["final_train_loss"]


def test_group_runs():
    a = [MQARRun("attention", 16, lr, **TINY) for lr in LRS]
    b = [MQARRun("attention", 32, lr, **TINY) for lr in LRS]
    seeded = dataclasses.replace(a[0], seed=1)
    groups = group_runs([a[0], b[0], a[1], seeded, b[1], a[2], b[2]])
    assert groups == [a, b, [seeded]]
    assert group_runs(a + b, max_stack=2) == [a[:2], a[2:], b[:2], b[2:]]
    with pytest.raises(ValueError, match="lr only"):
        StackedTrainer([a[0], b[0]])


def test_a_paused_group_resumes_where_it_stopped(tmp_path, monkeypatch):
    """Stopped at the time limit after 4 of its 10 steps and resumed: the rows of an uninterrupted run."""
    import based.mqar.stacked as stacked

    runs = [MQARRun("linear_attn", 16, lr, {"feature_dim": 4}, **TINY) for lr in LRS[:2]]
    whole = train_stacked(runs)
    clock = iter(range(100))
    monkeypatch.setattr(stacked, "_now", lambda: next(clock))
    with pytest.raises(stacked.Paused, match="paused at step 4 of 10") as paused:
        train_stacked(runs, deadline=3.5, checkpoint_dir=tmp_path)
    assert paused.value.path.exists()
    resumed = train_stacked(runs, deadline=1e9, checkpoint_dir=tmp_path)
    assert not paused.value.path.exists()
    for a, b in zip(whole, resumed):
        assert (a["final_train_loss"], a["accuracy"]) == (b["final_train_loss"], b["accuracy"])


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("mixer, d_model, kwargs", [("linear_attn", 16, {"feature_dim": 4}),
                                                    ("mamba", 16, {"ssm_state_size": 4}), ("attention", 16, {})])
def test_cuda_graphs_equal_eager_and_cpu(mixer, d_model, kwargs):
    """The captured step replays the eager one (same kernels: equal up to atomics), and fp32 CUDA stays
    within 1e-4 of the CPU (different kernels, 10 steps)."""
    assert torch.get_float32_matmul_precision() == "highest"  # fp32 matmuls, not TF32
    runs = [MQARRun(mixer, d_model, lr, kwargs, **TINY) for lr in LRS]
    trainers = [StackedTrainer(runs, "cpu"), StackedTrainer(runs, "cuda"), StackedTrainer(runs, "cuda", True)]
    losses = [[], [], []]
    for _ in range(trainers[0].total_steps):
        for t, l in zip(trainers, losses):
            t.step()
            l.append(t.losses.tolist())
    assert trainers[2].cuda_graphs and trainers[2].graphs  # captured, not fallen back to eager
    flat = [[x for step in run for x in step] for run in losses]  # steps x runs, flattened for approx
    assert flat[2] == pytest.approx(flat[1], abs=1e-6) and flat[1] == pytest.approx(flat[0], abs=1e-4)
    torch.testing.assert_close(trainers[2].flat, trainers[1].flat, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(trainers[1].flat.cpu(), trainers[0].flat, atol=1e-4, rtol=1e-4)


@pytest.mark.slow
@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=[pytest.mark.gpu, pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs CUDA")])])
def test_compiled_step_equals_eager(device):
    """torch.compile of the vmapped forward and backward (an option benchmarks/mqar_stacked.py --compile times)
    trains as the eager step does, over batches of two shapes (the second recompiles or goes dynamic)."""
    runs = [MQARRun("attention", 16, lr, **TINY) for lr in LRS[:2]]
    eager, compiled = StackedTrainer(runs, device), StackedTrainer(runs, device, compile=True)
    for _ in range(6):
        eager.step()
        compiled.step()
        torch.testing.assert_close(compiled.losses, eager.losses, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(compiled.flat, eager.flat, atol=1e-5, rtol=1e-5)


def test_training_device_restores_precision_and_says_cpu():
    from based.mqar.train import training_device

    before = torch.get_float32_matmul_precision()
    with training_device("cpu") as cuda:
        assert cuda is False and torch.get_float32_matmul_precision() == before
    assert torch.get_float32_matmul_precision() == before


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
def test_a_group_trains_on_a_gpu_other_than_the_current_one():
    """A sweep worker on cuda:1 while cuda:0 is current: Triton kernels and graph capture follow the run's device."""
    from based.mqar.train import training_device

    runs = [MQARRun("mamba", 16, lr, {"ssm_state_size": 4}, **TINY) for lr in (1e-3, 3e-3)]
    torch.cuda.set_device(0)
    with training_device("cuda:1") as cuda:
        assert cuda and torch.cuda.current_device() == 1
    assert torch.cuda.current_device() == 0
    rows = train_stacked(runs, "cuda:1")
    assert len(rows) == 2 and all(math.isfinite(r["final_train_loss"]) for r in rows)
