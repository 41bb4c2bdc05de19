"""D-ADDA's site: stage 1 upload, stage 3 synthesis, and (inherited from
:class:`clients.model.ModelClient`) the federated training of the classifier + localizer.

Messages (:mod:`fedad.dadda.protocol`):

- ``query.dadda_upload`` (stage 1): run DAM on the site's real training defects (pairs cached
  on the site's disk), then send the eq. (3) payload: normal images, and the masks of the real
  and the DAM defects with their class; never a defective image (part A's
  :func:`fedad.dadda.payload.build_upload`, extended by the DAM masks and checked again).
- ``query.dadda_synthesize`` (stage 3): with ``dadda-synthesis=dadda``, fine-tune the server's
  G^I with the mask cross-attention on the real + DAM pairs, sample masks from G^M for each
  local defect class and images from the fine-tuned G^I; with ``dam-only`` the DAM pairs are
  the synthetic set. The pairs stay on the site's disk for the federated stage's ``train``
  messages; the reply holds counts and timings only.
- ``train`` / ``evaluate``: :class:`ModelClient` with :data:`fedad.dadda.detector.DADDA_RECIPE`.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import numpy as np
import torch
from flwr.app import ConfigRecord, MetricRecord, RecordDict

from clients.model import ModelClient
from fedad.dadda.detector import defect_types_of, synthetic_cache_path
from fedad.dadda.generators import unpack_generators
from fedad.dadda.payload import ServerUpload, build_upload, check_upload, upload_to_record
from fedad.dadda.plots import plot_synthesized
from fedad.dadda.protocol import GENERATORS, PREVIEW_DIR, SEND_UPLOAD
from fedad.dadda.settings import DADDASettings
from fedad.dadda.synthesis import DefectPairs, dam_pairs, diffusion_pairs, finetune_image_model
from fedad.dam import DAMSettings, category_kind
from fedad.data import Sample, load_image, load_mask
from fedad.device import device_of
from fedad.models.diffusion_unet import DiffusionUNet
from fedad.seeding import seed_everything

log = logging.getLogger(__name__)


class DADDASite(ModelClient):
    """One production line of D-ADDA (see the module docstring)."""

    @property
    def settings(self) -> DADDASettings:
        """This run's ``dadda-*`` settings."""
        return self.cfg.section(DADDASettings)

    @property
    def _seed(self) -> int:
        return self.cfg.seed + 1000 * self.partition_id

    def _dam_cache(self, samples: list[Sample]) -> Path:
        path = synthetic_cache_path(self.cfg, samples)
        return path.with_name(f"{path.stem}-dam.npz")

    def query_dadda_cached(self, content: RecordDict) -> RecordDict:
        """Whether this site already holds synthetic pairs for this run's synthesis settings
        (:func:`synthetic_cache_path`): metric ``cached`` 1 or 0. Nothing else crosses."""
        samples = self.data.samples(self.partition_id, "train")
        cached = synthetic_cache_path(self.cfg, samples).is_file()
        return RecordDict({"metrics": MetricRecord({"cached": int(cached)})})

    def query_dadda_upload(self, content: RecordDict) -> RecordDict:
        """Stage 1: DAM (cached), then the site's eq. (3) payload at ``dadda-diffusion-size``
        with the DAM masks appended (their class index counts "good" as 0, as the payload's);
        no payload when the server's config says ``send-upload=false`` (DAM-only runs)."""
        settings = self.settings
        seed_everything(self._seed)
        samples = self.data.samples(self.partition_id, "train")
        normal, real = self._real_defects(samples)
        start = time.perf_counter()
        dam = DefectPairs.empty(settings.dadda_diffusion_size)
        if len(real):
            dam_settings = self.cfg.section(DAMSettings)
            dam = dam_pairs(normal, real, count=settings.dadda_dam_per_class,
                            kind=category_kind(self.data.categories[0], settings=dam_settings),
                            seed=self._seed, dam_settings=dam_settings)
        dam.save(self._dam_cache(samples))
        log.info("partition %d: DAM made %d pairs from %d real defects in %.1f s",
                 self.partition_id, len(dam), len(real), time.perf_counter() - start)
        if not content["config"].get(SEND_UPLOAD, True):  # dam-only: nothing to send
            return RecordDict({"metrics": MetricRecord({"num-dam": len(dam)})})
        upload = build_upload(samples, settings.dadda_diffusion_size, self.data.defect_types)
        upload = ServerUpload(
            normal_images=upload.normal_images,
            masks=np.concatenate([upload.masks, dam.masks]),
            mask_classes=np.concatenate([upload.mask_classes, dam.classes + 1]),
            image_labels=upload.image_labels, defect_digests=upload.defect_digests)
        check_upload(upload, num_classes=len(self.data.defect_types))
        return upload_to_record(upload)

    def _real_defects(self, samples: list[Sample]) -> tuple[np.ndarray, DefectPairs]:
        """Normal images [N, S, S, 3] and the real defective pairs of ``samples`` at the
        diffusion size (classes index :func:`defect_types_of`)."""
        size = self.settings.dadda_diffusion_size
        types = defect_types_of(self.cfg)
        normal = [load_image(s.image_path, size) for s in samples if s.label == 0]
        if not normal:
            raise ValueError(f"partition {self.partition_id}: no normal training images for DAM")
        pairs = [(load_image(s.image_path, size), load_mask(s.mask_path, size).astype(np.uint8),
                  types.index(s.defect_type)) for s in samples if s.label == 1]
        kept = [p for p in pairs if p[1].any()]
        if len(kept) < len(pairs):
            log.warning("partition %d: %d defect masks vanish at %d px; left out",
                        self.partition_id, len(pairs) - len(kept), size)
        if not kept:
            return np.stack(normal), DefectPairs.empty(size)
        images, masks, classes = zip(*kept, strict=True)
        real = DefectPairs(np.stack(images), np.stack(masks), np.array(classes, np.int64))
        return np.stack(normal), real.check("real defects")

    def query_dadda_synthesize(self, content: RecordDict) -> RecordDict:
        """Stage 3 (see the module docstring); caches the pairs, replies counts and seconds."""
        settings = self.settings
        config: ConfigRecord = content["config"]
        seed = self._seed
        seed_everything(seed)
        samples = self.data.samples(self.partition_id, "train")
        _, real = self._real_defects(samples)
        dam = DefectPairs.load(self._dam_cache(samples))
        timings: dict[str, float] = {}
        synthetic = dam
        if settings.dadda_synthesis == "dadda":
            synthetic = self._diffusion_pairs(content, DefectPairs.concat([real, dam]), seed,
                                              timings)
        synthetic.save(synthetic_cache_path(self.cfg, samples))
        preview = str(config.get(PREVIEW_DIR, ""))
        if preview and len(synthetic):
            plot_synthesized(synthetic, defect_types_of(self.cfg),
                             Path(preview) / f"synthesized_partition{self.partition_id}.png",
                             title=f"partition {self.partition_id}: {settings.dadda_synthesis}")
        log.info("partition %d: %d real defects, %d DAM pairs, %d cached synthetic pairs (%s)",
                 self.partition_id, len(real), len(dam), len(synthetic), timings)
        return RecordDict({"metrics": MetricRecord({
            "num-real-defects": len(real), "num-dam": len(dam), "num-synthetic": len(synthetic),
            **timings})})

    def _diffusion_pairs(self, content: RecordDict, local: DefectPairs, seed: int,
                         timings: dict[str, float]) -> DefectPairs:
        """Fine-tune G^I on ``local`` pairs, then eq. (7) for each local defect class."""
        settings = self.settings
        if not len(local):
            return local
        start = time.perf_counter()
        device, precision = device_of(self.cfg), self.cfg.precision
        image_state, mask_state = unpack_generators(content[GENERATORS])
        image_model = finetune_image_model(image_state, local, settings=settings, seed=seed + 1,
                                           device=device, precision=precision)
        timings["finetune_seconds"] = time.perf_counter() - start
        num_types = len(defect_types_of(self.cfg))
        mask_model = DiffusionUNet(**settings.unet_kwargs(1, num_classes=num_types))
        mask_model.load_state_dict(mask_state)
        start = time.perf_counter()
        with torch.no_grad():
            pairs = diffusion_pairs(image_model, mask_model.to(device).eval(),
                                    sorted(int(c) for c in np.unique(local.classes)),
                                    settings.dadda_synth_per_class, settings=settings,
                                    seed=seed + 2, precision=precision)
        timings["sample_seconds"] = time.perf_counter() - start
        return pairs
