"""The training loop every job shares: schedule, clipping, the stop on a non-finite loss, data order, progress."""

import pytest
import torch
from torch import nn

from coda_adapters.app.loop import (
    Optimization,
    OptimizerConfig,
    TrainingError,
    annealed_epsilon,
    batches_for_steps,
    epoch_order,
    run_epoch,
    warmed_up_reduction,
)
from coda_adapters.app.progress import progress_bar


def linear_problem(seed=0):
    torch.manual_seed(seed)
    model = nn.Linear(4, 1)
    inputs = torch.randn(32, 4)
    targets = inputs @ torch.tensor([[1.0], [-2.0], [0.5], [3.0]])
    return model, inputs, targets


def test_learning_rate_warms_up_linearly_then_decays_to_zero():
    model, _, _ = linear_problem()
    optimization = Optimization(model, OptimizerConfig(lr=0.1, warmup_ratio=0.2), total_steps=10)
    used = []  # the learning rate each of the 10 steps ran with
    for _ in range(10):
        used.append(optimization.optimizer.param_groups[0]["lr"])
        optimization.step(model(torch.ones(1, 4)).sum())
    assert used == pytest.approx([0.0, 0.05, 0.1] + [0.1 * (8 - i) / 8 for i in range(1, 8)])
    assert optimization.optimizer.param_groups[0]["lr"] == pytest.approx(0.0)


def test_gradients_are_clipped_to_the_configured_norm():
    model, inputs, targets = linear_problem()
    optimization = Optimization(model, OptimizerConfig(max_grad_norm=0.01), total_steps=1)
    seen = {}
    optimization.optimizer.register_step_pre_hook(
        lambda optimizer, args, kwargs: seen.update(
            norm=torch.cat([p.grad.flatten() for p in model.parameters()]).norm()
        )
    )
    optimization.step(((model(inputs) - targets) ** 2).mean() * 1000)
    assert seen["norm"] <= 0.01 + 1e-6


def test_run_epoch_lowers_the_loss_and_weighs_batches_by_size():
    model, inputs, targets = linear_problem()
    config = OptimizerConfig(lr=0.05, warmup_ratio=0.0)
    batches = list(batches_for_steps(len(inputs), 8, steps=200, seed=0))
    optimization = Optimization(model, config, total_steps=len(batches))
    result = run_epoch(
        batches, lambda i: ((model(inputs[i]) - targets[i]) ** 2).mean(), optimization, desc="fit", show_progress=False
    )
    assert len(result.step_losses) == 200 and result.step_losses[-1] < result.step_losses[0] / 10
    assert result.loss == pytest.approx(sum(result.step_losses) / 200)  # equal batch sizes


def test_a_non_finite_loss_stops_before_the_step_and_names_where():
    model, inputs, targets = linear_problem()
    optimization = Optimization(model, OptimizerConfig(), total_steps=3)
    before = [p.detach().clone() for p in model.parameters()]

    def loss_of(i):
        return ((model(inputs[i]) - targets[i]) ** 2).mean() * float("nan")

    with pytest.raises(TrainingError, match=r"non-finite loss \(nan\) at epoch 4; stopped, the checkpoint is kept"):
        run_epoch([[0, 1]], loss_of, optimization, desc="x", where="epoch 4", stop_hint="the checkpoint is kept")
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True))


def test_nothing_to_train_is_an_error():
    model = nn.Linear(2, 2).requires_grad_(False)
    with pytest.raises(ValueError, match="nothing to train"):
        Optimization(model, OptimizerConfig(), total_steps=1)


def test_routers_learn_at_their_own_rate_and_follow_the_same_schedule():
    from coda_adapters.routing import Router

    model = nn.ModuleDict({"router": Router(4), "head": nn.Linear(4, 2)})
    config = OptimizerConfig(lr=0.1, warmup_ratio=0.0, router_lr_scale=5.0)
    optimization = Optimization(model, config, total_steps=4)
    groups = {id(p): g for g in optimization.optimizer.param_groups for p in g["params"]}
    assert groups[id(model["router"].weight)]["lr"] == pytest.approx(0.5)
    assert groups[id(model["head"].weight)]["lr"] == pytest.approx(0.1)
    assert len(optimization.parameters) == 3  # router weight, head weight and bias, each once
    optimization.step(model["head"](model["router"].weight).sum())
    assert groups[id(model["router"].weight)]["lr"] == pytest.approx(0.5 * 3 / 4)  # decayed like the rest
    with pytest.raises(ValueError, match="--router-lr-scale must be a finite number > 0"):
        OptimizerConfig(router_lr_scale=0)


