"""Pulls models from a sanctum hub with the official `huggingface_hub` client (HF_ENDPOINT is set by
the test) and prints, as JSON, the sha256 of every file it wrote, per model and per call:
`snapshot_download` of each model named on the command line, `hf_hub_download` of its config.json,
the hub's model list, and the errors the client raises for a model and a file the hub does not
serve. Usage: hub_client.py CACHE_DIR MODEL..."""

import hashlib
import json
import os
import sys

from huggingface_hub import HfApi, hf_hub_download, snapshot_download
from huggingface_hub.errors import EntryNotFoundError, RepositoryNotFoundError


def sha256(path):
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def main():
    cache, models = sys.argv[1], sys.argv[2:]
    report = {"snapshot": {}, "file": {}, "listed": [m.id for m in HfApi().list_models()]}
    for model in models:
        root = snapshot_download(model, cache_dir=cache)
        report["snapshot"][model] = {
            os.path.relpath(os.path.join(d, f), root): sha256(os.path.join(d, f))
            for d, _, files in os.walk(root)
            for f in files
        }
        report["file"][model] = sha256(hf_hub_download(model, "config.json", cache_dir=cache))
    try:
        snapshot_download("not-approved", cache_dir=cache)
        report["not_approved"] = "downloaded"
    except RepositoryNotFoundError as e:
        report["not_approved"] = type(e).__name__
    try:
        hf_hub_download(models[0], "not-in-the-lock.bin", cache_dir=cache)
        report["not_in_lock"] = "downloaded"
    except EntryNotFoundError as e:
        report["not_in_lock"] = type(e).__name__
    print(json.dumps(report))


main()
