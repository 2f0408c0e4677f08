"""HTTP service throughput: requests/s and p50/p99 latency with concurrent clients on loopback.

Starts `cxrlabel serve` as a subprocess (the real command, its own process, so the clients'
Python threads do not compete with the server for the GIL) on a checkpoint made here with
weights 'none' (nothing is downloaded; the weights do not change the work), then runs N client
threads, each with its own keep-alive httpx connection, POSTing one film as fast as it is
answered for the given time. Prints requests/s, latency percentiles, the server's own decode
and predict times, and the error count (any non-200 or transport error; the goal is zero).

    .venv/bin/python benchmarks/bench_serve.py                      # DenseNet121 224 px, 8x30 s
    .venv/bin/python benchmarks/bench_serve.py --model tiny --size 320 --seconds 10
"""

from __future__ import annotations

import argparse
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import numpy as np
import torch

from cxrlabel.data.labels import OBSERVATIONS
from cxrlabel.models.checkpoint import save_checkpoint
from cxrlabel.models.factory import create_model
from cxrlabel.synth import write_dataset
from cxrlabel.training.execution import cpu_name

SHARED_FILM = Path(__file__).resolve().parents[2] / "shared/data/fixtures/nih_320/00000075_000.jpg"


@dataclass
class ClientLog:
    latencies: list[float] = field(default_factory=list)
    server_ms: list[tuple[float, float]] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)


def _film(tmp: Path) -> Path:
    if SHARED_FILM.is_file():
        return SHARED_FILM
    write_dataset(tmp / "synth", patients=1, size=320, seed=0)
    return sorted((tmp / "synth").glob("train/*/*/view1_frontal.jpg"))[0]


def _checkpoint(tmp: Path, backbone: str, size: int) -> Path:
    torch.manual_seed(0)
    model = create_model(backbone, "linear", OBSERVATIONS, weights="none", size=size)
    path = tmp / f"{backbone}.safetensors"
    save_checkpoint(path, model, config={"name": f"bench-{backbone}"}, epoch=0, step=0)
    return path


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _start_server(
    checkpoint: Path, port: int, log_path: Path | None = None
) -> subprocess.Popen[bytes]:
    """`cxrlabel serve` on `port`, once it answers /health; its log goes to `log_path` (a file,
    not a pipe nobody reads, which would stall the server once full) or is dropped."""
    command = [sys.executable, "-m", "cxrlabel.cli", "serve", "--model", str(checkpoint)]
    command += ["--port", str(port), "--device", "cpu"]
    env = {k: v for k, v in os.environ.items() if k != "CXRLABEL_TOKEN"}
    log_path = log_path or Path(os.devnull)
    with log_path.open("wb") as log_file:
        process = subprocess.Popen(command, env=env, stdout=log_file, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"server exited with status {process.returncode} (log: {log_path})")
        try:
            if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                return process
        except httpx.TransportError:
            time.sleep(0.2)
    process.terminate()
    raise RuntimeError("server did not answer /health within 120 s")


def _client(url: str, data: bytes, name: str, stop_at: float, log: ClientLog) -> None:
    with httpx.Client(base_url=url, timeout=120) as http:
        while time.perf_counter() < stop_at:
            start = time.perf_counter()
            try:
                response = http.post("/predict", files={"file": (name, data)})
            except httpx.HTTPError as exc:
                log.errors.append(f"{type(exc).__name__}: {exc}")
                continue
            elapsed = time.perf_counter() - start
            if response.status_code != 200:
                log.errors.append(f"HTTP {response.status_code}: {response.text[:200]}")
                continue
            timing = response.json()["timing_ms"]
            log.latencies.append(elapsed)
            log.server_ms.append((timing["read_and_decode"], timing["predict"]))


def run_clients(
    url: str, film: Path, clients: int, seconds: float
) -> tuple[list[ClientLog], float]:
    data = film.read_bytes()
    logs = [ClientLog() for _ in range(clients)]
    start = time.perf_counter()
    stop_at = start + seconds
    threads = [
        threading.Thread(target=_client, args=(url, data, film.name, stop_at, log)) for log in logs
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return logs, time.perf_counter() - start


def report(logs: list[ClientLog], wall: float, clients: int) -> None:
    latencies = np.array([x for log in logs for x in log.latencies]) * 1e3
    server = np.array([x for log in logs for x in log.server_ms]).reshape(-1, 2)
    errors = [e for log in logs for e in log.errors]
    print(f"clients              {clients} threads, {wall:.1f} s")
    print(f"requests             {len(latencies)} ok, {len(errors)} errors")
    print(f"throughput           {len(latencies) / wall:.2f} requests/s")
    if len(latencies):
        p50, p90, p99 = np.percentile(latencies, [50, 90, 99])
        print(f"latency (client)     p50 {p50:.0f} ms, p90 {p90:.0f} ms, p99 {p99:.0f} ms, "
              f"max {latencies.max():.0f} ms")  # fmt: skip
        decode, predict = np.median(server, axis=0)
        print(f"server (median)      read+decode {decode:.1f} ms, predict incl. lock wait "
              f"{predict:.1f} ms")  # fmt: skip
    for error in sorted(set(errors))[:5]:
        print(f"  error: {error}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="densenet121", help="backbone: densenet121, tiny...")
    parser.add_argument("--size", type=int, default=224, help="model input size")
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--seconds", type=float, default=30.0)
    parser.add_argument("--warmup", type=float, default=3.0, help="seconds, not counted")
    args = parser.parse_args()

    print(f"machine              {cpu_name()}, {os.cpu_count()} CPUs, torch {torch.__version__}")
    with tempfile.TemporaryDirectory(prefix="bench-serve-") as tmp:
        film = _film(Path(tmp))
        checkpoint = _checkpoint(Path(tmp), args.model, args.size)
        print(f"model                {args.model} (weights none), {args.size} px, 14 labels")
        print(f"film                 {film.name}, {film.stat().st_size:,} bytes")
        port = _free_port()
        server = _start_server(checkpoint, port)
        try:
            url = f"http://127.0.0.1:{port}"
            run_clients(url, film, args.clients, args.warmup)
            logs, wall = run_clients(url, film, args.clients, args.seconds)
            report(logs, wall, args.clients)
        finally:
            server.terminate()
            server.wait(timeout=30)


if __name__ == "__main__":
    main()
