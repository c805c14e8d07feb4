"""DDP on N GPUs vs 1: mmsae.train (TopK) on synthetic activations with 4096 known features, same data,
global batch (4096 = N × 4096/N) and token budget. Rank 0 scores the SAE on held-out tokens. Wall time covers
the whole `mmsae.train` call (DDP's process launch included).

    python benchmarks/bench_ddp.py 1 && python benchmarks/bench_ddp.py 2     # on a 2-GPU machine
"""

import json
import logging
import os
import sys
import time

import mmsae
from mmsae.datasets.synthetic import SyntheticActivations
from mmsae.metrics import evaluate
from mmsae.sae import default_lr

logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)
devices, tokens = int(sys.argv[1]), 16_000_000
gen = SyntheticActivations(d=256, n_directions=4096, mean_active=8, seed=0)
x = gen.sample(1 << 21)  # identical on every rank (a pure function of the seed)
start = time.perf_counter()
sae = mmsae.train(
    x,
    sae="topk",
    n_features=4096,
    k=8,
    tokens=tokens,
    batch_size=4096 // devices,
    devices=devices,
    lr=3 * default_lr(4096),
)
seconds = time.perf_counter() - start
if int(os.environ.get("LOCAL_RANK", 0)) == 0:
    m = evaluate(sae.cuda(), gen.batches(8192, 262144, offset=2**40), features=gen.features)
    result = {
        "devices": devices,
        "seconds": round(seconds, 1),
        "tok_s": round(tokens / seconds),
        **{k: round(float(v), 4) for k, v in m.items()},
    }
    print("RESULT", json.dumps(result), flush=True)
