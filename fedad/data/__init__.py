"""Datasets: the MVTec AD reader, the protocol split and the built-in synthetic generator."""

from fedad.data.images import load_image, load_mask
from fedad.data.mvtec import (
    AnomalyDataset,
    DatasetError,
    Sample,
    list_categories,
    scan_category,
    validate_dataset,
)
from fedad.data.protocol import ProtocolSplit, protocol_split
from fedad.data.synthetic import (
    DEFAULT_CATEGORY,
    SYNTHETIC_CATEGORIES,
    ensure_synthetic,
    generate_dataset,
)

__all__ = [
    "DEFAULT_CATEGORY",
    "SYNTHETIC_CATEGORIES",
    "AnomalyDataset",
    "DatasetError",
    "ProtocolSplit",
    "Sample",
    "ensure_synthetic",
    "generate_dataset",
    "list_categories",
    "load_image",
    "load_mask",
    "protocol_split",
    "scan_category",
    "validate_dataset",
]
