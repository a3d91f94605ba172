"""The generator's DiT, flow loss and sampler against the reference's own library version.

The reference (nnnth/UniLIP) pins diffusers 0.32.2; defaults moved since (SANA's positional
embedding is the measured case). This script saves one SANA directory as published (random
weights, `interpolation_scale` unset, the published DPM-Solver scheduler config), then computes
from it, on the same inputs:

  reference  in a second process with diffusers 0.32.2 first on sys.path: the reference's
             code paths (`SanaTransformer2DModel.from_pretrained(.., subfolder="transformer")`,
             its training sigmas from FlowMatchEulerDiscreteScheduler.from_pretrained on the
             same folder, its `sample_images` loop with DPMSolverMultistepScheduler)
  project    in this process, today's diffusers: the DiT as gen_loading builds and loads it,
             generator.flow_loss, sampling.denoise with sampling.make_scheduler

and prints the relative L2 differences (DiT output with padding in the caption mask, flow loss
at fixed sigmas and noise, a 20-step CFG sample at a fixed seed), plus the DiT difference the
project had before the positional embedding was made explicit.

    python tools/reference_parity.py --side /tmp/ref_side             # prints the pip command if empty
    python tools/reference_parity.py --side /tmp/ref_side --flavor 1b --layers 28   # the full Sana 600M
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
PIN = "diffusers==0.32.2"
STEPS, GUIDANCE, SEED = 20, 4.5, 42


# -------------------------------------------------------------------------- the reference side
def reference(work: Path) -> None:
    """Runs with diffusers 0.32.2 imported: the reference's code paths, written as it has them
    (unilip/model/language_model/unilip_internvl.py: forward's flow loss, sample_images)."""
    import diffusers
    import torch.nn.functional as F
    from diffusers import DPMSolverMultistepScheduler, FlowMatchEulerDiscreteScheduler, SanaTransformer2DModel
    from diffusers.utils.torch_utils import randn_tensor
    assert diffusers.__version__ == "0.32.2", diffusers.__file__
    inp = torch.load(work / "inputs.pt")
    dit = SanaTransformer2DModel.from_pretrained(str(work / "sana"), subfolder="transformer").eval()
    out = {"version": diffusers.__version__}
    with torch.no_grad():
        out["dit"] = dit(inp["x"], timestep=inp["t"], encoder_hidden_states=inp["enc"],
                         encoder_attention_mask=inp["mask"], return_dict=False)[0]
        # training: indices into the FlowMatch scheduler the reference builds from SANA's
        # scheduler folder (a DPM-Solver config: its shift is not read, 1.0)
        sched = FlowMatchEulerDiscreteScheduler.from_pretrained(str(work / "sana"), subfolder="scheduler")
        x0, noise = inp["x0"], inp["noise"]
        indices = (inp["u"] * sched.config.num_train_timesteps).long()
        timesteps = sched.timesteps[indices]
        step_indices = [(sched.timesteps == t).nonzero().item() for t in timesteps]
        sigmas = sched.sigmas[step_indices].flatten().view(-1, 1, 1, 1)
        noisy = (1.0 - sigmas) * x0 + sigmas * noise
        pred = dit(noisy, timestep=timesteps, encoder_hidden_states=inp["enc"],
                   encoder_attention_mask=inp["mask"], return_dict=False)[0]
        out["loss"] = F.mse_loss(pred.float(), (noise - x0).float(), reduction="none").flatten(1).mean(1)
        # sampling: sample_images (null rows first), fp32 here
        scheduler = DPMSolverMultistepScheduler.from_pretrained(str(work / "sana"), subfolder="scheduler")
        enc, mask = inp["enc_cfg"], inp["mask_cfg"]
        latents = randn_tensor(tuple(inp["shape"]), generator=torch.Generator().manual_seed(SEED),
                               dtype=torch.float32)
        scheduler.set_timesteps(STEPS)
        for t in scheduler.timesteps:
            x = latents.repeat(2, 1, 1, 1)
            v = dit(x, timestep=t.unsqueeze(0).expand(x.shape[0]).to(torch.long), encoder_hidden_states=enc,
                    encoder_attention_mask=mask, return_dict=False)[0].float()
            v_u, v_c = v.chunk(2)
            latents = scheduler.step(v_u + GUIDANCE * (v_c - v_u), t, latents).prev_sample
        out["sample"] = latents
    torch.save(out, work / "reference.pt")


# ---------------------------------------------------------------------------- the project side
def make_inputs(work: Path, flavor_name: str, layers: int, batch: int) -> dict:
    """A SANA directory as published (random weights) and fixed inputs."""
    from diffusers import SanaTransformer2DModel

    from unilip_ds.inference.sampling import make_scheduler
    from unilip_ds.models.flavors import get_flavor
    flavor = get_flavor(flavor_name)
    published = dict(flavor.sana, **({"num_layers": layers} if layers else {}))
    torch.manual_seed(0)
    dit = SanaTransformer2DModel(**published)
    with torch.no_grad():  # zero-initialised parts (output layer, gates) would hide differences
        for p in dit.parameters():
            p.add_(0.02 * torch.randn_like(p))
    dit.save_pretrained(str(work / "sana" / "transformer"))
    conf = work / "sana" / "transformer" / "config.json"  # as published: the key unset
    c = json.loads(conf.read_text())
    c.pop("interpolation_scale", None)
    conf.write_text(json.dumps(c, indent=2))
    make_scheduler(3.0).save_pretrained(str(work / "sana" / "scheduler"))
    side, t_len, ch = published["sample_size"], 40, published["caption_channels"]
    g = torch.Generator().manual_seed(1)
    mask = torch.ones(batch, t_len)
    for i in range(1, batch):  # padding in every row but the first
        mask[i, t_len - 7 * i:] = 0
    enc = torch.randn(batch, t_len, ch, generator=g)
    inp = {"x": torch.randn(batch, 32, side, side, generator=g),
           "t": torch.linspace(980.0, 20.0, batch),
           "enc": enc, "mask": mask,
           "x0": torch.randn(batch, 32, side, side, generator=g),
           "noise": torch.randn(batch, 32, side, side, generator=g),
           "u": torch.sigmoid(torch.randn(batch, generator=g)),
           "enc_cfg": torch.cat([torch.randn(batch, t_len, ch, generator=g), enc]),
           "mask_cfg": torch.cat([torch.ones(batch, t_len), mask]),
           "shape": [batch, 32, side, side]}
    torch.save(inp, work / "inputs.pt")
    return inp


def project(work: Path, flavor_name: str, inp: dict, pos_embed: bool = True) -> dict:
    """The same quantities through the project's code paths."""
    from functools import partial

    from diffusers import SanaTransformer2DModel

    from unilip_ds.engine.weights import load_component
    from unilip_ds.inference.sampling import denoise, make_scheduler
    from unilip_ds.models.flavors import get_flavor
    from unilip_ds.models.gen_loading import sana_config
    from unilip_ds.models.generator import dit_velocity, flow_loss
    saved = json.loads((work / "sana" / "transformer" / "config.json").read_text())
    config = dict(sana_config(get_flavor(flavor_name), pos_embed), num_layers=saved["num_layers"])
    dit = SanaTransformer2DModel(**config).eval()
    load_component(dit, work / "sana" / "transformer")  # as load_pretrained reads model.sana_path
    velocity = partial(dit_velocity, dit, dtype=torch.float32)
    out = {}
    with torch.no_grad():
        out["dit"] = velocity(inp["x"], inp["t"], inp["enc"], inp["mask"])
        out["loss"] = flow_loss(velocity, inp["x0"], inp["enc"], inp["mask"], u=inp["u"], noise=inp["noise"],
                                shift=1.0)["loss"]
        out["sample"] = denoise(velocity, inp["enc_cfg"], inp["mask_cfg"], inp["shape"], STEPS, GUIDANCE,
                                make_scheduler(3.0), generator=torch.Generator().manual_seed(SEED))
    return out


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--side", required=True, help=f"a folder with {PIN} installed (--target)")
    ap.add_argument("--flavor", default="1b", help="flavor whose SANA config is used (default 1b: Sana 600M)")
    ap.add_argument("--layers", type=int, default=2, help="DiT depth (0: the flavor's; default 2 for CPU time)")
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--work", default=None, help="scratch folder (default: a new temporary one)")
    ap.add_argument("--role", default="project", choices=["project", "reference"], help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    side = Path(args.side)
    if args.role == "reference":
        reference(Path(args.work))
        return 0
    if not (side / "diffusers" / "__init__.py").is_file():
        print(f"reference_parity: {side} holds no diffusers; make it with:\n"
              f"  {sys.executable} -m pip install --no-deps --target {side} {PIN}", file=sys.stderr)
        return 2
    work = Path(args.work or tempfile.mkdtemp(prefix="ref_parity_"))
    work.mkdir(parents=True, exist_ok=True)
    inp = make_inputs(work, args.flavor, args.layers, args.batch)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(side.resolve()), str(REPO)]))
    proc = subprocess.run([sys.executable, __file__, "--role", "reference", "--side", str(side), "--work", str(work)],
                          env=env, cwd=str(work), capture_output=True, text=True)
    if proc.returncode:
        print(proc.stderr[-3000:], file=sys.stderr)
        return proc.returncode
    ref = torch.load(work / "reference.pt")
    ours = project(work, args.flavor, inp)
    before = project(work, args.flavor, inp, pos_embed=False)
    import diffusers
    print(f"SANA {args.flavor} config, {json.loads((work / 'sana/transformer/config.json').read_text())['num_layers']}"
          f" layers, batch {args.batch}, fp32 CPU; reference: diffusers {ref['version']} (second process), "
          f"project: diffusers {diffusers.__version__}")
    print("| quantity | relative L2, project vs reference |\n|---|---|")
    print(f"| DiT output (padded caption mask) | {rel(ours['dit'], ref['dit']):.2e} |")
    print(f"| flow loss per sample, fixed sigmas + noise | {rel(ours['loss'], ref['loss']):.2e} "
          f"(ref {ref['loss'].tolist()}) |")
    print(f"| {STEPS}-step DPM-Solver sample, CFG {GUIDANCE}, seed {SEED} | {rel(ours['sample'], ref['sample']):.2e} |")
    print(f"| DiT output, no positional embedding (gen.dit_pos_embed=false, the project before) | "
          f"{rel(before['dit'], ref['dit']):.2e} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
