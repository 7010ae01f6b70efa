"""Run generate, train and evaluate for several params files in one process, and print each output's md5.

`python tests/stages_once.py OUT PARAMS_FILE[:STAGE,...]...` writes OUT/<params file's stem>/ with the files
dvc.yaml names, and OUT/md5.json: {params file's stem: {path: md5}}. After a colon, the stages to run (all of them
by default, in dvc.yaml's order).
One process for all of them, because under an emulated CPU (qemu-x86_64 -cpu MODEL, tests/test_cpus.py)
importing torch alone takes ~25 s. Tracking is off: this compares bytes, not runs.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
from pathlib import Path

from ruamel.yaml import YAML

REPO = Path(__file__).resolve().parents[1]


def stage_commands(folder: Path, params: Path) -> dict[str, list[str]]:
    """Each stage's arguments from dvc.yaml's own `cmd`, with its paths under `folder`."""
    spec = YAML(typ="safe").load((REPO / "dvc.yaml").read_text())
    paths = {k: str(folder / v) for k, v in spec["vars"][0]["paths"].items()}
    out = {}
    for name, stage in spec["stages"].items():
        words = stage["cmd"].split()
        assert words[:2] == ["python", "-m"], stage["cmd"]
        args = [w.replace("${paths.", "{").format(**paths) if "${" in w else w for w in words[3:]]
        out[name] = [words[2], *args, "--params", str(params)]
    return out


def outputs(folder: Path) -> dict[str, str]:
    return {
        str(p.relative_to(folder)): hashlib.md5(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


def main(out: Path, runs: list[str]) -> dict[str, dict[str, str]]:
    import importlib

    os.environ["PIPELINE_TRACKING"] = "off"
    result = {}
    for run in runs:
        path, _, only = run.partition(":")
        params = Path(path)
        folder = out / params.stem
        for stage, args in stage_commands(folder, params).items():
            if only and stage not in only.split(","):
                continue
            code = importlib.import_module(args[0]).main(args[1:])
            if code != 0:
                raise SystemExit(f"{stage} failed on {params} ({code})")
        result[params.stem] = outputs(folder)
    return result


if __name__ == "__main__":
    sys.path.insert(0, str(REPO))
    out = Path(sys.argv[1])
    (out / "md5.json").write_text(json.dumps(main(out, sys.argv[2:]), indent=1))
