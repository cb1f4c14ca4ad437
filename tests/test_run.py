"""hvdet.run: the run's state as a dict, and what a checkpoint must fit (one process, no launcher)."""
import pytest
import torch

from hvdet.checkpoint import CheckpointError
from hvdet.config import from_dict
from hvdet.run import Clock, check_model_fits, loader_state_for, resume_policy


def test_clock_round_trips_and_keeps_counting():
    clock = Clock(train_s=3.0, images=48, best={"bbox": 0.2}, evaluations=2, evaluated_at=20)
    clock.elapsed_offset_s = 10.0
    state = clock.state_dict()
    assert "start" not in state and state["elapsed_offset_s"] >= 10.0
    again = Clock.from_state_dict(state)
    assert (again.train_s, again.images, again.best, again.evaluations, again.evaluated_at) == (3.0, 48, {"bbox": 0.2},
                                                                                               2, 20)
    assert again.elapsed_s() >= state["elapsed_offset_s"]


def test_a_checkpoint_of_another_model_is_one_line_naming_both():
    cfg = from_dict({"solver": {"max_iters": 1}, "model": {"arch": "fasterrcnn_resnet18_fpn_fast", "norm": "local"}})
    mine = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4))
    other = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.Linear(2, 2))
    state = {"model": other.state_dict(), "config": {"model": {"arch": "maskrcnn_resnet50_fpn", "norm": "frozen"}}}
    with pytest.raises(CheckpointError) as info:
        check_model_fits(state, "ckpt.pt", mine, cfg)
    message = str(info.value)
    assert "\n" not in message and len(message) < 400, message
    assert "model.arch=maskrcnn_resnet50_fpn, model.norm=frozen" in message
    assert "model.arch=fasterrcnn_resnet18_fpn_fast, model.norm=local" in message
    assert "3 tensors missing, 0 unexpected, 4 of another shape (first: 1.running_mean)" in message
    check_model_fits({"model": mine.state_dict()}, "ckpt.pt", mine, cfg)  # the same model: no error


def test_resume_on_another_world_rescales_or_refuses():
    state = {"world_size": 2, "global_batch": 16, "loader": {"epoch": 1, "position": 6},
             "config": {"solver": {"backward_passes_per_step": 1}}}
    assert resume_policy(state, "c.pt", 2, 16, "refuse") == 1.0
    assert resume_policy(state, "c.pt", 4, 32, "rescale") == 2.0
    with pytest.raises(CheckpointError, match="Launch it with -np 2"):
        resume_policy(state, "c.pt", 4, 32, "refuse")
    assert loader_state_for(state, 32) == {"epoch": 1, "position": 3}  # the same 96 images of the epoch
