"""Streaming checkpoint IO: lazy sharded reads, bounded-memory sharded writes, manifests."""

from cpift_dist.io.atomic import atomic_dir, check_room
from cpift_dist.io.checkpoint import (Checkpoint, CheckpointReader, TensorInfo,
                                      compare_checkpoints, read_header, widened)
from cpift_dist.io.manifest import (checkpoint_digest, file_digest, read_manifest, sha256_file,
                                    verify_outputs, write_manifest)
from cpift_dist.io.shard_writer import ShardWriter

__all__ = [
    "Checkpoint", "CheckpointReader", "ShardWriter", "TensorInfo", "atomic_dir", "check_room",
    "checkpoint_digest", "compare_checkpoints", "file_digest", "read_header", "read_manifest",
    "sha256_file", "verify_outputs", "widened", "write_manifest",
]
