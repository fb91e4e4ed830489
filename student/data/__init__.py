"""Streaming a clip store into training batches, in an order that is a pure function of
(seed, epoch, position), so a stopped run resumes on exactly the samples it would have seen.

A rank starts from the store's manifest alone (shard names, clips per shard, held-out clips per
shard): an epoch is planned as arithmetic on per-shard counts, so start-up costs O(shards) in
time and memory however many clips the store holds. A shard's index file (clip ids, video ids) is
read only by the loader worker that opens the shard, to check the shard's keys against it and to
find which of its rows the pass reads; a worker keeps a few shards open, least recently used first
to go.

One module per idea, each saying more:

    store       what a rank knows of a store at start (schema, statistics, per-shard counts)
    selection   which clips a pass reads; the held-out split
    order       the shuffle buffer and the keyed Feistel permutation, computed on positions alone
    plan        an epoch (and an elastic resume's phases) as index arithmetic
    shards      opening and reading shards in a loader worker, every clip checked
    errors      how damaged stores and bad clips are reported
    loader      the DataLoader through all epochs, evaluation batches, the bad-clip budget
    synthetic   batches from memory, for benchmarks
"""

from student.data.errors import StoreContentError, TooManyBadClipsError
from student.data.loader import TrainData, epoch_clip_ids, eval_batches, jitter_frames
from student.data.order import FeistelPermutation, ShuffleBuffer
from student.data.plan import PLAN_VERSION, EpochPlan, plan_epoch, rank_batches
from student.data.selection import Selection, heldout_split
from student.data.store import FORMATS, SchemaMismatchError, StoreInfo, check_store_matches, read_store
from student.data.synthetic import synthetic_batches

__all__ = [
    "FORMATS", "PLAN_VERSION", "EpochPlan", "FeistelPermutation", "SchemaMismatchError", "Selection", "ShuffleBuffer",
    "StoreContentError", "StoreInfo", "TooManyBadClipsError", "TrainData", "check_store_matches", "epoch_clip_ids",
    "eval_batches", "heldout_split", "jitter_frames", "plan_epoch", "rank_batches", "read_store", "synthetic_batches",
]
