"""A moto S3 server for tests: `from tests.s3_server import s3_root  # noqa: F401` gives the `s3_root` fixture."""

from __future__ import annotations

import atexit
import logging
import urllib.request
import uuid
from contextlib import contextmanager
from typing import Iterator

import pytest

AWS_VARIABLES_TO_CLEAR = ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL_S3", "AWS_REGION")


@contextmanager
def moto_server() -> Iterator[str]:
    """Run moto's standalone S3 server on 127.0.0.1 (a free port); yields its endpoint URL, then resets and stops it."""
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    try:
        yield endpoint
    finally:
        try:  # moto's backends are process-wide: forget this server's buckets
            urllib.request.urlopen(urllib.request.Request(f"{endpoint}/moto-api/reset", method="POST"), timeout=5)
        finally:
            server.stop()


def use_moto(monkeypatch: pytest.MonkeyPatch, endpoint: str, prefix: str = "tda") -> str:
    """Point the AWS variables at the server, create a fresh bucket; returns `s3://<bucket>/<prefix>`."""
    import boto3

    for name in AWS_VARIABLES_TO_CLEAR:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_ENDPOINT_URL", endpoint)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    bucket = f"tda-test-{uuid.uuid4().hex[:8]}"
    boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1").create_bucket(Bucket=bucket)
    return f"s3://{bucket}/{prefix}"


_shared: list[str] = []


def shared_moto_endpoint() -> str:
    """One moto server per test process, started on first use and stopped at exit (stopping one takes 0.5 s)."""
    if not _shared:
        server = moto_server()
        _shared.append(server.__enter__())
        atexit.register(server.__exit__, None, None, None)
    return _shared[0]


@pytest.fixture
def s3_root(monkeypatch: pytest.MonkeyPatch) -> str:
    """`s3://<fresh bucket>/tda` on the shared moto server, with AWS_ENDPOINT_URL and test credentials set."""
    return use_moto(monkeypatch, shared_moto_endpoint())
