"""Stage 4: near-duplicate removal with MinHash LSH and connected components, on Ray.

`run_near_dedup` runs the whole stage, one tasks.stage.Stage per step; the ids it removed are
read back through tasks.removals.
"""

from tasks.near_dedup.steps import STAGE, DocsShard, run_near_dedup
from tasks.near_dedup.task import near_dedup

__all__ = ["STAGE", "DocsShard", "near_dedup", "run_near_dedup"]
