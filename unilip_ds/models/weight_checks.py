"""Start checks of the weight files a run will read, one per config key, before any process
group exists. Each looks inside: the directory's config.json is the expected model
(transformers' `model_type`, diffusers' `_class_name`), then the run's own loader is run into
a module built on the meta device reading only the files' headers
(`engine.weights.dry_load`): every file, key and shape the real load needs is checked, in
milliseconds, no tensor data is read. A failure is one ConfigError line naming the key, the
path, what is wrong and what belongs there, e.g.

    config key 'model.internvl_path': /ckpt/x: no config.json (expected an InternVL3 -hf
    directory, e.g. OpenGVLab/InternVL3-1B-hf)
"""

from __future__ import annotations

from pathlib import Path

import torch

from unilip_ds.engine.weights import check_config_json, dry_load

_INTERNVL = {"tiny": "OpenGVLab/InternVL3-1B-hf", "1b": "OpenGVLab/InternVL3-1B-hf", "2b": "OpenGVLab/InternVL3-2B-hf"}
_SANA = {"tiny": "Efficient-Large-Model/Sana_600M_512px_diffusers", "1b": "Efficient-Large-Model/Sana_600M_512px_diffusers",
         "2b": "Efficient-Large-Model/Sana_1600M_512px_diffusers"}
DCAE_EXAMPLE = "mit-han-lab/dc-ae-f32c32-sana-1.1-diffusers"


def expect_internvl(flavor: str, remote_ok: bool = False) -> str:
    layout = "InternVL3 directory (-hf or original layout)" if remote_ok else "InternVL3 -hf directory"
    return f"an {layout} of flavor {flavor}, e.g. {_INTERNVL.get(flavor, _INTERNVL['1b'])}"


def expect_sana(flavor: str) -> str:
    return (f"a SANA diffusers directory holding transformer/ (SanaTransformer2DModel) of flavor {flavor}, "
            f"e.g. {_SANA.get(flavor, _SANA['1b'])}")


def expect_dcae(flavor: str) -> str:
    return f"a diffusers AutoencoderDC directory of flavor {flavor}, e.g. {DCAE_EXAMPLE}"


RECON_EXPORT = "a recon export of this flavor (launch/export.py --run <recon run> --out DIR)"
GEN_EXPORT = "a gen export of this flavor (launch/export.py --run <gen run> --out DIR)"


def on_meta(build):
    """`build()` on the meta device (no memory, no initialisation cost)."""
    with torch.device("meta"):
        return build()


def check_internvl_vision(key: str, path: str, flavor: str) -> None:
    """What recon reads from an InternVL checkpoint: the vision tower + projector (the
    transformers `-hf` layout or the original remote-code one)."""
    from unilip_ds.models.flavors import get_flavor
    from unilip_ds.models.unilip import VisionPath, load_internvl_vision
    expect = expect_internvl(flavor, remote_ok=True)
    check_config_json(path, key, expect, "model_type", ("internvl", "internvl_chat"))
    vision = on_meta(lambda: VisionPath(get_flavor(flavor)))
    dry_load(key, path, expect, lambda: load_internvl_vision(vision, path))


def check_dcae_decoder(key: str, path: str, flavor: str) -> None:
    """What recon reads from a DC-AE directory: the decoder."""
    from unilip_ds.models.flavors import get_flavor
    from unilip_ds.models.unilip import DCAEDecoder
    expect = expect_dcae(flavor)
    check_config_json(path, key, expect, "_class_name", ("AutoencoderDC",))
    dec = on_meta(lambda: DCAEDecoder(**get_flavor(flavor).dcae))
    dry_load(key, path, expect, lambda: dec.load_dcae_weights(path))


def check_recon_export(key: str, path: str, flavor: str, components=("vision", "adapter", "decoder")) -> None:
    """A recon export (launch/export.py): each component loads into this flavor's UniLIP."""
    from unilip_ds.engine.weights import start_error, load_component
    from unilip_ds.models.flavors import get_flavor
    from unilip_ds.models.unilip import UniLIP
    root = Path(path)
    missing = [c for c in components if not (root / c).is_dir()]
    if missing:
        gen = (root / "model_index.json").is_file()
        raise start_error(key, root, f"no {', '.join(c + '/' for c in missing)}"
                           + ("; it is a gen export" if gen else ""), RECON_EXPORT)
    unilip = on_meta(lambda: UniLIP(get_flavor(flavor)))
    comps = unilip.export_components()
    for name in components:
        dry_load(key, root / name, RECON_EXPORT, lambda n=name: load_component(comps[n], root / n))


def check_teacher(key: str, path: str, flavor: str) -> None:
    """The self-distillation teacher: an InternVL checkpoint or a recon export's vision/."""
    from unilip_ds.models.flavors import get_flavor
    from unilip_ds.models.unilip import VisionPath
    from unilip_ds.tasks.recon import _is_recon_export, load_teacher
    expect = f"{expect_internvl(flavor, remote_ok=True)}, or a recon_stage1 export"
    if not _is_recon_export(Path(path)):
        check_config_json(path, key, expect, "model_type", ("internvl", "internvl_chat"))
    teacher = on_meta(lambda: VisionPath(get_flavor(flavor)))
    dry_load(key, path, expect, lambda: load_teacher(teacher, path))


def check_perceptual(paths: dict, flavor: str, describe: dict) -> None:
    """The published perceptual files ({config leaf: path}), each into its network."""
    from unilip_ds.models.flavors import get_flavor
    from unilip_ds.models.perceptual import PerceptualNets
    f = get_flavor(flavor)
    nets = on_meta(lambda: PerceptualNets(f.vgg_width_div, f.convnext_dims, f.convnext_depths, f.classifier_size))
    for leaf, path in paths.items():
        dry_load(f"model.{leaf}", path, describe[leaf], lambda leaf=leaf, path=path: nets.load_part(leaf, path))


def check_inception(key: str, path: str) -> None:
    from unilip_ds.evaluation.inception import InceptionWeightsError, load_fid_inception
    expect = "the FID Inception weights pt_inception-2015-12-05-6726825d.pth"

    def load() -> None:
        try:
            on_meta(lambda: load_fid_inception(path, device="meta"))
        except InceptionWeightsError as exc:  # its messages name the command-line option
            raise InceptionWeightsError(str(exc).removeprefix("--inception: ")) from None
    dry_load(key, path, expect, load)
