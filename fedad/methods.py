"""Registry of methods: the server workflow and the site logic behind each ``method`` value.

Entries are ``"module:attribute"`` strings, imported on first use, so that choosing one method
never imports another method's dependencies.

- ``server``: a function ``(grid, cfg) -> summary dict`` run by the ServerApp.
- ``client``: a class ``(cfg, data, partition_id)`` answering the ClientApp's messages
  (see :class:`clients.base.SiteClient`).
- ``recipe``: for methods trained as one model by :func:`fedad.federation.run_federated`, the
  :class:`fedad.task.ModelRecipe` that builds, trains and runs the model.
- ``actions``: the tuple of the method's custom site actions (``query.<action>`` messages,
  from its protocol module), which the ClientApp routes besides ``train`` and ``evaluate``
  (and besides :data:`SHARED_ACTIONS`, which every method's sites answer).
- ``rounds``: the method's own number of federated rounds, used when ``num-server-rounds`` is 0
  (its default).
- ``deployed``: for a method whose model on the line is one of its stages' own results, that
  stage's sub-folder of the results folder (``fedad predict`` / ``export`` / thresholds open it).

Adding a method touches its folder under ``fedad/``, its module under ``clients/`` and one
line here.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class MethodEntry:
    """Where a method's server workflow, site logic and (optional) model recipe live."""

    server: str
    client: str
    recipe: str = ""
    actions: str = ""
    rounds: int = 4
    deployed: str = ""


SHARED_ACTIONS = "fedad.thresholds:QUERY_ACTIONS"
"""The site actions of every method: the decision thresholds' sketch (:mod:`fedad.thresholds`),
answered by :class:`clients.base.SiteClient`."""

_MODEL_SERVER = "fedad.federation:run_federated"
_MODEL_CLIENT = "clients.model:ModelClient"

METHODS: dict[str, MethodEntry] = {
    "msvt": MethodEntry(_MODEL_SERVER, _MODEL_CLIENT, "fedad.msvt.training:MSVT_RECIPE"),
    "dadda": MethodEntry("fedad.dadda.workflow:run_dadda", "clients.dadda:DADDASite",
                         "fedad.dadda.detector:DADDA_RECIPE", "fedad.dadda.protocol:QUERY_ACTIONS"),
    "mae": MethodEntry(_MODEL_SERVER, _MODEL_CLIENT, "fedad.mae.training:MAE_RECIPE"),
    "nexvitad": MethodEntry("fedad.nexvitad.workflow:run_nexvitad",
                            "clients.nexvitad:NexViTADClient",
                            "fedad.nexvitad.training:NEXVITAD_RECIPE",
                            "fedad.nexvitad.protocol:QUERY_ACTIONS", rounds=3,
                            deployed="bank"),
    **{head: MethodEntry("fedad.heads.workflow:run_feature_head",
                         "clients.feature_head:FeatureHeadClient",
                         actions="fedad.heads.protocol:QUERY_ACTIONS", rounds=1)
       for head in ("memorybank", "gmm", "flow", "padim")},
}


def method_names() -> tuple[str, ...]:
    """Values accepted by the ``method`` setting."""
    return tuple(METHODS)


def resolve(reference: str) -> Any:
    """Import ``"module:attribute"`` and return the attribute."""
    module, _, attribute = reference.partition(":")
    return getattr(importlib.import_module(module), attribute)


def site_actions() -> tuple[str, ...]:
    """Every method's custom site actions and the shared ones (what the ClientApp
    registers), sorted."""
    return tuple(sorted({action for reference in (SHARED_ACTIONS, *(
        entry.actions for entry in METHODS.values() if entry.actions))
                         for action in resolve(reference)}))


def method_entry(name: str) -> MethodEntry:
    """The registry entry of ``name`` (ValueError naming the setting if unknown)."""
    if name not in METHODS:
        raise ValueError(f"method={name!r}: expected one of {', '.join(METHODS)}")
    return METHODS[name]
