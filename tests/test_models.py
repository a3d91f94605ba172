"""UniLIP autoencoder, perceptual nets and discriminator: shapes, init, real on-disk layouts."""

import pytest
import torch
from diffusers import AutoencoderDC
from transformers import InternVLForConditionalGeneration

from unilip_ds.engine.weights import full_state_dict, save_component
from unilip_ds.models.discriminator import (DiscriminatorLoss, LeCamEMA, PatchDiscriminator, hinge_d_loss,
                                           hinge_g_loss)
from unilip_ds.models.flavors import get_flavor, internvl_config
from unilip_ds.models.perceptual import LPIPSHeads, PerceptualNets, VGG16Features, convnext_small
from unilip_ds.models.unilip import (DCAEDecoder, UniLIP, WeightsNotFound, load_internvl_vision,
                                     load_vision_into_internvl)

TINY = get_flavor("tiny")


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    return UniLIP(TINY).eval()


def test_shapes(tiny):
    x = torch.rand(2, 3, 224, 224)
    with torch.no_grad():
        assert tiny.features(x).shape == (2, 64, TINY.d_llm)  # 16x16 patches -> 8x8 after shuffle
        z = tiny.encode(x)
        assert z.shape == (2, 32, 8, 8)
        assert tiny.dcae(z).shape == (2, 3, 256, 256)  # x32
        assert tiny.decode(z, size=(224, 224)).shape == (2, 3, 224, 224)
        assert tiny(torch.rand(1, 3, 112, 112)).shape == (1, 3, 112, 112)


def test_adapter_trunc_normal_init():
    torch.manual_seed(0)
    m = UniLIP(get_flavor("1b").__class__(**{**TINY.__dict__, "text": {**TINY.text, "hidden_size": 256}}))
    w = m.adapter.down_blocks[0].mlp[1].weight
    assert abs(w.std().item() - 0.02) < 0.002
    assert torch.all(m.adapter.down_mlp[3].bias == 0)
    assert m.adapter.down_mlp[1].weight.shape == (32, 256)


def test_meta_build_counts_real_flavors():
    with torch.device("meta"):
        m1, m2 = UniLIP(get_flavor("1b")), UniLIP(get_flavor("2b"))
    n_vit = sum(p.numel() for p in m1.vision.vision_tower.parameters())
    assert 300e6 < n_vit < 310e6  # InternViT-300M
    assert m1.vision.multi_modal_projector.linear_1.weight.shape == (896, 4096)
    assert m2.vision.multi_modal_projector.linear_1.weight.shape == (1536, 4096)
    assert m1.adapter.down_mlp[1].weight.shape == (32, 896)
    assert 150e6 < sum(p.numel() for p in m1.dcae.parameters()) < 170e6
    assert all(p.is_meta for p in m1.parameters())


def test_internvl_hf_layout_loads_and_exports(tmp_path, tiny):
    """Weights of a real-layout InternVLForConditionalGeneration load into UniLIP's vision
    path; the exported vision component loads back into InternVLForConditionalGeneration."""
    torch.manual_seed(1)
    hf = InternVLForConditionalGeneration(internvl_config(TINY)).eval()
    hf.save_pretrained(tmp_path / "internvl")
    m = UniLIP(TINY).eval()
    load_internvl_vision(m.vision, tmp_path / "internvl")
    x = torch.rand(1, 3, 224, 224)
    with torch.no_grad():
        ref = hf.model.get_image_features(pixel_values=m.normalize(x)).pooler_output
        assert torch.allclose(m.features(x), ref, atol=1e-5)
    # export the (different) tiny model and put it into a fresh InternVL
    save_component(tiny.export_components()["vision"], tmp_path / "vision")
    hf2 = InternVLForConditionalGeneration(internvl_config(TINY)).eval()
    load_vision_into_internvl(hf2, tmp_path / "vision")
    with torch.no_grad():
        got = hf2.model.get_image_features(pixel_values=tiny.normalize(x)).pooler_output
        assert torch.allclose(got, tiny.features(x), atol=1e-5)


def test_missing_internvl_path_is_clear(tmp_path):
    with pytest.raises(WeightsNotFound, match="model.internvl_path"):
        load_internvl_vision(UniLIP(TINY).vision, tmp_path / "nope")


