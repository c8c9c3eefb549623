"""The fraud example's batch trainer: an MLP over the model's numeric inputs, as ``tide retrain`` trains it.

``new_network(n_inputs)`` is the factory ``fraud_nn`` names (``batch_trainer="fraud_network:new_network"``):
it returns a torch module that maps the raw inputs, as serving assembles them, to the logit of fraud.
Amounts and counts are heavy-tailed and non-negative, so the module takes ``log1p`` of them first (ratios
such as amount / mean become differences), then standardises with statistics fixed by ``prepare`` on the
training rows, so the exported ONNX graph carries all of its preprocessing.
"""

from __future__ import annotations

import torch
from torch import nn


class LogMLP(nn.Module):
    """``mlp((log1p(max(x, 0)) - mean) / std)``: raw non-negative inputs in, the logit ``[batch, 1]`` out."""

    mean: torch.Tensor
    std: torch.Tensor

    def __init__(self, n_inputs: int, hidden: int = 32) -> None:
        super().__init__()
        self.register_buffer("mean", torch.zeros(n_inputs))
        self.register_buffer("std", torch.ones(n_inputs))
        self.net = nn.Sequential(
            nn.Linear(n_inputs, hidden),
            nn.ReLU(),
            nn.Linear(hidden, hidden),
            nn.ReLU(),
            nn.Linear(hidden, 1),
        )

    @staticmethod
    def transform(x: torch.Tensor) -> torch.Tensor:
        return torch.log1p(torch.relu(x))

    def prepare(self, x: torch.Tensor) -> None:
        """Fix the standardisation from the training inputs (called once, before training)."""
        z = self.transform(x)
        std = z.std(0)
        self.mean.copy_(z.mean(0))
        self.std.copy_(torch.where(std > 1e-6, std, torch.ones_like(std)))  # a constant input stays as it is

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.net((self.transform(x) - self.mean) / self.std)
        return out


def new_network(n_inputs: int) -> nn.Module:
    return LogMLP(n_inputs)
