"""README stays true: its options table is generated from the code, and CI runs its test command."""

import re
from pathlib import Path

from transfigure.__main__ import options_markdown

ROOT = Path(__file__).resolve().parents[1]
TEST_COMMAND = 'pip install torch==2.13.0 && pip install -e ".[test]" && python -m pytest -q'


def test_options_table_matches_code():
    readme = (ROOT / "README.md").read_text()
    table = re.search(r"<!-- options-table:start -->\n(.*?)<!-- options-table:end -->", readme, re.S).group(1)
    assert table.strip() == options_markdown().strip(), "regenerate with: python -m transfigure passes --markdown"


def test_ci_runs_the_readme_test_command():
    readme = (ROOT / "README.md").read_text()
    assert TEST_COMMAND in readme
    assert TEST_COMMAND in (ROOT / ".ci" / "run").read_text()
    assert "python -m transfigure demo" in readme
