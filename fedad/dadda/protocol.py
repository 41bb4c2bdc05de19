"""What D-ADDA's server and sites say to each other besides the detector's ``train`` /
``evaluate`` rounds: the custom queries, their config keys and records, and the name of the
stage checkpoint; :data:`QUERY_ACTIONS` lists the site actions (the registry names it).
The eq. (3) payload itself is :mod:`fedad.dadda.payload`."""

from __future__ import annotations

from fedad.payloads import Query

CACHED = Query("dadda_cached")
"""Whether a site already holds synthetic pairs for this run's synthesis settings."""
UPLOAD = Query("dadda_upload")
"""Stage 1: DAM on the site, then its eq. (3) payload (or nothing, see :data:`SEND_UPLOAD`)."""
SYNTHESIZE = Query("dadda_synthesize")
"""Stage 3: fine-tune G^I and synthesize pairs on the site; the reply holds counts only."""
QUERY_ACTIONS = (CACHED.action, UPLOAD.action, SYNTHESIZE.action)

SEND_UPLOAD = "send-upload"
"""Config key of :data:`UPLOAD`: false for ``dadda-synthesis=dam-only`` (DAM, nothing sent)."""
PREVIEW_DIR = "preview-dir"
"""Config key of :data:`SYNTHESIZE`: the folder each site writes its preview grid into."""
GENERATORS = "generators"
"""Record of :data:`SYNTHESIZE` holding G^I and G^M (see :mod:`fedad.dadda.generators`), and
the name of the stage checkpoint that holds them."""
