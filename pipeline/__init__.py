"""Linear regression in PyTorch as a reproducible DVC + MLflow pipeline.

Stages (one module each, run by dvc.yaml): generate -> train -> evaluate.
"""

import os

# The package's two import-time effects, both on purpose and both before anything imports what they concern.
# First: numpy, torch and MKL read their kernel settings from the environment when they first load or compute,
# so the pipeline pins them before anything imports either.
from pipeline import numerics as numerics  # pins on import: pipeline/numerics.py

# Second: MLflow sends usage telemetry (a DNS lookup, then requests to its servers) from the processes that
# import it, unless told not to. Off unless the user says otherwise (MLFLOW_DISABLE_TELEMETRY=false turns it back
# on, docs/tracking.md): for the stages and, as they inherit this environment, the tracking worker and the
# team server's `mlflow server`. The run records which (record.telemetry_tags).
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
