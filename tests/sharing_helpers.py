"""Helpers shared by the tests of ls / inspect / verify / convert / diff / push (plain functions)."""

from __future__ import annotations

import io
import json
import os
import re
import shutil
import signal
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tests.helpers import run_label


def label_store(data: Any, store: Path) -> dict[str, Path]:
    """A small store with the shapes the sharing commands care about (read-only for the tests: copy first).

    pq: parquet, fp16 logits + top-3, labeled (v1); pq@v2: hdf5, bf16 logits + top-3 (same transfer set)
    topk: parquet, top-2 only, labeled;  ens: two teachers, fp32 logits + top-2, unlabeled (npy transfer set)
    """
    out = {
        "pq": run_label(data.teacher_pt, data.parquet, store, "pq", format="parquet", top_k=3).path,
        "pq2": run_label(data.teacher_pt, data.parquet, store, "pq", format="hdf5", top_k=3,
                         logits_dtype="bfloat16").path,
        "topk": run_label(data.teacher_pt, data.parquet, store, "topk", top_k=2, keep_logits=False).path,
        "ens": run_label([str(data.teacher_pt), data.factory_spec], data.npy, store, "ens", top_k=2,
                         logits_dtype="float32").path,
    }
    return out


def copy_version(src: Path, store: Path, name: str = "copy", version: int = 1) -> Path:
    dst = store / name / f"v{version}"
    shutil.copytree(src, dst)
    return dst


def edit_manifest(version_dir: Path, edit: Any) -> None:
    path = version_dir / "manifest.json"
    m = json.loads(path.read_text())
    edit(m)
    path.write_text(json.dumps(m))


def flip_byte(path: Path, offset: int | None = None) -> None:
    raw = bytearray(path.read_bytes())
    i = len(raw) // 2 if offset is None else offset
    raw[i] ^= 0xFF
    path.write_bytes(bytes(raw))


def truncate(path: Path, keep: int = 100) -> None:
    path.write_bytes(path.read_bytes()[:keep])


# --- an S3 server on loopback that counts what it receives and injects faults -----------------------------------


@dataclass
class Fault:
    """What the tap does to the `nth` request whose method is `method` and whose path matches `path` (a regex).

    kill: SIGKILL process `pid` once `after` (a fraction) of the request's body has arrived; the request fails.
    deny: answer 403 AccessDenied, and from then on to every write (PUT, POST, DELETE): permissions withdrawn.
    hold: keep the request waiting until `release` is set.
    """

    action: str
    method: str
    path: str
    nth: int = 1
    after: float = 0.0
    pid: int | None = None
    release: threading.Event = field(default_factory=threading.Event)
    seen: int = 0
    fired: threading.Event = field(default_factory=threading.Event)


@dataclass
class Received:
    method: str
    path: str
    payload: int  # body bytes the client sent (decoded length for aws-chunked bodies)
    status: int


