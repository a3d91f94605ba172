#!/usr/bin/env python
"""SFT sets (BLIP3o-60k tars, ShareGPT-4o-Image jsons + part tars) -> shards + manifest.

    python data_prep/shard_sft.py --kind t2i --src /raw/BLIP3o-60k/ --dst /data/sft_t2i
    python data_prep/shard_sft.py --kind t2i --src /raw/ShareGPT-4o-Image/text_to_image.json \\
        --dst /data/sft_sharegpt_t2i
    python data_prep/shard_sft.py --kind edit \\
        --src /raw/ShareGPT-4o-Image/text_and_image_to_image.json --dst /data/sft_sharegpt_edit

ShareGPT-4o-Image records use `input_prompt`, `input_image` (a list; records with more
than one input image are skipped as `several_input_images`) and `output_image`; the
images are read from the *_part_N.tar files next to the jsons by member name, without
extracting them.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from data_prep.sharding import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(None, __doc__))
