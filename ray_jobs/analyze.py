"""Ray job entry point for the delta analysis.

    ray job submit --address http://HEAD:8265 --working-dir . -- \
        python ray_jobs/analyze.py --config configs/analyze-example.yaml

Inside a Ray job RAY_ADDRESS points at the cluster, so the analysis joins it (instead of
starting a local Ray) and fans its units out over the cluster's workers. Checkpoints and the
output directory must be on storage every node can read.
"""

import sys

from cpift_dist.cli import main

if __name__ == "__main__":
    sys.exit(main(["analyze", *sys.argv[1:]]))
