"""What a local Chroma server spends on the same records sent in requests of different sizes.

Starts its own `chroma run` on a fresh data directory, then upserts the same records (blobs of
the agent's size in `full_embeddings`: 512 rows x 128 f32, gzip stored blocks, base64, ~350 KB)
into a fresh collection per request size, and prints the wall time and the server's CPU seconds
(from /proc) for each. Rounds alternate the sizes; later rounds run on a larger database.
`--in-flight 1,2` also sends each size's requests from that many threads at once, to see
whether the server spreads concurrent writes over the cores.

    .venv/bin/python benches/chroma_request_cost.py [--records 600] [--sizes 16,25,50,100] [--rounds 2] [--in-flight 1]

`chroma` is taken from CHROMA_BIN, else from this Python's own environment. Linux only (/proc).
"""

import argparse
import base64
import gzip
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import chromadb
import numpy as np


def server_cpu_s(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    # utime and stime are fields 14 and 15 of stat; fields[0] here is field 3.
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--records", type=int, default=600)
    ap.add_argument("--sizes", default="16,25,50,100")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--in-flight", default="1", help="requests in flight at once, comma-separated")
    args = ap.parse_args()
    sizes = [int(s) for s in args.sizes.split(",")]
    in_flight = [int(s) for s in args.in_flight.split(",")]
    chroma = os.environ.get("CHROMA_BIN") or str(Path(sys.executable).parent / "chroma")
    if not shutil.which(chroma):
        sys.exit(f"no chroma at {chroma}: set CHROMA_BIN or run scripts/setup")

    rng = np.random.default_rng(0)
    blobs = [
        base64.b64encode(gzip.compress(rng.standard_normal((512, 128), dtype=np.float32).tobytes(), 0)).decode()
        for _ in range(32)
    ]
    with tempfile.TemporaryDirectory() as data:
        port = free_port()
        server = subprocess.Popen(
            [chroma, "run", "--path", data, "--port", str(port)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        try:
            client = None
            for _ in range(100):
                try:
                    client = chromadb.HttpClient(host="127.0.0.1", port=port)
                    client.heartbeat()
                    break
                except Exception:
                    time.sleep(0.2)
            print(f"{args.records} records of {len(blobs[0]) / 1e6:.2f} MB, chroma {chromadb.__version__}")
            print("round  records/request  in flight  requests  wall s  server CPU s  server CPU ms/request")

            def send(col, starts, size):
                for start in starts:
                    ids = [f"r{i}" for i in range(start, min(args.records, start + size))]
                    col.upsert(
                        ids=ids,
                        embeddings=[rng.standard_normal(128).tolist() for _ in ids],
                        documents=["x"] * len(ids),
                        metadatas=[{"full_embeddings": blobs[i % 32], "doc_id": f"doc{i // 30}"} for i in range(start, start + len(ids))],
                    )

            for rnd in range(args.rounds):
                for size in sizes:
                    for n in in_flight:
                        col = client.get_or_create_collection(f"size{size}_n{n}_round{rnd}")
                        starts = list(range(0, args.records, size))
                        wall, cpu = time.time(), server_cpu_s(server.pid)
                        threads = [threading.Thread(target=send, args=(col, starts[k::n], size)) for k in range(n)]
                        for t in threads:
                            t.start()
                        for t in threads:
                            t.join()
                        wall, cpu = time.time() - wall, server_cpu_s(server.pid) - cpu
                        requests = len(starts)
                        print(f"{rnd:5}  {size:15}  {n:9}  {requests:8}  {wall:6.1f}  {cpu:12.1f}  {cpu / requests * 1e3:21.0f}", flush=True)
        finally:
            server.terminate()
            server.wait()


if __name__ == "__main__":
    main()
