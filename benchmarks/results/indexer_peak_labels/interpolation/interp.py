"""Weight-space interpolation between the zero-shot (init) indexer and a trained one: W = (1-a) W0 + a W1.

python interp.py INIT_DIR TRAINED_DIR OUT_DIR 0.3,0.5,0.7     # writes OUT_DIR/ck_a30, ck_a50, ck_a70
"""

import sys
from pathlib import Path

from flashmemory.indexer.checkpoint import load_indexer, save_indexer

init, trained, out = Path(sys.argv[1]), Path(sys.argv[2]), Path(sys.argv[3])
for a in (float(x) for x in sys.argv[4].split(",")):
    w0 = load_indexer(init)
    w1 = load_indexer(trained)
    s0, s1 = w0.state_dict(), w1.state_dict()
    mixed = {k: (1 - a) * s0[k] + a * s1[k] if s0[k].is_floating_point() else s1[k] for k in s1}
    w1.load_state_dict(mixed)
    target = out / f"ck_a{int(a * 100):02d}"
    save_indexer(w1, target, extra={"interpolation": {"alpha": a, "init": str(init), "trained": str(trained)}})
    print("wrote", target)
