"""D-ADDA's result tables for one run: per-round defect-type accuracy (U-Pro / F-Pro,
Table III layout) and detection / localization (Table II layout), as CSV and Markdown."""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path

import pandas as pd
import torch

from fedad.config import ExperimentConfig
from fedad.dadda.detector import DADDADetector, classify, load_defects
from fedad.data import Sample
from fedad.metrics import class_accuracy
from fedad.models import load_trainable_state_dict

TABLE_II_METRICS = {"Detection AUC": "image_auroc", "Detection AP": "image_ap",
                    "Detection F1-max": "image_f1_max", "Localization AUC": "pixel_auroc",
                    "Localization AP": "pixel_ap", "Localization F1-max": "pixel_f1_max"}
"""Table II's columns and the metric behind each."""


def accuracy_per_round(results_dir: Path, model: DADDADetector, test: Sequence[Sample],
                       cfg: ExperimentConfig) -> pd.DataFrame:
    """Defect-type accuracy on the test split's defective images of each round's global model
    (checkpoints/round-*.pt); writes it into rounds.csv as ``class_accuracy`` (a windows
    classifier also as ``class_accuracy_at_true_defect``, looking where the ground truth says
    the defect is) and returns rounds.csv."""
    rounds = pd.read_csv(results_dir / "rounds.csv")
    columns = {"class_accuracy": False}
    if model.window_fraction is not None:
        columns["class_accuracy_at_true_defect"] = True
    accuracy: dict[str, list[float]] = {column: [] for column in columns}
    defects = load_defects(test, cfg)
    for server_round in rounds["round"]:
        path = results_dir / "checkpoints" / f"round-{int(server_round):03d}.pt"
        load_trainable_state_dict(model, torch.load(path, weights_only=True)["state_dict"])
        for column, at_true_defect in columns.items():
            accuracy[column].append(class_accuracy(*classify(model, defects, at_true_defect)))
    for column, values in accuracy.items():
        rounds[column] = values
    rounds.to_csv(results_dir / "rounds.csv", index=False)
    return rounds


def protocol_accuracies(rounds: pd.DataFrame) -> dict[str, float]:
    """U-Pro (the best round on the test split, the paper's "unfair protocol") and F-Pro (the
    last round) defect-type accuracy."""
    values = rounds["class_accuracy"]
    return {"u_pro": float(values.max()), "u_pro_round": int(rounds["round"][values.idxmax()]),
            "f_pro": float(values.iloc[-1])}


def _write(table: pd.DataFrame, stem: Path) -> None:
    table.to_csv(stem.with_suffix(".csv"), index=False)
    stem.with_suffix(".md").write_text(table.to_markdown(index=False, floatfmt=".2f") + "\n")


def write_tables(results_dir: Path, cfg: ExperimentConfig, synthesis: str, num_clients: int,
                 rounds: pd.DataFrame) -> dict[str, float]:
    """table_ii.{csv,md} (detection/localization of the last round, %), table_iii.{csv,md}
    (this run's row: clients, B, E, IID, U-Pro, F-Pro in %), and class accuracy in
    summary.json's ``final`` (F-Pro as ``class_accuracy``, U-Pro as ``class_accuracy_u_pro``,
    the last round's ``class_accuracy_at_true_defect`` where rounds.csv has it).
    Returns the protocol accuracies."""
    last = rounds.iloc[-1]
    table_ii = pd.DataFrame([{"Synthesis": synthesis, **{
        column: 100 * float(last[metric]) for column, metric in TABLE_II_METRICS.items()}}])
    _write(table_ii, results_dir / "table_ii")
    protocol = protocol_accuracies(rounds)
    table_iii = pd.DataFrame([{
        "Num. clients": num_clients, "B": cfg.batch_size, "E": cfg.local_epochs,
        "IID": "✓" if cfg.partitioner == "iid" else "✗", "Synthesis": synthesis,
        "U-Pro": 100 * protocol["u_pro"], "F-Pro": 100 * protocol["f_pro"],
    }])
    _write(table_iii, results_dir / "table_iii")
    summary_path = results_dir / "summary.json"
    summary = json.loads(summary_path.read_text())
    final = summary.setdefault("final", {})
    final["class_accuracy"] = protocol["f_pro"]
    final["class_accuracy_u_pro"] = protocol["u_pro"]
    if "class_accuracy_at_true_defect" in rounds:
        final["class_accuracy_at_true_defect"] = float(rounds["class_accuracy_at_true_defect"]
                                                       .iloc[-1])
    summary["class_accuracy_u_pro_round"] = protocol["u_pro_round"]
    summary_path.write_text(json.dumps(
        summary, indent=2, default=lambda v: None if isinstance(v, float) and math.isnan(v)
        else v))
    return protocol
