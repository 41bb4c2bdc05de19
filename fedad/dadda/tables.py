"""D-ADDA's result tables for one run: per-round defect-type accuracy (U-Pro / F-Pro,
Table III layout) and detection / localization (Table II layout), as CSV and Markdown."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

import pandas as pd

from fedad.config import ExperimentConfig
from fedad.dadda.detector import DADDADetector, classify, load_defects
from fedad.data import Sample
from fedad.metrics import class_accuracy

TABLE_II_METRICS = {"Detection AUC": "image_auroc", "Detection AP": "image_ap",
                    "Detection F1-max": "image_f1_max", "Localization AUC": "pixel_auroc",
                    "Localization AP": "pixel_ap", "Localization F1-max": "pixel_f1_max"}
"""Table II's columns and the metric behind each."""


def class_accuracy_metrics(model: DADDADetector, test: Sequence[Sample],
                           cfg: ExperimentConfig) -> Callable[[DADDADetector], dict[str, float]]:
    """A per-round metrics hook: the defect-type accuracy of the global model on the test
    split's defective images (``class_accuracy``; a windows classifier also
    ``class_accuracy_at_true_defect``, looking where the ground truth says the defect is).
    The test defects are loaded once, here."""
    defects = load_defects(test, cfg)
    columns = {"class_accuracy": False}
    if model.window_fraction is not None:
        columns["class_accuracy_at_true_defect"] = True

    def metrics(global_model: DADDADetector) -> dict[str, float]:
        return {column: class_accuracy(*classify(global_model, defects, at_true_defect))
                for column, at_true_defect in columns.items()}

    return metrics


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
    """table_ii.{csv,md} (detection/localization of the last round, %) and table_iii.{csv,md}
    (this run's row: clients, B, E, IID, U-Pro, F-Pro in %) from rounds.csv's rows. Returns
    the class accuracies for summary.json's ``final``: F-Pro as ``class_accuracy``, U-Pro as
    ``class_accuracy_u_pro`` (and its round), the last round's
    ``class_accuracy_at_true_defect`` where rounds.csv has it."""
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
    final = {"class_accuracy": protocol["f_pro"], "class_accuracy_u_pro": protocol["u_pro"],
             "class_accuracy_u_pro_round": protocol["u_pro_round"]}
    if "class_accuracy_at_true_defect" in rounds:
        final["class_accuracy_at_true_defect"] = float(
            rounds["class_accuracy_at_true_defect"].iloc[-1])
    return final
