"""The fraud model: a river pipeline over the inputs served (request fields and online features).

The pipeline derives ratios itself, so the artifact carries its own preprocessing and serving needs no
second copy of it. AdaGrad gives each weight a step that shrinks as its gradients accumulate: a learner
that has seen a long stream settles and adapts slowly when the pattern changes, which is why the model's
policy refreshes it (a fresh learner warmed on recent labels) on a concept-drift alert.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

from river import compose, linear_model, optim, preprocessing

CATEGORICAL: tuple[str, ...] = ("category", "country")


def derive(x: Mapping[str, Any]) -> dict[str, float]:
    amount = float(x["amount"])
    mean = float(x.get("amount_mean_1h") or 0.0)
    return {
        "log_amount": math.log1p(max(amount, 0.0)),
        "amount_ratio": math.log1p(max(amount, 0.0)) - math.log1p(max(mean, 0.0)),
        "card_present": 1.0 if x["card_present"] else 0.0,
        "foreign": 0.0 if x.get("country") == "US" else 1.0,
        "log_count": math.log1p(float(x.get("txn_count_1h") or 0.0)),
    }


def new_model() -> compose.Pipeline:
    numeric = compose.FuncTransformer(derive) | preprocessing.StandardScaler()
    categorical = compose.Select(*CATEGORICAL) | preprocessing.OneHotEncoder()
    return (numeric + categorical) | linear_model.LogisticRegression(optimizer=optim.AdaGrad(0.1))
