"""Linear regression in PyTorch as a reproducible DVC + MLflow pipeline.

Stages (one module each, run by dvc.yaml): generate -> train -> evaluate.
"""

# The package's one import-time effect, on purpose: numpy, torch and MKL read their kernel settings from the
# environment when they first load or compute, so the pipeline pins them before anything imports either.
from pipeline import numerics as numerics  # pins on import: pipeline/numerics.py
