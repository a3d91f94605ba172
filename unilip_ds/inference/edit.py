"""Image editing from a gen export (a UniLIPPipeline directory):

    python -m unilip_ds.inference.edit --ckpt exports/gen_stage2 --image in.jpg \\
        --instruction "flip the image horizontally" [--image ... --instruction ...] \\
        [--steps 20] [--guidance 4.5] [--seed 0] [--num-images 1] [--flow-shift 3.0] --out edits/

Each input is squashed to the model's resolution, as in training. Writes `<image#>_<k>.png`,
a side-by-side `<image#>_<k>_side_by_side.png` (input | edited) and `run.json`. The options
are those of unilip_ds.inference.generate.
"""

import sys

from unilip_ds.inference.generate import main

if __name__ == "__main__":
    sys.exit(main(edit=True, doc=__doc__))
