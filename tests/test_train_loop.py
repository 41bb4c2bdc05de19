"""The shared local training loop: epochs of batches, extra loss, hooks, caps and checks."""

import itertools

import pytest
import torch
from torch import nn

from fedad.train.loop import train_loop


def _setup():
    torch.manual_seed(0)
    model = nn.Linear(2, 1)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)

    def step(batch):
        output = model(batch)
        return output, torch.zeros(len(batch)), {"loss": (output ** 2).mean()}

    return model, optimizer, step


def test_epochs_hooks_and_the_cap_on_batches():
    model, optimizer, step = _setup()
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda i: 1.0 / (i + 1))
    calls = []
    batches = [torch.ones(3, 2), torch.full((3, 2), 2.0), torch.full((3, 2), 3.0)]
    result = train_loop(step, itertools.repeat(batches, 2), optimizer, list(model.parameters()),
                        max_batches=2, extra_loss=lambda output, labels: output.sum() * 0 + 1,
                        lr_schedule=schedule,
                        after_step=lambda done, losses: calls.append(
                            (done, optimizer.param_groups[0]["lr"], losses["loss"].item())))
    assert [c[0] for c in calls] == [1, 2, 1, 2]  # steps counted per epoch, capped at 2
    assert [c[1] for c in calls] == pytest.approx([0.05, 0.1 / 3, 0.025, 0.02])  # stepped first
    assert set(result) == {"train_loss", "train_extra_loss"}
    assert result["train_extra_loss"] == 1.0
    assert result["train_loss"] == pytest.approx((calls[2][2] + calls[3][2]) / 2)  # last epoch


def test_a_non_finite_loss_is_refused_before_the_step():
    model, optimizer, step = _setup()
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(FloatingPointError, match="tiny: non-finite loss"):
        train_loop(step, [[torch.full((2, 2), float("nan"))]], optimizer,
                   list(model.parameters()), name="tiny")
    assert all(torch.equal(a, p) for a, p in zip(before, model.parameters(), strict=True))
