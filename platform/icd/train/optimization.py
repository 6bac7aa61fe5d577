"""The optimizer and learning-rate schedule of one stage, from its `StageConfig`.

AdamW over the trainable parameters, and one of diffusers' schedules (`get_scheduler`, the
same names as its training scripts' ``--lr_scheduler``), stepped once per optimizer step.
The schedule's state goes into every checkpoint, so a resumed run continues the same curve.
"""

from __future__ import annotations

import torch
from diffusers.optimization import get_scheduler

from icd.config import StageConfig


def build_optimizer(parameters, stage_config: StageConfig
                    ) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LRScheduler]:
    """AdamW(lr, weight_decay) and its schedule over ``stage_config.steps`` optimizer steps."""
    optimizer = torch.optim.AdamW(parameters, lr=stage_config.lr, weight_decay=stage_config.weight_decay)
    scheduler = get_scheduler(stage_config.lr_scheduler, optimizer, num_warmup_steps=stage_config.lr_warmup_steps,
                              num_training_steps=max(stage_config.steps, 1))
    return optimizer, scheduler
