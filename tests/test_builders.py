"""hvdet.builders: recipe names reach the parts they name (registry -> implementation), in one process."""
import pytest
import torch

from hvdet import comm
from hvdet.builders import build_optimizer
from hvdet.config import from_dict
from hvdet.optim import LARS


@pytest.fixture(autouse=True, scope="module")
def world_of_one():
    comm.init()


def recipe(**solver):
    return from_dict({"solver": {"max_iters": 10, **solver}})


def test_optimizer_args_reach_the_constructor():
    """LARS's trust coefficient (and any constructor argument) is settable from a recipe."""
    model = torch.nn.Linear(3, 2)
    opt = build_optimizer(recipe(optimizer="lars", optimizer_args={"trust_coefficient": 0.02}), model, lr=0.1)
    assert isinstance(opt, LARS)  # Horovod's wrapper subclasses the optimizer's class
    assert {g["trust_coefficient"] for g in opt.param_groups} == {0.02}
    default = build_optimizer(recipe(optimizer="lars"), torch.nn.Linear(3, 2), lr=0.1)
    assert {g["trust_coefficient"] for g in default.param_groups} == {0.001}


def test_an_argument_the_optimizer_does_not_take_is_named():
    with pytest.raises(ValueError, match=r"optimizer 'sgd' takes no argument trust_coefficient"):
        build_optimizer(recipe(optimizer="sgd", optimizer_args={"trust_coefficient": 0.02}), torch.nn.Linear(3, 2), 0.1)


@pytest.mark.parametrize("name,cls", [("sgd", torch.optim.SGD), ("adamw", torch.optim.AdamW)])
def test_recipe_hyperparameters_reach_torch_optimizers(name, cls):
    opt = build_optimizer(recipe(optimizer=name, momentum=0.8, betas=[0.8, 0.99], eps=1e-7, weight_decay=0.01),
                          torch.nn.Linear(3, 2), lr=0.1)
    assert isinstance(opt, cls)
    group = opt.param_groups[0]
    if name == "sgd":
        assert group["momentum"] == 0.8 and group["weight_decay"] == 0.01
    else:
        assert group["betas"] == (0.8, 0.99) and group["eps"] == 1e-7 and group["weight_decay"] == 0.01
