"""Task sections of the config tree (loss weights etc.; pure dataclasses)."""

from dataclasses import dataclass


@dataclass
class ReconConfig:
    mse_weight: float = 1.0
    perceptual_weight: float = 1.1
    distill_weight: float = 0.0
    gan_weight: float = 0.1
    gan_start_step: int = -1  # -1: no GAN
    lecam_weight: float = 0.001
    disc_lr: float = 1e-4
    train_encoder: bool = False
    encoder_lr_scale: float = 0.1
