"""One intra-op thread: these tests run tiny models, where thread start-up and oversubscription of a
shared 2-core machine cost far more than they save (measured: a 1-epoch run took 7x longer)."""

from __future__ import annotations

import torch

torch.set_num_threads(1)
