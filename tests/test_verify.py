"""`make verify RUN=...` (pipeline/verify.py): a logged run rebuilt from its own commit and params, every output's md5
compared with what the run recorded. A queued sweep's run is verified in tests/test_team.py, and a run made natively
under an emulated CPU in tests/test_cpus.py."""

from __future__ import annotations

import json
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from pipeline import record, tracking, verify
from tests.helpers import free_port, lock_outputs, pipeline_env, sh


def the_run(repo: Path) -> tuple[MlflowClient, object]:
    client = MlflowClient(tracking.default_uri(repo))
    (run,) = client.search_runs([e.experiment_id for e in client.search_experiments()])
    return client, run


def untouched(repo: Path) -> dict[str, str]:
    """What a user would notice changed: the git state, dvc.lock, params.yaml and every file under data/."""
    git = "\n".join(sh(repo, "git", *args).stdout for args in (("status", "--porcelain"), ("worktree", "list")))
    files = sorted(p for p in (repo / "data").rglob("*") if p.is_file())
    return {"git": git, **{str(p): p.read_bytes().hex() for p in [repo / "dvc.lock", repo / "params.yaml", *files]}}


def verified(repo: Path, ref: str, tmp: Path) -> tuple[subprocess.CompletedProcess[str], dict[str, list[str]]]:
    """`python -m pipeline.verify ref` in the repository, its temporary folders in `tmp` (removed, or it fails);
    the output and the table's rows by output path."""
    tmp.mkdir(exist_ok=True)
    out = sh(repo, "python", "-m", "pipeline.verify", ref, env=pipeline_env(TMPDIR=str(tmp)), check=False)
    assert not list(tmp.glob("verify-*")), "the temporary checkout was left behind"
    rows = {line.split()[0]: line.split()[1:] for line in out.stdout.splitlines() if line.startswith("data/")}
    return out, rows


@pytest.mark.system
def test_a_run_verifies_after_main_moves_on_and_an_md5_altered_in_the_store_differs(repo: Path, tmp_path: Path) -> None:
    client, run = the_run(repo)
    recorded = {k.removeprefix("outs/"): v for k, v in run.data.tags.items() if k.startswith("outs/")}
    assert recorded == lock_outputs(repo), "the run records each output's md5 as dvc.lock does"
    # main moves on: train.json indented by one space, which today's code writes as other bytes.
    train = repo / "pipeline" / "train.py"
    assert train.read_text().count("json.dumps(report, indent=2)") == 1
    train.write_text(train.read_text().replace("json.dumps(report, indent=2)", "json.dumps(report, indent=1)"))
    sh(repo, "git", "commit", "-q", "-am", "train.json indented by one")
    report = (repo / "data/metrics/train.json").read_text()
    assert json.dumps(json.loads(report), indent=1) + "\n" != report
    before = untouched(repo)
    out, rows = verified(repo, run.info.run_id, tmp_path / "tmp")  # with the run's commit's code
    assert out.returncode == 0, out.stdout + out.stderr
    assert rows == {path: [md5, md5, "same"] for path, md5 in recorded.items()}
    assert f"same: 8 of 8 outputs of run {run.info.run_id}" in out.stdout
    stages = [line.split()[-1] for line in out.stderr.splitlines() if "rebuilding stage" in line]
    assert stages == ["generate", "train", "evaluate"], out.stderr
    # The store now says the model had other bytes: that output alone differs, and the exit status says so. By name.
    client.set_tag(run.info.run_id, "outs/data/model/model.safetensors", "0" * 32)
    out, rows = verified(repo, run.info.run_name, tmp_path / "tmp")
    assert out.returncode == 1, out.stderr
    assert {p for p, row in rows.items() if row[2] != "same"} == {"data/model/model.safetensors"}
    assert rows["data/model/model.safetensors"] == ["0" * 32, recorded["data/model/model.safetensors"], "differs"]
    assert untouched(repo) == before


@dataclass(frozen=True)
class Claims:
    project: Path  # the current folder: a DVC repository with a store and one stage, which fails
    runs: dict[str, str]  # {reason: run ID} for each reason a run cannot be verified, and "verifiable", which can
    tmp: Path  # where verify makes its temporary folders


