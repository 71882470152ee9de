"""Ray job entry point for the per-task fine-tunes.

    ray job submit --address http://HEAD:8265 --working-dir . -- \
        python ray_jobs/finetune.py --config configs/finetune-cluster.yaml

Inside a Ray job RAY_ADDRESS points at the cluster: one DeepSpeed job (a Ray Train group of
rank workers) per task, several at once. Paths in the config must be on shared storage.
"""

import sys

from cpift_dist.cli import main

if __name__ == "__main__":
    sys.exit(main(["finetune", *sys.argv[1:]]))
