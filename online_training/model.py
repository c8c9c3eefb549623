"""The fraud model: a river pipeline over the exact features served, and its artifact format.

Inputs are the feature map logged with each prediction: request fields of the event plus the online
features of the card. The pipeline derives ratios itself, so the artifact carries its own
preprocessing and serving needs no second copy of it.
"""

from __future__ import annotations

import hashlib
import math
import pickle
from collections.abc import Mapping
from typing import Any

from river import compose, linear_model, optim, preprocessing

from features.definitions import CARD_ACTIVITY
from infra.errors import TrainingError

# Fields taken from the scoring request (names and types come from the event schema).
REQUEST_FIELDS: tuple[str, ...] = ("amount", "category", "country", "card_present")
ONLINE_FEATURES: tuple[str, ...] = CARD_ACTIVITY.feature_names
FEATURE_NAMES: tuple[str, ...] = REQUEST_FIELDS + ONLINE_FEATURES
CATEGORICAL: tuple[str, ...] = ("category", "country")
# Inputs whose distributions are profiled for drift. Window aggregates are left out: they move while the
# window fills (a new card's mean starts at the default), which is not drift.
PROFILED: tuple[str, ...] = ("amount", "card_present")


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
    return (numeric + categorical) | linear_model.LogisticRegression(optimizer=optim.SGD(0.05))


def dump(model: Any) -> tuple[bytes, str]:
    """Serialise a river model; returns the artifact and its sha256."""
    blob = pickle.dumps(model, protocol=pickle.HIGHEST_PROTOCOL)
    return blob, hashlib.sha256(blob).hexdigest()


def load(blob: bytes, sha256: str) -> Any:
    """Load a river artifact after checking its digest.

    Artifacts are pickles: only load them from a models topic that only trusted trainers can write to.
    """
    if hashlib.sha256(blob).hexdigest() != sha256:
        raise TrainingError("artifact digest does not match its sha256")
    try:
        return pickle.loads(blob)
    except Exception as exc:
        raise TrainingError(f"artifact does not unpickle: {exc}") from exc
