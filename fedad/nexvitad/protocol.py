"""What NexViTAD's server and sites say to each other besides the training stage's
``train`` / ``evaluate`` rounds (whose replies carry only the parameters each site trained,
:mod:`fedad.nexvitad.aggregation`) and the memory-bank stage's feature-head messages
(:mod:`fedad.heads.protocol`); :data:`QUERY_ACTIONS` lists the site actions (the registry
names it)."""

from __future__ import annotations

from fedad.heads.protocol import QUERY_ACTIONS as HEAD_ACTIONS
from fedad.methods import METHODS
from fedad.payloads import Query

ENCODER = Query("nexvitad_encoder")
"""After training: the trained encoder (adapters and projections), which each site keeps on
its disk for the memory-bank stage; the reply holds a count only."""
QUERY_ACTIONS = (ENCODER.action, *HEAD_ACTIONS)

ENCODER_RECORD = "encoder"
"""Array record of :data:`ENCODER`: the encoder's trained weights."""
MODEL_RECORD = "arrays"
"""Array record of a training-stage ``train`` / ``evaluate`` message (the global model): a
message without it belongs to the memory-bank stage."""
ENCODER_FILE = "encoder.pt"
"""The trained encoder in the results folder's checkpoints/ (``feature-checkpoint`` of a
``feature-source=nexvitad`` memory bank)."""
BANK_DIR = METHODS["nexvitad"].deployed
"""Sub-folder of the results folder holding the memory-bank stage's own results (the registry's
``deployed`` stage: what ``fedad predict`` opens)."""
