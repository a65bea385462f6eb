#!/usr/bin/env python3
"""Cross-check beit-hub's cache layout against the real `huggingface_hub` and `transformers`.

The hub cannot be reached from our machines, so this script serves a small BEiT checkpoint
(fixtures/model/cls_per_layer) from a local HTTP server that speaks the hub's download protocol
(repo info, HEAD/GET on /resolve/ with etag + commit headers, byte ranges), and checks both ways:

  A. `cargo xtask fetch-weights` downloads it (with HF_ENDPOINT) into cache A; then, offline,
     huggingface_hub's `scan_cache_dir` finds no problem, `hf_hub_download(local_files_only=True)`
     returns the same paths, and transformers' `BeitForImageClassification.from_pretrained` loads it
     from cache A and reproduces the fixture's logits.
  B. huggingface_hub's `hf_hub_download` (what `from_pretrained` calls) fills cache B from the same server; then
     `xtask fetch-weights` with HF_HUB_OFFLINE=1 reports it as already cached (no network).

Usage: .venv/bin/python scripts/peers/hub_cache_check.py [--xtask target/debug/xtask]
Exit status 0 when every check passes.
"""
import argparse
import hashlib
import json
import os
import subprocess
import sys
import tempfile
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
FIXTURE = os.path.join(ROOT, "fixtures", "model", "cls_per_layer")
REPO = "beit-rs/beit-tiny-cls"
COMMIT = "5d1b0e6c1f2a3b4c5d6e7f8091a2b3c4d5e6f708"


def git_sha1(data):
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


FILES = {}
for name in ["config.json", "model.safetensors"]:
    with open(os.path.join(FIXTURE, name), "rb") as f:
        data = f.read()
    lfs = name.endswith(".safetensors")
    FILES[name] = (data, hashlib.sha256(data).hexdigest() if lfs else git_sha1(data), lfs)


class Hub(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, *args):
        pass

    def _send(self, status, headers, body, head_only=False):
        self.send_response(status)
        for k, v in headers.items():
            self.send_header(k, v)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if not head_only:
            self.wfile.write(body)

    def _handle(self, head_only):
        path = self.path.split("?")[0]
        prefix = f"/api/models/{REPO}/revision/"
        if path.startswith(prefix) or path == f"/api/models/{REPO}":
            body = json.dumps({
                "_id": "0", "id": REPO, "modelId": REPO, "sha": COMMIT, "private": False,
                "siblings": [{"rfilename": n} for n in FILES],
            }).encode()
            return self._send(200, {"Content-Type": "application/json"}, body, head_only)
        prefix = f"/{REPO}/resolve/"
        if path.startswith(prefix):
            _rev, name = path[len(prefix):].split("/", 1)
            if name not in FILES:
                return self._send(404, {"X-Error-Code": "EntryNotFound"}, b"", head_only)
            data, etag, lfs = FILES[name]
            headers = {"X-Repo-Commit": COMMIT, "Accept-Ranges": "bytes"}
            if lfs:
                headers["X-Linked-Etag"] = f'"{etag}"'
                headers["X-Linked-Size"] = str(len(data))
                headers["ETag"] = f'"{git_sha1(data)}"'
            else:
                headers["ETag"] = f'"{etag}"'
            rng = self.headers.get("Range")
            if rng and rng.startswith("bytes="):
                start, _, end = rng[6:].partition("-")
                start = int(start or 0)
                end = int(end) if end else len(data) - 1
                headers["Content-Range"] = f"bytes {start}-{end}/{len(data)}"
                return self._send(206, headers, data[start:end + 1], head_only)
            return self._send(200, headers, data, head_only)
        return self._send(404, {}, b"", head_only)

    def do_GET(self):
        self._handle(False)

    def do_HEAD(self):
        self._handle(True)


def layout(cache):
    """Relative path -> symlink target (or file size) of a repo folder, `.no_exist` markers aside."""
    base = os.path.join(cache, f"models--{REPO.replace('/', '--')}")
    out = {}
    for d, _dirs, files in os.walk(base):
        for f in files:
            p = os.path.join(d, f)
            rel = os.path.relpath(p, base)
            if not rel.startswith(".no_exist"):
                out[rel] = os.readlink(p) if os.path.islink(p) else os.path.getsize(p)
    return out


