"""Is understanding kept? A UniLIP recon export's encoder + projector against the original
InternVL (a transformers `-hf` checkpoint, i.e. the self-distillation teacher) on images:

  (a) features: MSE / cosine between the export's projector outputs and the original's
      (what self-distillation minimises; 0 for a stage-1 export, whose encoder is frozen);
  (b) the MLLM: InternVLForConditionalGeneration with the export's vision path swapped in
      (`load_vision_into_internvl`) vs the original, on a chat prompt with the image: MSE of
      the logits, cosine of the last hidden states, top-1 agreement of the next-token
      predictions (every position from the image on) and the KL of the answer's first token.

    python -m unilip_ds.evaluation.understanding --export exports/recon_stage2 \\
        --internvl /ckpt/InternVL3-1B-hf --images val/ a.jpg [--prompt "..."] [--out m.json]

Each image is one tile at the vision tower's input size (shorter side resized, centre crop;
no dynamic tiling): both models see the same pixels, which is what the comparison needs.
Prints one JSON object.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
from pathlib import Path
from typing import Dict, List, Optional

import torch
import torch.nn.functional as F

DEFAULT_PROMPT = "Describe the image in detail."


class UnderstandingError(ValueError):
    """Bad command-line input (missing export / checkpoint, no images, no tokenizer)."""


def check_paths(internvl: str | Path, export: str | Path) -> None:
    if not (Path(internvl) / "config.json").is_file():
        raise UnderstandingError(f"--internvl: {internvl} is not a transformers checkpoint dir (no config.json)")
    if not (Path(export) / "vision").is_dir():
        raise UnderstandingError(f"--export: {export} is not a recon export (no 'vision' component)")


def load_models(internvl: str | Path, export: str | Path, device: str = "cpu",
                dtype: torch.dtype = torch.float32):
    """(original, with the export's vision path, tokenizer), both models in eval mode."""
    from transformers import AutoTokenizer, InternVLForConditionalGeneration
    from unilip_ds.models.unilip import load_vision_into_internvl
    check_paths(internvl, export)
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(internvl))
    except (OSError, ValueError) as exc:
        raise UnderstandingError(f"--internvl: no usable tokenizer in {internvl}: {exc}") from None
    original = InternVLForConditionalGeneration.from_pretrained(str(internvl), dtype=dtype).to(device).eval()
    swapped = copy.deepcopy(original)
    load_vision_into_internvl(swapped, Path(export) / "vision")
    return original, swapped, tokenizer


def load_pixels(specs: List[str], size: int) -> torch.Tensor:
    """(N, 3, size, size) ImageNet-normalised pixels (InternVL's preprocessing of one tile)."""
    from unilip_ds.inference.reconstruct import ReconstructError, iter_images, to_tensor
    from unilip_ds.models.unilip import IMAGENET_MEAN, IMAGENET_STD, normalize
    try:
        images = [to_tensor(img, size) for _, img in iter_images(specs)]
    except ReconstructError as exc:
        raise UnderstandingError(str(exc)) from None
    if not images:
        raise UnderstandingError(f"--images: no images found in {' '.join(specs)}")
    return normalize(torch.stack(images), IMAGENET_MEAN, IMAGENET_STD)


def prompt_ids(tokenizer, config, prompt: str, image_tokens: int) -> torch.Tensor:
    """(1, T) ids of one user turn holding the image then `prompt`, ending where the
    assistant's answer starts; the image is <img> + image_tokens x <IMG_CONTEXT> + </img>."""
    start = getattr(tokenizer, "start_image_token", "<img>")
    end = getattr(tokenizer, "end_image_token", "</img>")
    ctx = getattr(tokenizer, "context_image_token", "<IMG_CONTEXT>")
    text = (f"<|im_start|>user\n{start}{ctx * image_tokens}{end}\n{prompt}<|im_end|>\n"
            "<|im_start|>assistant\n")
    ids = tokenizer(text, add_special_tokens=False, return_tensors="pt")["input_ids"]
    found = int((ids == config.image_token_id).sum())
    if found != image_tokens:
        raise UnderstandingError(f"the tokenizer maps {ctx!r} to {found} of {image_tokens} image_token_id "
                                 f"({config.image_token_id}) tokens; tokenizer and config do not belong together")
    return ids


