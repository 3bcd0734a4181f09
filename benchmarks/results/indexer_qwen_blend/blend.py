"""Weight-space blends of the long-dump candidate A with the zero-shot indexer it started from.

Candidate A (``../indexer_qwen_long_dump_h200/``) holds ``0.3 * zero-shot + 0.7 * trained`` weights. A blend at
``alpha`` holds ``(1 - alpha) * zero-shot + alpha * trained``, which is
``zero-shot + (alpha / 0.7) * (A - zero-shot)``: ``flashmemory blend`` with weight ``alpha / 0.7``; no training
is repeated.

Usage: ``python blend.py CKPT_A INIT_INDEXER OUT_DIR 0.2,0.35,0.5`` (``INIT_INDEXER``: a Qwen dump's
``init_indexer`` folder, target layer 13). Writes ``OUT_DIR/alpha_<a>/``.
"""

import sys
from pathlib import Path

from flashmemory.indexer.checkpoint import blend_indexers

A_INTERPOLATE = 0.7


def main() -> None:
    ck_a, init, out = Path(sys.argv[1]), Path(sys.argv[2]), Path(sys.argv[3])
    for alpha in (float(x) for x in sys.argv[4].split(",")):
        print(blend_indexers(init, ck_a, alpha / A_INTERPOLATE, out / f"alpha_{alpha:g}"))


if __name__ == "__main__":
    main()