def run(cmd, env, check=True):
    p = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if check and p.returncode != 0:
        sys.exit(f"FAILED: {' '.join(cmd)}\n{p.stdout}\n{p.stderr}")
    return p


def clean_env(**extra):
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "HUGGING"))}
    env.update(extra)
    return env


PY_CHECK_A = r"""
import os, sys, json
import torch
from huggingface_hub import scan_cache_dir, hf_hub_download
from safetensors.torch import load_file
from transformers import BeitForImageClassification
cache, repo, fixture, ours = sys.argv[1:5]
ours = json.loads(ours)
info = scan_cache_dir(cache)
assert not info.warnings, info.warnings
(r,) = info.repos
assert r.repo_id == repo and r.nb_files == 2, (r.repo_id, r.nb_files)
(rev,) = r.revisions
assert rev.refs == frozenset({"main"}), rev.refs
for name in ["config.json", "model.safetensors"]:
    p = hf_hub_download(repo, name, cache_dir=cache, local_files_only=True)
    assert p == ours[name], (p, ours[name])
model = BeitForImageClassification.from_pretrained(repo, cache_dir=cache, local_files_only=True).eval()
exp = load_file(os.path.join(fixture, "expected.safetensors"))
with torch.no_grad():
    logits = model(exp["pixel_values"]).logits
err = (logits - exp["logits"]).abs().max().item()
assert err < 1e-5, err
print(f"A: scan_cache_dir clean, hf_hub_download paths identical, transformers logits max err {err:.1e}")
"""

PY_FILL_B = r"""
import sys
from huggingface_hub import hf_hub_download
for name in ["config.json", "model.safetensors"]:
    print(hf_hub_download(sys.argv[2], name, cache_dir=sys.argv[1]))
"""


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--xtask", default=os.path.join(ROOT, "target", "debug", "xtask"))
    args = ap.parse_args()

    server = ThreadingHTTPServer(("127.0.0.1", 0), Hub)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    endpoint = f"http://127.0.0.1:{server.server_address[1]}"

    with tempfile.TemporaryDirectory() as tmp:
        # A: ours writes, huggingface_hub/transformers read (offline).
        cache_a = os.path.join(tmp, "a")
        out = run([args.xtask, "fetch-weights", REPO, "--no-progress"],
                  clean_env(HF_HUB_CACHE=cache_a, HF_ENDPOINT=endpoint, HOME=tmp)).stdout
        print("xtask:", out.strip())
        snap = os.path.join(cache_a, f"models--{REPO.replace('/', '--')}", "snapshots", COMMIT)
        ours = {n: os.path.join(snap, n) for n in FILES}
        print(run([sys.executable, "-c", PY_CHECK_A, cache_a, REPO, FIXTURE, json.dumps(ours)],
                  clean_env(HF_HUB_OFFLINE="1", HOME=tmp)).stdout.strip())

        # B: huggingface_hub writes, ours reads offline.
        cache_b = os.path.join(tmp, "b")
        got = run([sys.executable, "-c", PY_FILL_B, cache_b, REPO],
                  clean_env(HF_ENDPOINT=endpoint, HOME=tmp, HF_HUB_DISABLE_XET="1")).stdout.strip()
        print("hf_hub_download:", got.replace(chr(10), ", "))
        p = run([args.xtask, "fetch-weights", REPO],
                clean_env(HF_HUB_CACHE=cache_b, HF_HUB_OFFLINE="1", HOME=tmp))
        assert p.stdout.startswith(f"{REPO}: already cached (commit {COMMIT[:10]})"), p.stdout
        print("B: xtask offline on huggingface_hub's cache:", p.stdout.strip())
        a, b = layout(cache_a), layout(cache_b)
        assert a == b, f"layouts differ:\nours {a}\nhuggingface_hub {b}"
        print(f"A == B: identical repo folders ({len(a)} entries: blobs, relative snapshot links, refs/main)")
    print("all checks passed")


if __name__ == "__main__":
    main()
