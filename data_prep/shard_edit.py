#!/usr/bin/env python
"""Image-editing data (GPT-Image-Edit-style json + image folders) -> shards + manifest.

    python data_prep/shard_edit.py --src /raw/gpt-edit/jsons/ --image-root /raw/gpt-edit \\
        --dst s3://bucket/gpt_edit --resize 1024

Json field names are detected (the names below) or given with --input-field,
--output-field, --text-field. Re-running finishes an interrupted run.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from data_prep.sharding import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main("edit", __doc__))
