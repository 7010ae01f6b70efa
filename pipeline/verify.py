"""Prove a logged run: rebuild its outputs from its own commit and params, and compare every md5.

    make verify RUN=<run ID, run name or DVC experiment name>
    python -m pipeline.verify <run> [--cpu MODEL] [--keep]

The run is looked up in MLFLOW_TRACKING_URI's store, or the project's own. Its commit is checked out in a temporary
clone that borrows this repository's objects (nothing in the working tree or in .git changes), the params file the run
logged is written there, and `dvc repro --force` runs that commit's stages with tracking off. Then one table: each
output the run recorded (its `outs/<path>` tags), the md5 recorded, the md5 DVC wrote into the rebuilt dvc.lock,
and whether they are the same. --cpu rebuilds under an emulated CPU (qemu-x86_64 -cpu MODEL, Debian's qemu-user).

Exit status: 0 when every output is the same; 1 when one differs or the rebuild fails; 2, with one line saying why,
when the run cannot be verified.
"""

from __future__ import annotations

import argparse
import os
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

from ruamel.yaml import YAML

from pipeline import cli, record, tracking
from pipeline.errors import DataError, PipelineError, first_line

RUN_ID = re.compile(r"[0-9a-f]{32}")  # what MLflow's run IDs look like
STAGE_STARTS = re.compile(r"^Running stage '([^']+)':")  # how `dvc repro` announces a stage


@dataclass(frozen=True)
class Claim:
    """What a run says it made: from which commit, with which params file and numerics, and each output's md5."""

    run_id: str
    name: str
    commit: str
    params: bytes
    numerics: str  # portable, or native: the machine's own kernels (pipeline/numerics.py)
    outputs: dict[str, str]


def verify(args: argparse.Namespace) -> int:
    root = tracking.project_root()
    store = tracking.tracking_uri(root)
    claim = read_claim(store, args.run)  # read and check: one line and exit 2 for a run that cannot be verified
    check_commit(root, claim)
    cli.log.info("run %s (%s): %d outputs from commit %s", claim.run_id, claim.name, len(claim.outputs), claim.commit)
    with checkout(root, claim.commit, args.keep) as folder:
        (folder / record.PARAMS_ARTIFACT).write_bytes(claim.params)
        warn_about_packages(folder)
        rebuilt = rebuild(folder, claim.numerics, args.cpu)
    rows = compare(claim.outputs, rebuilt)
    print(table(rows))
    same = sum(r[3] == "same" for r in rows)
    where = f"under an emulated {args.cpu}" if args.cpu else "here"
    print(
        f"{'same' if same == len(rows) else 'differs'}: {same} of {len(rows)} outputs of run {claim.run_id} rebuilt "
        f"byte for byte from commit {claim.commit[:12]} {where}"
    )
    return 0 if same == len(rows) else 1


def read_claim(store: str, ref: str) -> Claim:
    """The run `ref` names, and what it recorded; a run that cannot be verified is one line saying why."""
    tracking.require_store(store, f"run {ref}")
    import mlflow.exceptions  # only once there is a store: the refusal above stays quick
    from mlflow.tracking import MlflowClient

    from pipeline.tracking_worker import store_lock

    try:
        with store_lock(store):  # an older store's first use migrates it
            client = MlflowClient(tracking_uri=store)
            run = find_run(client, ref, store)
        tags, status = run.data.tags, run.info.status
        label = f"run {run.info.run_id} ({run.info.run_name})"
        if status != "FINISHED":
            raise DataError(f"{label} is {status}: only a run that finished can be verified")
        outputs = {k.removeprefix(record.OUTS_TAG): v for k, v in tags.items() if k.startswith(record.OUTS_TAG)}
        if not outputs:
            raise DataError(f"{label} recorded no outputs' md5s (outs/<path> tags): it predates `make verify`")
        commit = tags.get(record.GIT_COMMIT_TAG)
        if commit is None:
            raise DataError(f"{label} recorded no git commit: it ran outside a git repository")
        dirty = tags.get("git_dirty")
        if dirty != "false":
            why = "the code differed from it" if dirty == "true" else "whether the code differed from it is unknown"
            raise DataError(f"{label} cannot be verified: it ran at commit {commit[:12]}, but {why}")
        quiet = tracking.mlflow_settings({"MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false"})
        with tempfile.TemporaryDirectory(prefix="verify-params-") as tmp, quiet:
            try:
                params = Path(client.download_artifacts(run.info.run_id, record.PARAMS_ARTIFACT, tmp)).read_bytes()
            except mlflow.exceptions.MlflowException as e:
                raise DataError(f"{label} has no {record.PARAMS_ARTIFACT} artifact: {first_line(e)}") from None
    except mlflow.exceptions.MlflowException as e:  # the store's own words, in one line
        raise DataError(f"MLflow store {store}: {first_line(e)}") from None
    return Claim(run.info.run_id, run.info.run_name, commit, params, tags.get("numerics", "portable"), outputs)


