"""A local Google Cloud Storage API on 127.0.0.1 for tests: `gs://` paths as a pod sees them.

The emulator (the `gcp-storage-emulator` package) runs in a thread of the test process, in
memory; a test and the processes it starts reach it through the environment that each GCS
client reads:

  STORAGE_EMULATOR_HOST          gcsfs, hence etils.epath and tensorflow-datasets
  TENSORSTORE_GCS_HTTP_URL       tensorstore, hence orbax's array files
  GOOGLE_AUTH_TOKEN_FOR_TESTING  tensorstore's credentials (any string)

    with gcs_emulator() as gcs:
        subprocess.run([...], env=dict(os.environ, **gcs.env))
        gcs.path("run/checkpoints").exists()
"""
from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import socket
import socketserver
from typing import Iterator

BUCKET = "spacetime-test"


@dataclasses.dataclass(frozen=True)
class Emulator:
    url: str
    bucket: str

    @property
    def env(self) -> dict[str, str]:
        return {"STORAGE_EMULATOR_HOST": self.url, "TENSORSTORE_GCS_HTTP_URL": self.url,
                "GOOGLE_AUTH_TOKEN_FOR_TESTING": "test-token"}

    def uri(self, relative: str = "") -> str:
        return f"gs://{self.bucket}/{relative}".rstrip("/")

    def path(self, relative: str = ""):
        """An epath.Path into the bucket, read fresh (see forget_listings)."""
        from etils import epath
        forget_listings()
        return epath.Path(self.uri(relative))


def forget_listings() -> None:
    """gcsfs caches folder listings per process: what other processes wrote since this one
    last listed a folder shows up only after this."""
    import gcsfs
    for filesystem in list(gcsfs.GCSFileSystem._cache.values()):  # every instance epath made
        filesystem.invalidate_cache()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _send_generations() -> None:
    """Object downloads carry the object's generation (x-goog-generation), as GCS's do.
    tensorstore (orbax's arrays) keys its cached OCDBT manifests by it; without it, a
    checkpoint written soon after the previous one fails with "Malformed StorageGeneration"."""
    from gcp_storage_emulator import server
    from gcp_storage_emulator.handlers import objects
    original = objects.download
    if getattr(original, "sends_generation", False):
        return

    def download(request, response, storage, *args, **kwargs):
        original(request, response, storage, *args, **kwargs)
        if response.status.value in (200, 206):
            obj = storage.get_file_obj(request.params["bucket_name"],
                                       request.params["object_id"])
            response["x-goog-generation"] = str(obj["generation"])
            response["x-goog-metageneration"] = str(obj["metageneration"])

    download.sends_generation = True
    objects.download = download  # objects.get(alt=media) calls it by name
    for _, methods in server.HANDLERS:
        for method, handler in methods.items():
            if handler is original:
                methods[method] = download


def _quiet_client_disconnects() -> None:
    # Clients close idle keep-alive connections; the emulator's socketserver prints a traceback
    # for each one, which says nothing about the code under test.
    socketserver.BaseServer.handle_error = lambda self, request, client_address: None
    logging.getLogger("gcp_storage_emulator").setLevel(logging.CRITICAL)
    # gcsfs asks for default credentials to learn the bucket's type; the emulator needs none.
    logging.getLogger("gcsfs").setLevel(logging.ERROR)


@contextlib.contextmanager
def gcs_emulator(bucket: str = BUCKET) -> Iterator[Emulator]:
    """Starts the emulator with an empty `bucket`; sets the clients' environment in this
    process for the duration (and restores it)."""
    from gcp_storage_emulator.server import create_server
    _send_generations()
    _quiet_client_disconnects()
    port = _free_port()
    server = create_server("127.0.0.1", port, in_memory=True, default_bucket=bucket)
    server.start()
    emulator = Emulator(f"http://127.0.0.1:{port}", bucket)
    saved = {key: os.environ.get(key) for key in emulator.env}
    os.environ.update(emulator.env)
    try:
        yield emulator
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        server.stop()
