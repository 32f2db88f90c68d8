"""MkDocs hook: the README's sections become the site's guide pages.

The README stays the one source: each ``## `` section is served as
``guides/<slug>.md`` at build time (nothing is written into docs/), and the
part before the first section opens the home page. Links are rewritten for
the new place: ``docs/x`` becomes a link relative to the guides folder; a
link to another file of the repository (benchmark results, examples) keeps
its text as code and drops the target, which lives outside the site.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from mkdocs.structure.files import File, Files

README = Path(__file__).resolve().parents[2] / "README.md"
_LINK = re.compile(r"(!?)\[([^\]]*)\]\(([^)\s]+)\)")


def _slug(title: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", title.lower()).strip("-")


def _relink(text: str) -> str:
    def fix(m: re.Match[str]) -> str:
        bang, label, target = m.groups()
        if re.match(r"[a-z]+://|#", target):
            return m.group(0)
        if target.startswith("docs/"):
            return f"{bang}[{label}](../{target[len('docs/'):]})"
        return label if label.startswith("`") else f"`{label}`"

    return _LINK.sub(fix, text)


def sections() -> tuple[str, list[tuple[str, str]]]:
    """The README's intro, and (title, body) of each ``## `` section."""
    parts = re.split(r"^## (.+)$", README.read_text(encoding="utf-8"), flags=re.M)
    intro, rest = parts[0], parts[1:]
    return intro, [(rest[i].strip(), rest[i + 1]) for i in range(0, len(rest), 2)]


def on_config(config: Any) -> Any:
    """Put one guide per README section into the nav, after the home page, so
    a new section needs no edit here."""
    _, found = sections()
    guides = [{title: f"guides/{_slug(title)}.md"} for title, _ in found]
    nav = list(config["nav"] or [])
    at = next((i for i, item in enumerate(nav) if isinstance(item, dict) and "Guides" in item), None)
    if at is None:
        nav.insert(1, {"Guides": guides})
    else:
        nav[at] = {"Guides": guides + list(nav[at]["Guides"])}
    config["nav"] = nav
    return config


def on_files(files: Files, config: Any) -> Files:
    _, found = sections()
    for title, body in found:
        files.append(File.generated(config, f"guides/{_slug(title)}.md", content=f"# {title}\n{_relink(body)}"))
    return files


def on_page_markdown(markdown: str, page: Any, config: Any, files: Files) -> str:
    if page.file.src_uri != "index.md":
        return markdown
    intro, found = sections()
    intro = re.sub(r"^# .*\n", "", intro, count=1)
    guides = "\n".join(f"- [{title}](guides/{_slug(title)}.md)" for title, _ in found)
    return markdown.replace("{{ readme_intro }}", _relink(intro).replace("](../", "](")).replace(
        "{{ guides }}", guides)
