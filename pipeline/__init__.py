"""Linear regression in PyTorch as a reproducible DVC + MLflow pipeline.

Stages (one module each, run by dvc.yaml): generate -> train -> evaluate.
"""