@pytest.fixture
def claims(project: Path, tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> Claims:
    """Runs made by hand, as no stage would make most of them, in a project that verify runs in, in-process."""
    (project / "dvc.yaml").write_text("stages:\n  broken:\n    cmd: python -c 'raise SystemExit(3)'\n")
    (project / ".dvc").mkdir()
    (project / ".dvc" / "config").write_text("[core]\n    analytics = false\n")
    for args in (("init", "-q"), ("add", "dvc.yaml", ".dvc/config"), ("commit", "-qm", "first")):
        subprocess.run(["git", *args], cwd=project, env=pipeline_env(), check=True, capture_output=True)
    commit = sh(project, "git", "rev-parse", "HEAD").stdout.strip()
    (project / "params.yaml").write_text("generate: {}\n")
    client = MlflowClient(tracking.default_uri(project))
    experiment = client.create_experiment("linear-regression")
    good = {record.GIT_COMMIT_TAG: commit, "git_dirty": "false", "outs/data/model/model.safetensors": "0" * 32}
    runs = {}
    for reason, status, tags, params in (
        ("failed", "FAILED", good, True),
        ("no outputs", "FINISHED", {record.GIT_COMMIT_TAG: commit, "git_dirty": "false"}, True),
        ("no commit", "FINISHED", good | {record.GIT_COMMIT_TAG: ""}, True),
        ("dirty", "FINISHED", good | {"git_dirty": "true"}, True),
        ("no params", "FINISHED", good, False),
        ("not here", "FINISHED", good | {record.GIT_COMMIT_TAG: "f" * 40}, True),
        ("verifiable", "FINISHED", good, True),
        ("twice", "FINISHED", good, True),  # two runs of one name: verify takes the newer, which is dirty
        ("twice", "FINISHED", good | {"git_dirty": "true"}, True),
    ):
        run = client.create_run(experiment, run_name=reason, tags={k: v for k, v in tags.items() if v}).info.run_id
        if params:
            client.log_artifact(run, str(project / "params.yaml"))
        client.set_terminated(run, status)
        runs[reason] = run
    monkeypatch.chdir(project)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    tmp = tmp_path_factory.mktemp("tmp")
    monkeypatch.setattr(tempfile, "tempdir", str(tmp))
    return Claims(project, runs, tmp)


WHY = {
    "failed": "is FAILED: only a run that finished can be verified",
    "no outputs": "recorded no outputs' md5s (outs/<path> tags): it predates `make verify`",
    "no commit": "recorded no git commit",
    "dirty": "cannot be verified: it ran at commit {short}, but the code differed from it",
    "no params": "has no params.yaml artifact",
    "not here": "its commit ffffffffffffffffffffffffffffffffffffffff is not in the repository at",
}


@pytest.mark.stage
def test_what_cannot_be_verified_is_one_line_and_exit_2_changing_nothing(
    claims: Claims, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    project, runs, tmp = claims.project, claims.runs, claims.tmp
    short = sh(project, "git", "rev-parse", "HEAD").stdout.strip()[:12]

    def listing() -> list[Path]:  # but the store, which reading may lock
        return sorted(p.relative_to(project) for p in project.rglob("*") if not {".git", "mlruns"} & set(p.parts))

    before = listing()

    def refused(ref: str) -> str:
        assert verify.main([ref]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("error: verify: "), err
        return err[0]

    for reason, why in WHY.items():
        assert why.format(short=short) in refused(runs[reason]), reason
    assert "no run with ID, name or DVC experiment name 'nosuch' in the MLflow store" in refused("nosuch")
    assert refused("twice").startswith(f"error: verify: run {runs['twice']} (twice) cannot be verified")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"http://127.0.0.1:{free_port()}")
    assert "is not reachable" in refused(runs["dirty"])
    assert not list(tmp.iterdir()) and listing() == before


def test_the_table_lists_each_output_once_in_the_rebuilt_locks_order() -> None:
    recorded = {"b": "1", "a": "2", "gone": "3"}
    rows = verify.compare(recorded, {"a": "2", "c": "9", "b": "0"})
    assert rows == [("a", "2", "2", "same"), ("b", "1", "0", "differs"), ("gone", "3", "(not rebuilt)", "differs")]
    lines = verify.table(rows).splitlines()
    assert lines[0].split() == ["output", "recorded", "md5", "rebuilt", "md5"] and len(lines) == 4
    assert len({line.index(line.split()[1]) for line in lines[1:]}) == 1, "the columns line up"


@pytest.mark.stage
def test_a_rebuild_that_fails_is_a_difference_and_leaves_nothing(
    claims: Claims, capsys: pytest.CaptureFixture[str], caplog: pytest.LogCaptureFixture
) -> None:
    project, runs, tmp = claims.project, claims.runs, claims.tmp
    status = sh(project, "git", "status", "--porcelain").stdout
    assert verify.main([runs["verifiable"]]) == 1
    err = capsys.readouterr().err  # DVC's last lines, then the error
    assert "rebuilding stage broken" in caplog.text and "ERROR: failed to reproduce 'broken'" in err, err
    assert err.strip().splitlines()[-1].startswith("error: verify: the rebuild failed in stage broken (exit status")
    assert not list(tmp.glob("verify-*")) and sh(project, "git", "status", "--porcelain").stdout == status


def test_packages_that_differ_from_the_commits_lock_are_named(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    from importlib import metadata

    torch = metadata.version("torch").split("+")[0]  # the local label (+cpu) is not part of the locked version
    (tmp_path / "requirements.lock").write_text(f"torch=={torch}\nnumpy==0.0.1\nno-such-package==1.0\n")
    verify.warn_about_packages(tmp_path)
    (line,) = [r.getMessage() for r in caplog.records]
    numpy = metadata.version("numpy")
    assert line.startswith(f"2 installed package(s) differ from the commit's requirements.lock: numpy {numpy}"), line
    assert "no-such-package none (locked 1.0)" in line and "torch" not in line