def test_dcae_layout_loads_and_roundtrips(tmp_path):
    torch.manual_seed(2)
    ae = AutoencoderDC(**TINY.dcae).eval()
    ae.save_pretrained(tmp_path / "dcae")
    dec = DCAEDecoder(**TINY.dcae).eval()
    dec.load_dcae_weights(tmp_path / "dcae")
    z = torch.randn(1, 32, 4, 4)
    with torch.no_grad():
        assert torch.allclose(dec(z), ae.decode(z).sample, atol=1e-6)
    dec.save_pretrained(tmp_path / "exported")
    again = DCAEDecoder.from_pretrained(tmp_path / "exported").eval()
    for (k, a), (k2, b) in zip(full_state_dict(dec).items(), full_state_dict(again).items()):
        assert k == k2 and torch.equal(a, b)
    # its config is AutoencoderDC's: the full model can be rebuilt from it
    assert AutoencoderDC.from_config(again.config).decoder.conv_in.weight.shape == dec.decoder.conv_in.weight.shape


def test_decoder_checkpointing_same_grads():
    torch.manual_seed(3)
    a = DCAEDecoder(**TINY.dcae)
    b = DCAEDecoder(**TINY.dcae)
    b.load_state_dict(a.state_dict())
    b.enable_checkpointing()
    z = torch.randn(2, 32, 2, 2)
    a(z).square().mean().backward()
    b(z).square().mean().backward()
    assert list(a.state_dict()) == list(b.state_dict())
    for pa, pb in zip(a.parameters(), b.parameters()):
        assert torch.allclose(pa.grad, pb.grad, atol=1e-6)


# -- perceptual nets: our keys ARE the published ones -----------------------------------
def test_vgg16_and_lpips_keys_match_published_files():
    sd = VGG16Features().state_dict()
    # torchvision vgg16: convs at 0,2,5,7,10,12,14,17,19,21,24,26,28
    assert sd["features.0.weight"].shape == (64, 3, 3, 3)
    assert sd["features.5.weight"].shape == (128, 64, 3, 3)
    assert sd["features.28.weight"].shape == (512, 512, 3, 3)
    assert sd["features.28.bias"].shape == (512,)
    assert "features.1.weight" not in sd and "features.4.weight" not in sd
    assert len(sd) == 26 and sum(v.numel() for v in sd.values()) == 14_714_688
    heads = LPIPSHeads().state_dict()  # lpips/weights/v0.1/vgg.pth
    assert {k: tuple(v.shape) for k, v in heads.items()} == {
        "lin0.model.1.weight": (1, 64, 1, 1), "lin1.model.1.weight": (1, 128, 1, 1),
        "lin2.model.1.weight": (1, 256, 1, 1), "lin3.model.1.weight": (1, 512, 1, 1),
        "lin4.model.1.weight": (1, 512, 1, 1)}


def test_convnext_small_keys_match_torchvision():
    sd = convnext_small().state_dict()
    expect = {
        "features.0.0.weight": (96, 3, 4, 4), "features.0.1.weight": (96,),
        "features.1.0.layer_scale": (96, 1, 1), "features.1.0.block.0.weight": (96, 1, 7, 7),
        "features.1.0.block.2.weight": (96,), "features.1.0.block.3.weight": (384, 96),
        "features.1.0.block.5.weight": (96, 384), "features.2.0.weight": (96,),
        "features.2.1.weight": (192, 96, 2, 2), "features.5.26.block.0.weight": (384, 1, 7, 7),
        "features.7.2.layer_scale": (768, 1, 1), "classifier.0.weight": (768,),
        "classifier.2.weight": (1000, 768), "classifier.2.bias": (1000,)}
    for k, shape in expect.items():
        assert tuple(sd[k].shape) == shape, k
    assert "features.5.27.layer_scale" not in sd
    assert sum(v.numel() for v in sd.values()) == 50_223_688  # torchvision's convnext_small


def test_perceptual_loads_published_files(tmp_path):
    torch.manual_seed(4)
    src = PerceptualNets()
    vgg = {k: v.clone() for k, v in src.lpips.vgg.state_dict().items()}
    vgg["classifier.0.weight"] = torch.zeros(4096, 25088)[:1]  # the vgg16 file also has a classifier
    torch.save(vgg, tmp_path / "vgg16.pth")
    torch.save(src.lpips.heads.state_dict(), tmp_path / "vgg.pth")
    torch.save(src.convnext.state_dict(), tmp_path / "convnext_small.pth")
    torch.manual_seed(5)
    dst = PerceptualNets()
    dst.load_pretrained(str(tmp_path / "vgg16.pth"), str(tmp_path / "vgg.pth"), str(tmp_path / "convnext_small.pth"))
    for a, b in zip(src.state_dict().values(), dst.state_dict().values()):
        assert torch.equal(a, b)
    with pytest.raises(WeightsNotFound, match="model.convnext_path"):
        dst.load_pretrained(str(tmp_path / "vgg16.pth"), str(tmp_path / "vgg.pth"), str(tmp_path / "none.pth"))


