"""Every notebook runs top to bottom on a fresh Jupyter kernel (nbclient), on the tiny model
configuration (``KVPRESS_RS_NOTEBOOK_MODEL=tiny``, seconds each); the notebooks' own
asserts check their results. ``KVPRESS_RS_NOTEBOOK_MODEL=smollm2`` runs them on the real
model by hand: ``KVPRESS_RS_NOTEBOOK_MODEL=smollm2 pytest tests_py/test_notebooks.py``."""

from __future__ import annotations

import os
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

NOTEBOOKS = sorted((Path(__file__).parent.parent / "notebooks").glob("*.ipynb"))


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_notebook_runs_top_to_bottom(path, monkeypatch):
    # the kernel inherits the environment: the model choice, and one thread for rayon
    monkeypatch.setenv("KVPRESS_RS_NOTEBOOK_MODEL", os.environ.get("KVPRESS_RS_NOTEBOOK_MODEL", "tiny"))
    monkeypatch.setenv("MPLBACKEND", "Agg")
    notebook = nbformat.read(path, as_version=4)
    NotebookClient(notebook, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(path.parent)}}).execute()
    outputs = [o for cell in notebook.cells if cell.cell_type == "code" for o in cell.outputs]
    assert not [o for o in outputs if o.output_type == "error"]
    assert any(o.output_type == "stream" for o in outputs)


def test_the_four_notebooks_exist():
    assert {p.stem for p in NOTEBOOKS} >= {"quickstart", "comparing_policies", "quantization", "rope_and_chunks"}
