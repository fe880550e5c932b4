"""examples/colab.ipynb runs top to bottom on a CPU-only runtime (a short run: 2 steps)."""

from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")
pytest.importorskip("ipykernel")

NOTEBOOK = Path(__file__).parent.parent / "examples" / "colab.ipynb"


@pytest.mark.slow
def test_the_notebook_trains_compares_and_exports(tmp_path, monkeypatch):
    monkeypatch.setenv("LORAKIT_NOTEBOOK_STEPS", "2")
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    client = nbclient.NotebookClient(
        notebook, timeout=900, kernel_name="python3", resources={"metadata": {"path": tmp_path}}
    )
    client.execute()  # raises CellExecutionError, naming the cell, if any cell fails
    outputs = [o for cell in notebook.cells if cell.cell_type == "code" for o in cell.outputs]
    text = "".join(o.get("text", "") for o in outputs if o.output_type == "stream")
    assert any("image/png" in o.get("data", {}) for o in outputs)  # the loss curve is shown
    assert "base :" in text and "tuned:" in text
    assert "a llama.cpp LoRA adapter over 120 weights" in text
    assert (tmp_path / "run" / "adapter_model.safetensors").is_file()
    assert (tmp_path / "run" / "jargon.gguf").stat().st_size > 0
    assert (tmp_path / "run" / "jargon-merged.gguf").stat().st_size > 50 * 2**20
