"""The PaDiM Gaussian head (method=padim): the federated statistics give exactly the
centralized Gaussians and maps, malformed statistics are refused, a tiny in-process run."""

import json

import numpy as np
import pandas as pd
import pytest
import torch

from fedad.config import ExperimentConfig
from fedad.data import generate_dataset
from fedad.heads.gaussian import EPS, GaussianHead
from fedad.heads.payload import Payload, PayloadError, payload_from_record
from fedad.heads.scoring import PatchSet, anomaly_maps
from fedad.heads.settings import HeadSettings
from fedad.inprocess import run_in_process

IMAGES, DIM, GRID = 10, 12, (8, 6)
SETTINGS = {"per-position": HeadSettings(gaussian_grid=4, gaussian_channels=5),
            "shared": HeadSettings(gaussian_positions="shared", gaussian_channels=5)}


pytestmark = pytest.mark.usefixtures("one_thread")


def feature_maps(n, seed):
    """Fabricated patch features [n, D, h, w]: correlated channels, a mean that varies with
    the position, values far from zero (so that sums and outer sums are large)."""
    generator = torch.Generator().manual_seed(seed)
    mixing = torch.randn(DIM, DIM, generator=torch.Generator().manual_seed(1))
    position = torch.linspace(0, 3, GRID[0] * GRID[1]).reshape(1, 1, *GRID)
    noise = torch.einsum("de,nehw->ndhw", mixing, torch.randn(n, DIM, *GRID,
                                                              generator=generator))
    return 20 + position * torch.arange(DIM).reshape(1, DIM, 1, 1) + noise


def rows(maps):
    """Patch rows [n * h * w, D] in (image, y, x) order, as a site fits on them."""
    return PatchSet(maps, *(np.zeros(len(maps)),) * 4).flat()


def reference_gaussians(head, maps):
    """PaDiM's fit, with numpy, on all images: np.cov of each cell's patches + EPS * I."""
    kept = maps[:, head.channels].flatten(2).double().numpy()  # [n, C, h * w]
    means, covariances = [], []
    for cell in head.cells:
        samples = kept[:, :, cell.numpy()].transpose(0, 2, 1).reshape(-1, kept.shape[1])
        means.append(samples.mean(0))
        covariances.append(np.cov(samples, rowvar=False) + EPS * np.eye(kept.shape[1]))
    return np.stack(means), np.stack(covariances)


