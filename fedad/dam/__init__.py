"""D-ADDA stage 1: the Data Augmentation Module (Algorithm 1), run on each site only.

``augment_defects`` turns a site's normal images and few real defects into many new defective
image/mask pairs; ``category_kind`` says whether a category is a texture or an object.
"""

from fedad.dam.augment import DAMSample, DefectAugmenter, augment_defects
from fedad.dam.plots import plot_dam_examples, plot_dam_samples
from fedad.dam.settings import DAMSettings, category_kind

__all__ = [
    "DAMSample",
    "DAMSettings",
    "DefectAugmenter",
    "augment_defects",
    "category_kind",
    "plot_dam_examples",
    "plot_dam_samples",
]
