"""The engine tells the user where the generic per-sample re-run is costly."""

import logging
import warnings

import torch
from torch import nn

import groupclip


class RootParam(nn.Module):
    def __init__(self, layers: int):
        super().__init__()
        self.cls = nn.Parameter(torch.zeros(1, 4))
        self.layers = nn.ModuleList(nn.Linear(4, 4) for _ in range(layers))

    def forward(self, x):
        x = x + self.cls
        for layer in self.layers:
            x = layer(x)
        return x


def _build(model):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return groupclip.PrivacyEngine(model, torch.optim.SGD(model.parameters(), lr=0.1), batch_size=2,
                                       sample_size=10, noise_multiplier=1.0)


def test_costly_generic_rerun_is_warned(caplog):
    with caplog.at_level(logging.WARNING, logger="groupclip"):
        _build(RootParam(10))
    assert any("['cls']" in r.getMessage() and "10 submodules" in r.getMessage() for r in caplog.records)


def test_cheap_generic_unit_is_not_warned(caplog):
    with caplog.at_level(logging.WARNING, logger="groupclip"):
        _build(RootParam(2))
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]
