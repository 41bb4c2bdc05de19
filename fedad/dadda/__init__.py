"""D-ADDA (Coscia et al.): distributed anomaly detection with client-side defect generation.

Stage 1 (DAM, :mod:`fedad.dam`) runs on each site; only the payload of eq. (3), normal images
and defect masks with their defect class (:mod:`fedad.dadda.payload`), crosses to the server,
which trains the stage-2 diffusion models; stage 3 synthesizes defects and trains the
detectors on the sites.
"""
