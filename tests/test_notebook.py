"""The walkthrough notebook runs top to bottom (nbclient), at a reduced quickstart scale."""

import json
import sys

import nbformat
import pytest

from helpers import REPO_ROOT

NOTEBOOK = REPO_ROOT / "notebooks" / "walkthrough.ipynb"
pytestmark = pytest.mark.slow


def test_outputs_are_stripped_in_git():
    notebook = json.loads(NOTEBOOK.read_text())
    for cell in notebook["cells"]:
        if cell["cell_type"] == "code":
            assert cell["outputs"] == [] and cell["execution_count"] is None


def test_walkthrough_executes(tmp_path):
    from nbclient import NotebookClient

    notebook = nbformat.read(NOTEBOOK, as_version=4)
    overrides = [
        f"output_dir={tmp_path / 'run'}", "train.epochs=1", "data.synthetic.num_train=16",
        "data.synthetic.num_val=4", "data.synthetic.size=[32, 32]", "data.crop_size=[32, 32]",
        "data.resize=[32, 32]", "train.warmup_steps=0", "teacher_train.epochs=1",
        "data.labelled_fraction=0.5", "data.num_workers=0",
    ]
    assert notebook.cells[1].source.startswith("# Parameters")
    notebook.cells[1].source = f"RECIPE = {str(REPO_ROOT / 'recipes' / 'quickstart.yaml')!r}\nOVERRIDES = {overrides!r}"
    client = NotebookClient(notebook, timeout=600, kernel_name="python3",
                            resources={"metadata": {"path": str(REPO_ROOT / "notebooks")}})
    client.execute()
    text = "\n".join(
        output.get("text", "") + json.dumps(output.get("data", {}).get("text/plain", ""))
        for cell in notebook.cells if cell.cell_type == "code" for output in cell.outputs
    )
    assert "student: best val mIoU" in text and "classes found:" in text
    assert (tmp_path / "run" / "compare" / "compare.png").is_file()
    assert (tmp_path / "run" / "export" / "student.onnx").is_file()
    images = [o for c in notebook.cells if c.cell_type == "code" for o in c.outputs if "image/png" in o.get("data", {})]
    assert len(images) == 2  # the comparison figure and the segmented image
