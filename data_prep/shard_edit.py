#!/usr/bin/env python
"""Image-editing data (GPT-Image-Edit-1.5M and similar) -> validated shards + manifest.

    python data_prep/shard_edit.py --src /raw/GPT-Image-Edit-1.5M/gpt-edit \\
        --dst s3://bucket/gpt_edit --resize 1024
    python data_prep/shard_edit.py --src /raw/GPT-Image-Edit-1.5M/gptedit.txt \\
        --dst s3://bucket/gpt_edit_ref --resize 1024

The first reads every task folder's metadata/<src>_<task>.json (paths relative to its
task folder) of the extracted archives; the second the reference's list file of
LLaVA-style jsons. Json field names are detected (the names below) or given with
--input-field, --output-field, --text-field. Re-running with the same arguments finishes
an interrupted run.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from data_prep.sharding import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main("edit", __doc__))