def find_run(client: Any, ref: str, store: str) -> Any:
    """The run whose ID is `ref`, else the newest whose name or DVC experiment name is `ref` (saying so when several
    are)."""
    import mlflow.exceptions

    if RUN_ID.fullmatch(ref):
        try:
            return client.get_run(ref)
        except mlflow.exceptions.MlflowException:
            pass  # a name that looks like an ID, perhaps
    quote = next((q for q in "'\"" if q not in ref), None)
    experiments = [e.experiment_id for e in client.search_experiments()]
    runs: dict[str, Any] = {}
    if quote is not None and experiments:
        for key in ("attributes.run_name", f"tags.{record.DVC_EXP_TAG}"):
            for run in client.search_runs(experiments, f"{key} = {quote}{ref}{quote}"):
                runs[run.info.run_id] = run
    if not runs:
        raise DataError(f"no run with ID, name or DVC experiment name {ref!r} in the MLflow store {store}")
    newest = sorted(runs.values(), key=lambda r: r.info.start_time, reverse=True)
    if len(newest) > 1:
        cli.log.info(
            "%d runs are named %r: the newest, %s; give a run ID for another", len(newest), ref, newest[0].info.run_id
        )
    return newest[0]


def check_commit(root: Path, claim: Claim) -> None:
    found = git(root, "cat-file", "-e", f"{claim.commit}^{{commit}}")
    if found.returncode != 0:
        raise DataError(
            f"run {claim.run_id}: its commit {claim.commit} is not in the repository at {root}: "
            "fetch the branch that holds it"
        )


def git(folder: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["git", "-C", str(folder), *args], capture_output=True, text=True)


@contextmanager
def checkout(root: Path, commit: str, keep: bool) -> Iterator[Path]:
    """`commit` in a temporary clone that borrows this repository's objects (git clone --shared): any commit here
    can be checked out, a branch's or not, and the repository itself is only read. Removed afterwards, unless kept."""
    parent = Path(tempfile.mkdtemp(prefix="verify-"))
    folder = parent / "repo"
    try:
        for args in (
            ("clone", "--quiet", "--shared", "--no-checkout", str(root), str(folder)),
            ("-C", str(folder), "-c", "advice.detachedHead=false", "checkout", "--quiet", "--detach", commit),
        ):
            done = subprocess.run(["git", *args], capture_output=True, text=True)
            if done.returncode != 0:
                said = (done.stderr.strip().splitlines() or [f"git exit status {done.returncode}"])[0]
                raise DataError(f"cannot check out commit {commit} in {folder}: {said}")
        yield folder
    finally:
        if keep:
            cli.log.info("the rebuilt checkout is kept at %s", folder)
        else:
            shutil.rmtree(parent, ignore_errors=True)


