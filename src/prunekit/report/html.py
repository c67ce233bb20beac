"""``report.html`` and ``report.md`` from one Markdown text: the charts are linked into the Markdown next
to the section they illustrate, then the same Markdown is converted to HTML (Python-Markdown, ``tables``
and ``fenced_code``) with each chart embedded as a base64 data URI and the style sheet inline, so the HTML
opens offline and any section added to the Markdown report shows up in both files.

Raw HTML in the Markdown (a layer named ``<lambda>``, say) is escaped, never passed through.
"""

from __future__ import annotations

import base64
import html
from collections.abc import Sequence
from pathlib import Path

from prunekit.files import atomic_write_bytes, atomic_write_text
from prunekit.report.plots import Figure

CSS = """
body { font: 15px/1.5 -apple-system, "Segoe UI", Roboto, "Helvetica Neue", Arial, sans-serif;
       color: #1d2329; background: #fff; max-width: 1100px; margin: 2em auto; padding: 0 1.5em; }
h1 { font-size: 1.7em; border-bottom: 2px solid #3b6ea8; padding-bottom: .2em; }
h2 { font-size: 1.3em; margin-top: 1.8em; border-bottom: 1px solid #d8dee4; padding-bottom: .15em; }
h1 + h2 + ul { background: #f3f7fb; border-left: 4px solid #3b6ea8; padding: .6em 1em .6em 2em; }
table { border-collapse: collapse; margin: .8em 0; font-size: 13px; font-variant-numeric: tabular-nums; }
th, td { border: 1px solid #d0d7de; padding: 3px 9px; text-align: left; }
th { background: #eef1f4; }
tr:nth-child(even) td { background: #f8f9fa; }
code { font: 12.5px ui-monospace, "SFMono-Regular", Menlo, Consolas, monospace; background: #f3f4f6;
       padding: 0 3px; border-radius: 3px; }
pre { background: #f6f8fa; padding: .8em 1em; overflow-x: auto; border-radius: 4px; }
pre code { background: none; padding: 0; }
img { max-width: 100%; display: block; margin: .6em 0; border: 1px solid #e1e4e8; }
strong { color: #9a2a1f; }
"""


def figure_file(figure: Figure) -> str:
    return f"report-{figure.name}.png"


def with_figures(text: str, figures: Sequence[Figure]) -> str:
    """``text`` with an image link ``![title](report-<name>.png)`` at the end of the section whose ``## ``
    heading starts with ``figure.section``; a figure without such a section goes into a closing
    ``## Charts`` section."""
    lines = text.rstrip("\n").split("\n")
    orphans = []
    for figure in figures:
        link = f"![{figure.title}]({figure_file(figure)})"
        start = next(
            (
                i
                for i, line in enumerate(lines)
                if line.startswith("## ") and line[3:].startswith(figure.section)
            ),
            None,
        )
        if start is None:
            orphans.append(link)
            continue
        end = next(
            (i for i in range(start + 1, len(lines)) if lines[i].startswith(("# ", "## "))), len(lines)
        )
        while end > start + 1 and not lines[end - 1].strip():
            end -= 1  # before the blank lines that close the section
        lines[end:end] = ["", link]
    if orphans:
        lines += ["", "## Charts", ""] + [x for link in orphans for x in (link, "")]
    return "\n".join(lines) + "\n"


def _converter():
    import markdown

    md = markdown.Markdown(extensions=["tables", "fenced_code"], output_format="html")
    md.preprocessors.deregister("html_block")  # escape raw HTML instead of passing it through
    md.inlinePatterns.deregister("html")
    return md


def markdown_to_html(text: str, images: dict[str, bytes] | None = None, title: str | None = None) -> str:
    """A self-contained HTML page of the Markdown ``text``; ``images`` maps the file names its image links
    use to PNG bytes, embedded as data URIs (a link to a name not in ``images`` is left as it is)."""
    body = _converter().convert(text)
    for name, png in (images or {}).items():
        uri = "data:image/png;base64," + base64.b64encode(png).decode("ascii")
        body = body.replace(f'src="{html.escape(name)}"', f'src="{uri}"')
    if title is None:
        first = next((line for line in text.splitlines() if line.startswith("# ")), "# prunekit report")
        title = first[2:].strip()
    return (
        '<!DOCTYPE html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n'
        '<meta name="viewport" content="width=device-width, initial-scale=1">\n'
        f"<title>{html.escape(title)}</title>\n<style>{CSS}</style>\n</head>\n<body>\n{body}\n</body>\n</html>\n"
    )


def write_reports(out: str | Path, text: str, figures: Sequence[Figure] = ()) -> tuple[Path, Path]:
    """Write ``out/report-<name>.png`` per figure, ``out/report.md`` (``text`` with the charts linked) and
    ``out/report.html`` (the same Markdown, charts embedded), each atomically; returns the two reports'
    paths. Charts of an earlier run that this one does not draw are removed."""
    out = Path(out)
    names = {figure_file(f) for f in figures}
    for figure in figures:
        atomic_write_bytes(out / figure_file(figure), figure.png)
    for stale in out.glob("report-*.png"):
        if stale.name not in names:
            stale.unlink()
    text = with_figures(text, figures)
    md = atomic_write_text(out / "report.md", text)
    page = markdown_to_html(text, {figure_file(f): f.png for f in figures})
    return md, atomic_write_text(out / "report.html", page)
