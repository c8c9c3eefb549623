"""Definitions of this project: edit, then `tide plan` and `tide apply`."""

from tide import Entity, Feature, FeatureView, Labels, Model, Source

events = Source(name="events", schema="events.avsc", key="user_id", event_time="ts", partitions=4)
outcomes = Source(name="outcomes", schema="outcomes.avsc", key="user_id", event_time="ts", partitions=4)

user = Entity(name="user", join_key="user_id")

user_activity = FeatureView(
    name="user_activity",
    source=events,
    entity=user,
    kind="sliding",
    window="1h",
    tile="1m",
    allowed_lateness="5m",
    ttl="7d",
    features=[
        Feature("events_1h", "count"),
        Feature("value_mean_1h", "mean", "value"),
        Feature("kinds_1h", "distinct", "kind"),
    ],
)

outcome = Labels(
    name="outcome", source=outcomes, key="event_id", target="positive", task="binary", max_delay="1d"
)

scorer = Model(
    name="scorer",
    task="binary",
    request=events,
    request_fields=["value", "kind"],
    features=["user_activity.events_1h", "user_activity.value_mean_1h", "user_activity.kinds_1h"],
    labels=outcome,
    learner="learner:new_learner",
    monitor=["value"],
)
