"""The docs stand alone: every relative link in the README, docs/ and kernels/README.md points at
a file the repository has, nothing cites a design file that is not in it, and the README stays
the front page (about 25 KB at most)."""
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DOCS = [ROOT / "README.md", ROOT / "kernels" / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
LINK = re.compile(r"\]\(([^)#\s]+)(?:#[^)]*)?\)")


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: str(p.relative_to(ROOT)))
def test_links_point_at_files_in_the_repository(doc):
    text = doc.read_text()
    missing = [t for t in LINK.findall(text)
               if not t.startswith(("http://", "https://", "mailto:")) and not (doc.parent / t).exists()]
    assert missing == [], missing
    assert "DESIGN.md" not in text


def test_readme_is_a_front_page():
    text = (ROOT / "README.md").read_text()
    assert len(text.encode()) <= 25 * 1024
    for section in ("## Install", "## Two commands", "## Quickstart", "## API in brief", "## Benchmark",
                    "## Documentation"):
        assert section in text, section
    for doc in sorted((ROOT / "docs").glob("*.md")):
        assert f"docs/{doc.name}" in text, f"the README does not link docs/{doc.name}"
