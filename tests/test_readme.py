"""The README's quick start is exactly two commands, and CI runs the second one verbatim."""

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def quick_start() -> list[str]:
    section = (ROOT / "README.md").read_text().split("## Quick start", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"```bash\n(.*?)\n```", section, re.S)


def test_quick_start_has_two_commands():
    first, second = quick_start()
    assert "leanlm optimize" in first and "pytest" in second


def test_ci_runs_the_readme_test_command():
    assert quick_start()[1] in (ROOT / ".ci" / "run").read_text()


def test_every_shipped_recipe_is_in_the_repo_folder():
    shipped = sorted(p.name for p in (ROOT / "src" / "leanlm" / "recipes").glob("*.yaml"))
    assert shipped == sorted(p.name for p in (ROOT / "recipes").glob("*.yaml")) and "default.yaml" in shipped


def test_readme_is_a_short_guide_whose_links_exist():
    text = (ROOT / "README.md").read_text()
    assert len(text.splitlines()) <= 220
    links = re.findall(r"\]\(([^)#]+)\)", text)
    assert len(links) >= 8 and all((ROOT / link).exists() for link in links), links


def test_benchmarks_opens_with_a_dashboard():
    head = (ROOT / "BENCHMARKS.md").read_text().split("\n## ", 2)
    assert "dashboard" in head[0].lower() and "| target | today | command | date |" in head[1]
