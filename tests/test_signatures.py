"""Calls written for a peer's library fail loudly instead of meaning something else (0.2.0):
the loss modules and LARS take their options by keyword only, and a positional one is a
TypeError naming the keywords and what the peer's argument in that place is."""
import pytest
import torch
from torch import nn

import fastclr


def _raises(call, *needles):
    with pytest.raises(TypeError) as info:
        call()
    text = str(info.value)
    for needle in needles:
        assert needle in text, text
    return text


def test_lightly_ntxent_order():
    # lightly: NTXentLoss(temperature, memory_bank_size) -- once silently a learnable temperature
    _raises(lambda: fastclr.NTXentLoss(0.5, 4096), "NTXentLoss(temperature, ...) takes learnable_temperature",
            "(4096)", "memory_bank_size", "learnable_temperature=True")
    crit = fastclr.NTXentLoss(0.5, learnable_temperature=True)
    assert crit.learnable_temperature and isinstance(crit.log_temperature, nn.Parameter)


def test_pml_supcon_call():
    z, labels = torch.randn(8, 4), torch.arange(8) % 3
    crit = fastclr.SupConLoss(0.1)
    _raises(lambda: crit(z, labels, None), "SupConLoss.forward(z, labels) takes return_accuracy",
            "indices_tuple")
    loss, acc = crit(z, labels, return_accuracy=True)
    assert loss.dim() == 0 and isinstance(acc, dict)
    assert torch.is_tensor(crit(z, labels))  # PML's two-argument call is unchanged
    _raises(lambda: fastclr.SupConLoss(0.1, "sum"), "positives='mean' or 'sum'")


def test_ntxent_forward_flags_are_keywords():
    z1, z2 = torch.randn(4, 3), torch.randn(4, 3)
    _raises(lambda: fastclr.NTXentLoss()(z1, z2, True), "takes return_accuracy by keyword only", "(True)")
    assert fastclr.NTXentLoss()(z1, z2, return_accuracy=True).accuracy


@pytest.mark.parametrize("args", [(0.1, 0.9, 0.0, 1e-6), (0.1, 0.9)])
def test_lightly_and_timm_lars_order(args):
    # lightly's (lr, momentum, dampening, weight_decay): once weight decay 0, trust coefficient 1e-6
    p = [nn.Parameter(torch.randn(3))]
    text = _raises(lambda: fastclr.LARS(p, *args), "LARS(params, lr, ...) takes momentum, weight_decay",
                   "lightly's LARS(params, lr, momentum, dampening", "timm's Lars", "dampening third")
    assert f"({', '.join(map(repr, args[1:]))})" in text
    opt = fastclr.LARS(p, 0.1, momentum=0.9, weight_decay=1e-6)
    assert opt.param_groups[0]["momentum"] == 0.9 and opt.param_groups[0]["lr"] == 0.1


def test_version():
    assert fastclr.__version__ == "0.2.0"
