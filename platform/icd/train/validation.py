"""Which checkpoint a stage exports: reconstruction PSNR on a held-out validation split.

With ``train.<stage>.export: best_validation`` rank 0 scores the model it trains at every
checkpoint (``validation_psnr``, reported with the checkpoint, so that Ray Train's
``checkpoint_score_attribute`` keeps the best one), remembers the best weights, and the stage
exports those instead of the last step's: early stopping's "restore the best weights". The
images come from ``data.validation_dataset``, a split of their own, so the evaluation set
(``data.eval_dataset``, which the no-regression check and the benchmarks read) never takes part
in the choice. Only trained checkpoints are candidates: the untrained start is what the
no-regression gate compares the export with.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from icd.config import Config
from icd.diffusion.boundaries import Boundaries
from icd.models.bundle import ModelBundle
from icd.storage import S3Settings

SCORE = "validation_psnr"  # the metric Ray Train orders checkpoints by


def selects_best(config: Config, stage: str) -> bool:
    return getattr(config.train, stage).export == "best_validation"


def snapshot(trainable: dict[str, torch.nn.Parameter]) -> dict[str, torch.Tensor]:
    """A CPU copy of the weights, which training moving on does not change."""
    return {name: p.detach().to("cpu", copy=True) for name, p in trainable.items()}


@dataclass
class BestWeights:
    """The best-scoring checkpoint so far: its step, score and trainable weights (rank 0 keeps them)."""

    step: int | None = None
    score: float = -math.inf
    weights: dict[str, torch.Tensor] | None = None

    @classmethod
    def resumed(cls, step: int, score: float, current_step: int, trainable: dict[str, torch.nn.Parameter],
                fetch) -> "BestWeights":
        """The best of a resumed run: the restored weights if they are the best, else ``fetch(step)``'s."""
        return cls(step, score, snapshot(trainable) if step == current_step else fetch(step))

    def offer(self, step: int, score: float, trainable: dict[str, torch.nn.Parameter]) -> bool:
        """Keep ``trainable`` if ``score`` beats the best so far (a tie keeps the earlier); True if kept."""
        if not score > self.score:  # NaN never wins
            return False
        self.step, self.score, self.weights = step, score, snapshot(trainable)
        return True

    def load_into(self, trainable: dict[str, torch.nn.Parameter]) -> None:
        with torch.no_grad():
            for name, param in trainable.items():
                param.copy_(self.weights[name].to(param.device, param.dtype))


class Validator:
    """Scores a stage's model: mean per-image PSNR of its 4-step (the run's boundaries) reconstruction."""

    def __init__(self, images: torch.Tensor, captions: list[str], boundaries: Boundaries, seed: int):
        self.images, self.captions, self.boundaries, self.seed = images, captions, boundaries, seed

    @classmethod
    def from_config(cls, config: Config, stage: str, settings: S3Settings | None = None) -> "Validator":
        from icd.evaluation.reconstruction import load_eval_images

        settings = settings or S3Settings.from_config(config.storage)
        count = getattr(config.train, stage).validation_count
        images, captions = load_eval_images(settings.uri(f"datasets/{config.data.validation_dataset}"), count,
                                            config.model.resolution, settings)
        return cls(images, captions, Boundaries.from_config(config.method), config.seed)

    def score(self, bundle: ModelBundle) -> float:
        from icd.evaluation.reconstruction import consistency_reconstructor, reconstruction_metrics

        was_training = bundle.unet.training
        bundle.unet.eval()
        try:
            return reconstruction_metrics(bundle, self.images, self.captions,
                                          consistency_reconstructor(self.boundaries, seed=self.seed))["psnr"]
        finally:
            bundle.unet.train(was_training)
