"""The method's losses as small functions over tensors (the training loops compose them)."""

from icd.losses.consistency import consistency_loss, pseudo_huber
from icd.losses.distill import cfg_distillation_loss
from icd.losses.preservation import forward_preservation_loss, reverse_preservation_loss

__all__ = ["cfg_distillation_loss", "consistency_loss", "forward_preservation_loss", "pseudo_huber",
           "reverse_preservation_loss"]