def test_reduction_warmup_holds_dense_then_shrinks_the_kept_share_linearly_to_one_over_r():
    values = [warmed_up_reduction(4.0, step, total_steps=10, warmup_ratio=0.5) for step in range(11)]
    assert values[0] == 1.0 and values[5:] == [pytest.approx(4.0)] * 6
    assert [1 / v for v in values[:6]] == pytest.approx([1 - 0.15 * i for i in range(6)])  # 1 -> 1/4 in 5 steps
    assert warmed_up_reduction(4.0, 0, total_steps=10, warmup_ratio=0.0) == 4.0  # no warm-up: r from the start
    assert warmed_up_reduction(1.0, 3, total_steps=10, warmup_ratio=0.5) == 1.0
    held = [warmed_up_reduction(4.0, step, total_steps=10, warmup_ratio=0.5, dense_ratio=0.3) for step in range(11)]
    assert held[:3] == [1.0] * 3 and held[3:9] == values[:6] and held[9:] == [4.0] * 2  # the same fall, 3 steps later


def test_annealed_epsilon_falls_geometrically_over_the_reduction_warmup_only():
    values = [annealed_epsilon(0.8, 0.1, step, total_steps=10, warmup_ratio=0.3, dense_ratio=0.2) for step in range(11)]
    assert values[:3] == [0.8, 0.8, 0.8] and values[5:] == [0.1] * 6  # start while dense, target once routed at r
    assert values[3] == pytest.approx(0.8 * (0.1 / 0.8) ** (1 / 3)) and values[4] == pytest.approx(0.8 / 4)
    ratios = [values[i + 1] / values[i] for i in range(2, 5)]
    assert ratios == pytest.approx([0.5] * 3)  # a constant factor per step: 0.8 -> 0.1 in three halvings
    for step in range(11):  # the same warm-up phase as the reduction's
        r = warmed_up_reduction(4.0, step, 10, 0.3, 0.2)
        assert (r == 4.0) == (values[step] == 0.1) and (r == 1.0) == (values[step] == 0.8)


def test_steps_pass_over_every_example_once_per_epoch_in_the_epoch_order():
    batches = list(batches_for_steps(10, 4, steps=5, seed=3))
    flat = [i for batch in batches for i in batch]
    assert [len(b) for b in batches] == [4] * 5
    # the two examples left at the end of an epoch open the next batch, followed by the next epoch's order
    assert flat[:12] == epoch_order(10, 3, 0) + epoch_order(10, 3, 1)[:2]
    assert batches == list(batches_for_steps(10, 4, steps=5, seed=3))  # deterministic


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"batch_size": 0}, "--batch-size must be an int >= 1"),
        ({"max_length": 1}, "--max-length must be an int >= 2"),
        ({"lr": 0}, "--lr must be a finite number > 0"),
        ({"warmup_ratio": 1.0}, "--warmup-ratio must be a finite number >= 0 and < 1"),
    ],
)
def test_bad_optimizer_settings_name_the_option(kwargs, message):
    with pytest.raises(ValueError, match=message):
        OptimizerConfig(**kwargs)


def test_progress_in_a_log_is_whole_lines_without_carriage_returns(capsys):
    for _ in progress_bar(range(3), desc="work", unit="step"):
        pass
    err = capsys.readouterr().err
    assert "\r" not in err and "work" in err and "3/3" in err.splitlines()[-1]


def test_small_data_gets_enough_epochs_to_make_the_minimum_steps(capsys):
    from coda_adapters.app.classify import TrainConfig, planned_epochs

    assert planned_epochs(TrainConfig(epochs=3, min_steps=250), steps_per_epoch=96) == 3  # BBC News: 288 steps
    assert planned_epochs(TrainConfig(epochs=3, min_steps=250), steps_per_epoch=19) == 14  # 300 examples
    assert "training 14 epochs instead of 3 to make --min-steps 250" in capsys.readouterr().err
    assert planned_epochs(TrainConfig(epochs=3, min_steps=0), steps_per_epoch=1) == 3


def test_a_last_epoch_that_still_raised_validation_accuracy_is_flagged():
    from coda_adapters.app.classify import still_improving

    assert still_improving([{"val_accuracy": 0.5}, {"val_accuracy": 0.7}])
    assert not still_improving([{"val_accuracy": 0.7}, {"val_accuracy": 0.7}])
    assert not still_improving([{"val_accuracy": 0.7}])
    assert not still_improving([{"train_loss": 1.0}, {"train_loss": 0.5}])  # no validation split
