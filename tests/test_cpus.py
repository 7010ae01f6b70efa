"""The same bytes on other CPUs, shown rather than hoped: the stages under emulated CPUs (qemu-x86_64 -cpu MODEL,
Debian's qemu-user) write what they write natively, and the defaults what the committed dvc.lock records.

The native CPU here may have AVX-512; the emulated ones have AVX2 only (qemu emulates no AVX-512), one an Intel
model and one an AMD one, whose vendor MKL also looks at. Each emulated process runs every configuration in turn
(tests/stages_once.py), because importing torch under emulation is slow, and evaluate for two of them.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from mlflow.tracking import MlflowClient
from ruamel.yaml import YAML

from pipeline import numerics, tracking
from tests.helpers import REPO, clone, lock_outputs, pipeline_env

pytestmark = [
    pytest.mark.system,
    pytest.mark.skipif(not numerics.portable_here(), reason="the same-bytes guarantee is for x86-64 CPUs"),
]

MODELS = {"Haswell": "Intel Haswell, AVX2, no AVX-512", "EPYC-Rome": "AMD Zen 2, AVX2"}
VERIFIED = "Haswell"  # here the defaults run as `make verify CPU=Haswell` rebuilds a run made natively
# Every code path whose kernels a CPU could choose: several features, momentum, mini-batches, Adam, float64,
# the three methods, data away from 0, and the compiled step (forced on: at the sizes where `auto` compiles,
# an emulated CPU would take hours).
CONFIGS: dict[str, dict[str, dict[str, Any]]] = {
    "defaults": {},
    "features3_momentum_batches": {
        "generate": {"true_weights": [3.0, -2.0, 0.5], "n_samples": 400},
        "train": {"momentum": 0.9, "batch_size": 32, "lr": 0.02},
    },
    "adam_float64": {"generate": {"true_weights": [3.0, 1.0]}, "train": {"optimizer": "adam", "dtype": "float64"}},
    "numpy_features3": {"generate": {"true_weights": [3.0, 1.0, -1.0]}, "train": {"method": "numpy"}},
    "autograd_offset": {
        "generate": {"true_weights": [3.0, 1.0], "x_loc": 5.0},
        "train": {"method": "autograd", "momentum": 0.5, "lr": 0.01},
    },
    "compiled": {"generate": {"n_samples": 5000}, "train": {"compile": "on", "epochs": 20}},
}
# Emulated, evaluate runs on these two only: its code paths do not depend on how the model was trained, and it
# is most of an emulated configuration's time (docs/performance.md). The others run generate and train there.
EVALUATED = ("defaults", "features3_momentum_batches")


def params_files(folder: Path) -> list[Path]:
    yaml = YAML()
    files = []
    for name, changes in CONFIGS.items():
        params = yaml.load(REPO / "params.yaml")
        for section, values in changes.items():
            params[section].update(values)
        path = folder / f"{name}.yaml"
        yaml.dump(params, path)
        files.append(path)
    return files


def start(out: Path, runs: list[str], cpu: str | None) -> subprocess.Popen[bytes]:
    """tests/stages_once.py natively (cpu None) or under an emulated CPU, with an inductor cache of its own:
    each CPU compiles the step itself. At a lower priority: the other test processes' waits are its time."""
    emulate = ["nice", "-n", "5"] + ([] if cpu is None else ["qemu-x86_64", "-cpu", cpu])
    env = pipeline_env(TORCHINDUCTOR_CACHE_DIR=str(out / "inductor"))
    cmd = [*emulate, sys.executable, str(REPO / "tests" / "stages_once.py"), str(out), *runs]
    log = (out.parent / f"{out.name}.log").open("wb")
    return subprocess.Popen(cmd, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)


@dataclass(frozen=True)
class Emulated:
    md5s: dict[str, dict[str, dict[str, str]]]  # {"native" or a model: {config: {output path: md5}}}
    verified: subprocess.CompletedProcess[str]  # `pipeline.verify --cpu VERIFIED` of the reproduced repository's run
    recorded: dict[str, str]  # that run's outputs' md5s as it recorded them