def warn_about_packages(folder: Path) -> None:
    """The rebuild runs this environment's packages: say which differ from the commit's requirements.lock."""
    lock = folder / "requirements.lock"
    if not lock.is_file():
        return
    differ = []
    for line in lock.read_text().splitlines():
        name, _, version = line.partition("==")
        if version:
            try:
                installed = metadata.version(name)
            except metadata.PackageNotFoundError:
                installed = "none"
            if installed.split("+")[0] != version.strip():
                differ.append(f"{name} {installed} (locked {version.strip()})")
    if differ:
        cli.log.warning(
            "%d installed package(s) differ from the commit's requirements.lock: %s", len(differ), ", ".join(differ[:3])
        )


class Rebuild(PipelineError):
    """The run's commit and params did not rebuild: that is a difference (exit 1), not an unusable run."""

    exit_status = 1


def rebuild(folder: Path, numerics: str, cpu: str | None) -> dict[str, str]:
    """`dvc repro --force` in `folder`, tracking off and the run's numerics, each stage announced as it starts; then
    the rebuilt dvc.lock's output md5s. The stages' `python` is this one, or it under qemu-x86_64 -cpu `cpu`."""
    bin_dir = Path(sys.executable).parent
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "DVC_"))}
    env |= {"PIPELINE_TRACKING": "off", "PIPELINE_NUMERICS": numerics, "DVC_SITE_CACHE_DIR": str(folder.parent / "dvc")}
    paths = [str(bin_dir), env.get("PATH", "")]
    if cpu is not None:
        if shutil.which("qemu-x86_64") is None:
            raise DataError(f"--cpu {cpu}: qemu-x86_64 is missing: make qemu (apt-get install qemu-user)")
        shim = folder.parent / "emulated"
        shim.mkdir()
        launcher = f'#!/bin/sh\nexec qemu-x86_64 -cpu {shlex.quote(cpu)} {shlex.quote(sys.executable)} "$@"\n'
        (shim / "python").write_text(launcher)
        (shim / "python").chmod(0o755)
        paths.insert(0, str(shim))
    env["PATH"] = os.pathsep.join(paths)
    command = [sys.executable, "-m", "dvc", "repro", "--force", "--no-commit"]
    log: list[str] = []
    stage = "(start)"
    with subprocess.Popen(
        command, cwd=folder, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    ) as process:
        assert process.stdout is not None
        for line in process.stdout:
            log.append(line)
            if started := STAGE_STARTS.match(line):
                stage = started.group(1)
                cli.log.info("rebuilding stage %s", stage)
    if process.returncode != 0:
        sys.stderr.writelines(f"  | {line}" for line in log[-20:])
        raise Rebuild(f"the rebuild failed in stage {stage} (exit status {process.returncode}); DVC's last lines above")
    lock = folder / "dvc.lock"  # none when the commit has no stage
    stages = YAML(typ="safe").load(lock.read_text())["stages"] if lock.is_file() else {}
    return {o["path"]: o["md5"] for s in stages.values() for o in s.get("outs", [])}


def compare(recorded: dict[str, str], rebuilt: dict[str, str]) -> list[tuple[str, str, str, str]]:
    """(output, recorded md5, rebuilt md5, same or differs), in the rebuilt dvc.lock's order."""
    order = [p for p in rebuilt if p in recorded] + sorted(p for p in recorded if p not in rebuilt)
    rows = []
    for path in order:
        got = rebuilt.get(path, "(not rebuilt)")
        rows.append((path, recorded[path], got, "same" if got == recorded[path] else "differs"))
    return rows


def table(rows: list[tuple[str, str, str, str]]) -> str:
    lines = [("output", "recorded md5", "rebuilt md5", ""), *rows]
    widths = [max(len(line[i]) for line in lines) for i in range(3)]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(line, [*widths, 0], strict=True)).rstrip() for line in lines)


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run", help="run ID, run name or DVC experiment name (the newest of several with that name)")
    p.add_argument("--cpu", help="rebuild under this emulated CPU model: qemu-x86_64 -cpu MODEL (e.g. Haswell)")
    p.add_argument("--keep", action="store_true", help="keep the rebuilt checkout, and say where it is")
    return cli.run("verify", verify, p.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
