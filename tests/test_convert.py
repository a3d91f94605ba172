"""Converter: the reference tokenizer checkpoint (remote-code InternViT keys) -> UniLIP export."""

import pytest
import torch

from unilip_ds.engine.weights import read_weights_dir
from unilip_ds.models.convert import ConversionError, convert, main, reference_to_unilip
from unilip_ds.models.flavors import get_flavor
from unilip_ds.models.unilip import DCAEDecoder, UniLIP

TINY = get_flavor("tiny")


def reference_state_dict(seed=0):
    """Key names and shapes of the reference tokenizer checkpoint, written out from the
    remote-code layout (not derived from our mapping)."""
    g = torch.Generator().manual_seed(seed)
    v, d = TINY.vision, TINY.d_llm
    c, p, n_pos = v["hidden_size"], v["patch_size"], (v["image_size"] // v["patch_size"]) ** 2 + 1
    r = lambda *s: torch.randn(*s, generator=g) * 0.05  # noqa: E731
    sd = {"encoder.embeddings.class_embedding": r(1, 1, c),
          "encoder.embeddings.position_embedding": r(1, n_pos, c),
          "encoder.embeddings.patch_embedding.weight": r(c, 3, p, p),
          "encoder.embeddings.patch_embedding.bias": r(c)}
    for i in range(v["num_hidden_layers"]):
        L = f"encoder.encoder.layers.{i}."
        sd.update({L + "attn.qkv.weight": r(3 * c, c), L + "attn.qkv.bias": r(3 * c),
                   L + "attn.proj.weight": r(c, c), L + "attn.proj.bias": r(c),
                   L + "ls1": r(c), L + "ls2": r(c),
                   L + "norm1.weight": 1 + r(c), L + "norm1.bias": r(c),
                   L + "norm2.weight": 1 + r(c), L + "norm2.bias": r(c),
                   L + "mlp.fc1.weight": r(v["intermediate_size"], c), L + "mlp.fc1.bias": r(v["intermediate_size"]),
                   L + "mlp.fc2.weight": r(c, v["intermediate_size"]), L + "mlp.fc2.bias": r(c)})
    sd.update({"mlp1.0.weight": 1 + r(4 * c), "mlp1.0.bias": r(4 * c), "mlp1.1.weight": r(d, 4 * c),
               "mlp1.1.bias": r(d), "mlp1.3.weight": r(d, d), "mlp1.3.bias": r(d)})
    for i in range(3):
        sd.update({f"down_blocks.{i}.mlp.0.weight": 1 + r(d), f"down_blocks.{i}.mlp.0.bias": r(d),
                   f"down_blocks.{i}.mlp.1.weight": r(d, d), f"down_blocks.{i}.mlp.1.bias": r(d),
                   f"down_blocks.{i}.mlp.3.weight": r(d, d), f"down_blocks.{i}.mlp.3.bias": r(d)})
    sd.update({"down_mlp.0.weight": 1 + r(d), "down_mlp.0.bias": r(d), "down_mlp.1.weight": r(32, d),
               "down_mlp.1.bias": r(32), "down_mlp.3.weight": r(32, 32), "down_mlp.3.bias": r(32)})
    # the DC-AE decoder keeps diffusers' own keys in the reference checkpoint
    for k, t in DCAEDecoder(**TINY.dcae).state_dict().items():
        sd[k] = r(*t.shape)
    return sd


def test_mapping_splits_qkv_and_renames():
    sd = reference_state_dict()
    out = reference_to_unilip(sd)
    c = TINY.vision["hidden_size"]
    qkv = sd["encoder.encoder.layers.1.attn.qkv.weight"]
    att = "vision.vision_tower.encoder.layer.1.attention."
    assert torch.equal(out[att + "q_proj.weight"], qkv[:c])
    assert torch.equal(out[att + "k_proj.weight"], qkv[c:2 * c])
    assert torch.equal(out[att + "v_proj.weight"], qkv[2 * c:])
    assert torch.equal(out["vision.vision_tower.encoder.layer.0.lambda_1"], sd["encoder.encoder.layers.0.ls1"])
    assert torch.equal(out["vision.vision_tower.embeddings.cls_token"], sd["encoder.embeddings.class_embedding"])
    assert torch.equal(out["vision.multi_modal_projector.linear_2.weight"], sd["mlp1.3.weight"])
    assert torch.equal(out["adapter.down_mlp.1.weight"], sd["down_mlp.1.weight"])
    assert set(out) == set(UniLIP(TINY).state_dict())


def test_convert_writes_loadable_export(tmp_path):
    sd = reference_state_dict()
    torch.save(sd, tmp_path / "ref.pt")
    assert main(["--src", str(tmp_path / "ref.pt"), "--out", str(tmp_path / "export"), "--flavor", "tiny"]) == 0
    for name in ("vision", "adapter", "decoder"):
        assert (tmp_path / "export" / name).is_dir()
    assert (tmp_path / "export" / "config.yaml").is_file()
    vision = read_weights_dir(tmp_path / "export" / "vision")
    assert torch.equal(vision["model.multi_modal_projector.linear_1.weight"], sd["mlp1.1.weight"])
    decoder = DCAEDecoder.from_pretrained(tmp_path / "export" / "decoder")
    assert torch.equal(decoder.decoder.conv_in.weight, sd["decoder.conv_in.weight"])
    # the converted model computes what the remote-code InternViT computes: check the
    # embedding + first attention's q projection by hand
    model = convert(tmp_path / "ref.pt", tmp_path / "export2", flavor="tiny").eval()
    x = torch.rand(1, 3, 224, 224)
    with torch.no_grad():
        emb = model.vision.vision_tower.embeddings(model.normalize(x))
        patches = torch.nn.functional.conv2d(model.normalize(x), sd["encoder.embeddings.patch_embedding.weight"],
                                             sd["encoder.embeddings.patch_embedding.bias"], stride=14)
        manual = torch.cat([sd["encoder.embeddings.class_embedding"], patches.flatten(2).transpose(1, 2)], 1) \
            + sd["encoder.embeddings.position_embedding"]
        assert torch.allclose(emb, manual, atol=1e-5)


@pytest.mark.parametrize("corrupt, match", [
    (lambda sd: sd.update({"encoder.encoder.layers.0.attn.bogus.weight": torch.zeros(1)}), "attn.bogus"),
    (lambda sd: sd.update({"quantizer.codebook": torch.zeros(1)}), "quantizer.codebook"),
    (lambda sd: sd.pop("down_mlp.3.bias"), "adapter.down_mlp.3.bias"),
    (lambda sd: sd.update({"mlp1.3.weight": torch.zeros(3, 3)}), "multi_modal_projector.linear_2.weight"),
])
def test_refuses_bad_keys_and_shapes(tmp_path, capsys, corrupt, match):
    sd = reference_state_dict()
    corrupt(sd)
    torch.save(sd, tmp_path / "bad.pt")
    with pytest.raises(ConversionError, match=match.replace(".", r"\.")):
        convert(tmp_path / "bad.pt", tmp_path / "out", flavor="tiny")
    assert main(["--src", str(tmp_path / "bad.pt"), "--out", str(tmp_path / "out"), "--flavor", "tiny"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error:")


def test_flavor_is_inferred_or_refused(tmp_path):
    sd = reference_state_dict()
    torch.save(sd, tmp_path / "ref.pt")
    with pytest.raises(ConversionError, match="infer the flavor"):
        convert(tmp_path / "ref.pt", tmp_path / "out")  # tiny widths match no real flavor


@pytest.mark.parametrize("name, write, match", [
    ("notes.pt", lambda p: p.write_text("not a checkpoint"), "not a readable torch / safetensors checkpoint"),
    ("bad.safetensors", lambda p: p.write_bytes(b"zz"), "not a readable torch / safetensors checkpoint"),
    ("other.pt", lambda p: torch.save({"a.weight": torch.zeros(2)}, p), "not a reference tokenizer checkpoint"),
])
def test_a_file_that_is_not_a_reference_checkpoint_is_one_line(tmp_path, capsys, name, write, match):
    write(tmp_path / name)
    assert main(["--src", str(tmp_path / name), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"error: --src: {tmp_path / name} is ") and match in err[0], err
    assert not (tmp_path / "out").exists()
