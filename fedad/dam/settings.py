"""DAM settings (run-config keys ``dam-*``) and the texture/object kind of each category.

Defaults are the paper's where it gives them (D-ADDA, Sec. IV-A: p ~ U(0.35, 0.65) for
textures, U(0.65, 0.85) for objects, 100 quality tries). The paper gives no quickshift,
smoothing, crop or shift parameters; ours are chosen for 128x128 images and say so below.
"""

from __future__ import annotations

from dataclasses import dataclass

from fedad.data.synthetic import SYNTHETIC_CATEGORIES

KINDS = ("texture", "object")

MVTEC_KINDS: dict[str, str] = {
    **dict.fromkeys(("carpet", "grid", "leather", "tile", "wood"), "texture"),
    **dict.fromkeys(
        (
            "bottle", "cable", "capsule", "hazelnut", "metal_nut",
            "pill", "screw", "toothbrush", "transistor", "zipper",
        ),
        "object",
    ),
}
"""MVTec AD's 15 categories: 5 textures, 10 objects (Bergmann et al., CVPR 2019)."""

KNOWN_KINDS: dict[str, str] = {**SYNTHETIC_CATEGORIES, **MVTEC_KINDS}


@dataclass(frozen=True)
class DAMSettings:
    """Settings of the Data Augmentation Module; run-config key = field name in kebab case.

    Read with ``cfg.section(DAMSettings)``. ``dam-smooth-sigma`` is given for 128x128 images
    and scaled with the image side. The quickshift settings are used as given: segment counts
    do not scale simply with the side (on one synthetic gear, (2, 4) gives 316 segments at
    64 px, 6309 at 128, 3189 at 256; scaling both by side/128 gives 2609 and 208).
    """

    dam_p_texture_low: float = 0.35
    """p1 of the mask fraction for textures (paper)."""
    dam_p_texture_high: float = 0.65
    """p2 of the mask fraction for textures (paper)."""
    dam_p_object_low: float = 0.65
    """p1 of the mask fraction for objects (paper)."""
    dam_p_object_high: float = 0.85
    """p2 of the mask fraction for objects (paper)."""
    dam_quality_tries: int = 100
    """Tries of the quality check eq. (4); the last try is kept after that."""
    dam_quality_leave_out: bool = True
    """Leave base and source images out of eq. (4) (quality.py)."""
    dam_growth_rings: int = 1
    """Rings of adjacent superpixels added to the defective ones."""
    dam_smooth_sigma: float = 1.5
    """Gaussian sigma (pixels at 128) of the new mask's smoothing."""
    dam_align_crop: float = 0.5
    """Side of the defective image's centre crop, fraction of the side."""
    dam_texture_shift: float = 0.5
    """Largest random x/y shift for textures, fraction of the side."""
    dam_histogram_match: bool = True
    """Match the defect image's histogram to the normal image's."""
    # quickshift: skimage's defaults (5, 10) give 20-80 segments at 128 px, each about as large
    # as a defect, so one ring of growth covers a fifth of the image; (2, 4) gives ~1-6k.
    dam_quickshift_kernel_size: float = 2.0
    """Quickshift kernel size (skimage default 5 gives too few segments)."""
    dam_quickshift_max_dist: float = 4.0
    """Quickshift max_dist (skimage default 10)."""
    dam_quickshift_ratio: float = 1.0
    """Quickshift colour/space ratio."""
    dam_category_kinds: str = ""
    """Kind overrides, e.g. "my_part=object,my_cloth=texture"."""

    def __post_init__(self) -> None:
        for kind in KINDS:
            low, high = self.p_range(kind)
            if not 0.0 < low <= high <= 1.0:
                raise ValueError(
                    f"dam-p-{kind}-low={low}, dam-p-{kind}-high={high}: "
                    "need 0 < low <= high <= 1"
                )
        if self.dam_quality_tries < 1:
            raise ValueError(f"dam-quality-tries={self.dam_quality_tries}: must be >= 1")
        if self.dam_growth_rings < 0:
            raise ValueError(f"dam-growth-rings={self.dam_growth_rings}: must be >= 0")
        if self.dam_smooth_sigma < 0:
            raise ValueError(f"dam-smooth-sigma={self.dam_smooth_sigma}: must be >= 0")
        if not 0.0 < self.dam_align_crop <= 1.0:
            raise ValueError(f"dam-align-crop={self.dam_align_crop}: must be in (0, 1]")
        if not 0.0 <= self.dam_texture_shift <= 1.0:
            raise ValueError(f"dam-texture-shift={self.dam_texture_shift}: must be in [0, 1]")
        for name in ("dam_quickshift_kernel_size", "dam_quickshift_max_dist"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name.replace('_', '-')}={getattr(self, name)}: must be > 0")
        if self.dam_quickshift_ratio < 0:
            raise ValueError(f"dam-quickshift-ratio={self.dam_quickshift_ratio}: must be >= 0")
        self.kind_overrides()  # validates dam-category-kinds

    def p_range(self, kind: str) -> tuple[float, float]:
        """(p1, p2) of the mask fraction for ``kind`` ("texture" | "object")."""
        if kind not in KINDS:
            raise ValueError(f"kind={kind!r}: expected one of {', '.join(KINDS)}")
        return getattr(self, f"dam_p_{kind}_low"), getattr(self, f"dam_p_{kind}_high")

    def kind_overrides(self) -> dict[str, str]:
        """``dam-category-kinds`` parsed to {category: kind}; ValueError naming the key."""
        overrides: dict[str, str] = {}
        for item in filter(None, (part.strip() for part in self.dam_category_kinds.split(","))):
            category, sep, kind = (s.strip() for s in item.partition("="))
            if not sep or not category or kind not in KINDS:
                raise ValueError(
                    f"dam-category-kinds={self.dam_category_kinds!r}: bad entry {item!r} "
                    f"(expected category=texture or category=object, comma-separated)"
                )
            overrides[category] = kind
        return overrides


def category_kind(category: str, *, settings: DAMSettings | None = None) -> str:
    """"texture" or "object" for ``category``: ``dam-category-kinds`` first, then MVTec AD's
    and the synthetic generator's categories; ValueError for any other name."""
    overrides = (settings or DAMSettings()).kind_overrides()
    if category in overrides:
        return overrides[category]
    if category in KNOWN_KINDS:
        return KNOWN_KINDS[category]
    raise ValueError(
        f"category {category!r}: unknown to DAM (known: {', '.join(sorted(KNOWN_KINDS))}); "
        f"set dam-category-kinds=\"{category}=texture\" or \"{category}=object\""
    )