class S3Tap:
    """WSGI middleware in front of moto's S3 app: logs each request's payload and status; applies `faults`."""

    def __init__(self, app: Any) -> None:
        self.app = app
        self.lock = threading.Lock()
        self.log: list[Received] = []
        self.faults: list[Fault] = []

    def clear(self) -> None:
        with self.lock:
            self.log.clear()
            self.faults.clear()

    def sent(self, method: str = "PUT", contains: str = "/data/") -> int:
        """Payload bytes of the successful `method` requests whose path contains `contains`."""
        with self.lock:
            return sum(r.payload for r in self.log if r.method == method and contains in r.path and r.status < 300)

    def _fault(self, method: str, path: str) -> Fault | None:
        with self.lock:
            for f in self.faults:
                if f.action == "deny" and f.fired.is_set() and method in ("PUT", "POST", "DELETE"):
                    return f
                if f.method == method and re.search(f.path, path) and not f.fired.is_set():
                    f.seen += 1
                    if f.seen == f.nth:
                        f.fired.set()
                        return f
        return None

    def __call__(self, environ: dict[str, Any], start_response: Any) -> Any:
        method, path = environ["REQUEST_METHOD"], environ.get("PATH_INFO", "")
        fault = self._fault(method, path)
        chunked = bool(environ.get("wsgi.input_terminated"))  # werkzeug de-chunks; read to the end
        length = int(environ.get("CONTENT_LENGTH") or environ.get("HTTP_X_AMZ_DECODED_CONTENT_LENGTH") or 0)
        kill_at = fault.after * length if fault is not None and fault.action == "kill" else None
        body = bytearray()
        while True:
            if kill_at is not None and len(body) >= kill_at:
                os.kill(_wait_for(lambda: fault.pid), signal.SIGKILL)
                start_response("500 Internal Server Error", [("Content-Length", "0")])
                return [b""]
            want = 65536 if chunked else min(65536, length - len(body))
            if kill_at is not None:
                want = min(want, max(1, int(kill_at) - len(body)))  # stop reading exactly where the kill is due
            block = environ["wsgi.input"].read(want) if want > 0 else b""
            if not block:
                break
            body += block
        payload = int(environ.get("HTTP_X_AMZ_DECODED_CONTENT_LENGTH") or len(body))
        if fault is not None and fault.action == "hold":
            fault.release.wait(60)
        if fault is not None and fault.action == "deny":
            self._record(method, path, payload, 403)
            xml = (b'<?xml version="1.0" encoding="UTF-8"?><Error><Code>AccessDenied</Code>'
                   b"<Message>Access Denied</Message><RequestId>tap</RequestId></Error>")
            start_response("403 Forbidden", [("Content-Type", "application/xml"), ("Content-Length", str(len(xml)))])
            return [xml]
        environ["wsgi.input"] = io.BytesIO(bytes(body))
        environ["CONTENT_LENGTH"] = str(len(body))
        environ.pop("wsgi.input_terminated", None)
        status: list[int] = []

        def record_status(s: str, headers: Any, *rest: Any) -> Any:
            status.append(int(s.split()[0]))
            return start_response(s, headers, *rest)

        out = self.app(environ, record_status)
        self._record(method, path, payload, status[0] if status else 0)
        return out

    def _record(self, method: str, path: str, payload: int, status: int) -> None:
        with self.lock:
            self.log.append(Received(method, path, payload, status))


def _wait_for(get: Any, timeout: float = 10.0) -> Any:
    end = time.monotonic() + timeout
    while (value := get()) is None and time.monotonic() < end:
        time.sleep(0.01)
    return value


@contextmanager
def moto_s3() -> Iterator[tuple[str, S3Tap]]:
    """A moto S3 server on 127.0.0.1 (a free port) behind an `S3Tap`, with dummy credentials and AWS_ENDPOINT_URL
    set in this process's environment (subprocesses inherit it) while the block runs."""
    import pytest
    import s3fs
    from moto.moto_server.werkzeug_app import DomainDispatcherApplication, create_backend_app
    from werkzeug.serving import WSGIRequestHandler, make_server

    class Quiet(WSGIRequestHandler):
        def log_request(self, *args: Any, **kwargs: Any) -> None:
            pass

    tap = S3Tap(DomainDispatcherApplication(create_backend_app))
    server = make_server("127.0.0.1", 0, tap, threaded=True, request_handler=Quiet)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    endpoint = f"http://127.0.0.1:{server.server_address[1]}"
    with pytest.MonkeyPatch.context() as mp:
        for k, v in {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
                     "AWS_DEFAULT_REGION": "us-east-1", "AWS_ENDPOINT_URL": endpoint,
                     "AWS_CONFIG_FILE": "/nonexistent", "AWS_SHARED_CREDENTIALS_FILE": "/nonexistent"}.items():
            mp.setenv(k, v)
        mp.delenv("AWS_PROFILE", raising=False)
        mp.delenv("AWS_SESSION_TOKEN", raising=False)
        s3fs.S3FileSystem.clear_instance_cache()
        try:
            yield endpoint, tap
        finally:
            s3fs.S3FileSystem.clear_instance_cache()
            server.shutdown()
            thread.join()
