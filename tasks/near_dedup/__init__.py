"""Stage 4: near-duplicate removal with MinHash LSH and connected components, on Ray.

`run_near_dedup` runs the whole stage, one tasks.stage.Stage per step; `near_duplicate_ids`
gives one docs shard's removed ids.
"""

from tasks.near_dedup.minhash import MinHasher, normalize
from tasks.near_dedup.steps import STAGE, DocsShard, near_duplicate_ids, run_near_dedup
from tasks.near_dedup.task import near_dedup

__all__ = ["STAGE", "DocsShard", "MinHasher", "near_dedup", "near_duplicate_ids", "normalize", "run_near_dedup"]
