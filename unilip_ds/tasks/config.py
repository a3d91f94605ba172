"""Task sections of the config tree (loss weights etc.; pure dataclasses)."""

from dataclasses import dataclass, field
from typing import List, Optional


@dataclass
class ReconConfig:
    """The UniLIP autoencoder stages (recon_stage1 / recon_stage2 / recon_stage2_448)."""
    mse_weight: float = 1.0
    # perceptual = (LPIPS + logits_weight x MSE of ConvNeXt-S logits) / (1 + logits_weight),
    # weighted by perceptual_weight: 1.1 x (LPIPS + 0.1 x logits) / 1.1, as the reference
    perceptual_weight: float = 1.1
    logits_weight: float = 0.1
    # self-distillation (student projector output vs the frozen original's); > 0 needs
    # train_encoder and a teacher (teacher_path, else model.internvl_path)
    distill_weight: float = 0.0
    # the ORIGINAL encoder + projector the student distils to: an InternVL checkpoint (-hf or
    # remote-code layout) or a recon export whose encoder was not trained (a recon_stage1
    # export). Unset: model.internvl_path
    teacher_path: Optional[str] = None
    gan_weight: float = 0.1
    gan_start_step: int = -1  # -1: no GAN (and no discriminator engine)
    lecam_weight: float = 0.001
    lecam_decay: float = 0.999
    disc_lr: float = 1e-4
    # stage 1: encoder + projector frozen (and in eval mode); stage 2: they train at
    # optim.lr x encoder_lr_scale
    train_encoder: bool = False
    encoder_lr_scale: float = 0.1
    # FID InceptionV3 weights (pt_inception-2015-12-05 file): periodic evaluation also
    # reports rFID; unset: PSNR / SSIM only
    inception_path: Optional[str] = None


@dataclass
class GenConfig:
    """The generator stages (gen_stage1 / gen_stage2 / gen_stage3)."""
    # dcae: the SANA's own DC-AE latent space (gen_stage1, DiT frozen); unilip: the UniLIP
    # latent space (gen_stage2/3)
    target: str = "unilip"
    # target latent x this; None = the flavor's (unilip: 10.6 at 1b, 9.5 at 2b; dcae: the
    # DC-AE's scaling_factor 0.41407)
    latent_scale: Optional[float] = None
    train_dit: bool = True  # False: the DiT is frozen, gradients still flow through it
    # the fixed 2-D sin-cos positional embedding SANA adds to the latent tokens under the
    # reference's diffusers 0.32 (the published configs leave interpolation_scale unset, which
    # 0.32 reads as max(sample_size // 64, 1) = 1 and diffusers >= 0.33 as "no embedding"):
    # the function UniLIP was trained and released as. False: no embedding (SANA as today's
    # diffusers builds it). Written into the export's transformer/config.json
    dit_pos_embed: bool = True
    # a sample's prompt is replaced by the null prompt with this probability (CFG)
    cfg_dropout: float = 0.1
    # flow shift of the training sigmas; the reference's effective value is 1.0 (its
    # scheduler config key is never read)
    flow_shift_train: float = 1.0
    # flow shift of sampling (DPM-Solver with flow sigmas); the reference's silent 3.0
    flow_shift_sample: float = 3.0
    # longest sequence (prompt + image tokens + <img> + queries); only the caption /
    # instruction text is truncated to fit
    max_length: int = 1024
    # sample grids written every train.sample_every steps
    sample_steps: int = 20
    guidance_scale: float = 4.5
    sample_prompts: List[str] = field(default_factory=lambda: [
        "a photo of a cat sitting on a wooden table", "a red sports car on a mountain road",
        "a bowl of fresh fruit, studio lighting", "an astronaut riding a horse on the moon"])
    # edit pairs for the sample grids: taken from the first held-out edit batch, else none
    sample_edits: int = 2
    # at train.eval_every, also the FID of images sampled from the held-out captions against the
    # held-out images (eval/gen_fid; needs recon.inception_path; evaluation/gen_fid.py)
    eval_fid: bool = False
