"""The food-delivery example: how many minutes an order will take from placing to the door.

What it shows beyond the fraud example: a regression model; features of two entity types (restaurants
and couriers) in one model; feature views over the labels stream itself (a restaurant's actual minutes
over the last 7 days, a courier's measured pace), and categorical request inputs (cuisine, daypart,
vehicle) one-hot encoded in the river pipeline.

Declared with Tide's public API only; `tide apply --project examples/food_delivery` registers it.
"""

from tide import Entity, Feature, FeatureView, Labels, Model, Source

PROJECT_NAME = "food_delivery"

orders = Source(
    name="orders",
    schema="schemas/order.avsc",
    key="order_id",
    event_time="ts",
    partitions=4,
    max_future_skew="1h",
    description="Orders as they are placed, with the restaurant and the courier assigned.",
)
deliveries = Source(
    name="deliveries",
    schema="schemas/delivered.avsc",
    key="order_id",
    event_time="ts",
    partitions=4,
    description="Orders at the door: the minutes each actually took (the labels).",
)

restaurant = Entity(name="restaurant", join_key="restaurant_id", description="A restaurant's kitchen.")
courier = Entity(name="courier", join_key="courier_id", description="A courier and their vehicle.")

restaurant_kitchen = FeatureView(
    name="restaurant_kitchen",
    description="How busy a kitchen is: its orders over the last minute (sliding, 5-second tiles).",
    source=orders,
    entity=restaurant,
    kind="sliding",
    window="1m",
    tile="5s",
    allowed_lateness="30s",
    ttl="1d",
    features=[Feature("restaurant_orders_1m", "count")],
)
restaurant_history = FeatureView(
    name="restaurant_history",
    description="A restaurant's actual delivery minutes over the last 7 days, from the deliveries (labels).",
    source=deliveries,
    entity=restaurant,
    kind="sliding",
    window="7d",
    tile="1h",
    allowed_lateness="5m",
    ttl="30d",
    features=[
        Feature("restaurant_minutes_7d", "mean", "minutes"),
        Feature("restaurant_deliveries_7d", "count"),
    ],
)
courier_history = FeatureView(
    name="courier_history",
    description="A courier's measured ride pace since first seen, from the deliveries (labels).",
    source=deliveries,
    entity=courier,
    kind="lifetime",
    allowed_lateness="1h",
    ttl="90d",
    features=[
        Feature("courier_pace", "mean", "pace_min_per_km"),
        Feature("courier_deliveries", "count"),
    ],
)

delivery_minutes = Labels(
    name="delivery_minutes",
    source=deliveries,
    key="order_id",
    target="minutes",
    task="regression",
    max_delay="2h",
)

eta = Model(
    name="eta",
    task="regression",
    description="Minutes from order to door, learnt online from every delivery.",
    request=orders,
    request_fields=["cuisine", "daypart", "vehicle", "distance_km", "items"],
    features=[
        "restaurant_kitchen.restaurant_orders_1m",
        "restaurant_history.restaurant_minutes_7d",
        "restaurant_history.restaurant_deliveries_7d",
        "courier_history.courier_pace",
        "courier_history.courier_deliveries",
    ],
    labels=delivery_minutes,
    learner="eta_model:new_model",
    metric="MAE",
    publish_every=500,
    monitor=["distance_km", "items"],
)
