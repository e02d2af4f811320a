import pytest
import torch
from torch import nn

from lightning_backdoor.losses import LOSSES, IBDPSCAdaptiveLoss, LossTerm, ScaleUpAdaptiveLoss, create_loss, list_losses


def test_registry_lists_and_builds_every_term():
    assert list_losses() == ["ibd_psc_adaptive", "neural_cleanse_unlearning", "scale_up_adaptive"]
    assert list_losses("scale*") == ["scale_up_adaptive"]
    assert isinstance(create_loss("scale_up_adaptive", weight=0.5), ScaleUpAdaptiveLoss)
    assert isinstance(create_loss("ibd_psc_adaptive", k=2), IBDPSCAdaptiveLoss)
    with pytest.raises(ValueError, match="unknown loss 'nope'.*scale_up_adaptive"):
        create_loss("nope")


@pytest.mark.parametrize("name", list_losses())
def test_term_contract(name):
    term = LOSSES.create(name)
    assert isinstance(term, LossTerm) and isinstance(term, nn.Module)
    assert term.name == name and term.skipped == 0
    assert isinstance(term.main_weight, float) and 0 <= term.main_weight <= 1
    assert isinstance(term.requires_fit, bool)
    assert list(term.parameters()) == []  # the model is passed in, never registered


def test_base_forward_is_abstract():
    with pytest.raises(NotImplementedError):
        LossTerm()(nn.Identity(), torch.rand(1, 3, 2, 2), torch.zeros(1), torch.zeros(1, dtype=torch.bool), torch.zeros(1), 0)
