"""Reconstruction evaluation as the paper reports it: PSNR / SSIM against scikit-image,
the FID InceptionV3 (published-file layout, random weights here) and rFID, the metric
accumulator, and `python -m unilip_ds.evaluation.recon` (one process and torchrun x2)."""

import json
import math

import numpy as np
import pytest
import torch
from skimage import data as skdata
from skimage.metrics import peak_signal_noise_ratio, structural_similarity

from tests.launch_util import check
from unilip_ds.config import load_config, to_yaml
from unilip_ds.engine.weights import save_component
from unilip_ds.evaluation.fid import FeatureStats, fid_from_stats, frechet_distance
from unilip_ds.evaluation.inception import FIDInceptionV3, InceptionWeightsError, load_fid_inception
from unilip_ds.evaluation.metrics import psnr, ssim, ssim_ref, to_uint8_levels
from unilip_ds.evaluation.recon import ReconMetrics, main
from unilip_ds.models.flavors import get_flavor
from unilip_ds.models.unilip import UniLIP


def _pair():
    """A natural 64x64 crop and a degraded copy, both 8-bit, as float arrays in [0, 1]."""
    a = skdata.astronaut()[100:164, 180:244].astype(np.float64) / 255
    rng = np.random.default_rng(0)
    b = np.clip(a + rng.normal(0, 0.05, a.shape) + 0.02, 0, 1)
    b = np.round(b * 255) / 255
    return a, b


def _t(a):
    return torch.from_numpy(a).permute(2, 0, 1)[None]


def test_psnr_and_both_ssims_match_scikit_image():
    a, b = _pair()
    # the reference: psnr_loss(fake, real) -> data range 1 inferred for float images in [0, 1]
    assert psnr(_t(b), _t(a)).item() == pytest.approx(peak_signal_noise_ratio(a, b), abs=1e-4)
    assert psnr(_t(b), _t(a)).item() == pytest.approx(peak_signal_noise_ratio(a, b, data_range=1.0), abs=1e-4)
    want = structural_similarity(b, a, data_range=1.0, channel_axis=-1, gaussian_weights=True, sigma=1.5,
                                 use_sample_covariance=False)
    assert ssim(_t(b), _t(a)).item() == pytest.approx(want, abs=1e-5)
    # the reference's call: skimage defaults (7x7 uniform window) with data_range=2.0
    want_ref = structural_similarity(b, a, data_range=2.0, channel_axis=-1)
    assert ssim_ref(_t(b), _t(a)).item() == pytest.approx(want_ref, abs=1e-5)
    assert ssim_ref(_t(b), _t(a)).item() > ssim(_t(b), _t(a)).item()  # the doubled range inflates it


def test_uint8_rounding_before_metrics():
    x = torch.rand(2, 3, 32, 32)
    x8 = to_uint8_levels(x)
    assert torch.equal(torch.round(x8 * 255), x8 * 255) and (x8 - x).abs().max() <= 0.5 / 255 + 1e-7
    m = ReconMetrics()
    real = to_uint8_levels(torch.rand(2, 3, 32, 32))
    m.update(real, real + 0.4 / 255)  # rounds back to the same 8-bit image
    m.update(real, real * 0 + 1.7)  # clamped to white
    res = m.result()
    white = psnr(torch.ones_like(real), real).mean().item()
    assert res["images"] == 4
    assert res["psnr"] == pytest.approx((2 * 10 * math.log10(1e20) + 2 * white) / 4, rel=1e-4)


def _random_inception(seed=0):
    """FIDInceptionV3 in the published layout with random weights scaled so features are O(1)."""
    torch.manual_seed(seed)
    net = FIDInceptionV3()
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, torch.nn.Conv2d):
                torch.nn.init.kaiming_normal_(m.weight)
    return net


@pytest.fixture(scope="module")
def inception_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("inception") / "pt_inception-2015-12-05-random.pth"
    sd = {k: v for k, v in _random_inception().state_dict().items() if not k.endswith("num_batches_tracked")}
    torch.save(sd, path)  # the published file has no num_batches_tracked either
    return path


def test_fid_inception_layout_and_fid_behaviour(inception_file, tmp_path):
    net = load_fid_inception(inception_file, dtype=torch.float32)
    keys = set(net.state_dict())
    # torchvision Inception3 without AuxLogits, 1008 classes: the pt_inception-2015-12-05 keys
    assert {"Conv2d_1a_3x3.conv.weight", "Mixed_5b.branch5x5_1.bn.running_var",
            "Mixed_7c.branch3x3dbl_3b.conv.weight", "fc.weight"} <= keys
    assert not any(k.startswith("AuxLogits") for k in keys) and tuple(net.fc.weight.shape) == (1008, 2048)
    assert sum(p.numel() for p in net.parameters()) == 23_850_960
    imgs = torch.from_numpy(np.stack([skdata.astronaut()[i * 40:i * 40 + 48, 100:148] for i in range(8)]))
    imgs = imgs.permute(0, 3, 1, 2).contiguous()
    feats = net(imgs)
    assert feats.shape == (8, 2048) and feats.std() > 1e-3

    def stats(f):
        s = FeatureStats(2048)
        s.update(f)
        return s

    real = stats(feats)
    # ~0: only the round-off of square roots of the (rank-7) covariance's zero eigenvalues
    assert abs(fid_from_stats(real, stats(feats))) < 1e-5 * float(real.mean_cov()[1].trace())
    g = torch.Generator().manual_seed(0)
    fids = []
    for sigma in (8, 32, 96):
        noisy = (imgs.float() + sigma * torch.randn(imgs.shape, generator=g)).clamp(0, 255).round().to(torch.uint8)
        fids.append(fid_from_stats(real, stats(net(noisy))))
    assert 0 < fids[0] < fids[1] < fids[2], fids
    with pytest.raises(ValueError, match="uint8"):
        net(imgs.float())
    # a wrong file: one line naming the problem
    torch.save({"fc.weight": torch.zeros(10, 2048)}, tmp_path / "bad.pth")
    with pytest.raises(InceptionWeightsError, match="not the FID InceptionV3"):
        load_fid_inception(tmp_path / "bad.pth")
    with pytest.raises(InceptionWeightsError, match="no such file"):
        load_fid_inception(tmp_path / "missing.pth")


