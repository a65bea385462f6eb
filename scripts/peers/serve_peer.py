#!/usr/bin/env python3
"""The peer of `beit-cli serve` for scripts/bench/serve_bench.py: FastAPI + uvicorn + transformers with
the same routes and the same dynamic batching (up to --max-batch images, waiting at most
--max-wait-ms for company, one forward pass on a dedicated thread, answers split back).

  POST /v1/classify?top_k=K   raw image body -> [{"image": "body", "predictions": [...]}]
  GET  /healthz, /readyz

A full queue (--queue requests waiting) answers 503 with Retry-After, like beit-cli serve.

Usage: python scripts/peers/serve_peer.py --model microsoft/beit-base-patch16-224 --port 8081
       (needs torch, transformers, fastapi, uvicorn, pillow)
"""

import argparse
import asyncio
import io
import queue
import threading
import time

import torch
import uvicorn
from fastapi import FastAPI, HTTPException, Request
from fastapi.responses import JSONResponse
from PIL import Image
from transformers import BeitForImageClassification, BeitImageProcessor


def parse_args():
    p = argparse.ArgumentParser()
    p.add_argument("--model", required=True)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8081)
    p.add_argument("--max-batch", type=int, default=16)
    p.add_argument("--max-wait-ms", type=float, default=5.0)
    p.add_argument("--queue", type=int, default=256)
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.add_argument("--attn", default="auto", choices=["auto", "sdpa", "eager"],
                   help="transformers' attention implementation; auto: time both on a batch of "
                        "--max-batch at start-up and keep the faster")
    return p.parse_args()


class Batcher:
    """Bounded queue + one thread running batched forwards."""

    def __init__(self, model, max_batch, max_wait, capacity):
        self.model, self.max_batch, self.max_wait = model, max_batch, max_wait
        self.q = queue.Queue(maxsize=capacity)
        threading.Thread(target=self.run, daemon=True).start()

    def submit(self, pixels, top_k, loop):
        fut = loop.create_future()
        self.q.put_nowait((pixels, top_k, fut, loop))  # raises queue.Full
        return fut

    def gather(self):
        jobs = [self.q.get()]
        deadline = time.monotonic() + self.max_wait
        while len(jobs) < self.max_batch:
            left = deadline - time.monotonic()
            if left <= 0:
                break
            try:
                jobs.append(self.q.get(timeout=left))
            except queue.Empty:
                break
        return jobs

    def run(self):
        labels = self.model.config.id2label
        while True:
            jobs = self.gather()
            with torch.inference_mode():
                logits = self.model(pixel_values=torch.cat([j[0] for j in jobs])).logits
            probs = logits.softmax(-1)
            for row, (_, k, fut, loop) in zip(probs, jobs):
                p, i = row.topk(k)
                preds = [{"index": int(a), "label": labels[int(a)], "probability": float(b)}
                         for a, b in zip(i, p)]
                loop.call_soon_threadsafe(fut.set_result, preds)


def load(path, attn):
    return BeitForImageClassification.from_pretrained(path, attn_implementation=attn).eval()


def load_fastest(args):
    """The model with the attention implementation that runs a full batch faster here (best of
    three forwards each; one model in memory at a time, so that the peak RSS is the server's)."""
    times = {}
    for attn in ("sdpa", "eager"):
        m = load(args.model, attn)
        size = m.config.image_size
        x = torch.randn(args.max_batch, 3, size, size)
        with torch.inference_mode():
            times[attn] = []
            for _ in range(3):
                t = time.perf_counter()
                m(pixel_values=x)
                times[attn].append(time.perf_counter() - t)
        del m, x
    best = min(times, key=lambda a: min(times[a]))
    print(f"attention: {best} ({', '.join(f'{a} {min(t):.2f} s' for a, t in times.items())} "
          f"per batch of {args.max_batch})", flush=True)
    return load(args.model, best)


def main():
    args = parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    processor = BeitImageProcessor.from_pretrained(args.model)
    model = load_fastest(args) if args.attn == "auto" else load(args.model, args.attn)
    batcher = Batcher(model, args.max_batch, args.max_wait_ms / 1000, args.queue)
    app = FastAPI()

    @app.get("/healthz")
    def healthz():
        return "ok"

    @app.get("/readyz")
    def readyz():
        return "ready"

    @app.post("/v1/classify")
    async def classify(request: Request, top_k: int = 5):
        body = await request.body()
        try:
            img = Image.open(io.BytesIO(body)).convert("RGB")
        except Exception as e:  # noqa: BLE001 - any decoder failure is the client's
            raise HTTPException(422, f"cannot decode image body: {e}")
        pixels = processor(images=img, return_tensors="pt")["pixel_values"]
        try:
            fut = batcher.submit(pixels, top_k, asyncio.get_running_loop())
        except queue.Full:
            return JSONResponse({"error": "queue full"}, 503, headers={"Retry-After": "1"})
        return [{"image": "body", "predictions": await fut}]

    uvicorn.run(app, host=args.host, port=args.port, log_level="warning")


if __name__ == "__main__":
    main()
