"""The FAISS peer of `benches/scale.rs`: the same search through faiss-python.

Reads the database's own index snapshot (FAISS's format: the same HNSW graph and vectors
lookalike searches; `index.faiss` holds all of it but the vectors, which are in
`index.vectors` and go back in before the IDMap's ids: see src/index/snapshot.rs), takes the
stored vectors of the ids listed in IDS_FILE (one per line) as queries, and times `index.search`
one query at a time with k + 1 (lookalike's `nearest_to` leaves the query's own image out) and
efSearch 64, as lookalike runs it, after one untimed pass over the same queries.

    python3 faiss_peer.py DB/index.faiss IDS_FILE [K]      # needs `pip install faiss-cpu numpy`

Prints one line: p50 and p99 in milliseconds.
"""
import os
import sys
import time

import faiss
import numpy as np


def read_snapshot(path):
    graph = open(path, "rb").read()
    vectors_path = os.path.join(os.path.dirname(path), "index.vectors")
    if not os.path.exists(vectors_path):
        return faiss.read_index(path)  # stamp format 1: the whole stream in one file
    # IDMap header: fourcc, d (int32), ntotal (int64), ...; the stream ends with the ids
    # (a length and ntotal int64s), just after the vectors.
    d = int.from_bytes(graph[4:8], "little", signed=True)
    n = int.from_bytes(graph[8:16], "little")
    at = len(graph) - 8 - 8 * n
    with open(vectors_path, "rb") as f:
        vectors = f.read(n * d * 4)
    stream = np.frombuffer(graph[:at] + vectors + graph[at:], dtype="uint8")
    return faiss.deserialize_index(stream)


index = read_snapshot(sys.argv[1])
k = int(sys.argv[3]) if len(sys.argv) > 3 else 10
inner = faiss.downcast_index(index.index)
if isinstance(inner, faiss.IndexHNSW):
    inner.hnsw.efSearch = 64
ids = [int(line) for line in open(sys.argv[2]) if line.strip()]
position = {int(v): i for i, v in enumerate(faiss.vector_to_array(index.id_map))}
queries = np.stack([inner.reconstruct(position[i]) for i in ids]).astype("float32")
for q in queries:  # one untimed pass, as lookalike's side has
    index.search(q[None, :], k + 1)
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