def test_perceptual_distance_behaviour():
    torch.manual_seed(6)
    f = TINY
    net = PerceptualNets(f.vgg_width_div, f.convnext_dims, f.convnext_depths, f.classifier_size)
    x = torch.rand(2, 3, 64, 64)
    lp0, lg0 = net(x, x)
    assert lp0.item() == pytest.approx(0, abs=1e-6) and lg0.item() == pytest.approx(0, abs=1e-8)
    lp1, _ = net(x, (x + 0.1 * torch.randn_like(x)).clamp(0, 1))
    lp2, _ = net(x, torch.rand_like(x))
    assert 0 < lp1.item() < lp2.item()
    assert not any(p.requires_grad for p in net.parameters())
    net.train()
    assert not net.training


# -- discriminator -----------------------------------------------------------------------
def test_discriminator_is_the_reference_n_layer_network():
    """taming/MaskGIT N-layer patch discriminator as the reference builds it (1b flavor):
    5x5 stem, 3 levels 128 -> 128 -> 256 -> 512, GroupNorm(32), 1x1 + 5x5 head to 1 channel."""
    f = get_flavor("1b")
    with torch.device("meta"):
        d = PatchDiscriminator(f.disc_channels, f.disc_mults, f.disc_groups)
    shapes = {k: tuple(v.shape) for k, v in d.state_dict().items()}
    assert shapes["block_in.0.weight"] == (128, 3, 5, 5)
    assert [shapes[f"blocks.{i}.0.weight"] for i in range(3)] == [(128, 128, 3, 3), (256, 128, 3, 3),
                                                                  (512, 256, 3, 3)]
    assert "blocks.3.0.weight" not in shapes
    assert [d.blocks[i][2].num_groups for i in range(3)] == [32, 32, 32]
    assert shapes["to_logits.0.weight"] == (512, 512, 1, 1) and shapes["to_logits.2.weight"] == (1, 512, 5, 5)
    assert all(m.negative_slope == 0.1 for m in d.modules() if isinstance(m, torch.nn.LeakyReLU))
    assert isinstance(d.pool, torch.nn.AdaptiveMaxPool2d)
    assert not list(d.buffers())  # nothing a bf16 engine / zero.Init could hold in bf16


def test_discriminator_blur_downsampling_and_unit_range_input():
    from unilip_ds.models.discriminator import BlurDown
    x = torch.zeros(1, 1, 8, 8)
    x[0, 0, 3, 3] = 64.0  # an impulse: the output shows the (1,3,3,1)^2 / 64 kernel, stride 2
    y = BlurDown()(x)[0, 0]
    assert y.shape == (4, 4)  # even sides: pad 1 / 1
    k = torch.tensor([1.0, 3.0, 3.0, 1.0])
    # padded index 4 (= 3 + 1) is tap 2 of the window at output 1 (padded 2..5), tap 0 of output 2
    assert torch.allclose(y[1:3, 1:3], torch.outer(k[[2, 0]], k[[2, 0]]))
    assert BlurDown()(torch.ones(1, 2, 7, 7)).shape == (1, 2, 4, 4)  # odd sides: pad 1 / 2
    torch.manual_seed(7)
    d = PatchDiscriminator(TINY.disc_channels, TINY.disc_mults, TINY.disc_groups)
    img = torch.rand(1, 3, 64, 64)
    with torch.no_grad():  # images enter as given, in [0, 1] (no rescale to [-1, 1])
        h = d.block_in[0](img)
    assert torch.allclose(h, torch.nn.functional.conv2d(img, d.block_in[0].weight, d.block_in[0].bias, padding=2))


def test_discriminator_logits_and_losses():
    torch.manual_seed(7)
    d = PatchDiscriminator(TINY.disc_channels, TINY.disc_mults, TINY.disc_groups)
    assert any(isinstance(m, torch.nn.GroupNorm) for m in d.modules())
    for res in (224, 256, 448):
        assert d(torch.rand(2, 3, res, res)).shape == (2, 1, 16, 16)
    real, fake = torch.full((4,), 2.0), torch.full((4,), -2.0)
    assert hinge_d_loss(real, fake).item() == 0  # both beyond the margin
    # the reference's (taming's) 0.5 factor: 0.5 * (relu(1 + 2) + relu(1 + 2))
    assert hinge_d_loss(fake, real).item() == pytest.approx(3.0)
    assert hinge_d_loss(torch.tensor([0.5, -1.5]), torch.tensor([0.0, 2.0])).item() == \
        pytest.approx(0.5 * ((0.5 + 2.5) / 2 + (1.0 + 3.0) / 2))
    assert hinge_g_loss(torch.tensor([1.0, 3.0])).item() == -2.0
    loss_mod = DiscriminatorLoss(d, lecam_weight=0.001)
    x = torch.rand(2, 3, 64, 64)
    loss, logs = loss_mod(x, x.flip(0))
    assert {"loss/disc", "loss/lecam"} <= set(logs)
    assert loss.item() == pytest.approx((logs["loss/disc"] + 0.001 * logs["loss/lecam"]).item(), rel=1e-5)
    assert loss_mod.lecam.real.item() != 0  # EMA updated


