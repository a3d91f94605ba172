#!/usr/bin/env python
"""SFT sets (BLIP3o-60k tars, ShareGPT-4o-Image json + images) -> shards + manifest.

    python data_prep/shard_sft.py --kind t2i --src /raw/BLIP3o-60k/ --dst /data/sft_t2i
    python data_prep/shard_sft.py --kind t2i --src /raw/sharegpt4o/text_to_image.json \\
        --dst /data/sft_sharegpt_t2i
    python data_prep/shard_sft.py --kind edit --src /raw/sharegpt4o/image_editing.json \\
        --dst /data/sft_sharegpt_edit

ShareGPT-4o-Image records use `input_prompt`, `input_image` (a one-element list) and
`output_image`; these names are among the ones detected.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from data_prep.sharding import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(None, __doc__))
