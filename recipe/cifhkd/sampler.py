"""Length-bucketed batches for the recipe's data loaders (imports neither torch nor numpy:
the ONNX runtime path uses it too)."""

import math
import random
from typing import Iterator, List, Optional, Sequence


class BucketBatchSampler:
    """Batches of similar-length utterances, capped by padded seconds, in an order fixed
    by (seed, epoch) and resumable mid-epoch.

    Utterances are sorted by duration and cut into ``num_buckets`` equal-count buckets;
    each bucket is shuffled and packed greedily into batches whose padded length
    ``max(duration) * batch_size`` stays within ``max_batch_seconds`` (and at most
    ``max_batch_size`` utterances); then the batches of all buckets are shuffled together.
    An utterance longer than max_batch_seconds forms a batch of its own. drop_last drops
    each bucket's last batch when it is less than half full.

    Resuming: ``state_dict()`` returns ``{"epoch", "seed", "batches_done"}``;
    ``load_state_dict`` makes the next iteration skip the batches already done. Iterating
    advances ``batches_done``; call ``set_epoch`` at the start of each epoch.
    """

    def __init__(
        self,
        durations: Sequence[float],
        max_batch_seconds: float,
        *,
        max_batch_size: int = 10**9,
        num_buckets: int = 10,
        shuffle: bool = True,
        seed: int = 0,
        drop_last: bool = False,
    ):
        if not durations:
            raise ValueError("BucketBatchSampler: durations is empty")
        if any(d is None or not math.isfinite(d) or d <= 0 for d in durations):
            raise ValueError(
                "BucketBatchSampler: every duration must be a positive number "
                "(run data.check_audio first to fill them in)"
            )
        if max_batch_seconds <= 0 or max_batch_size < 1 or num_buckets < 1:
            raise ValueError(
                "BucketBatchSampler: max_batch_seconds > 0, max_batch_size >= 1 and num_buckets >= 1 expected"
            )
        self.durations = list(durations)
        self.max_batch_seconds = max_batch_seconds
        self.max_batch_size = max_batch_size
        self.num_buckets = num_buckets
        self.shuffle = shuffle
        self.seed = seed
        self.drop_last = drop_last
        self.epoch = 0
        self.batches_done = 0
        self._cache = None

    def set_epoch(self, epoch: int):
        if epoch != self.epoch:
            self.epoch = epoch
            self.batches_done = 0

    def batches(self) -> List[List[int]]:
        """All batches of the current epoch, in order (deterministic)."""
        if self._cache is not None and self._cache[0] == (self.seed, self.epoch):
            return self._cache[1]
        rng = random.Random(self.seed * 1_000_003 + self.epoch)
        order = sorted(range(len(self.durations)), key=lambda i: (self.durations[i], i))
        size = math.ceil(len(order) / self.num_buckets)
        result = []
        for start in range(0, len(order), size):
            bucket = order[start : start + size]
            if self.shuffle:
                rng.shuffle(bucket)
            batch, longest = [], 0.0
            for i in bucket:
                new_longest = max(longest, self.durations[i])
                if batch and (
                    new_longest * (len(batch) + 1) > self.max_batch_seconds or len(batch) >= self.max_batch_size
                ):
                    result.append(batch)
                    batch, new_longest = [], self.durations[i]
                batch.append(i)
                longest = new_longest
            if batch and not (self.drop_last and longest * len(batch) < self.max_batch_seconds / 2):
                result.append(batch)
        if self.shuffle:
            rng.shuffle(result)
        self._cache = ((self.seed, self.epoch), result)
        return result

    def __len__(self) -> int:
        return len(self.batches())

    def __iter__(self) -> Iterator[List[int]]:
        batches = self.batches()
        while self.batches_done < len(batches):
            batch = batches[self.batches_done]
            self.batches_done += 1
            yield batch

    def state_dict(self, batches_done: Optional[int] = None) -> dict:
        """batches_done: the batches the training loop has consumed, when a DataLoader
        prefetches ahead of it (default: the batches this sampler has yielded)."""
        done = self.batches_done if batches_done is None else batches_done
        return {"epoch": self.epoch, "seed": self.seed, "batches_done": done}

    def load_state_dict(self, state: dict):
        self.seed = state["seed"]
        self.epoch = state["epoch"]
        self.batches_done = state["batches_done"]


def rank_batches(sampler: BucketBatchSampler, rank: int, world_size: int) -> List[List[int]]:
    """This rank's share of the epoch's batches: global batch i goes to rank i % world;
    the tail that does not fill every rank is dropped so that ranks step together."""
    batches = sampler.batches()
    usable = len(batches) - len(batches) % world_size
    return batches[rank:usable:world_size]
