"""Reads and writes at once: one quire on SQLite, 24 connections reading books by id and 8 writing
(posting books, or placing orders), two wrk processes started together. It shows how the event loop
shares itself between them, which the one-endpoint-at-a-time runs of bench.py cannot.

    bench/run --help   # builds the venvs; then, from the project's root:
    /tmp/quire-bench-repo/venv-peers-*/bin/python bench/mixed.py --quire-python \\
        /tmp/quire-bench-repo/venv-quire-*/bin/python [--write order] [--rounds 2] [--duration 10]

quire starts as bench.py starts it (pinned to CPU 0, 10,000 books seeded through its API); both
wrk run on CPU 1. Per round: req/s, p50, p99 and the slowest request of each side.
"""
import argparse
import json
import os
import random
import subprocess
import threading
import types

import bench


def load(server, connections, mode, ids_file, seconds, tag, results):
    script = {"get": ["get", ids_file], "post": ["post", server.token, tag],
              "order": ["order", server.token, ids_file]}[mode]
    cmd = bench.pin(1) + ["wrk", "-t1", f"-c{connections}", "--timeout", "10s", "--latency", f"-d{seconds}s",
                          "-s", f"{bench.HERE}/bench.lua", server.base + "/", "--", *script]
    out = subprocess.run(cmd, capture_output=True, text=True).stdout
    results[mode] = json.loads(next(line for line in out.splitlines() if line.startswith("JSON "))[5:])


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quire-python", required=True, help="python of a venv with the project's requirements")
    parser.add_argument("--write", choices=["post", "order"], default="post")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--duration", type=int, default=10)
    args = parser.parse_args()
    for sub in ("run", "logs"):
        os.makedirs(f"{bench.WORK}/{sub}", exist_ok=True)
    os.sched_setaffinity(0, {1})
    books = bench.make_books(bench.N_BOOKS)
    for rnd in range(1, args.rounds + 1):
        server = bench.start("quire", types.SimpleNamespace(database="sqlite", quire_python=args.quire_python), books)
        try:
            ids_file = f"{bench.WORK}/run/mixed.ids"
            order = list(range(len(books)))
            random.Random(7).shuffle(order)
            with open(ids_file, "w") as f:
                f.write("".join(f"{server.ids[i]}\n" for i in order))
            load(server, 8, args.write, ids_file, 2, f"warm{rnd}", {})
            results = {}
            sides = [threading.Thread(target=load, args=(server, 24, "get", ids_file, args.duration, "", results)),
                     threading.Thread(target=load, args=(server, 8, args.write, ids_file, args.duration,
                                                         f"mixed{rnd}", results))]
            for side in sides:
                side.start()
            for side in sides:
                side.join()
            for mode, w in results.items():
                print(f"round {rnd} {mode:5} {w['requests'] / (w['duration_us'] / 1e6):8,.0f} req/s  "
                      f"p50 {w['p50_us'] / 1e3:6.1f} ms  p99 {w['p99_us'] / 1e3:6.1f} ms  "
                      f"max {w['max_us'] / 1e3:6.1f} ms  errors {w['err_status']}")
        finally:
            bench.stop(server)


if __name__ == "__main__":
    main()