@pytest.fixture(scope="module")
def emulation(tmp_path_factory: pytest.TempPathFactory, reproduced: Path) -> Iterator[Emulated]:
    """The stages natively and under the emulated CPUs, and one verification, all side by side (~2 min)."""
    if shutil.which("qemu-x86_64") is None:
        message = "qemu-x86_64 is missing: make qemu (apt-get install qemu-user)"
        pytest.fail(message) if os.environ.get("CI") else pytest.skip(message)
    tmp = tmp_path_factory.mktemp("cpus")
    files = params_files(tmp)
    # Natively every stage of each configuration but the defaults (test_pipeline_e2e's: the reproduced repository
    # against dvc.lock); emulated, evaluate only where EVALUATED says, and the defaults on VERIFIED through verify.
    native = [str(f) for f in files if f.stem != "defaults"]
    runs = {"native": start(tmp / "native", native, None)}
    for cpu in MODELS:
        listed = [f for f in files if cpu != VERIFIED or f.stem != "defaults"]
        runs[cpu] = start(tmp / cpu, [str(f) if f.stem in EVALUATED else f"{f}:generate,train" for f in listed], cpu)
    repo = clone(reproduced, tmp / "verified")
    client = MlflowClient(tracking.default_uri(repo))
    (run,) = client.search_runs([e.experiment_id for e in client.search_experiments()])
    verify = ["nice", "-n", "5", sys.executable, "-m", "pipeline.verify", run.info.run_id, "--cpu", VERIFIED]
    verifying = subprocess.Popen(verify, cwd=repo, env=pipeline_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    for name, process in runs.items():
        if process.wait(timeout=900) != 0:
            pytest.fail(f"{name}: {(tmp / f'{name}.log').read_text()[-3000:]}")
    out, err = verifying.communicate(timeout=900)
    verified = subprocess.CompletedProcess(verify, verifying.returncode, out.decode(), err.decode())
    recorded = {k.removeprefix("outs/"): v for k, v in run.data.tags.items() if k.startswith("outs/")}
    yield Emulated({name: json.loads((tmp / name / "md5.json").read_text()) for name in runs}, verified, recorded)


def test_a_run_made_natively_verifies_under_an_emulated_cpu(emulation: Emulated) -> None:
    # make verify CPU=Haswell: the reproduced repository's run, rebuilt from its commit by DVC under the emulated
    # CPU, has every md5 the run recorded natively; and those are the committed dvc.lock's.
    out = emulation.verified
    assert out.returncode == 0, out.stdout + out.stderr[-3000:]
    rows = [line.split() for line in out.stdout.splitlines() if line.startswith("data/")]
    assert {row[0]: row[1:] for row in rows} == {p: [m, m, "same"] for p, m in emulation.recorded.items()}
    assert f"under an emulated {VERIFIED}" in out.stdout
    assert emulation.recorded == lock_outputs(REPO), "the defaults' bytes are not the committed dvc.lock's"


def dir_md5(files: dict[str, str], folder: str) -> str:
    """DVC 3's hash of a folder: the md5 of its sorted JSON listing of {md5, relpath}."""
    import hashlib

    listing = [
        {"md5": m, "relpath": p[len(folder) + 1 :]} for p, m in sorted(files.items()) if p.startswith(folder + "/")
    ]
    return hashlib.md5(json.dumps(listing, sort_keys=True).encode()).hexdigest() + ".dir"


@pytest.mark.parametrize("cpu", [cpu for cpu in MODELS if cpu != VERIFIED])
def test_the_defaults_write_the_bytes_the_committed_lock_records(emulation: Emulated, cpu: str) -> None:
    got = emulation.md5s[cpu]["defaults"]
    for path, md5 in lock_outputs(REPO).items():
        actual = got[path] if path in got else dir_md5(got, path)
        assert actual == md5, f"{cpu} ({MODELS[cpu]}): {path} differs from dvc.lock"


@pytest.mark.parametrize("cpu", MODELS)
@pytest.mark.parametrize("config", [c for c in CONFIGS if c != "defaults"])
def test_every_configuration_writes_the_same_bytes_as_natively(emulation: Emulated, cpu: str, config: str) -> None:
    native, emulated = emulation.md5s["native"][config], emulation.md5s[cpu][config]
    assert emulated.keys() <= native.keys() and "data/model/model.safetensors" in emulated, sorted(emulated)
    assert config not in EVALUATED or emulated.keys() == native.keys(), f"{config}: evaluate wrote nothing"
    differ = sorted(p for p in emulated if emulated[p] != native[p])
    assert not differ, f"{config} on {MODELS[cpu]}: {differ} differ"