def test_lecam_on_batch_means_with_emas_updated_after_use():
    ema = LeCamEMA(decay=0.999)
    real = torch.tensor([3.0, -1.0])  # mean 1.0
    fake = torch.tensor([-4.0, 0.0])  # mean -2.0
    # first call: EMAs are 0 -> relu(1 - 0)^2 + relu(0 - (-2))^2 (per logit it would be 9+4 / 16+0)
    assert ema(real, fake).item() == pytest.approx(1.0 + 4.0)
    assert ema.real.item() == pytest.approx(0.001 * 1.0) and ema.fake.item() == pytest.approx(-0.002)
    # second call uses the EMAs of the first: relu(1 - (-0.002))^2 + relu(0.001 - (-2))^2
    assert ema(real, fake).item() == pytest.approx(1.002 ** 2 + 2.001 ** 2, rel=1e-6)
    assert ema.real.item() == pytest.approx(0.001 * 0.999 + 0.001, rel=1e-6)
    # margins met: nothing to pay
    ema2 = LeCamEMA()
    assert ema2(torch.tensor([-1.0]), torch.tensor([1.0])).item() == 0.0


@pytest.mark.parametrize("how", ["cast", "zero_init"])
def test_lecam_emas_stay_fp32_under_bf16(how):
    """bf16 EMAs stall (0.5 x 0.999 + 1e-3 rounds back to 0.5): 3000 updates with mean logits
    +-1 must reach +-(1 - 0.999^3000) = +-0.950, whatever built / cast the module."""
    if how == "cast":
        ema = LeCamEMA(0.999).to(torch.bfloat16)
    else:  # what zero.Init does to every float tensor created in a constructor
        from unittest import mock
        orig = torch.zeros
        with mock.patch("torch.zeros", lambda *a, **k: orig(*a, **k).bfloat16()):
            ema = LeCamEMA(0.999)
    one = torch.ones(4, dtype=torch.bfloat16)
    for _ in range(3000):
        ema(one, -one)
    assert ema.real.dtype == torch.float32 and ema.fake.dtype == torch.float32
    assert ema.real.item() == pytest.approx(1 - 0.999 ** 3000, abs=1e-4)
    assert ema.fake.item() == pytest.approx(-(1 - 0.999 ** 3000), abs=1e-4)
    # a checkpoint loads into fp32 buffers (no rounding on resume)
    again = LeCamEMA(0.999).to(torch.bfloat16)
    again.load_state_dict(ema.state_dict())
    assert again.real.dtype == torch.float32 and again.real.item() == ema.real.item()


# -- decode resize and the 256 px pad path ----------------------------------------------
def test_decode_resize_is_bilinear_without_antialias(tiny):
    z = torch.randn(1, 32, 2, 2)
    with torch.no_grad():
        raw = tiny.dcae(z).float()
        got = tiny.decode(z)
    want = (torch.nn.functional.interpolate(raw, size=(56, 56), mode="bilinear", align_corners=False) + 1) / 2
    assert torch.equal(got, want)


def test_reconstruct_padded_pads_resizes_and_crops_as_the_reference(tiny):
    import types
    import numpy as np
    from unilip_ds.models.unilip import reconstruct_any, reconstruct_padded
    x = torch.rand(1, 3, 30, 31)  # -> padded to 56 x 56: top 13 / bottom 13, left 12 / right 13
    seen = {}

    def encode(images):
        seen["x"] = images
        return torch.zeros(images.shape[0], 32, images.shape[-2] // 28, images.shape[-1] // 28)

    def ramp(z):  # a decoder output that ramps down the rows over [-1, 1]
        h, w = z.shape[-2] * 32, z.shape[-1] * 32
        return torch.linspace(-1, 1, h)[:, None].expand(z.shape[0], 3, h, w)

    y = reconstruct_padded(types.SimpleNamespace(encode=encode, dcae=ramp), x)
    assert y.shape == x.shape
    padded = np.pad(x[0].numpy(), ((0, 0), (13, 13), (12, 13)), mode="reflect")
    assert np.allclose(seen["x"][0].numpy(), padded)
    # 64 -> 56 rows, bilinear with align_corners: the ramp keeps its end points; crop rows 13..42
    ramp01 = (torch.linspace(-1, 1, 56) + 1) / 2
    assert torch.allclose(y[0, 0, :, 0], ramp01[13:13 + 30], atol=1e-6)
    # multiples of 28 take the training path
    z = torch.rand(1, 3, 56, 56)
    with torch.no_grad():
        assert torch.equal(reconstruct_any(tiny, z), tiny(z))
