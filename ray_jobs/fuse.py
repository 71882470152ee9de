"""Ray job entry point for the fusion.

    ray job submit --address http://HEAD:8265 --working-dir . -- \
        python ray_jobs/fuse.py --config configs/analyze-example.yaml \
            --masks runs/example/analysis/masks --out runs/example/fusion/backbone

Inside a Ray job RAY_ADDRESS points at the cluster: one Ray task per output shard (a GPU each
with --device cuda). Inputs and output must be on storage every node can read.
"""

import sys

from cpift_dist.cli import main

if __name__ == "__main__":
    sys.exit(main(["fuse", *sys.argv[1:]]))
