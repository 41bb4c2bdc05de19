"""Byzantine sites for robustness experiments: a malicious site replaces its honest update
``trained - received`` by a scaled (``attack=scale``) or negated and scaled
(``attack=sign-flip``) one before replying.

Run-config keys: ``attack`` (none | scale | sign-flip), ``attack-scale`` (the factor's size)
and ``malicious-partitions`` (comma-separated partition ids, e.g. ``"0"`` or ``"0,3"``).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from flwr.app import Array, ArrayRecord

ATTACKS = ("none", "scale", "sign-flip")


@dataclass(frozen=True)
class AttackSettings:
    """Which sites misbehave and how (see the module docstring)."""

    attack: str = "none"
    """Byzantine attack of the malicious sites: none, scale or sign-flip."""
    attack_scale: float = 10.0
    """Size of the factor the honest update is multiplied by."""
    malicious_partitions: str = ""
    """Comma-separated partition ids of the malicious sites, e.g. "0,3"."""

    def __post_init__(self) -> None:
        if self.attack not in ATTACKS:
            raise ValueError(f"attack={self.attack!r}: expected one of {', '.join(ATTACKS)}")
        if not (np.isfinite(self.attack_scale) and self.attack_scale > 0):
            raise ValueError(f"attack-scale={self.attack_scale}: must be a finite number > 0")
        malicious = self.malicious  # raises on a malformed list
        if self.attack != "none" and not malicious:
            raise ValueError(f"malicious-partitions={self.malicious_partitions!r}: attack="
                             f"{self.attack} needs at least one malicious partition id")

    @property
    def malicious(self) -> frozenset[int]:
        """The malicious partition ids."""
        try:
            ids = frozenset(int(p) for p in self.malicious_partitions.split(",") if p.strip())
        except ValueError:
            raise ValueError(f"malicious-partitions={self.malicious_partitions!r}: expected "
                             "comma-separated partition ids, e.g. '0,3'") from None
        if any(p < 0 for p in ids):
            raise ValueError(f"malicious-partitions={self.malicious_partitions!r}: ids >= 0")
        return ids

    @property
    def factor(self) -> float:
        """Multiplier of the honest update: +attack-scale (scale) or -attack-scale (sign-flip)."""
        return -self.attack_scale if self.attack == "sign-flip" else self.attack_scale

    def is_malicious(self, partition_id: int) -> bool:
        """True when ``partition_id`` attacks."""
        return self.attack != "none" and partition_id in self.malicious


def apply_attack(trained: ArrayRecord, received: ArrayRecord, partition_id: int,
                 settings: AttackSettings) -> ArrayRecord:
    """The arrays a site replies: ``trained`` for an honest site, else
    ``received + factor * (trained - received)`` array by array (the keys of ``trained``, a
    subset of ``received``'s where a site replies only what it trained; same shapes, dtypes;
    integer arrays such as BatchNorm counters are left as trained)."""
    if not settings.is_malicious(partition_id):
        return trained
    unknown = sorted(set(trained.keys()) - set(received.keys()))
    if unknown:
        raise ValueError(f"partition {partition_id}: trained arrays {unknown[:3]} were not "
                         "received")
    out = {}
    for key in trained:
        new, old = trained[key].numpy(), received[key].numpy()
        if new.shape != old.shape:
            raise ValueError(f"partition {partition_id}: array {key!r} has shape {new.shape}, "
                             f"received {old.shape}")
        if np.issubdtype(new.dtype, np.floating):
            new = (old + settings.factor * (new - old)).astype(new.dtype)
        out[key] = Array(np.ascontiguousarray(new))
    return ArrayRecord(out)
