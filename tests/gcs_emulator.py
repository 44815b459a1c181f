"""A Google Cloud Storage stand-in on localhost for the tests: gcp-storage-emulator (in memory)
with the one thing tensorstore's GCS driver needs that it lacks, the `x-goog-generation` header on
object downloads (the driver reads an object's generation from it).

    python tests/gcs_emulator.py PORT BUCKET    # serves http://127.0.0.1:PORT until killed

Clients are pointed at it through the environment (`environment(url)`); nothing leaves the host.
"""

from __future__ import annotations

import sys


def environment(url: str) -> dict:
  """Variables that send gcsfs and google-cloud-storage (STORAGE_EMULATOR_HOST) and tensorstore
  (TENSORSTORE_GCS_HTTP_URL, a fixed OAuth token) to the emulator at `url`. gcsfs's bucket-layout
  lookup (zonal / hierarchical buckets) is turned off: it asks the Storage Control API, which the
  emulator lacks, and would warn on every call before falling back to plain GCS."""
  return {"STORAGE_EMULATOR_HOST": url, "TENSORSTORE_GCS_HTTP_URL": url,
          "GOOGLE_AUTH_TOKEN_FOR_TESTING": "test", "GOOGLE_CLOUD_PROJECT": "test",
          "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT": "false"}


def _patch_download():
  from gcp_storage_emulator.handlers import objects

  plain = objects.download

  def download(request, response, storage, *args, **kwargs):
    try:
      obj = storage.get_file_obj(request.params["bucket_name"], request.params["object_id"])
    except objects.NotFound:
      obj = None
    if obj is not None:
      response["x-goog-generation"] = obj["generation"]
    return plain(request, response, storage, *args, **kwargs)

  objects.download = download


def main(port: int, bucket: str):
  _patch_download()
  from gcp_storage_emulator.server import create_server
  create_server("127.0.0.1", port, in_memory=True, default_bucket=bucket).run()


if __name__ == "__main__":
  main(int(sys.argv[1]), sys.argv[2])
