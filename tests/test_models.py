"""UniLIP autoencoder, perceptual nets and discriminator: shapes, init, real on-disk layouts."""

import pytest
import torch
from diffusers import AutoencoderDC
from transformers import InternVLForConditionalGeneration

from unilip_ds.engine.weights import full_state_dict, save_component
from unilip_ds.models.discriminator import DiscriminatorLoss, PatchDiscriminator, hinge_d_loss
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
def test_discriminator_logits_and_losses():
    torch.manual_seed(7)
    d = PatchDiscriminator(TINY.disc_channels, TINY.disc_mults, TINY.disc_groups)
    assert any(isinstance(m, torch.nn.GroupNorm) for m in d.modules())
    assert any(isinstance(m, torch.nn.LeakyReLU) for m in d.modules())
    for res in (224, 448):
        assert d(torch.rand(2, 3, res, res)).shape == (2, 1, 16, 16)
    real, fake = torch.full((4,), 2.0), torch.full((4,), -2.0)
    assert hinge_d_loss(real, fake).item() == 0  # both beyond the margin
    assert hinge_d_loss(fake, real).item() == pytest.approx(6.0)
    loss_mod = DiscriminatorLoss(d, lecam_weight=0.001)
    x = torch.rand(2, 3, 64, 64)
    loss, logs = loss_mod(x, x.flip(0))
    assert {"loss/disc", "loss/lecam"} <= set(logs)
    assert loss.item() == pytest.approx((logs["loss/disc"] + 0.001 * logs["loss/lecam"]).item(), rel=1e-5)
    assert loss_mod.lecam.real.item() != 0  # EMA updated