@torch.no_grad()
def compare(original, swapped, tokenizer, pixels: torch.Tensor, prompt: str = DEFAULT_PROMPT,
            batch_size: int = 4) -> Dict[str, float]:
    """The metrics of the module docstring, averaged over images."""
    device, dtype = original.device, original.dtype
    sums: Dict[str, float] = {}
    counts: Dict[str, int] = {}

    def add(key: str, value: torch.Tensor, n: int) -> None:
        sums[key] = sums.get(key, 0.0) + float(value) * n
        counts[key] = counts.get(key, 0) + n

    ids, first = None, 0
    for i in range(0, len(pixels), batch_size):
        px = pixels[i:i + batch_size].to(device, dtype)
        b = len(px)
        fo = original.model.get_image_features(pixel_values=px).pooler_output.float()
        fs = swapped.model.get_image_features(pixel_values=px).pooler_output.float()
        add("feature_mse", F.mse_loss(fs, fo), b)
        add("feature_mean_sq", fo.pow(2).mean(), b)
        add("feature_cosine", F.cosine_similarity(fs, fo, dim=-1).mean(), b)
        if ids is None:
            ids = prompt_ids(tokenizer, original.config, prompt, fo.shape[1]).to(device)
            # earlier positions cannot see the image (causal): equal in both, left out
            first = int((ids[0] == original.config.image_token_id).nonzero()[0])
        batch_ids = ids.expand(b, -1)
        oo = original(input_ids=batch_ids, pixel_values=px, output_hidden_states=True)
        os_ = swapped(input_ids=batch_ids, pixel_values=px, output_hidden_states=True)
        lo, ls = oo.logits[:, first:].float(), os_.logits[:, first:].float()
        ho, hs = oo.hidden_states[-1][:, first:].float(), os_.hidden_states[-1][:, first:].float()
        add("logits_mse", F.mse_loss(ls, lo), b)
        add("hidden_cosine", F.cosine_similarity(hs, ho, dim=-1).mean(), b)
        add("top1_agreement", (ls.argmax(-1) == lo.argmax(-1)).float().mean(), b)
        add("answer_top1_agreement", (ls[:, -1].argmax(-1) == lo[:, -1].argmax(-1)).float().mean(), b)
        add("answer_kl", F.kl_div(F.log_softmax(ls[:, -1], -1), F.log_softmax(lo[:, -1], -1),
                                  log_target=True, reduction="batchmean"), b)
    out = {k: sums[k] / counts[k] for k in sums}
    out["feature_rel_mse"] = out["feature_mse"] / max(out.pop("feature_mean_sq"), 1e-30)
    out.update(images=len(pixels), image_tokens=int((ids[0] == original.config.image_token_id).sum()),
               positions=int(ids.shape[1] - first))
    return out


def evaluate(export: str | Path, internvl: str | Path, images: List[str], prompt: str = DEFAULT_PROMPT,
             size: int = 0, device: Optional[str] = None, dtype: str = "auto",
             batch_size: int = 4) -> Dict[str, float]:
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    if dtype == "auto":
        dtype = "bfloat16" if device.startswith("cuda") else "float32"
    from transformers import AutoConfig
    check_paths(internvl, export)
    vision = AutoConfig.from_pretrained(str(internvl)).vision_config
    first = lambda v: v[0] if isinstance(v, (list, tuple)) else v  # noqa: E731
    size, patch = size or first(vision.image_size), first(vision.patch_size)
    if size % (2 * patch):  # whole patches, an even grid for the 0.5 pixel shuffle
        raise UnderstandingError(f"--resolution: must be a multiple of {2 * patch}, got {size}")
    pixels = load_pixels(images, size)  # bad image input fails before the models load
    original, swapped, tokenizer = load_models(internvl, export, device, getattr(torch, dtype))
    out = compare(original, swapped, tokenizer, pixels, prompt, batch_size)
    out.update(export=str(export), internvl=str(internvl), resolution=size, dtype=dtype, prompt=prompt)
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--export", required=True, help="recon export dir (launch/export.py; has vision/)")
    ap.add_argument("--internvl", required=True, help="the original InternVL3 -hf checkpoint dir")
    ap.add_argument("--images", required=True, nargs="+", help="image files, directories or .tar shards")
    ap.add_argument("--prompt", default=DEFAULT_PROMPT)
    ap.add_argument("--resolution", type=int, default=0, help="tile size (default: the vision tower's)")
    ap.add_argument("--device", default=None, help="default: cuda when available, else cpu")
    ap.add_argument("--dtype", default="auto", choices=("auto", "float32", "bfloat16"))
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--out", default=None, help="also write the JSON here")
    args = ap.parse_args(argv)
    from unilip_ds.engine.weights import WeightsMismatch
    try:
        result = evaluate(args.export, args.internvl, args.images, args.prompt, args.resolution,
                          args.device, args.dtype, args.batch_size)
    except (UnderstandingError, WeightsMismatch) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    text = json.dumps(result, indent=1)
    if args.out:
        Path(args.out).write_text(text + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
