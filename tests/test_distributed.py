"""Cluster detection (r1jax.parallel.distributed.cluster_detected) on fake environments, and the
GCE metadata query against a stand-in metadata server on localhost."""

import http.server
import threading

import pytest

from r1jax.parallel import distributed

NO_TPU = {"TPU_SKIP_MDS_QUERY": "1"}  # what jax sets at import on a host without TPU chips
WORKERS = "t1v-n-0-w-0:0:10.1.0.7,t1v-n-0-w-1:1:10.1.0.8"


def no_metadata(key, env):
  raise AssertionError(f"asked the metadata server for {key} on a host without TPU chips")


@pytest.mark.parametrize("env, expected", [
    ({}, False),
    ({"SLURM_JOB_ID": "7", "SLURM_NTASKS": "16"}, True),
    ({"SLURM_JOB_ID": "7", "SLURM_NTASKS": "1"}, False),
    ({"SLURM_NTASKS": "16"}, False),  # not inside a job
    ({"TPU_WORKER_HOSTNAMES": "w-0,w-1", "TPU_WORKER_ID": "1"}, True),  # GKE multi-host
    ({"TPU_WORKER_HOSTNAMES": "w-0", "TPU_WORKER_ID": "0"}, False),  # GKE single host
    ({"TPU_PROCESS_ADDRESSES": "10.0.0.1:8476,10.0.0.2:8476"}, True),
    ({"OMPI_COMM_WORLD_SIZE": "4"}, True),
    ({"JAX_COORDINATOR_ADDRESS": "10.0.0.1:1234"}, True),
])
def test_environment_without_tpu_chips(env, expected):
  assert distributed.cluster_detected(dict(NO_TPU, **env), metadata=no_metadata) is expected


@pytest.mark.parametrize("endpoints, expected", [
    (WORKERS, True),                  # a multi-host TPU VM slice (name:id:ip entries)
    ("t1v-n-0-w-0,t1v-n-0-w-1", True),  # the newer hostname-only format
    ("t1v-n-0-w-0:0:10.1.0.7", False),  # a single-host TPU VM
    (None, False),                    # no such attribute, or no metadata server
])
def test_tpu_vm_reads_its_workers_from_the_metadata(endpoints, expected):
  asked = []

  def metadata(key, env):
    asked.append(key)
    return endpoints

  assert distributed.cluster_detected({}, metadata=metadata) is expected
  assert asked == ["worker-network-endpoints"]


@pytest.fixture
def metadata_server():
  """A stand-in for the GCE metadata server: attributes answer only with the Metadata-Flavor
  header; unknown keys are 404."""
  attributes = {"worker-network-endpoints": WORKERS}

  class Handler(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
      key = self.path.rsplit("/", 1)[-1]
      ok = (self.headers.get("Metadata-Flavor") == "Google" and key in attributes and
            self.path.startswith("/computeMetadata/v1/instance/attributes/"))
      body = attributes[key].encode() if ok else b"not found"
      self.send_response(200 if ok else 404)
      self.send_header("Content-Length", str(len(body)))
      self.end_headers()
      self.wfile.write(body)

    def log_message(self, *args):
      pass

  server = http.server.HTTPServer(("127.0.0.1", 0), Handler)
  thread = threading.Thread(target=server.serve_forever, daemon=True)
  thread.start()
  yield f"127.0.0.1:{server.server_address[1]}"
  server.shutdown()
  server.server_close()


def test_gce_metadata_query(metadata_server):
  env = {"GCE_METADATA_IP": metadata_server}
  assert distributed.gce_metadata("worker-network-endpoints", env) == WORKERS
  assert distributed.gce_metadata("agent-worker-number", env) is None  # 404
  assert distributed.cluster_detected(env) is True  # through the real query


def test_gce_metadata_unreachable_is_none():
  env = {"GCE_METADATA_IP": "127.0.0.1:9"}  # the discard port: nothing listens
  assert distributed.gce_metadata("worker-network-endpoints", env, timeout=2) is None
