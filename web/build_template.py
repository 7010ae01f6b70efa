"""Write web/dvc-plots.html, the page `dvc plots show` and `dvc plots diff` fill with their plots.

DVC's own page loads vega, vega-lite and vega-embed from a CDN and stays blank offline. This one carries the
three libraries inside it, read from web/node_modules, which `make install` fills from the npm registry
(`npm ci`, versions and hashes in web/package-lock.json). .dvc/config points DVC at it (plots.html_template).

    python web/build_template.py          # after `npm ci --prefix web`; `make install` runs both
"""

from __future__ import annotations

import sys
from pathlib import Path

WEB = Path(__file__).resolve().parent
LIBRARIES = ("vega/build/vega.min.js", "vega-lite/build/vega-lite.min.js", "vega-embed/build/vega-embed.min.js")
OUT = WEB / "dvc-plots.html"
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


def script(path: Path) -> str:
    code = path.read_text(encoding="utf-8")
    for placeholder in PLACEHOLDERS:
        if placeholder in code:  # DVC would replace it inside the library's code
            raise SystemExit(f"error: {path}: contains {placeholder}, which DVC would replace")
    # The HTML parser ends a script at the first "</script", wherever it is.
    code = code.replace("</script", "<\\/script")
    return f"<!-- {path.relative_to(WEB)} -->\n<script>\n{code}\n</script>"


def main() -> int:
    missing = [lib for lib in LIBRARIES if not (WEB / "node_modules" / lib).is_file()]
    if missing:
        print(f"error: web/node_modules/{missing[0]}: missing; run `npm ci --prefix web` first", file=sys.stderr)
        return 2
    libraries = "\n".join(script(WEB / "node_modules" / lib) for lib in LIBRARIES)
    page = PAGE.format(refresh_tag="{refresh_tag}", plot_divs="{plot_divs}", libraries=libraries)
    tmp = OUT.with_name(f".{OUT.name}.tmp")
    tmp.write_text(page, encoding="utf-8")
    tmp.replace(OUT)  # whole or not at all
    print(f"wrote {OUT.relative_to(WEB.parent)} ({len(page) / 1e6:.1f} MB, {len(LIBRARIES)} libraries inlined)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
