"""Stage 4: near-duplicate removal with MinHash LSH and connected components, on Ray.

`run_near_dedup` runs the whole stage through a `fan_out` (tasks.fanout.run_shards with the
store bound); `removed_ids` gives the tokenize stage one docs shard's removed ids.
"""

from tasks.near_dedup.minhash import MinHasher, normalize
from tasks.near_dedup.stage import SAMPLE_KEY, STAGE, DocsShard, FanOut, removed_ids, run_near_dedup
from tasks.near_dedup.task import near_dedup

__all__ = ["SAMPLE_KEY", "STAGE", "DocsShard", "FanOut", "MinHasher", "near_dedup", "normalize", "removed_ids", "run_near_dedup"]
