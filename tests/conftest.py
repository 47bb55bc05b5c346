"""Shared pytest set-up (kept minimal).

pytest's default import mode puts ``tests/`` on ``sys.path``, so test modules import the
generators in ``strategies.py`` directly; a tool that wants them adds ``tests/`` itself.
"""

import torch

# One intra-op thread, as the tools and the benchmarks run: the machines have two cores, and
# a parent whose OpenMP pool is running can leave a forked DataLoader worker waiting on a
# lock of that pool (a fork-context test hung once while a second test run shared the cores).
torch.set_num_threads(1)
