"""The tensors the engine keeps KV in, and their byte counts (read from real storage, spare included).

- `KVRun`: the exact-size keys and values of one run of tokens, a tree node's payload. Shared by
  reference: every running request that uses a run reads the same tensors.
- `RowBuffer`: a running request's private KV (what no run holds yet: its uncached prompt tail and
  its reply), preallocated for the whole request so it never regrows.

Shapes come from the model's KV layout (`attention.kv_layout`: each layer's KV heads and head dim).
How a forward reads these is `attention.py`.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

Layout = Sequence[tuple[int, int]]  # per layer: (KV heads, head dim)


class KVRun:
    """Keys and values of a run of consecutive tokens, per layer [kv_heads, n, head_dim]: exact-size,
    except the larger side of a split, a view whose whole storage `nbytes` counts."""

    __slots__ = ("keys", "values")

    def __init__(self, keys: list[torch.Tensor], values: list[torch.Tensor]) -> None:
        self.keys, self.values = keys, values

    @property
    def num_tokens(self) -> int:
        return self.keys[0].shape[1]

    @property
    def nbytes(self) -> int:
        return sum(t.untyped_storage().nbytes() for t in (*self.keys, *self.values))

    def split(self, at: int) -> tuple[KVRun, KVRun]:
        """Positions [0, at) and [at, n) as two runs. The smaller side is copied; the larger stays a
        view of this run's storage, which therefore stays alive and is counted whole (`nbytes`
        reads the storage): a split costs at most half the run, in time and in bytes."""
        def part(lo: int, hi: int | None, copy: bool) -> KVRun:
            take = (lambda t: t[:, lo:hi].clone()) if copy else (lambda t: t[:, lo:hi])
            return KVRun([take(k) for k in self.keys], [take(v) for v in self.values])

        head_is_smaller = at <= self.num_tokens - at
        return part(0, at, head_is_smaller), part(at, None, not head_is_smaller)


class RowBuffer:
    """A running request's private KV: preallocated per layer [kv_heads, capacity, head_dim]."""

    def __init__(self, layout: Layout, capacity_tokens: int, device: torch.device, dtype: torch.dtype) -> None:
        shapes = [(kv_heads, capacity_tokens, head_dim) for kv_heads, head_dim in layout]
        self.keys = [torch.empty(shape, device=device, dtype=dtype) for shape in shapes]
        self.values = [torch.empty(shape, device=device, dtype=dtype) for shape in shapes]
        self.num_tokens = 0

    @property
    def capacity_tokens(self) -> int:
        return self.keys[0].shape[1]

    @property
    def nbytes(self) -> int:
        return sum(t.untyped_storage().nbytes() for t in (*self.keys, *self.values))

    def filled(self, layer: int, new_tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
        """This layer's keys and values up to and including the `new_tokens` being fed."""
        end = self.num_tokens + new_tokens
        return self.keys[layer][:, :end], self.values[layer][:, :end]

    def append_run(self, run: KVRun, num_tokens: int) -> None:
        """Copy the first `num_tokens` positions of `run` after what the buffer holds."""
        end = self.num_tokens + num_tokens
        for mine, theirs in zip((*self.keys, *self.values), (*run.keys, *run.values), strict=True):
            mine[:, self.num_tokens : end].copy_(theirs[:, :num_tokens])
        self.num_tokens = end

    def as_run(self) -> KVRun:
        """The buffer, full, as a run of its own tensors (no copy): a published system prompt."""
        assert self.num_tokens == self.capacity_tokens
        return KVRun(self.keys, self.values)

    def take_run(self, num_tokens: int | None = None, start: int = 0) -> KVRun:
        """Turn `num_tokens` positions (all it holds by default) from `start` into an exact-size
        run, one tensor at a time, freeing each buffer tensor as soon as it is copied: at most
        `transient_nbytes` are ever held twice. The buffer is empty afterwards."""
        num_tokens = self.num_tokens - start if num_tokens is None else num_tokens
        keys, values = [], []
        for mine, theirs in ((self.keys, keys), (self.values, values)):
            for layer, buffer in enumerate(mine):
                theirs.append(buffer[:, start : start + num_tokens].clone())
                mine[layer] = buffer.new_empty((0,))
        self.num_tokens = 0
        return KVRun(keys, values)

    @staticmethod
    def transient_nbytes(num_tokens: int, bytes_per_token: int, layers: int) -> int:
        """Extra bytes `take_run` holds at its peak: one layer's keys (or values)."""
        return -(-num_tokens * bytes_per_token // (2 * layers))


def bytes_per_token(layout: Layout, device: torch.device, dtype: torch.dtype) -> int:
    """Bytes one position of KV takes, measured on a real one-token buffer."""
    return RowBuffer(layout, 1, device, dtype).nbytes
