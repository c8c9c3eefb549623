"""The online learner: any object with river's verbs (learn_one, predict_proba_one / predict_one)."""

from river import compose, linear_model, preprocessing


def new_learner() -> compose.Pipeline:
    numeric = (
        compose.Select("value", "events_1h", "value_mean_1h", "kinds_1h") | preprocessing.StandardScaler()
    )
    categorical = compose.Select("kind") | preprocessing.OneHotEncoder()
    return (numeric + categorical) | linear_model.LogisticRegression()
