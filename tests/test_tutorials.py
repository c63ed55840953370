"""Executes each tutorial notebook in its quick setting, as the CI does."""

import json
import os
import sys
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

from conftest import needs_fashion_mnist, needs_uci

TUTORIALS = Path(__file__).resolve().parent.parent / "tutorials"
# Appended to each notebook: reports the interpreter and the `results` dict.
REPORT_CELL = """
import json as _json, sys as _sys
print("REPORT " + _json.dumps({"executable": _sys.executable, "results": results}))
"""


def execute(name, monkeypatch):
    """Runs `name` from tutorials/; returns the executed notebook and report."""
    monkeypatch.setenv("KERAS_HYDRA_TUTORIAL_QUICK", "1")
    monkeypatch.setenv("TF_CPP_MIN_LOG_LEVEL", "2")
    # Shell commands in the notebook (saved_model_cli) come from this
    # interpreter's environment, activated or not.
    bin_dir = os.path.dirname(sys.executable)
    monkeypatch.setenv("PATH", bin_dir + os.pathsep + os.environ.get("PATH", ""))
    notebook = nbformat.read(TUTORIALS / name, as_version=4)
    assert not any(cell.get("outputs") for cell in notebook.cells), (
        f"{name} is committed with outputs; clear them."
    )
    notebook.cells.append(nbformat.v4.new_code_cell(REPORT_CELL))
    client = NotebookClient(
        notebook,
        timeout=600,
        kernel_name="python3",
        resources={"metadata": {"path": str(TUTORIALS)}},
    )
    client.execute()  # raises CellExecutionError on the first failing cell
    text = "".join(output.get("text", "") for output in notebook.cells[-1].outputs)
    report = json.loads(text.split("REPORT ", 1)[1])
    assert os.path.realpath(report["executable"]) == os.path.realpath(sys.executable)
    return notebook, report["results"]


def images(notebook) -> int:
    return sum(
        "image/png" in output.get("data", {})
        for cell in notebook.cells
        for output in cell.get("outputs", [])
    )


def cell_text(notebook, source_fragment: str) -> str:
    (cell,) = [
        c
        for c in notebook.cells
        if c.cell_type == "code" and source_fragment in c.source
    ]
    return "".join(o.get("text", "") for o in cell.outputs)


@needs_fashion_mnist
def test_classification(monkeypatch):
    notebook, results = execute("hydra_classification.ipynb", monkeypatch)
    assert images(notebook) == 3  # samples, reliability diagram, histograms
    assert set(results) == {"ensemble", "hydra", "kd"}
    for name, r in results.items():
        assert r["accuracy"] > 0.7, (name, r)
        assert 0.0 <= r["ece"] < 0.2, (name, r)
        assert 0.0 <= r["auroc_entropy"] <= 1.0, (name, r)
    # One head: no mutual information, so MI cannot rank OOD inputs.
    assert results["kd"]["auroc_mi"] == 0.5
    assert results["hydra"]["params"] < results["ensemble"]["params"]
    assert results["kd"]["params"] < results["hydra"]["params"]


@needs_uci
def test_regression(monkeypatch):
    notebook, results = execute("hydra_regression.ipynb", monkeypatch)
    assert images(notebook) == 2  # intervals, variance split
    assert set(results) == {"ensemble", "hydra"}
    for name, r in results.items():
        assert 0.5 <= r["coverage_95"] <= 1.0, (name, r)
        assert 0.0 < r["epistemic_share"] < 1.0, (name, r)
        assert r["rmse"] < 10.0, (name, r)  # the target's std is about 15


def test_serving(monkeypatch):
    notebook, results = execute("hydra_serving.ipynb", monkeypatch)
    assert results["max_abs_difference"] < 1e-5
    assert results["outputs"] == sorted(
        [
            "probabilities",
            "head_probabilities",
            "predicted_class",
            "total_uncertainty",
            "aleatoric_uncertainty",
            "epistemic_uncertainty",
        ]
    )
    assert results["dtypes"]["predicted_class"] == "int64"
    assert results["dtypes"]["probabilities"] == "float32"
    shown = cell_text(notebook, "saved_model_cli show")
    assert "signature_def['serving_default']" in shown
    assert "outputs['epistemic_uncertainty']" in shown
    assert "inputs['x']" in shown
    # The REST bodies a client would get: one dict per example (row format),
    # one list per output (columnar), with the signature's output names.
    predictions = results["response"]["predictions"]
    assert len(predictions) == 2
    assert all(sorted(p) == results["outputs"] for p in predictions)
    columnar = results["response_columnar"]["outputs"]
    assert sorted(columnar) == results["outputs"]
    assert columnar["predicted_class"] == [p["predicted_class"] for p in predictions]
    assert all(p["predicted_class"] in range(6) for p in predictions)


@pytest.mark.parametrize("name", sorted(p.name for p in TUTORIALS.glob("*.ipynb")))
def test_every_tutorial_has_a_quick_setting(name):
    notebook = nbformat.read(TUTORIALS / name, as_version=4)
    nbformat.validate(notebook)
    assert any("KERAS_HYDRA_TUTORIAL_QUICK" in cell.source for cell in notebook.cells)
    assert notebook.cells[0].cell_type == "markdown"
    assert notebook.cells[0].source.startswith("# ")
