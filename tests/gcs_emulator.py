"""A local Cloud Storage server for tests and benchmarks: gcp-storage-emulator on a free port of
127.0.0.1, with an empty bucket, and the environment that points gcsfs (etils.epath's gs:// backend
here) and TensorStore (orbax's checkpoints) at it.

Two patches make it answer as Cloud Storage does where soupjax depends on it:
- downloads send the ``x-goog-generation`` (and metageneration) headers: TensorStore reads orbax's
  checkpoint index (OCDBT) by generation, and fails with "Malformed StorageGeneration" without them;
- uploads and deletes honour the ``ifGenerationMatch`` precondition (412 when the live generation is
  another, ``0`` meaning "no object yet"), which the emulator ignores: a lease is taken by an upload with
  ``ifGenerationMatch=0`` and released by a delete of its own generation only (soupjax/io/leases.py)."""
from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator

# `python -c SERVER start --host ... --port ...`: the emulator's own main, after the patch.
SERVER = """
from gcp_storage_emulator.handlers import objects
_download = objects.download
def download(request, response, storage, *args, **kwargs):
    try:
        stored = storage.get_file_obj(request.params["bucket_name"], request.params["object_id"])
        response["x-goog-generation"] = str(stored["generation"])
        response["x-goog-metageneration"] = str(stored.get("metageneration", "1"))
    except Exception:  # not found: the download handler answers 404
        pass
    return _download(request, response, storage, *args, **kwargs)
objects.download = download  # objects.get (alt=media) looks it up here

from http import HTTPStatus
from gcp_storage_emulator.exceptions import NotFound

def _precondition_fails(request, storage, object_id):
    wanted = request.query.get("ifGenerationMatch")
    if not wanted or object_id is None:
        return False
    try:
        live = str(storage.get_file_obj(request.params["bucket_name"], object_id)["generation"])
    except NotFound:
        live = "0"
    return live != wanted[0]

def _uploaded_name(request):
    if "name" in request.query:
        return request.query["name"][0]
    data = request.data
    if isinstance(data, dict):
        return (data.get("meta") or {}).get("name") or data.get("name")
    return None

_insert, _delete = objects.insert, objects.delete
def insert(request, response, storage, *args, **kwargs):
    if _precondition_fails(request, storage, _uploaded_name(request)):
        response.status = HTTPStatus.PRECONDITION_FAILED
        return None
    return _insert(request, response, storage, *args, **kwargs)
def delete(request, response, storage, *args, **kwargs):
    if _precondition_fails(request, storage, request.params.get("object_id")):
        response.status = HTTPStatus.PRECONDITION_FAILED
        return None
    return _delete(request, response, storage, *args, **kwargs)
objects.insert, objects.delete = insert, delete  # before the server's routing table is built from them
from gcp_storage_emulator.__main__ import main
main()
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def running(bucket: str) -> Iterator[dict[str, str]]:
    """The emulator serving an empty ``gs://bucket`` while the block runs, with the environment (set in
    this process too, and given back to be passed to the processes it starts) that points the clients at
    it; stopped and the environment restored after it."""
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    server = subprocess.Popen(
        [sys.executable, "-c", SERVER, "start",
         "--host", "127.0.0.1", "--port", str(port), "--in-memory", "--default-bucket", bucket],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    env = {"STORAGE_EMULATOR_HOST": url, "TENSORSTORE_GCS_HTTP_URL": url,
           # No metadata server here: google.auth must not wait for one, nor gcsfs ask the storage
           # control API (which the emulator does not serve) what kind of bucket this is.
           "NO_GCE_CHECK": "true", "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT": "false", "EPATH_USE_TF": "false"}
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                urllib.request.urlopen(f"{url}/storage/v1/b/{bucket}", timeout=1).read()
                break
            except OSError:
                if server.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError("the Cloud Storage emulator did not start") from None
                time.sleep(0.05)
        yield env
    finally:
        server.terminate()
        server.wait(timeout=10)
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
