"""Write web/dvc-plots.html, the page `dvc plots show` and `dvc plots diff` fill with their plots.

DVC's own page loads vega, vega-lite and vega-embed from a CDN and stays blank offline. This one carries the
three libraries inside it, as the one script vl-convert-python bundles them into (vl_convert.javascript_bundle):
a Python package pinned in requirements.lock like the rest, so building the page needs no Node.js or npm.
.dvc/config points DVC at the page (plots.html_template).

    .venv/bin/python web/build_template.py          # `make install` runs it
"""

from __future__ import annotations

import sys
from pathlib import Path

WEB = Path(__file__).resolve().parent
OUT = WEB / "dvc-plots.html"
# DVC's vega-lite templates (dvc_render.vega_templates) declare "$schema": ".../vega-lite/v5.json". vega-embed
# warns on every plot whose major versions differ from those it carries: the spec's vega-lite against its own
# ("The input spec uses Vega-Lite v5, but the current version of Vega-Lite is v6..."), and the vega that vega-lite
# compiles the spec to against its own ("The compiled spec uses Vega v5, but current version is v6...": hence
# vl-convert-python < 1.8 in pyproject.toml, as 1.8 and later bundle vega 6). So vega-lite 5, the newest 5.x
# vl-convert has (vl_convert.get_vegalite_versions()), fixed here so that an upgrade cannot change it unnoticed;
# main() checks that DVC's templates still say v5.
VL_VERSION = "5.21"
# DVC fills the page by plain text replacement of these (dvc_render.html.HTML.embed); {scripts} is left out on
# purpose: it is where DVC would put its CDN <script src=...> tags.
PLACEHOLDERS = ("{plot_divs}", "{refresh_tag}", "{scripts}")

PAGE = """<!DOCTYPE html>
<html>
<head>
<meta charset="utf-8">
{refresh_tag}
<title>DVC plots</title>
<style>
  body {{ font-family: sans-serif; margin: 16px; }}
  table {{ border-spacing: 15px; }}
</style>
{libraries}
</head>
<body>
{plot_divs}
</body>
</html>
"""


def script(code: str, name: str) -> str:
    for placeholder in PLACEHOLDERS:
        if placeholder in code:  # DVC would replace it inside the library's code
            raise SystemExit(f"error: {name}: contains {placeholder}, which DVC would replace")
    # After "<!--", a "<script" makes the HTML parser skip the next "</script>": the page would swallow the rest.
    if "<!--" in code:
        raise SystemExit(f"error: {name}: contains <!--, which can keep the HTML parser from ending the script")
    # The HTML parser ends a script at the first "</script", wherever it is.
    code = code.replace("</script", "<\\/script")
    # A classic script, not type="module": a module runs only once the whole page is parsed, and the inline
    # <script> DVC puts after each plot calls vegaEmbed(...) as soon as it is parsed. Wrapped in a function: the
    # bundle is an ES module's code, whose thousands of minified top-level names (function P, const Q1, ...)
    # would otherwise all become globals of the page, beside DVC's `var spec = ...` in every plot's script: a
    # later script that declares one of them again fails (a const) or breaks vega (a function). "use strict":
    # module code is strict, and this is how it was written to run.
    return f'<!-- {name} -->\n<script>\n(function () {{\n"use strict";\n{code}\n}})();\n</script>'


def dvc_schema_majors() -> set[str]:
    """The vega-lite major versions ("v5") that DVC's plot templates declare in their $schema."""
    from dvc_render.vega_templates import TEMPLATES

    return {t.DEFAULT_CONTENT["$schema"].rsplit("/", 1)[-1].removesuffix(".json") for t in TEMPLATES}


def main() -> int:
    try:
        import vl_convert
    except ModuleNotFoundError:
        print(
            "error: vl_convert is missing (the package vl-convert-python): run `make install`, or this script"
            " with the venv's python (.venv/bin/python web/build_template.py)",
            file=sys.stderr,
        )
        return 2
    offered = vl_convert.get_vegalite_versions()
    if VL_VERSION not in offered:
        print(
            f"error: vl-convert {vl_convert.__version__} has no vega-lite {VL_VERSION} (it has {offered})",
            file=sys.stderr,
        )
        return 2
    majors = dvc_schema_majors()
    if majors != {f"v{VL_VERSION.split('.')[0]}"}:
        print(
            f"error: DVC's plot templates declare vega-lite {sorted(majors)}; VL_VERSION is {VL_VERSION}",
            file=sys.stderr,
        )
        return 2
    vega, embed = vl_convert.get_vega_version(), vl_convert.get_vega_embed_version()
    versions = f"vega {vega}, vega-lite {VL_VERSION}, vega-embed {embed}"
    name = f"{versions} (vl-convert-python {vl_convert.__version__})"
    # The one global the page needs: what DVC's scripts call. (The default snippet also sets window.vega and
    # window.vegaLite, to the modules' default exports, which are null.)
    bundle = vl_convert.javascript_bundle(snippet="window.vegaEmbed = vegaEmbed;", vl_version=VL_VERSION)
    libraries = script(bundle, name)
    page = PAGE.format(refresh_tag="{refresh_tag}", plot_divs="{plot_divs}", libraries=libraries)
    tmp = OUT.with_name(f".{OUT.name}.tmp")
    tmp.write_text(page, encoding="utf-8")
    tmp.replace(OUT)  # whole or not at all
    print(f"wrote {OUT.relative_to(WEB.parent)} ({len(page) / 1e6:.1f} MB: {versions})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
