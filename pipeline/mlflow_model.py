"""The trained model in MLflow's format: the code of the pyfunc model that the train stage logs with its run.

MLflow "models from code": train's tracking worker hands this file's path to MLflow, which copies it into the
logged model beside the weights (data/model/model.safetensors) and the model's signature, input example and
pinned requirements. Load it anywhere with

    model = mlflow.pyfunc.load_model("models:/<model id>")   # or runs:/..., or a registered name
    model.predict(pandas.DataFrame({"x": [1.5, 2.0]}))       # -> what the nn.Linear outputs: about 3 * x

The file stands alone, because a logged model must load without this repository. It computes what nn.Linear's
forward computes, x W^T + b, in NumPy: serving the model then needs numpy and safetensors, not torch,
and MLflow's check that the logged model serves its input example does not import torch into the stage's
tracking worker (docs/pipeline.md, "Using the model"). tests/test_tracking.py holds its predictions to the nn.Linear's.
No stage imports this file: MLflow executes it, and `set_model` at the end is how MLflow finds the model.
"""

from __future__ import annotations

from typing import Any

import mlflow
import numpy as np
import pandas as pd
from mlflow.pyfunc.model import PythonModel


class LinearRegressionModel(PythonModel):
    """The trained nn.Linear(k, 1) as a function: one prediction per row of k features."""

    def load_context(self, context: Any) -> None:
        from safetensors.numpy import load_file

        state = load_file(context.artifacts["weights"])  # nn.Linear's state_dict: weight (1, k), bias (1,)
        self.weight, self.bias = state["weight"], state["bias"]

    # MLflow reads the hint on model_input: a DataFrame (or none at all) leaves the signature to the one logged
    # with the model; list[...] hints would make MLflow infer a second one.
    def predict(self, context: Any, model_input: pd.DataFrame, params: dict[str, Any] | None = None) -> np.ndarray:
        # The signature has checked the columns; nn.Linear's forward is x W^T + b, in the weights' dtype.
        x = np.asarray(model_input, dtype=self.weight.dtype).reshape(len(model_input), -1)
        out: np.ndarray = (x @ self.weight.T + self.bias).reshape(-1)
        return out


mlflow.models.set_model(LinearRegressionModel())
