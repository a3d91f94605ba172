"""The edit path learns (issue 21): a handful of edit pairs ("flip the image horizontally",
the same instruction for all, so only the reference image tells them apart), trained in
process on the tiny flavor with GenModel's own flow loss, until its samples reproduce the
training targets: closer to them than copying the input, and than the same model with the
reference image's features zeroed. The latent scale is set as the reference derived its
10.6: 1 / std of the target latents (the tiny UniLIP's latents at 10.6 have std ~0.1, and
the DiT then learns the noise: benchmarks/edit_learns.py overfit --latent-scale flavor).
Figures and the command: benchmarks/edit_learns.py."""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

from edit_learns import flip_pairs, latent_scale_for, overfit  # noqa: E402


def test_edit_pairs_are_reproduced_from_the_reference_image(build_gen):
    torch.manual_seed(0)
    task, model = build_gen(extra=["model.grad_checkpointing=false"])
    inputs, targets = flip_pairs(4, model.resolution)
    model.latent_scale = latent_scale_for(model, targets)
    assert 20 < model.latent_scale < 1000  # the tiny UniLIP's latents are far below unit std
    r = overfit(task, model, inputs, targets, steps=600, lr=5e-3)
    print({k: round(v, 2) for k, v in r.items()})
    assert r["loss_last"] < 0.5 * r["loss_first"]
    # the samples are the targets, not the inputs, and come from the reference image
    assert r["latent_psnr_sample"] > r["latent_psnr_copy"] + 1.0, r
    assert r["latent_psnr_sample"] > r["latent_psnr_sample_vs_input"] + 1.0, r
    assert r["latent_psnr_sample"] > r["latent_psnr_zeroed"] + 2.0, r


def test_mosaic_identity_pairs_are_mixed_into_the_edit_pairs():
    """Mosaics (the layout lever of issue 21): flat cells aligned to the tiny flavor's 8 x 8
    token grid, seeded; `mix_mosaic` replaces that fraction of the training pairs (the last
    ones) by "keep the image as it is" pairs of mosaics and leaves the held-out pairs alone."""
    import numpy as np
    from edit_learns import edit_pairs
    from unilip_ds.data.sample_images import IDENTITY_EDIT, mosaic_samples
    a, b = mosaic_samples(3, grids=(2, 4, 8), seed=0), mosaic_samples(3, grids=(2, 4, 8), seed=0)
    assert all(np.array_equal(np.asarray(x.image), np.asarray(y.image)) for x, y in zip(a, b))
    for s in mosaic_samples(4, grids=(8,), seed=1):
        px = np.asarray(s.image)
        assert px.shape == (224, 224, 3)
        cells = px.reshape(8, 28, 8, 28, 3)
        assert (cells == cells[:, :1, :, :1]).all()  # every 28 px cell is one colour
        assert len({tuple(c) for c in cells[:, 0, :, 0].reshape(-1, 3)}) > 32  # and they differ
    (tr_in, tr_text, tr_out), held = edit_pairs("shapes", 8, 0, "colours", mix_mosaic=0.25)
    plain, held_plain = edit_pairs("shapes", 8, 0, "colours")
    assert tr_text[:6] == plain[1][:6] and tr_text[6:] == [IDENTITY_EDIT[0]] * 2
    assert all(x is y for x, y in zip(tr_in[6:], tr_out[6:]))  # identity: the output is the input
    assert held[1] == held_plain[1]