@pytest.mark.parametrize("positions", SETTINGS)
@pytest.mark.parametrize("num_sites", [1, 2, 5])
def test_federated_gaussians_and_maps_equal_the_centralized_fit(positions, num_sites):
    head = GaussianHead(SETTINGS[positions], DIM, seed=3, grid=GRID)
    train, test = feature_maps(IMAGES, seed=0), feature_maps(4, seed=1)
    central = head.fit_local(rows(train))
    sites = [head.fit_local(rows(part)) for part in train.split(-(-IMAGES // num_sites))]
    assert len(sites) == num_sites
    federated = head.merge(sites)
    assert federated.count == central.count == IMAGES * GRID[0] * GRID[1]
    means, covariances = reference_gaussians(head, train)
    for model in (central, federated):
        mean, covariance = head.gaussians(model)
        np.testing.assert_allclose(mean.numpy(), means, rtol=1e-6, atol=1e-6)
        np.testing.assert_allclose(covariance.numpy(), covariances, rtol=1e-6, atol=1e-6)
    central_maps, federated_maps = (anomaly_maps(head, model, test, 32, sigma=2.0)
                                    for model in (central, federated))
    np.testing.assert_allclose(federated_maps, central_maps, rtol=1e-6, atol=1e-6)
    refined = head.refine(federated, [head.refine_local(federated, rows(part))
                                      for part in train.split(3)])
    for name, values in federated.arrays.items():  # later rounds rebuild the same head
        np.testing.assert_allclose(refined.arrays[name], values, rtol=1e-12)


def test_scores_are_mahalanobis_distances_to_each_cells_gaussian():
    head = GaussianHead(SETTINGS["per-position"], DIM, seed=3, grid=GRID)
    train, test = feature_maps(IMAGES, seed=0), feature_maps(2, seed=1)
    means, covariances = reference_gaussians(head, train)
    scores = head.patch_scores(head.fit_local(rows(train)), rows(test)).reshape(2, -1)
    kept = test[:, head.channels].flatten(2).double().numpy()
    for k, cell in enumerate(head.cells):
        for position in cell.tolist():
            diff = kept[:, :, position] - means[k]
            expected = np.sqrt(np.einsum("nc,cd,nd->n", diff, np.linalg.inv(covariances[k]),
                                         diff))
            np.testing.assert_allclose(scores[:, position].numpy(), expected, rtol=1e-5)
    assert len(head.cells) == 16 and sorted(torch.cat(head.cells).tolist()) == list(range(48))


def test_channels_are_drawn_from_the_seed_and_bad_shapes_are_refused():
    settings = SETTINGS["per-position"]
    assert torch.equal(GaussianHead(settings, DIM, 3, GRID).channels,
                       GaussianHead(settings, DIM, 3, GRID).channels)
    assert not torch.equal(GaussianHead(settings, DIM, 3, GRID).channels,
                           GaussianHead(settings, DIM, 4, GRID).channels)
    with pytest.raises(ValueError, match="gaussian-grid=8"):
        GaussianHead(HeadSettings(gaussian_grid=8), DIM, 0, GRID)
    with pytest.raises(ValueError, match="grid"):
        GaussianHead(settings, DIM, 0)
    with pytest.raises(ValueError, match="not whole images"):
        GaussianHead(settings, DIM, 0, GRID).fit_local(rows(feature_maps(2, 0))[:-1])
    with pytest.raises(ValueError, match="gaussian-positions='each'"):
        HeadSettings(gaussian_positions="each")


def corrupt(payload, name, change):
    arrays = {k: v.copy() for k, v in payload.arrays.items()}
    arrays[name] = change(arrays[name])
    return Payload(payload.kind, arrays, payload.count).to_record()


def nan_first(values):
    values.flat[0] = np.nan
    return values


def asymmetric(values):
    values[0, 0, 1] += 1.0
    return values


def negative_variance(values):
    values[0] -= 1e3 * np.abs(values[0]).max() * np.eye(values.shape[1])
    return values


@pytest.mark.parametrize("name, change, reason", [
    ("outer", lambda v: v[:, :, :-1], "shape"),
    ("sums", lambda v: v[:-1], "shape"),
    ("sums", nan_first, "non-finite"),
    ("outer", asymmetric, "not symmetric"),
    ("outer", negative_variance, "negative variance"),
    ("counts", lambda v: v * 0, "count below 1"),
])
def test_malformed_statistics_are_refused(name, change, reason):
    head = GaussianHead(SETTINGS["per-position"], DIM, seed=3, grid=GRID)
    payload = head.fit_local(rows(feature_maps(3, seed=0)))
    assert payload_from_record(payload.to_record(), head.fit_kind, head.sizes).count == 144
    with pytest.raises(PayloadError, match=reason):
        payload_from_record(corrupt(payload, name, change), head.fit_kind, head.sizes)


def test_a_tiny_padim_run_writes_finite_rounds_and_only_statistics_cross(tmp_path):
    data = generate_dataset(tmp_path / "mvtec", categories=["washer"], num_train=8,
                            num_test_good=2, num_test_per_defect=1)
    results = tmp_path / "results"
    cfg = ExperimentConfig.from_run_config({
        "method": "padim", "image-size": 64, "data-path": str(data), "category": "washer",
        "results-dir": str(results), "num-server-rounds": 2, "plot-every-round": False,
        "gaussian-grid": 4, "gaussian-channels": 8})
    summary = run_in_process(cfg, 2)
    assert summary["method"] == "padim" and summary["rounds"] == 1  # exact in one round
    rounds = pd.read_csv(results / "rounds.csv")
    metrics = rounds[["image_auroc", "pixel_auroc", "aupro"]]
    assert len(rounds) == 1 and np.isfinite(metrics.to_numpy()).all()
    crossed = [json.loads(line) for line in (results / "payloads.jsonl").read_text().splitlines()]
    sketches = {"score-range", "score-histogram"}  # the thresholds' step (tests/test_thresholds)
    assert all(r["accepted"] for r in crossed if r["kind"] not in sketches)
    assert all(r["accepted"] or r["reason"].startswith("abstained") for r in crossed
               if r["kind"] in sketches)
    stats = [r for r in crossed if r["kind"] == "gaussian-stats"]
    assert len(stats) == 2  # one per site
    assert all(r["shapes"] == {"counts": [16], "sums": [16, 8], "outer": [16, 8, 8]}
               for r in stats)
    num_patches = min(r["count"] for r in stats)
    for row in crossed:  # no array has a row per patch or image: features never cross
        assert all(num_patches not in shape for shape in (row["shapes"] or {}).values()), row
