"""The README documents every recipe key and the commands CI runs."""

from pathlib import Path

from distill.config import recipe_reference

REPO = Path(__file__).resolve().parents[1]
START, END = "<!-- recipe-reference:start -->\n", "<!-- recipe-reference:end -->"


def embedded_reference() -> str:
    text = (REPO / "README.md").read_text()
    return text[text.index(START) + len(START) : text.index(END)]


def test_readme_lists_every_recipe_key():
    assert embedded_reference() == recipe_reference(), (
        "README's recipe table is stale: run `python -m tests.test_readme` to regenerate it"
    )


def test_ci_runs_the_readme_test_command():
    ci = (REPO / ".ci" / "run").read_text().strip().splitlines()[-1]
    assert ci == "make test"
    assert "make test " in (REPO / "README.md").read_text()


if __name__ == "__main__":  # regenerate the README's table
    import distill  # noqa: F401

    readme = REPO / "README.md"
    text = readme.read_text()
    head, rest = text.split(START)
    _, tail = rest.split(END)
    readme.write_text(head + START + recipe_reference() + END + tail)
