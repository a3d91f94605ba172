"""Task sections of the config tree (loss weights etc.; pure dataclasses)."""

from dataclasses import dataclass


@dataclass
class ReconConfig:
    """The UniLIP autoencoder stages (recon_stage1 / recon_stage2 / recon_stage2_448)."""
    mse_weight: float = 1.0
    # perceptual = LPIPS + logits_weight x MSE of ConvNeXt-S logits; the sum is weighted by this
    perceptual_weight: float = 1.1
    logits_weight: float = 0.1
    # self-distillation (student projector output vs the frozen original's); > 0 needs
    # train_encoder and builds the teacher copy
    distill_weight: float = 0.0
    gan_weight: float = 0.1
    gan_start_step: int = -1  # -1: no GAN (and no discriminator engine)
    lecam_weight: float = 0.001
    lecam_decay: float = 0.999
    disc_lr: float = 1e-4
    # stage 1: encoder + projector frozen (and in eval mode); stage 2: they train at
    # optim.lr x encoder_lr_scale
    train_encoder: bool = False
    encoder_lr_scale: float = 0.1
