"""Mean size of the lookahead target of step 0 per prompt kind in a dump (how diffuse its labels are).

python benchmarks/results/indexer_training_variants/label_spread.py DUMP_DIR
"""

import collections
import sys

from flashmemory.dump.labels import from_csr
from flashmemory.dump.shards import iter_records

stats = collections.defaultdict(list)
for meta, rec in iter_records(sys.argv[1]):
    golden = from_csr(rec)
    union = set()
    for ids in golden[1:65]:
        union |= set(ids.tolist())
    stats[meta["kind"]].append((len(union), rec["chunk_keys"].shape[2]))
print("| kind | prompts | golden chunks in the step-0 target (mean) | chunks (mean) |")
print("|---|---|---|---|")
for kind, rows in sorted(stats.items()):
    golden, chunks = (sum(r[i] for r in rows) / len(rows) for i in (0, 1))
    print(f"| {kind} | {len(rows)} | {golden:.1f} | {chunks:.1f} |")
