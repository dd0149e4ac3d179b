"""The tutorial notebooks run top to bottom (on the tiny model) and are committed without outputs."""

import json
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

NOTEBOOKS = Path(__file__).resolve().parents[1] / "notebooks"


@pytest.mark.parametrize("name, says", [("01_quickstart.ipynb", "reward"), ("02_human_feedback.ipynb", "reward"),
                                        ("03_tools.ipynb", "tool_calls")])
def test_notebook_executes(name, says):
    raw = json.loads((NOTEBOOKS / name).read_text())
    assert all(not cell.get("outputs") for cell in raw["cells"]), "commit notebooks without outputs"
    notebook = nbformat.read(NOTEBOOKS / name, as_version=4)
    NotebookClient(notebook, timeout=600, kernel_name="python3",
                   resources={"metadata": {"path": str(NOTEBOOKS)}}).execute()  # raises if a cell fails
    printed = "".join(output.get("text", "") for cell in notebook.cells for output in cell.get("outputs", []))
    assert says in printed
