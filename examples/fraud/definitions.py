"""The card-fraud example: card transactions scored at authorisation, chargeback labels arriving later.

Declared with Tide's public API only; `tide apply --project examples/fraud` registers it.
"""

from tide import Canary, Entity, Feature, FeatureView, Labels, Model, Policy, Retrain, Source

PROJECT_NAME = "fraud"

transactions = Source(
    name="transactions",
    schema="schemas/transaction.avsc",
    key="card_id",
    event_time="ts",
    topic="events",
    partitions=4,
    max_future_skew="1h",
    description="Card transactions, as the payment system sees them at authorisation.",
)
chargebacks = Source(
    name="chargebacks",
    schema="schemas/label.avsc",
    key="card_id",
    event_time="ts",
    topic="labels",
    partitions=4,
    description="Whether a transaction was fraud, known days later.",
)

card = Entity(name="card", join_key="card_id", description="A payment card.")

card_activity = FeatureView(
    name="card_activity",
    description="A card's spending over the last hour (sliding, 1-minute tiles).",
    source=transactions,
    entity=card,
    kind="sliding",
    window="1h",
    tile="1m",
    allowed_lateness="5m",
    ttl="7d",
    features=[
        Feature("txn_count_1h", "count"),
        Feature("amount_sum_1h", "sum", "amount"),
        Feature("amount_mean_1h", "mean", "amount"),
        Feature("amount_max_1h", "max", "amount"),
        Feature("amount_std_1h", "stddev", "amount"),
        Feature("merchants_1h", "distinct", "merchant_id"),
    ],
)
card_daily = FeatureView(
    name="card_daily",
    description="A card's spending today so far (tumbling, calendar days in UTC).",
    source=transactions,
    entity=card,
    kind="tumbling",
    window="1d",
    allowed_lateness="5m",
    ttl="7d",
    features=[
        Feature("txn_count_today", "count"),
        Feature("amount_p90_today", "quantile", "amount", q=0.9),
        Feature("amount_min_today", "min", "amount"),
    ],
)
card_profile = FeatureView(
    name="card_profile",
    description="Everything known about a card since it was first seen.",
    source=transactions,
    entity=card,
    kind="lifetime",
    allowed_lateness="1h",
    ttl="90d",
    features=[
        Feature("txn_count_lifetime", "count"),
        Feature("last_category", "last", "category", default=""),
        Feature("countries_lifetime", "distinct", "country"),
    ],
)

is_fraud = Labels(
    name="is_fraud",
    source=chargebacks,
    key="event_id",
    target="is_fraud",
    task="binary",
    max_delay="1d",
)

fraud = Model(
    name="fraud",
    task="binary",
    description="A river pipeline learning online from every chargeback label.",
    request=transactions,
    request_fields=["amount", "category", "country", "card_present"],
    features=[f"card_activity.{f.name}" for f in card_activity.features]
    + ["card_daily.txn_count_today", "card_profile.txn_count_lifetime"],
    labels=is_fraud,
    learner="fraud_model:new_model",
    metric="ROCAUC",
    # A version per 1200 labels: the judge watches the loss of each version for a change, so the version
    # serving when the world changes must go on serving long enough for the change to show.
    publish_every=1200,
    # Window aggregates are left out: they move while a window fills, which is not drift.
    monitor=["amount", "card_present"],
    policy=Policy(
        # A canary is decided within a minute of traffic: a pass is promoted, a fail rolled back.
        canary=Canary(promote=True, rollback=True, min_labels=150, min_duration_s=10.0, max_duration_s=120.0),
        # A concept-drift alert (the labels show the change) refreshes the learner: a fresh one warmed on
        # the labels since the change point the alert estimates (at most 400), blessed against the
        # champion on the same labels. Input-drift alerts are reported
        # only: they come before any label of the changed world, so a refresh then would learn the old one.
        retrain=Retrain(on=("concept",), window=400, min_interval_s=20.0, max_regression=0.05),
    ),
)

fraud_nn = Model(
    name="fraud_nn",
    task="binary",
    description="An MLP retrained in batch on point-in-time features (tide retrain), served as ONNX.",
    request=transactions,
    request_fields=["amount", "card_present"],
    features=[f"card_activity.{f.name}" for f in card_activity.features],
    labels=is_fraud,
    batch_trainer="fraud_network:new_network",
    metric="ROCAUC",
    monitor=["amount", "card_present"],
    policy=Policy(retrain=Retrain(on=("concept", "drift"), window=2000, min_interval_s=300.0)),
)
