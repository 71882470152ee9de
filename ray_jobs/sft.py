"""Ray job entry point for the final SFT (CPI-FT's masked stages, or a baseline).

    ray job submit --address http://HEAD:8265 --working-dir . -- \
        python ray_jobs/sft.py --config configs/cluster.yaml [--method multitask]

Each stage is one DeepSpeed job (a Ray Train group of rank workers) on the cluster that
RAY_ADDRESS names. Paths in the config must be on shared storage.
"""

import sys

from cpift_dist.cli import main

if __name__ == "__main__":
    sys.exit(main(["sft", *sys.argv[1:]]))
