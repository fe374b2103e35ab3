"""The learning: data, numpy models, training, tracking, plots, and `python -m src.train`."""

import os

# MLflow 3 and Ray send usage statistics to their makers' servers by default; a run of this
# project talks to its tracking store and nothing else. Set here, before either is imported
# by any entry point (src.train, src.stage, src.upload); a user's own choice is kept.
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
