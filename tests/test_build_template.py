"""web/build_template.py, which builds the offline plot page: what it refuses to inline, and its one line of error
when vl-convert-python is missing. That the page it writes works is tests/test_browser.py's part."""

from __future__ import annotations

import importlib.util
import sys
from types import ModuleType

import pytest

from tests.helpers import REPO


def load() -> ModuleType:
    spec = importlib.util.spec_from_file_location("build_template", REPO / "web" / "build_template.py")
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


build_template = load()


def test_without_vl_convert_it_says_so_in_one_line_and_exits_2(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setitem(sys.modules, "vl_convert", None)  # `import vl_convert` raises ModuleNotFoundError
    assert build_template.main() == 2
    err = capsys.readouterr().err
    assert err.startswith("error: vl_convert is missing (the package vl-convert-python)"), err
    assert err.count("\n") == 1, err


@pytest.mark.parametrize("placeholder", ["{plot_divs}", "{refresh_tag}", "{scripts}"])
def test_a_bundle_holding_a_placeholder_dvc_fills_is_refused(placeholder: str) -> None:
    with pytest.raises(SystemExit, match=f"error: lib: contains {placeholder}, which DVC would replace"):
        build_template.script(f'const s = "{placeholder}";', "lib")


def test_a_script_end_tag_inside_the_bundle_is_escaped() -> None:
    html = build_template.script('const s = "</script>";', "lib")
    assert html.count("</script") == 1 and html.endswith("</script>"), html
    assert 'const s = "<\\/script>";' in html


def test_a_bundle_holding_an_html_comment_opening_is_refused() -> None:
    with pytest.raises(SystemExit, match="error: lib: contains <!--"):
        build_template.script('const s = "<!--<script>";', "lib")
