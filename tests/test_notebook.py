"""The Colab/TPU notebook, executed top to bottom on the CPU: the demo model on an emulated mesh of 4."""

from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

NOTEBOOK = Path(__file__).resolve().parents[1] / "notebooks" / "jaxfuse_sdxl.ipynb"


def outputs_of(cell) -> list[dict]:
    return [output for output in cell.get("outputs", []) if output.get("output_type") in ("display_data",
                                                                                          "execute_result")]


def test_notebook_is_saved_without_outputs_and_starts_with_its_parameters():
    nb = nbformat.read(NOTEBOOK, as_version=4)
    code = [cell for cell in nb.cells if cell.cell_type == "code"]
    assert all(not cell.outputs and cell.execution_count is None for cell in code)
    assert code[0].source.startswith("# Parameters")
    for name in ("MODEL_PATH", "PROMPT", "SIZE", "STEPS", "MODE", "DEVICES"):
        assert f"\n{name} = " in code[0].source


@pytest.mark.slow
def test_notebook_runs_on_cpu_and_shows_the_image_and_the_comparison(tmp_path, monkeypatch):
    nb = nbformat.read(NOTEBOOK, as_version=4)
    parameters = next(cell for cell in nb.cells if cell.cell_type == "code")
    parameters.source = parameters.source.replace("STEPS = 30", "STEPS = 6")
    # The kernel inherits the environment: no device-count flag, so the notebook asks for its 4.
    monkeypatch.delenv("XLA_FLAGS", raising=False)
    monkeypatch.setenv("JAX_PLATFORMS", "cpu")
    monkeypatch.setenv("JAXFUSE_CACHE", str(tmp_path / "cache"))
    NotebookClient(nb, timeout=600, kernel_name="python3",
                   resources={"metadata": {"path": str(NOTEBOOK.parent)}}).execute()

    errors = [o for cell in nb.cells for o in cell.get("outputs", []) if o.get("output_type") == "error"]
    assert not errors
    text = "\n".join(o.get("text", "") for cell in nb.cells for o in cell.get("outputs", []))
    assert "backend: cpu, 4 devices" in text
    assert "left: single device; right: displaced over 4 devices" in text
    images = [o for cell in nb.cells for o in outputs_of(cell) if "image/png" in o["data"]]
    assert len(images) == 2  # the image, then single and displaced side by side
    tables = [o["data"]["text/markdown"] for cell in nb.cells for o in outputs_of(cell) if "text/markdown" in o["data"]]
    assert len(tables) == 1 and "| displaced | 4 |" in tables[0] and "PSNR vs single" in tables[0]
