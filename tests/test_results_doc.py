"""benchmarks/RESULTS.md opens with a table of the current figures, one row per benchmark,
each linking to a section of the log below it that exists."""
import re
from collections import Counter

from serve_process import ROOT

RESULTS = ROOT / "benchmarks" / "RESULTS.md"
COLUMNS = ["what", "figure", "reference, same run", "ratio", "machine", "date", "section"]


def anchors(text: str) -> set:
    """The anchors GitHub gives the headings of `text` (lower case, punctuation dropped,
    spaces to hyphens; a repeated heading gets -1, -2...)."""
    seen: Counter = Counter()
    found = set()
    for heading in re.findall(r"^#+ (.+)$", text, re.M):
        slug = re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")
        found.add(slug if not seen[slug] else f"{slug}-{seen[slug]}")
        seen[slug] += 1
    return found


def test_results_open_with_the_current_figures_linking_into_the_log():
    text = RESULTS.read_text()
    first_section = re.search(r"^## (.+)$", text, re.M).group(1)
    assert first_section == "Current figures"
    table = text[text.index("| what |"):text.index("## Log of runs")]
    rows = [[cell.strip() for cell in line.strip().strip("|").split("|")]
            for line in table.splitlines() if line.startswith("|")]
    assert rows[0] == COLUMNS and len(rows) > 10
    targets = anchors(text)
    for row in rows[2:]:
        assert len(row) == len(COLUMNS), row
        assert re.fullmatch(r"\d{4}-\d\d-\d\d", row[5]), row
        link = re.fullmatch(r"\[[^\]]+\]\(#([^)]+)\)", row[6])
        assert link and link.group(1) in targets, row[6]
