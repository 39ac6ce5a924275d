"""The shipped Redis users on a real redis-server (issue #20, item 6): the ACL file infra/redis/users-acl.sh prints
(the one the Kubernetes Secret holds) gives jobs a writer and serving replicas a read-only user; and no password
is ever on a process's command line.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import redis

from hlm.index import AdIndex
from hlm.lease import Lease
from hlm.live_index import LiveIndex
from hlm.redis_client import redis_client
from hlm.store import IndexStore, PublishError
from tests.conftest import REPO, free_port, received

pytestmark = [pytest.mark.integration, pytest.mark.reliability]
PASSWORDS = {"writer": "writer-pass-for-tests", "reader": "reader-pass-for-tests"}


def start_redis(folder: Path, env: dict[str, str], *options: str) -> tuple[int, str]:
    port = free_port()
    pid = subprocess.run([str(REPO / "infra/redis/start.sh"), str(port), str(folder), *options], check=True,
                         capture_output=True, text=True, env={"PATH": os.environ["PATH"], **env}).stdout.strip()
    return port, pid


@pytest.fixture(scope="module")
def acl_redis(tmp_path_factory) -> Iterator[dict]:
    folder = tmp_path_factory.mktemp("acl-redis")
    acl = folder / "users.acl"
    acl.write_text(subprocess.run(
        [str(REPO / "infra/redis/users-acl.sh")], check=True, capture_output=True, text=True,
        env={"PATH": os.environ["PATH"], "HLM_REDIS_WRITER_PASSWORD": PASSWORDS["writer"],
             "HLM_REDIS_READER_PASSWORD": PASSWORDS["reader"]}).stdout)
    port, pid = start_redis(folder / "data", {"REDIS_USER": "hlm-reader", "REDIS_PASSWORD": PASSWORDS["reader"]},
                            "--aclfile", str(acl))
    yield {"port": port, "pid": pid, "acl": acl.read_text()}
    subprocess.run(["kill", pid], check=False)


def client_as(acl_redis: dict, user: str) -> redis.Redis:
    """A client the way a pod makes one: the user in $HLM_REDIS_URL, the password from $HLM_REDIS_PASSWORD."""
    return redis_client(f"redis://hlm-{user}@127.0.0.1:{acl_redis['port']}/0", password=PASSWORDS[user])


def small_index(seed: int) -> AdIndex:
    x = np.random.default_rng(seed).standard_normal((300, 16)).astype(np.float32)
    return AdIndex.build([f"ad-{seed}-{i}" for i in range(300)], x / np.linalg.norm(x, axis=1, keepdims=True),
                         "space-a", "Flat")


def test_the_acl_file_holds_no_password_in_clear_and_turns_the_default_user_off(acl_redis) -> None:
    assert not [p for p in PASSWORDS.values() if p in acl_redis["acl"]]
    assert "user default off" in acl_redis["acl"]
    with pytest.raises(redis.AuthenticationError):
        redis_client(f"redis://127.0.0.1:{acl_redis['port']}/0", password=PASSWORDS["writer"]).ping()


def test_the_writer_runs_a_nightly_job_and_the_read_only_replica_user_serves_but_cannot_publish(
        acl_redis, record_property) -> None:
    writer = IndexStore(client_as(acl_redis, "writer"), "ads", chunk_bytes=4096)
    reader = IndexStore(client_as(acl_redis, "reader"), "ads", chunk_bytes=4096)
    events = reader.client.pubsub(ignore_subscribe_messages=True)
    events.subscribe(reader.channel)  # what a replica's listener does
    # Given a job as the writer: lease, two publishes, gc and a rollback all work
    with Lease(writer.client, writer.lease_key, owner="test") as lease:  # SET NX PX, released by EVAL
        first, second = writer.publish(small_index(0)), writer.publish(small_index(1))
        writer.gc(keep=2)
        assert writer.rollback() == first and lease.held()
    assert writer.client.get(writer.lease_key) is None
    # Then a replica as the reader hears the versions, loads the current one and serves it
    assert set(received(events, 3)) == {first.encode(), second.encode()}
    live = LiveIndex(reader, "space-a", poll_s=60)
    assert live.refresh() and live.status()["version"] == first
    # But cannot publish, roll back or collect: a clear error naming the read-only user, and nothing changed
    with pytest.raises(PublishError, match=r"NOPERM.*serving replicas connect as the read-only user"):
        reader.publish(small_index(2))
    for change in (reader.rollback, reader.gc):
        with pytest.raises(Exception, match="NOPERM"):
            change()
    assert writer.current() == first and writer.versions() == [second, first]
    # And neither user reaches keys outside hlm:* or the server's administration
    for user in ("reader", "writer"):
        client = client_as(acl_redis, user)
        for command in (("GET", "other:key"), ("FLUSHALL",), ("CONFIG", "GET", "*"), ("KEYS", "*")):
            with pytest.raises(redis.exceptions.NoPermissionError):
                client.execute_command(*command)
    record_property("reader", "loads and subscribes; publish, rollback, gc: NOPERM")


def test_start_sh_puts_the_password_on_no_command_line(tmp_path) -> None:
    # Given redis-server behind a shim that records its arguments (a running redis-server rewrites its title, so
    # /proc/PID/cmdline would not show them) before running the real one
    real, shim = shutil.which("redis-server"), tmp_path / "bin"
    shim.mkdir()
    (shim / "redis-server").write_text(f'#!/bin/sh\nprintf "%s\\n" "$@" > {tmp_path}/argv\nexec {real} "$@"\n')
    (shim / "redis-server").chmod(0o755)
    password = "requirepass-for-tests"
    port = free_port()
    pid = subprocess.run([str(REPO / "infra/redis/start.sh"), str(port), str(tmp_path / "data")], check=True,
                         capture_output=True, text=True,
                         env={"PATH": f"{shim}:{os.environ['PATH']}", "REDIS_PASSWORD": password}).stdout.strip()
    try:
        # Then the server requires the password, and it was in none of redis-server's arguments
        argv = (tmp_path / "argv").read_text()
        assert "--port" in argv and password not in argv
        assert redis_client(f"redis://127.0.0.1:{port}/0", password=password).ping()
        with pytest.raises(redis.AuthenticationError):
            redis_client(f"redis://127.0.0.1:{port}/0").ping()
    finally:
        subprocess.run(["kill", pid], check=False)
