"""Documentation examples run as written."""

import re
from pathlib import Path

DOCS = Path(__file__).resolve().parent.parent / "docs"


def _python_blocks(page: str) -> list[str]:
    return re.findall(r"```python\n(.*?)```", (DOCS / page).read_text(), flags=re.S)


def test_custom_probe_example_runs_as_written(capsys):
    blocks = _python_blocks("custom-probe.md")
    assert blocks, "custom-probe.md lost its example"
    namespace: dict = {}
    for code in blocks:
        exec(compile(code, "custom-probe.md", "exec"), namespace)
    out = capsys.readouterr().out.split()
    assert out[0] == "(32,)" and 0.0 < float(out[1]) < 1.0


def test_every_cli_command_is_documented():
    from probe.cli.main import cli

    text = (DOCS / "cli.md").read_text()
    for name in cli.commands:
        assert f"`probe {name}" in text, name


def test_the_schema_tables_in_the_docs_are_the_declared_schema():
    from probe.store.schema import schema_markdown

    text = (DOCS / "schema.md").read_text()
    block = re.search(r"<!-- schema:begin.*?-->\n(.*?)\n<!-- schema:end -->", text, flags=re.S)
    assert block and block.group(1) == schema_markdown(), "regenerate with schema_markdown()"


def _slug(heading: str) -> str:
    """A heading's anchor as GitHub makes it: lower case, punctuation dropped, spaces to '-'."""
    kept = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return kept.replace(" ", "-")


def test_every_relative_link_in_the_docs_resolves():
    root = DOCS.parent
    broken = []
    for page in [root / "README.md", *sorted(DOCS.glob("*.md"))]:
        # code (fenced blocks, inline spans) holds brackets that are not links
        text = re.sub(r"```.*?```|`[^`\n]*`", "", page.read_text(), flags=re.S)
        for target in re.findall(r"\]\(([^)\s]+)\)", text):
            if re.match(r"[a-z]+:", target):  # a URL
                continue
            path, _, anchor = target.partition("#")
            linked = (page.parent / path).resolve() if path else page
            if not linked.exists():
                broken.append(f"{page.name}: {target} (no such file)")
            elif anchor and linked.suffix == ".md":
                headings = re.findall(r"^#+ (.+)$", linked.read_text(), re.M)
                if anchor not in {_slug(h) for h in headings}:
                    broken.append(f"{page.name}: {target} (no such heading)")
    assert not broken, "\n".join(broken)
