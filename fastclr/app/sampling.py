"""The one shuffle/shard scheme every training batch source follows (``BatchOrder``): in-memory
arrays, an image folder through DataLoader workers, and DALI's external source."""
from __future__ import annotations

import torch


class BatchOrder:
    """The one shuffle/shard scheme of every training source.

    Epoch ``e`` is the permutation of ``range(n)`` drawn from ``(seed, e)``; global batch ``k``
    is its slice ``[k B, (k + 1) B)`` and rank ``r`` of ``W`` takes the ``r``-th of the ``W``
    equal parts of it. So ``W`` processes of ``B / W`` images see exactly the images one
    process of ``B`` sees, and a run resumed at any batch sees what an uninterrupted one does.
    ``drop_last`` (the training loop's choice: the loss wants full batches) drops the last
    partial global batch; otherwise it is kept (rank by rank, as far as it reaches).
    """

    def __init__(self, n: int, global_batch: int, *, seed: int = 0, rank: int = 0,
                 world_size: int = 1, drop_last: bool = True):
        if global_batch < 1 or global_batch % world_size:
            raise ValueError(f"the global batch ({global_batch}) must be a positive multiple of the "
                             f"number of processes ({world_size})")
        if drop_last and global_batch > n:
            raise ValueError(f"--batch-size {global_batch} is larger than the training set ({n} images)")
        self.n, self.global_batch, self.seed, self.rank = n, global_batch, seed, rank
        self.local = global_batch // world_size
        self.drop_last = drop_last
        self._perm = (None, None)

    def __len__(self) -> int:
        full, rest = divmod(self.n, self.global_batch)
        return full + (1 if rest and not self.drop_last else 0)

    def permutation(self, epoch: int) -> torch.Tensor:
        """Epoch ``epoch``'s order of the ``n`` indices."""
        if self._perm[0] != epoch:
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            self._perm = (epoch, torch.randperm(self.n, generator=g))
        return self._perm[1]

    def batch(self, epoch: int, k: int) -> torch.Tensor:
        """This rank's indices (int64) of global batch ``k`` of ``epoch`` (maybe empty at the
        end of an epoch without drop_last)."""
        lo = k * self.global_batch + self.rank * self.local
        return self.permutation(epoch)[lo:min(lo + self.local, (k + 1) * self.global_batch)]

    def position(self, epoch: int, pos: int) -> int:
        """The index at position ``pos`` of epoch ``epoch``'s order, going round past its end."""
        return int(self.permutation(epoch)[pos % self.n])

    def epoch(self, epoch: int, start: int = 0):
        """This rank's index tensors of batches ``start..len-1`` of ``epoch``."""
        for k in range(start, len(self)):
            yield self.batch(epoch, k)
