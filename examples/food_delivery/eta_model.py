"""The delivery-time model: a river pipeline over the inputs served (request fields and online features).

Numeric inputs are derived and scaled; the categorical request fields (cuisine, daypart, vehicle) are
one-hot encoded; the distance is also split by vehicle, since a kilometre costs a bike more minutes than
a scooter. The intercept starts near a typical delivery and gradients are clipped, so plain SGD settles
within a few hundred deliveries instead of overshooting on the first ones. The pipeline holds all of it,
so serving needs no second copy of the preprocessing.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

from river import compose, linear_model, optim, preprocessing

CATEGORICAL: tuple[str, ...] = ("cuisine", "daypart", "vehicle")


def _number(x: Mapping[str, Any], name: str) -> float:
    value = x.get(name)
    return float(value) if value is not None else 0.0


def derive(x: Mapping[str, Any]) -> dict[str, float]:
    """Numeric inputs: features of restaurants and couriers never seen have no history, so each comes
    with an indicator and counts as 0 until it has some."""
    km = _number(x, "distance_km")
    restaurant_known = 1.0 if _number(x, "restaurant_deliveries_7d") > 0 else 0.0
    courier_known = 1.0 if _number(x, "courier_deliveries") > 0 else 0.0
    return {
        "km": km,
        "items": _number(x, "items"),
        "kitchen_load": math.log1p(_number(x, "restaurant_orders_1m")),
        "restaurant_known": restaurant_known,
        "restaurant_minutes": _number(x, "restaurant_minutes_7d") * restaurant_known,
        "courier_known": courier_known,
        "ride_estimate": km * _number(x, "courier_pace") * courier_known,
    }


def km_by_vehicle(x: Mapping[str, Any]) -> dict[str, float]:
    return {f"km_{x.get('vehicle')}": _number(x, "distance_km")}


def new_model() -> compose.Pipeline:
    numeric = (
        compose.FuncTransformer(derive) + compose.FuncTransformer(km_by_vehicle)
    ) | preprocessing.StandardScaler()
    categorical = compose.Select(*CATEGORICAL) | preprocessing.OneHotEncoder()
    regressor = linear_model.LinearRegression(
        optimizer=optim.SGD(0.005), intercept_init=25.0, intercept_lr=0.05, clip_gradient=10.0
    )
    return (numeric + categorical) | regressor
