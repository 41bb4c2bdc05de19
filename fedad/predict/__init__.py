"""From a finished run to the line: score new images with a run's global model
(``fedad predict``), as one uniform scorer per method that ``fedad export`` also writes.

- :mod:`fedad.predict.scorers`: the scorer of each method (images -> scores and maps);
- :mod:`fedad.predict.run`: a results folder's config, checkpoint, scorer and thresholds;
- :mod:`fedad.predict.inputs`: the images to score; :mod:`fedad.predict.outputs`: what is
  written; :mod:`fedad.predict.predict`: the batched loop between them.
"""

from fedad.predict.inputs import InputError, collect_inputs
from fedad.predict.predict import PredictResult, predict_images
from fedad.predict.run import RunError, Thresholds, load_scorer, open_run, run_thresholds
from fedad.predict.scorers import SCORERS, Scorer

__all__ = ["SCORERS", "InputError", "PredictResult", "RunError", "Scorer", "Thresholds",
           "collect_inputs", "load_scorer", "open_run", "predict_images", "run_thresholds"]
