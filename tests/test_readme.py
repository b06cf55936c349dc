"""The docs list every recipe key (docs/recipe.md), and the README the commands CI runs."""

from pathlib import Path

from distill.config import recipe_reference

REPO = Path(__file__).resolve().parents[1]
START, END = "<!-- recipe-reference:start -->\n", "<!-- recipe-reference:end -->"


REFERENCE = REPO / "docs" / "recipe.md"


def embedded_reference() -> str:
    text = REFERENCE.read_text()
    return text[text.index(START) + len(START) : text.index(END)]


def test_readme_lists_every_recipe_key():
    assert embedded_reference() == recipe_reference(), (
        "docs/recipe.md is stale: run `python -m tests.test_readme` to regenerate it"
    )


def test_ci_runs_the_readme_test_command():
    ci = (REPO / ".ci" / "run").read_text().strip().splitlines()[-1]
    assert ci == "make test"
    assert "make test " in (REPO / "README.md").read_text()



def test_the_by_hand_install_does_what_make_does():
    # Each command of the Makefile's install recipe (pip install, then the start-up hook that
    # `accelerate launch` needs where torchvision's extension cannot load) is in the README's
    # by-hand install block, with the same arguments.
    readme = (REPO / "README.md").read_text()
    block = readme.split("By hand:", 1)[1].split("```bash", 1)[1].split("```", 1)[0]
    makefile = (REPO / "Makefile").read_text()
    recipe = makefile.split("$(VENV)/.installed:", 1)[1].split("\n\n", 1)[0]
    assert "pip install" in block and "-e '.[dev]'" in block and "-c constraints-cpu.txt" in block
    hook = next(line for line in recipe.splitlines() if "_compat" in line).split("/bin/python", 1)[1].strip()
    assert hook in block, f"the README's by-hand install lacks the start-up hook: {hook}"


if __name__ == "__main__":  # regenerate docs/recipe.md's table
    import distill  # noqa: F401

    text = REFERENCE.read_text()
    head, rest = text.split(START)
    _, tail = rest.split(END)
    REFERENCE.write_text(head + START + recipe_reference() + END + tail)
