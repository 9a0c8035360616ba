"""The run's random streams. Every random draw of a run comes from a ``torch.Generator`` seeded by
:func:`stream_seed` of the run's seed and integers naming the draw, so that batches are a pure
function of (seed, step, micro-batch) and a resumed run draws what an uninterrupted one would.

``STREAMS`` names the one-off draws outside the loop; ``TAGS`` the integers that keep the other
streams apart. Add a new stream to one of these tables, never as a bare number at the call site.
"""

from __future__ import annotations

import numpy as np


def stream_seed(*parts: int) -> int:
    """A 63-bit seed mixing several integers (numpy's SeedSequence)."""
    return int(np.random.SeedSequence([int(p) & 0xFFFFFFFF for p in parts]).generate_state(2, np.uint32).astype(np.uint64)
               .dot(np.array([1 << 32, 1], dtype=np.uint64)) & ((1 << 63) - 1))


# one-off draws outside the loop (teacher-sample pools, DMD's regression pairs, the GAN head's probe,
# validation samples) have named streams at negative positions of the (step, rank) space, which loop
# iterations never reach
STREAMS = {"pool": -1, "gan_probe": -3, "regression_pairs": -7, "validation": -10**9}

# the integers that keep a step's streams apart (each the last or a middle part of stream_seed's input)
TAGS = {
    "batch": 0,  # (seed, step, 0, micro): noise, times, prompt choice
    "items": 1,  # (seed, step, 1, micro): the large-set path's item indices and VAE noise
    "item_crop": 17,  # (seed, item, 17) and, in a stream, (seed, step, micro, j, 17): an item's random crop
    "cache_noise": 23,  # (seed, item, 23): the VAE sample of item i in a data cache
    "stream_window": 29,  # (seed, epoch, rank, window, 29): the permutation of a stream's window
}
