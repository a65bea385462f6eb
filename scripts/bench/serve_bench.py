#!/usr/bin/env python3
"""Throughput and latency of `beit-cli serve` against scripts/peers/serve_peer.py (FastAPI + uvicorn +
transformers, same batching), and a soak test of `beit-cli serve` with hostile requests.

Both servers must already run, on the same machine and the same checkpoint, e.g.:

  beit-cli serve --model microsoft/beit-base-patch16-224 --port 8080 --max-batch 16 --max-wait-ms 5
  python scripts/peers/serve_peer.py --model microsoft/beit-base-patch16-224 --port 8081 \
      --max-batch 16 --max-wait-ms 5
  python scripts/bench/serve_bench.py --images DIR --ours http://127.0.0.1:8080 \
      --peer http://127.0.0.1:8081 --server-pid $(pgrep -n beit-cli)

Throughput: for each concurrency (1, 8, 32), alternating rounds (ours, peer, ours, peer, ...) of
--requests requests each; reports requests/s and p50/p99 latency per server (median over rounds).
Every answer's top-1 is checked against the first answer our server gave for that image.

Soak: --soak requests (10,000) to ours at concurrency 32, 5% hostile (empty, truncated, text,
oversized dimensions); reports status counts, wrong answers (a good image with another top-1, or
a hostile one answered 200), transport errors, and the server's peak RSS (VmHWM of --server-pid).
Both servers' peak RSS after the throughput rounds is reported too (--server-pid, --peer-pid).

Only the Python standard library is needed. Nothing here is run by the test suite.
"""

import argparse
import concurrent.futures as cf
import json
import os
import random
import statistics
import struct
import time
import urllib.error
import urllib.request


def post(url, body, timeout=60):
    req = urllib.request.Request(url, data=body, method="POST",
                                 headers={"Content-Type": "application/octet-stream"})
    t0 = time.perf_counter()
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            status, data = r.status, r.read()
    except urllib.error.HTTPError as e:
        status, data = e.code, e.read()
    except OSError:
        status, data = 0, b""
    return status, data, time.perf_counter() - t0


def top1(data):
    try:
        return json.loads(data)[0]["predictions"][0]["index"]
    except (ValueError, KeyError, IndexError, TypeError):
        return None


def round_(url, images, n, concurrency, reference):
    lat, wrong = [], 0
    t0 = time.perf_counter()
    with cf.ThreadPoolExecutor(concurrency) as ex:
        futs = {ex.submit(post, url, images[i % len(images)][1]): i % len(images) for i in range(n)}
        for f in cf.as_completed(futs):
            status, data, dt = f.result()
            lat.append(dt)
            name = images[futs[f]][0]
            if status != 200 or (name in reference and top1(data) != reference[name]):
                wrong += 1
    wall = time.perf_counter() - t0
    lat.sort()
    return {"rps": n / wall, "p50": lat[len(lat) // 2], "p99": lat[min(len(lat) - 1, int(0.99 * len(lat)))],
            "wrong": wrong}


def hostile_bodies(good):
    png = next((b for n, b in good if n.lower().endswith(".png")), None)
    bodies = [b"", b"not an image at all", good[0][1][: len(good[0][1]) // 2]]
    if png is not None:
        bomb = bytearray(png)
        bomb[16:24] = struct.pack(">II", 100000, 100000)
        bodies.append(bytes(bomb))
    return bodies


def peak_rss_kib(pid):
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def soak(url, images, reference, n, pid):
    hostile = hostile_bodies(images)
    counts, wrong = {}, 0
    rng = random.Random(0)
    plan = [("hostile", rng.choice(hostile)) if rng.random() < 0.05 else rng.choice(images)
            for _ in range(n)]
    with cf.ThreadPoolExecutor(32) as ex:
        for (name, _), (status, data, _) in zip(plan, ex.map(lambda p: post(url, p[1]), plan)):
            counts[status] = counts.get(status, 0) + 1
            if name == "hostile":
                wrong += status == 200
            elif status == 200 and top1(data) != reference.get(name):
                wrong += 1
    return {"requests": n, "status_counts": counts, "wrong_answers": wrong,
            "transport_errors": counts.get(0, 0), "peak_rss_kib": peak_rss_kib(pid) if pid else None}


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--images", required=True, help="folder of test images")
    p.add_argument("--ours", default="http://127.0.0.1:8080")
    p.add_argument("--peer", default="http://127.0.0.1:8081")
    p.add_argument("--requests", type=int, default=256, help="requests per round")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--concurrency", default="1,8,32")
    p.add_argument("--soak", type=int, default=10000)
    p.add_argument("--server-pid", type=int, default=0, help="our server's pid (peak RSS)")
    p.add_argument("--peer-pid", type=int, default=0, help="the peer's pid (peak RSS)")
    args = p.parse_args()
    names = sorted(f for f in os.listdir(args.images) if f.lower().endswith((".jpg", ".jpeg", ".png")))
    images = [(n, open(os.path.join(args.images, n), "rb").read()) for n in names]
    ours, peer = args.ours + "/v1/classify", args.peer + "/v1/classify"
    reference = {n: top1(post(ours, b)[1]) for n, b in images}
    report = {"throughput": {}}
    for c in map(int, args.concurrency.split(",")):
        rows = {"ours": [], "peer": []}
        for _ in range(args.rounds):
            rows["ours"].append(round_(ours, images, args.requests, c, reference))
            rows["peer"].append(round_(peer, images, args.requests, c, reference))
        report["throughput"][c] = {
            side: {k: statistics.median(r[k] for r in rs) for k in ("rps", "p50", "p99", "wrong")}
            for side, rs in rows.items()}
        print(c, json.dumps(report["throughput"][c]), flush=True)
    report["peak_rss_kib_after_throughput"] = {
        "ours": peak_rss_kib(args.server_pid) if args.server_pid else None,
        "peer": peak_rss_kib(args.peer_pid) if args.peer_pid else None}
    print(json.dumps(report["peak_rss_kib_after_throughput"]), flush=True)
    if args.soak:
        report["soak"] = soak(ours, images, reference, args.soak, args.server_pid)
        print(json.dumps(report["soak"]), flush=True)
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
