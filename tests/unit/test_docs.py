"""The documentation keeps up with the code: docs/configuration.md's gateway table lists exactly the
environment variables the gateway reads, and every relative link in README.md and docs/ leads to a
file (and a heading) that exists."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

from tests.conftest import REPO_ROOT

CONFIGURATION = REPO_ROOT / "docs" / "configuration.md"
GATEWAY_TABLE_HEADING = "## The gateway"
VARIABLE = re.compile(r"VLM_[A-Z0-9_]+")
# [text](target): the targets of inline Markdown links (images too), outside code.
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")
DOCUMENTS = [REPO_ROOT / "README.md", *sorted((REPO_ROOT / "docs").glob("*.md"))]


def variables_read(source: str) -> set[str]:
    """The environment variables a module names: string constants that are exactly a VLM_ name
    (the keys of `env.get(...)`; messages that mention a variable are longer than its name)."""
    return {node.value for node in ast.walk(ast.parse(source))
            if isinstance(node, ast.Constant) and isinstance(node.value, str) and VARIABLE.fullmatch(node.value)}


def gateway_variables() -> set[str]:
    return set().union(*(variables_read(path.read_text()) for path in sorted((REPO_ROOT / "gateway").glob("*.py"))))


def section(markdown: str, heading: str) -> str:
    """The text under `heading` up to the next heading of the same or a higher level."""
    level = len(heading) - len(heading.lstrip("#"))
    lines = markdown.splitlines()
    if heading not in lines:
        pytest.fail(f"no heading {heading!r} in docs/configuration.md: the gateway's settings table belongs under it")
    start = lines.index(heading) + 1
    end = next((i for i in range(start, len(lines))
                if re.match(rf"^#{{1,{level}}} ", lines[i])), len(lines))
    return "\n".join(lines[start:end])


def table_rows(text: str) -> dict[str, list[str]]:
    """{variable: its row's other cells} for table rows whose first cell is a `VLM_...` name."""
    rows = {}
    for line in text.splitlines():
        cells = [cell.strip() for cell in line.strip().strip("|").split("|")] if line.startswith("|") else []
        name = re.fullmatch(r"`(VLM_[A-Z0-9_]+)`", cells[0]) if cells else None
        if name:
            rows[name.group(1)] = cells[1:]
    return rows


def test_the_variables_are_found_in_the_gateway_code():
    found = gateway_variables()
    assert {"VLM_API_KEYS", "VLM_TRITON_URL", "VLM_DRAIN_GRACE_S", "VLM_REQUIRED_MODELS"} <= found
    assert all(VARIABLE.fullmatch(name) for name in found)


def test_every_gateway_variable_has_a_row_with_its_default_and_meaning():
    rows = table_rows(section(CONFIGURATION.read_text(), GATEWAY_TABLE_HEADING))
    missing = sorted(gateway_variables() - set(rows))
    assert not missing, f"docs/configuration.md ({GATEWAY_TABLE_HEADING}) has no row for {', '.join(missing)}"
    incomplete = sorted(name for name, cells in rows.items() if len(cells) < 2 or not all(cells[:2]))
    assert not incomplete, f"rows without a default and a meaning: {', '.join(incomplete)}"


def test_the_gateway_table_names_no_variable_the_gateway_does_not_read():
    rows = table_rows(section(CONFIGURATION.read_text(), GATEWAY_TABLE_HEADING))
    stale = sorted(set(rows) - gateway_variables())
    assert not stale, f"docs/configuration.md documents {', '.join(stale)}, which the gateway does not read"


def test_a_missing_variable_is_found():
    """The check above can fail: a table without one of the variables misses it."""
    rows = table_rows(section(CONFIGURATION.read_text(), GATEWAY_TABLE_HEADING))
    assert "VLM_MAX_PARTS" in rows
    without = "\n".join(line for line in CONFIGURATION.read_text().splitlines() if "`VLM_MAX_PARTS`" not in line)
    assert "VLM_MAX_PARTS" in gateway_variables() - set(table_rows(section(without, GATEWAY_TABLE_HEADING)))


def anchor(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces as hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def anchors(path: Path) -> set[str]:
    text = re.sub(r"```.*?```", "", path.read_text(), flags=re.S)
    return {anchor(line.lstrip("#")) for line in text.splitlines() if re.match(r"^#{1,6} ", line)}


def relative_links(path: Path) -> list[str]:
    text = re.sub(r"```.*?```", "", path.read_text(), flags=re.S)  # code blocks hold no links
    text = re.sub(r"`[^`\n]*`", "", text)
    return [target for target in LINK.findall(text) if not re.match(r"^[a-z][a-z0-9+.-]*:", target)]


@pytest.mark.parametrize("document", DOCUMENTS, ids=lambda path: str(path.relative_to(REPO_ROOT)))
def test_every_relative_link_leads_to_a_file_and_heading_that_exist(document):
    broken = []
    for target in relative_links(document):
        file_part, _, fragment = target.partition("#")
        destination = (document.parent / file_part).resolve() if file_part else document
        if not destination.exists():
            broken.append(f"{target} (no such file)")
        elif fragment and destination.suffix == ".md" and fragment not in anchors(destination):
            broken.append(f"{target} (no such heading in {destination.relative_to(REPO_ROOT)})")
    assert not broken, f"{document.relative_to(REPO_ROOT)}: broken links: {', '.join(broken)}"


def test_the_docs_are_linked_from_the_readme():
    linked = {(REPO_ROOT / target.partition("#")[0]).resolve() for target in relative_links(REPO_ROOT / "README.md")}
    unlinked = [path.name for path in DOCUMENTS[1:] if path.resolve() not in linked]
    assert not unlinked, f"README.md links no page {', '.join(unlinked)}"


def test_the_readme_keeps_the_curl_examples_the_integration_test_runs():
    """tests/integration/test_openai_api.py::test_the_readmes_curl_examples_run runs this block."""
    readme = (REPO_ROOT / "README.md").read_text()
    block = re.search(r"<!-- curl-examples -->\n```bash\n(.*?)```", readme, re.S)
    assert block and "/v1/chat/completions" in block.group(1)
