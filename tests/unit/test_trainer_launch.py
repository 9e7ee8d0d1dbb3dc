"""Choosing how a round trains: in the service, or data-parallel in child processes."""

from __future__ import annotations

import pytest

from onpolicy_trainer import launch
from onpolicy_trainer.dpo import train_round
from onpolicy_trainer.settings import TrainerSettings


@pytest.mark.parametrize(
    ("train_processes", "gpus", "expected"), [(1, 4, 1), (2, 0, 2), (0, 4, 4), (0, 1, 1), (0, 0, 1)]
)
def test_processes_follow_the_setting_or_the_visible_gpus(
    monkeypatch, train_processes, gpus, expected
):
    import torch

    monkeypatch.setattr(torch.cuda, "device_count", lambda: gpus)
    settings = TrainerSettings(model="m", train_processes=train_processes)
    assert launch.processes(settings) == expected


def test_one_process_trains_in_the_service_and_more_under_torchrun():
    assert launch.train_fn(TrainerSettings(model="m", train_processes=1)) is train_round
    assert (
        launch.train_fn(TrainerSettings(model="m", train_processes=2))
        is launch.train_round_distributed
    )


def test_a_negative_process_count_is_refused_naming_the_field():
    with pytest.raises(ValueError, match="train_processes"):
        TrainerSettings(model="m", train_processes=-1)
