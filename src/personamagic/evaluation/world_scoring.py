"""World T-Sim and world I-Pre behind the interfaces of the real metrics (`TextSimilarity`,
`IdentityPreservation`), so that `evaluate images --metrics world` and the studies report them with the
same records, summaries, confidence intervals and plots. Every world image shows exactly one face, so
the no-face conventions of the real I-Pre are moot: each image counts as a found face."""

from __future__ import annotations

import numpy as np

from ..world import world_judge_path  # noqa: F401  (re-exported for images.world_metrics)
from ..world.judge import WorldJudge, load_judge
from ..world.metrics import to_tensor, world_t_sim
from .identity_preservation import FaceMatch
from .text_similarity import TextScore


class WorldTextSimilarity:
    """World T-Sim: the share of the prompt's context attributes the judge reads in the image (all
    three T-Sim scales carry it, the 100· one times 100)."""

    name = "world-judge"

    def __init__(self, judge: WorldJudge):
        self.judge = judge

    @classmethod
    def load(cls, path=None) -> "WorldTextSimilarity":
        return cls(load_judge(path or world_judge_path()))

    def score(self, images, prompts, *, placeholders=(), supercategory: str = "face", batch_size: int = 64):
        from .text_similarity import replace_placeholders

        texts = [replace_placeholders(p, tuple(placeholders), supercategory) for p in prompts]
        scores = []
        for start in range(0, len(texts), batch_size):
            chunk = texts[start:start + batch_size]
            for text, share in zip(chunk, world_t_sim(self.judge, images[start:start + batch_size], chunk)):
                scores.append(TextScore(text, share, 100.0 * share, share))
        return scores


class WorldIdentityPreservation:
    """World I-Pre: the world identity encoder's cosine to the reference photo(s), mean over them."""

    name = "world-judge"
    detector_name = "none (a world image shows one face)"

    def __init__(self, judge: WorldJudge):
        from ..world.judge import WorldIdentityEncoder

        self.encoder = WorldIdentityEncoder(judge)

    @classmethod
    def load(cls, path=None) -> "WorldIdentityPreservation":
        return cls(load_judge(path or world_judge_path()))

    def reference(self, photos) -> np.ndarray:
        from ..faces.photos import load_photo

        images = [load_photo(p) if not hasattr(p, "convert") else p for p in photos]
        return self._embed(images)

    def score(self, image, reference: np.ndarray) -> FaceMatch:
        similarity = float((reference @ self._embed([image])[0]).mean())
        return FaceMatch(face_found=True, i_pre=similarity, num_faces=1)

    def _embed(self, images) -> np.ndarray:
        import torch

        with torch.no_grad():
            return self.encoder(to_tensor(images)).numpy()
