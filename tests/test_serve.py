"""`make serve`: the champion over HTTP with MLflow's own scoring server, what it answers, what it refuses, and
how it fails to start without a champion."""

from __future__ import annotations

import io
import json
import os
import shutil
import signal
import socket
import subprocess
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import requests

from pipeline import serve
from tests.helpers import REPO, free_port, pipeline_env, sh, wait_for_port


@pytest.mark.system
def test_make_serve_answers_with_the_champions_line_refuses_a_malformed_payload_and_stops_cleanly(repo: Path) -> None:
    port = free_port()
    # -o: the copy's venv is this one, linked (tests/conftest.py); remaking it would install this copy into it.
    server = subprocess.Popen(
        ["make", "-o", ".venv/.installed", "serve", f"SERVE_PORT={port}"],
        cwd=repo,
        env=pipeline_env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        assert wait_for_port(port, 120), "the scoring server did not start"
        url = f"http://127.0.0.1:{port}/invocations"
        x = [1.5, 2.0, -1.0]
        answer = requests.post(url, json={"dataframe_split": {"columns": ["x"], "data": [[v] for v in x]}}, timeout=30)
        assert answer.status_code == 200, answer.text
        served = np.array(answer.json()["predictions"])
        # Two oracles: the predict command on the DVC-tracked file, and the closed form's line (float32 apart).
        out = sh(repo, "python", "-m", "pipeline.predict", *map(str, x)).stdout
        printed = pd.read_csv(io.StringIO(out))["prediction"].to_numpy()  # float32, printed shortest
        np.testing.assert_array_equal(served.astype(np.float32), printed.astype(np.float32))
        m = json.loads((repo / "data/metrics/metrics.json").read_text())
        closed = m["weight"]["closed_form"] * np.array(x) + m["bias"]["closed_form"]
        np.testing.assert_allclose(served, closed, rtol=1e-5, atol=1e-5)
        # A value that is not a number, and a body that is not JSON: 400, with MLflow's message saying so.
        bad = requests.post(url, json={"dataframe_split": {"columns": ["x"], "data": [["abc"]]}}, timeout=30)
        assert bad.status_code == 400 and "message" in bad.json(), bad.text
        garbled = requests.post(url, data="{not json", headers={"Content-Type": "application/json"}, timeout=30)
        assert garbled.status_code == 400 and "message" in garbled.json(), garbled.text
    finally:
        os.killpg(server.pid, signal.SIGTERM)  # as Ctrl-C in its terminal would reach the whole group
        _, err = server.communicate(timeout=60)
    assert "models:/linear-regression@champion is version 1" in err, err
    assert "Traceback" not in err, err
    with pytest.raises(OSError), socket.create_connection(("127.0.0.1", port), timeout=2):
        pass  # the port is free again: nothing was left serving


@pytest.mark.stage
def test_without_a_champion_it_stops_in_one_line_before_starting_anything(
    project: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    shutil.copy(REPO / "params.yaml", project / "params.yaml")
    monkeypatch.chdir(project)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert serve.main([]) == 2  # a made store, no model registered in it yet
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: serve: models:/linear-regression@champion: no version")
    (project / "params.yaml").write_text(
        (REPO / "params.yaml").read_text().replace("registered_model: linear-regression ", "registered_model: null ")
    )
    assert serve.main([]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "tracking.registered_model is null" in err, err
    shutil.rmtree(project / "mlruns")
    (project / "params.yaml").write_text((REPO / "params.yaml").read_text())
    assert serve.main([]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "there is no MLflow store at " in err and "run `make repro` first" in err, err
    assert not (project / "mlruns").exists(), "refusing to serve made a store"
