"""The stages' command lines: what they write, and one-line errors that leave nothing behind."""

from __future__ import annotations

from pathlib import Path

import pytest

from pipeline import evaluate, generate, train
from tests.conftest import REPO


def params_with(tmp_path: Path, old: str, new: str) -> Path:
    text = (REPO / "params.yaml").read_text()
    assert old in text
    (tmp_path / "params.yaml").write_text(text.replace(old, new))
    return tmp_path / "params.yaml"


def test_generate_writes_both_tables(tmp_path: Path) -> None:
    args = [
        "--params",
        str(REPO / "params.yaml"),
        "--train",
        str(tmp_path / "tr.csv"),
        "--test",
        str(tmp_path / "te.csv"),
    ]
    assert generate.main(args) == 0
    assert (tmp_path / "tr.csv").stat().st_size > 0 and (tmp_path / "te.csv").stat().st_size > 0
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no temp files left


@pytest.mark.parametrize(
    ("old", "new", "fragment"),
    [
        ("lr: 0.1 ", "lr: -1 ", "train.lr = -1.0: must be > 0"),
        ("epochs: 100", "epochz: 100", "unknown key train.epochz"),
    ],
)
def test_bad_params_fail_every_stage_in_one_line_writing_nothing(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], old: str, new: str, fragment: str
) -> None:
    params = str(params_with(tmp_path, old, new))
    out = tmp_path / "out"
    runs = [
        (generate.main, ["--train", f"{out}/a.csv", "--test", f"{out}/b.csv"]),
        (train.main, ["--data", f"{REPO}/params.yaml", "--model", f"{out}/m.pt", "--trajectory", f"{out}/t.csv"]),
        (
            evaluate.main,
            [
                *("--train-data", "x", "--test-data", "x", "--model", "x", "--trajectory", "x"),
                *("--metrics", f"{out}/m.json", "--plots", f"{out}/plots"),
            ],
        ),
    ]
    for main, args in runs:
        assert main(["--params", params, *args]) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and fragment in err and str(params) in err, err
    assert not out.exists()


def test_train_refuses_a_missing_data_file_before_any_work(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    args = [
        "--data",
        str(tmp_path / "none.csv"),
        "--model",
        str(tmp_path / "m.pt"),
        "--trajectory",
        str(tmp_path / "t"),
    ]
    assert train.main(["--params", str(REPO / "params.yaml"), *args]) == 2
    assert "no such data file" in capsys.readouterr().err
    assert not (tmp_path / "m.pt").exists()
