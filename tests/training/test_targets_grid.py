"""``l0k.SparsityTarget`` over a grid of Adam learning rates, targets, warm-ups and metrics (docs/design.md §9).

The contract: with the default settings and Adam at lr 1e-3 to 1e-2, E is within 3 points of the target about
1,500 steps after warm-up, without overshooting far, and ``finalize_()`` then meets the target within 1 point.

The task is the teacher task of ``tests/training/test_targets.py`` (60 inputs of which the target uses 18; two ``L0Linear``
layers, 76 gates), fixed seeds. The grid: lr in {1e-3, 3e-3, 1e-2} x target in {0.1, 0.3, 0.7} x warm-up in
{0, 300, 4/lr}, one metric per point in rotation (``(i + j + k) % 3``: every metric at 9 points, each pair of
lr, target and warm-up with all three; the full product with the three metrics is measured in
docs/benchmarks.md). Each point asserts:

* ``|E - t| <= 0.03`` from warm-up + 1,500 steps through warm-up + 1,700 (still there 200 steps later);
* E never below ``t - 0.03`` over the whole run (the overshoot: at most the tolerance itself; measured at most
  about 1 point on this grid);
* ``finalize_()`` meets the target within 1 point.

Four points cannot meet the 1,500 steps with Adam at lr 1e-3 (``OPTIMIZER_BOUND``: targets 0.1 and 0.3 with a
warm-up of 0 or 300 steps, below the docs' 4/lr): a gate's ``log_alpha`` moves about lr per step, and these
targets need most gates to travel from 0 to about -4. There the controller must not inflate the multipliers
(that closes gates the task needs without moving the others faster): E gets there by warm-up + 4,000 steps,
``lambda_1`` stays moderate, and nothing overshoots.
"""
import pytest
import torch
from torch import nn

import l0kernels as l0k
from l0kernels.data import teacher_task

TOL = 0.03  # E within 3 points of the target ...
AFTER = 1500  # ... this many steps after warm-up ...
TAIL = 200  # ... and still within them this many steps later
BELOW = 0.03  # E never further below the target than this
METRICS = ("params", "flops", "gates")
LRS = (1e-3, 3e-3, 1e-2)
TARGETS = (0.1, 0.3, 0.7)
OPTIMIZER_BOUND = {(1e-3, 0, 0.1), (1e-3, 0, 0.3), (1e-3, 300, 0.1), (1e-3, 300, 0.3)}
BOUND_AFTER = 4000  # steps after warm-up for those points (the gates' travel at lr 1e-3)

_TASK = []


def _task():
    if not _TASK:
        _TASK.append(teacher_task(60, 18, 1024, 256, seed=0))  # the target uses 30% of the inputs
    return _TASK[0]


def _train(metric, target, warmup, lr, steps):
    """Adam on the teacher task with the controller at its defaults; E after every step, and the largest
    ``|lambda_1|``."""
    task = _task()
    torch.manual_seed(0)
    model = nn.Sequential(l0k.L0Linear(60, 16, backend="torch"), nn.ReLU(), l0k.L0Linear(16, 1, backend="torch"))
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    ctl = l0k.SparsityTarget(model, target, metric=metric, warmup_steps=warmup,
                             example_inputs=task.x_train[:1] if metric == "flops" else None)
    g = torch.Generator().manual_seed(0)
    hist, peak = [], 0.0
    for _ in range(steps):
        idx = torch.randint(0, 1024, (64,), generator=g)
        loss = ((model(task.x_train[idx]) - task.y_train[idx]) ** 2).mean() + ctl.penalty()
        opt.zero_grad()
        loss.backward()
        opt.step()
        ctl.step()
        hist.append(ctl.expected())
        peak = max(peak, abs(float(ctl.lambda_1)))
    return model, ctl, hist, peak


def _points():
    out = []
    for i, lr in enumerate(LRS):
        for j, warmup in enumerate((0, 300, round(4 / lr))):
            for k, target in enumerate(TARGETS):
                if (lr, warmup, target) not in OPTIMIZER_BOUND:
                    out.append(pytest.param(METRICS[(i + j + k) % 3], target, warmup, lr,
                                            id=f"lr{lr:g}-wu{warmup}-t{target:g}-{METRICS[(i + j + k) % 3]}"))
    return out


def _check_finalize(ctl, target):
    r = ctl.finalize_()
    assert abs(r["fraction"] - target) <= 0.01 + 1e-9, r
    assert abs(ctl.deterministic() - target) <= 0.01 + 1e-9


@pytest.mark.slow
@pytest.mark.parametrize("metric,target,warmup,lr", _points())
def test_within_three_points_1500_steps_after_warmup(metric, target, warmup, lr):
    _, ctl, hist, _ = _train(metric, target, warmup, lr, warmup + AFTER + TAIL)
    late = hist[warmup + AFTER - 1:]
    worst = max(late, key=lambda e: abs(e - target))
    assert abs(worst - target) <= TOL, (worst, [round(e, 3) for e in hist[::100]])
    assert min(hist) >= target - BELOW, min(hist)
    _check_finalize(ctl, target)


@pytest.mark.slow
def test_reported_case_gates_target_after_a_short_warmup():
    """The report of a slow approach: Adam 5e-3, a 300-step warm-up (shorter than 4/lr = 800), 0.3 of the gates;
    E was said to be about 12 points off 1,700 steps after the warm-up."""
    _, ctl, hist, _ = _train("gates", 0.3, 300, 5e-3, 300 + 1700)
    assert all(abs(e - 0.3) <= TOL for e in hist[300 + AFTER - 1:]), [round(e, 3) for e in hist[::100]]
    assert min(hist) >= 0.3 - BELOW
    _check_finalize(ctl, 0.3)


@pytest.mark.slow
@pytest.mark.parametrize("lr,warmup,target", sorted(OPTIMIZER_BOUND),
                         ids=[f"lr{a:g}-wu{b}-t{c:g}" for a, b, c in sorted(OPTIMIZER_BOUND)])
def test_optimizer_bound_points_arrive_later_without_inflating_the_multiplier(lr, warmup, target):
    metric = METRICS[(TARGETS.index(target) + 2 * (warmup > 0)) % 3]  # params, flops / gates, params
    _, ctl, hist, peak = _train(metric, target, warmup, lr, warmup + BOUND_AFTER + TAIL)
    assert all(abs(e - target) <= TOL for e in hist[warmup + BOUND_AFTER - 1:]), [round(e, 3) for e in hist[::200]]
    assert min(hist) >= target - BELOW
    assert peak < 200, peak  # a geometric run-away would reach 1e3-1e6 here
    _check_finalize(ctl, target)
