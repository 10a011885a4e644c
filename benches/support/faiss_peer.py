"""The FAISS peer of `benches/scale.rs`: the same search through faiss-python.

Reads the database's own index snapshot (`index.faiss` is FAISS's format: the same HNSW graph
and vectors lookalike searches), takes the stored vectors of the ids listed in IDS_FILE (one per
line) as queries, and times `index.search` one query at a time with k + 1 (lookalike's
`nearest_to` leaves the query's own image out) and efSearch 64, as lookalike runs it.

    python3 faiss_peer.py DB/index.faiss IDS_FILE [K]      # needs `pip install faiss-cpu numpy`

Prints one line: p50 and p99 in milliseconds.
"""
import sys
import time

import faiss
import numpy as np

index = faiss.read_index(sys.argv[1])
k = int(sys.argv[3]) if len(sys.argv) > 3 else 10
inner = faiss.downcast_index(index.index)
if isinstance(inner, faiss.IndexHNSW):
    inner.hnsw.efSearch = 64
ids = [int(line) for line in open(sys.argv[2]) if line.strip()]
position = {int(v): i for i, v in enumerate(faiss.vector_to_array(index.id_map))}
queries = np.stack([inner.reconstruct(position[i]) for i in ids]).astype("float32")
latencies = []
for q in queries:
    t = time.perf_counter()
    index.search(q[None, :], k + 1)
    latencies.append((time.perf_counter() - t) * 1e3)
latencies.sort()
print(
    f"FAISSPEER {latencies[len(latencies) // 2]:.4f} {latencies[int(len(latencies) * 0.99)]:.4f} "
    f"faiss {faiss.__version__}"
)
