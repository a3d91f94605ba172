"""UniLIPPipeline: a gen export as a diffusers pipeline, loaded with one call.

    pipe = UniLIPPipeline.from_pretrained("exports/gen_stage2")        # the export directory
    images = pipe(prompt=["a red car", "a cat"], num_inference_steps=20, guidance_scale=4.5,
                  generator=torch.Generator().manual_seed(0), num_images_per_prompt=2).images
    edited = pipe(image=[Image.open("in.jpg")], prompt=["make it night"]).images

Components, each in its library's own layout: `mllm` (transformers InternVL `-hf`, its
vision path = the UniLIP encoder + mlp1), `tokenizer`, `connector` (queries + connector +
projector), `transformer` (diffusers SanaTransformer2DModel), `scheduler`
(DPMSolverMultistepScheduler, flow sigmas), `adapter` and `decoder` (the UniLIP latent
head and DC-AE decoder) and, for a gen_stage1 export whose latents are SANA's own, `dcae`
(diffusers AutoencoderDC). The sampling code is the training sample grids' (sampling.py).
"""

from __future__ import annotations

from typing import List, Optional, Union

import numpy as np
import torch
from diffusers import DiffusionPipeline
from diffusers.pipelines.pipeline_utils import ImagePipelineOutput
from PIL import Image

# the custom components' modules: diffusers resolves model_index.json's entries from
# sys.modules for libraries other than its own and transformers
import unilip_ds.models.connector  # noqa: F401,E402
import unilip_ds.models.unilip  # noqa: F401,E402
from unilip_ds.inference.sampling import make_scheduler, sample, to_pil


class UniLIPPipeline(DiffusionPipeline):
    _optional_components = ["dcae"]

    def __init__(self, mllm, tokenizer, connector, transformer, scheduler, adapter, decoder, dcae=None,
                 target: str = "unilip", latent_scale: float = 10.6, resolution: int = 448,
                 max_length: int = 1024):
        super().__init__()
        self.register_modules(mllm=mllm, tokenizer=tokenizer, connector=connector, transformer=transformer,
                              scheduler=scheduler, adapter=adapter, decoder=decoder, dcae=dcae)
        self.register_to_config(target=target, latent_scale=latent_scale, resolution=resolution,
                                max_length=max_length)

    @classmethod
    def from_gen_model(cls, model, tokenizer, cfg) -> "UniLIPPipeline":
        """A pipeline sharing the modules of a (trained) GenModel; export writes it."""
        return cls(model.mllm, tokenizer, model.connector, model.transformer,
                   make_scheduler(cfg.gen.flow_shift_sample), model.adapter, model.decoder, model.dcae,
                   target=model.target, latent_scale=float(model.latent_scale),
                   resolution=model.resolution, max_length=cfg.gen.max_length)

    def gen_model(self):
        """The training code's GenModel over this pipeline's modules (nothing copied)."""
        from unilip_ds.models.generator import GenModel
        c = self.config
        return GenModel(self.mllm, self.connector, self.transformer, self.adapter, self.decoder, self.dcae,
                        target=c.target, latent_scale=c.latent_scale, resolution=c.resolution,
                        train_dit=False).eval()

    def prompt_builder(self):
        from unilip_ds.models.prompts import PromptBuilder
        return PromptBuilder(self.tokenizer, (self.config.resolution // 28) ** 2,
                             self.connector.config.num_queries, self.config.max_length)

    def preprocess(self, images: List[Image.Image]) -> torch.Tensor:
        """Edit inputs squashed to the square resolution (as in training), [0, 1]."""
        r = self.config.resolution
        arr = [np.asarray(im.convert("RGB").resize((r, r), Image.BICUBIC), dtype=np.float32) / 255.0
               for im in images]
        return torch.from_numpy(np.stack(arr)).permute(0, 3, 1, 2)

    @torch.no_grad()
    def __call__(self, prompt: Union[str, List[str]], image: Optional[Union[Image.Image, List[Image.Image]]] = None,
                 num_inference_steps: int = 20, guidance_scale: float = 4.5,
                 generator: Optional[Union[torch.Generator, List[torch.Generator]]] = None,
                 num_images_per_prompt: int = 1, output_type: str = "pil", return_dict: bool = True):
        """Text-to-image (`prompt` only) or editing (`image` + `prompt` = instructions, one per
        image). Images come out prompt-major: prompt i's images at i*n ... i*n + n - 1."""
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        ref = None
        if image is not None:
            images = [image] if isinstance(image, Image.Image) else list(image)
            if len(images) != len(prompts):
                raise ValueError(f"editing needs one instruction per image: {len(images)} images, "
                                 f"{len(prompts)} instructions")
            ref = self.preprocess(images)
        if num_inference_steps < 1 or num_images_per_prompt < 1:
            raise ValueError("num_inference_steps and num_images_per_prompt must be >= 1")
        for name in ("decoder", "dcae"):  # the reference decodes in fp32, whatever the rest runs in
            if getattr(self, name, None) is not None:
                getattr(self, name).to(torch.float32)
        out = sample(self.gen_model(), self.prompt_builder(), "edit" if ref is not None else "t2i", prompts,
                     ref, steps=num_inference_steps, guidance=guidance_scale, generator=generator,
                     num_images_per_prompt=num_images_per_prompt, scheduler=self.scheduler)
        out = to_pil(out) if output_type == "pil" else out
        if not return_dict:
            return (out,)
        return ImagePipelineOutput(images=out)
