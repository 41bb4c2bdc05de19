"""`fedad report` writes report.html: self-contained (every image a base64 data URI, no
external link, script or style sheet), with a run's tables, plots and payload summary, or a
sweep's table, cells and plots; headless Chromium renders it (where installed)."""

import base64
import importlib.util
import shutil
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from fedad.bench import run_sweep
from fedad.bench.spec import app_config_keys, parse_spec
from fedad.cli import main
from fedad.config import ExperimentConfig
from fedad.data import generate_dataset
from fedad.inprocess import run_in_process

pytestmark = pytest.mark.usefixtures("one_thread")

MAE = {"method": "mae", "image-size": 32, "num-server-rounds": 2, "plot-every-round": False,
       "val-fraction": 0.0, "local-epochs": 1, "max-train-batches": 1, "batch-size": 4,
       "mae-patch-size": 8, "mae-embed-dim": 32, "mae-depth": 1, "mae-heads": 2,
       "mae-decoder-dim": 16, "mae-decoder-depth": 1, "mae-decoder-heads": 2,
       "mae-pretrain-rounds": 1, "category": "washer"}
SCREENSHOT = Path(__file__).resolve().parents[1] / "bench" / "report_screenshot.py"


class Page(HTMLParser):
    """The tags of a page and their attributes."""

    def __init__(self, text: str) -> None:
        super().__init__()
        self.tags: list[tuple[str, dict]] = []
        self.feed(text)

    def handle_starttag(self, tag, attrs):
        self.tags.append((tag, dict(attrs)))

    def named(self, tag: str) -> list[dict]:
        return [attrs for name, attrs in self.tags if name == tag]


def assert_self_contained(page: Page) -> None:
    assert not page.named("script") and not page.named("link") and not page.named("iframe")
    for _, attrs in page.tags:
        assert attrs.get("href", "#").startswith("#"), attrs
        assert attrs.get("src", "data:image/png;base64,").startswith(
            "data:image/png;base64,"), attrs["src"][:80]
    for image in page.named("img"):  # each embedded image is a whole PNG
        assert base64.b64decode(image["src"].split(",", 1)[1]).startswith(b"\x89PNG")


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return generate_dataset(tmp_path_factory.mktemp("mvtec"), categories=["washer"],
                            num_train=8, num_test_good=2, num_test_per_defect=1, image_size=32)


@pytest.fixture(scope="module")
def run_folder(data, tmp_path_factory):
    results = tmp_path_factory.mktemp("run")
    run_in_process(ExperimentConfig.from_run_config(
        {**MAE, "data-path": str(data), "results-dir": str(results)}), 2)
    return results


def test_a_runs_report_html_is_self_contained_with_its_tables_and_plots(run_folder, capsys):
    assert main(["report", str(run_folder)]) == 0
    assert f"wrote {run_folder / 'report.html'}" in capsys.readouterr().out
    text = (run_folder / "report.html").read_text()
    page = Page(text)
    assert_self_contained(page)
    plots = sorted((run_folder / "plots").glob("*.png"))
    assert {p.stem for p in plots} >= {"metrics_per_round", "roc", "anomaly_maps"}
    assert len(page.named("img")) == len(plots)
    for section in ("Summary", "Rounds", "Per defect type", "Plots", "Privacy and payloads",
                    "Configuration"):
        assert f">{section}</h2>" in text, section
    assert len(page.named("table")) >= 5 and "<th>image_auroc</th>" in text
    assert "<td>contamination</td>" in text  # a defect type's row
    assert "<td>train</td>" in text and "No payload was refused." in text  # what crossed
    assert "inf (no differential privacy)" in text


def test_a_sweeps_report_html_holds_its_table_cells_and_plots(data, tmp_path):
    spec = parse_spec({
        "name": "tiny", "runner": "in-process",
        "fixed": {**MAE, "data-path": str(data), "num-server-rounds": 1},
        "grid": {"strategy": ["fedavg"], "num-clients": [2], "seed": [0]},
        "table": {"rows": ["strategy"], "metrics": ["image_auroc", "pixel_auroc"]},
        "cell-timeout": 300}, "tiny.yaml", app_config_keys())
    out = tmp_path / "sweep"
    assert [o.status for o in run_sweep(spec, out, progress=False)] == ["done"]
    assert main(["report", str(out)]) == 0
    text = (out / "report.html").read_text()
    page = Page(text)
    assert_self_contained(page)
    assert "<h1>sweep tiny</h1>" in text and "<b>" in text  # the best mean in bold
    assert "strategy-fedavg__num-clients-2__seed-0" in text and ">Payloads per cell</h2>" in text
    assert len(page.named("img")) == len(list((out / "plots").glob("*.png"))) >= 2


@pytest.mark.skipif(not any(shutil.which(b) for b in ("chromium", "chromium-headless-shell")),
                    reason="no headless Chromium (apt-get install chromium)")
def test_headless_chromium_renders_the_report(run_folder, tmp_path):
    if not (run_folder / "report.html").is_file():
        assert main(["report", str(run_folder)]) == 0
    spec = importlib.util.spec_from_file_location("report_screenshot", SCREENSHOT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    png = module.screenshot(run_folder / "report.html", tmp_path / "page.png", 1000, 1600)
    pixels = np.asarray(Image.open(png).convert("L"))
    assert pixels.shape == (1600, 1000)
    assert pixels.std() > 10  # text, tables and plots, not a blank page