def test_frechet_distance_matches_the_closed_form():
    """Diagonal covariances: FID = |mu1 - mu2|^2 + sum (sqrt(a) - sqrt(b))^2."""
    a, b = torch.tensor([1.0, 4.0, 9.0]), torch.tensor([4.0, 1.0, 0.25])
    mu1, mu2 = torch.tensor([0.0, 1.0, 2.0]), torch.tensor([1.0, 1.0, 0.0])
    want = 1 + 4 + ((a.sqrt() - b.sqrt()) ** 2).sum().item()
    assert frechet_distance(mu1, torch.diag(a), mu2, torch.diag(b)) == pytest.approx(want, rel=1e-9)


# ---------------------------------------------------------------------------------------
# the command line
# ---------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def export_and_shards(tmp_path_factory):
    from unilip_ds.data.sample_images import write_caption_tars
    d = tmp_path_factory.mktemp("evalcli")
    torch.manual_seed(0)
    model = UniLIP(get_flavor("tiny"))
    for name, comp in model.export_components().items():
        save_component(comp, d / "export" / name)
    cfg = load_config("recon_stage1", ["model.flavor=tiny", "model.perceptual_pretrained=false"], world_size=1)
    (d / "export" / "config.yaml").write_text(to_yaml(cfg))
    write_caption_tars(d / "shards", count=8, per_tar=4, size=96)
    return d / "export", d / "shards", model.eval()


def test_eval_cli_single_process(export_and_shards, inception_file, tmp_path, capsys):
    ckpt, shards, model = export_and_shards
    rc = main(["--ckpt", str(ckpt), "--data", str(shards), "--resolution", "64", "--inception",
               str(inception_file), "--out", str(tmp_path / "o"), "--batch-size", "3"])
    assert rc == 0
    res = json.loads((tmp_path / "o" / "metrics.json").read_text())
    assert json.loads(capsys.readouterr().out) == res
    assert res["images"] == 8 and res["resolution"] == 64 and res["shards"] == 2
    assert {"rfid", "psnr", "ssim", "ssim_ref"} <= set(res) and res["rfid"] > 0
    # the same numbers from the pieces: decoded crops, the pad path, uint8 rounding
    from unilip_ds.evaluation.recon import iter_batches
    from unilip_ds.models.unilip import reconstruct_padded
    m = ReconMetrics()
    with torch.no_grad():
        for b in iter_batches(sorted(str(p) for p in shards.glob("*.tar")), 64, 8, 0, 1):
            x = b.float() / 255
            m.update(x, reconstruct_padded(model, x))
    want = m.result()
    for k in ("psnr", "ssim", "ssim_ref"):
        assert res[k] == pytest.approx(want[k], rel=1e-5), k


def test_eval_cli_bad_inputs_one_line(export_and_shards, tmp_path, capsys):
    ckpt, shards, _ = export_and_shards
    cases = ((["--ckpt", str(tmp_path), "--data", str(shards)], "not an export dir"),
             (["--ckpt", str(ckpt), "--data", str(tmp_path / "none")], "--data"),
             (["--ckpt", str(ckpt), "--data", str(shards), "--inception", str(tmp_path / "x.pth")], "no such file"),
             (["--ckpt", str(ckpt), "--data", str(shards), "--resolution", "8"], "--resolution"))
    for argv, msg in cases:
        capsys.readouterr()
        assert main(argv + ["--out", str(tmp_path / "o"), "--no-progress"]) == 2
        err = capsys.readouterr().err.strip()
        assert msg in err and len(err.splitlines()) == 1, err


def test_eval_cli_torchrun_shards_and_gathers(export_and_shards, inception_file, tmp_path):
    """2 ranks, one shard each: the gathered result is the single-process one."""
    ckpt, shards, _ = export_and_shards
    args = ["--ckpt", str(ckpt), "--data", str(shards), "--resolution", "56", "--inception",
            str(inception_file), "--no-progress"]
    check(_torchrun(args + ["--out", str(tmp_path / "two")]))
    assert main(args + ["--out", str(tmp_path / "one")]) == 0
    two = json.loads((tmp_path / "two" / "metrics.json").read_text())
    one = json.loads((tmp_path / "one" / "metrics.json").read_text())
    assert two["world_size"] == 2 and two["images"] == one["images"] == 8
    for k in ("psnr", "ssim", "ssim_ref", "rfid"):
        assert two[k] == pytest.approx(one[k], rel=1e-6, abs=1e-9), k


def _torchrun(args):
    import subprocess
    from tests.launch_util import BIN, REPO, _port, env
    cmd = [str(BIN / "torchrun"), "--nproc_per_node", "2", "--master_port", str(_port()), "-m",
           "unilip_ds.evaluation.recon", *args]
    return subprocess.run(cmd, cwd=REPO, env=env(), capture_output=True, text=True, timeout=600)
