"""Sphinx configuration: the Markdown pages in docs/ (through MyST) plus an API reference from the docstrings.

Build with ``tox -e docs`` or ``sphinx-build -W --keep-going -b html docs docs/_build/html``; warnings are errors.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
# Document the code in this checkout, whatever is installed.
sys.path.insert(0, str(ROOT))

import esmtpkit  # noqa: E402

project = "esmtpkit"
author = "the esmtpkit authors"
copyright = "esmtpkit authors"
release = esmtpkit.__version__
version = release

extensions = [
    "myst_parser",
    "sphinx.ext.autodoc",
    "repoze.sphinx.autointerface",
]

source_suffix = {".md": "markdown", ".rst": "restructuredtext"}
root_doc = "index"
exclude_patterns = ["_build", "Thumbs.db", ".DS_Store"]
# index.md's toctree lists the guides in reading order and ends with a ``*`` glob: it brings in the API reference
# (api.md, deliberately not listed) and any new page not placed yet, so the glob always matches a page.

# MyST: `[text](page.md)` links between pages, `[text](page.md#a-heading)` and `(#a-heading)` anchors.
myst_enable_extensions = ["colon_fence", "deflist"]
myst_heading_anchors = 3

# Docstrings write `Name` for a Python object, as most of the code base does.
default_role = "py:obj"

autodoc_member_order = "bysource"
autodoc_typehints = "signature"
autodoc_default_options = {"members": True, "show-inheritance": True}
autodoc_inherit_docstrings = True
# The sidebar lists pages and sections; the API page would otherwise list every method there too.
toc_object_entries = False


html_theme = "alabaster"
html_title = f"esmtpkit {release}"
html_theme_options = {
    "description": "A Twisted toolkit for writing ESMTP servers",
    "fixed_sidebar": True,
    # The pages have wide tables (options, rule book, side-by-side mappings).
    "page_width": "1320px",
    "code_font_size": "0.8em",
}


def _repository_file_links(app: Any, doctree: Any) -> None:
    """Make links from a page to repository files outside docs/ work in the built site.

    ``[haproxy.cfg](../contrib/haproxy/haproxy.cfg)`` reads well on a repository browser. In the site, a link to a
    file becomes a download of that file, and a link to a folder keeps its text without a link. Links to anything
    that does not exist in the repository are left alone, so they still fail the build.
    """
    from sphinx import addnodes

    env = app.env
    docname = env.current_document.docname if hasattr(env, "current_document") else env.docname
    srcdir = Path(env.srcdir).resolve()
    here = (srcdir / docname).parent
    for node in list(doctree.findall(addnodes.pending_xref)):
        if node.get("reftype") != "myst":
            continue
        target = str(node["reftarget"])
        if node.get("refdomain") == "doc":
            if target in env.found_docs:
                continue
            candidates = [Path(srcdir, target + suffix) for suffix in app.config.source_suffix]
        elif node.get("refdomain") is None:
            candidates = [here / target.split("#", 1)[0]]
        else:
            continue
        for path in candidates:
            path = path.resolve()
            if not path.exists() or not path.is_relative_to(ROOT) or path.is_relative_to(srcdir):
                continue
            if path.is_file():
                link = addnodes.download_reference("", "", *node.children, refdoc=docname, refexplicit=True,
                                                   reftarget=os.path.relpath(path, here))
                link["classes"] = ["xref", "download", "myst"]
                node.replace_self(link)
            else:
                node.replace_self(node.children)
            break


def setup(app: Any) -> dict[str, Any]:
    """Register the repository-link fix before Sphinx collects downloadable files."""
    app.connect("doctree-read", _repository_file_links, priority=100)
    return {"parallel_read_safe": True}
