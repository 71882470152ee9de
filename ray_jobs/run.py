"""Ray job entry point for the whole pipeline (`cpift run`).

    ray job submit --address http://HEAD:8265 --working-dir . \
        --runtime-env-json '{"excludes": ["runs/", ".git/", ".venv/", "bench/_data/"]}' -- \
        python ray_jobs/run.py configs/cluster.yaml

Inside a Ray job RAY_ADDRESS points at the cluster; every stage schedules its work there.
``runs_dir`` in the config must be on storage that every node reads.
"""

import sys

from cpift_dist.cli import main

if __name__ == "__main__":
    sys.exit(main(["run", *sys.argv[1:]]))
