#!/usr/bin/env python
"""BLIP3o-style text-to-image data -> validated shards + manifest.

    python data_prep/shard_blip3o.py --src /raw/BLIP3o-Pretrain-Long-Caption/ \\
        --dst s3://bucket/blip3o_long --resize 1024

Re-running with the same arguments finishes an interrupted run (shards verified by the
manifest are kept); other arguments or changed sources are refused (--restart).
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from data_prep.sharding import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main("t2i", __doc__))
