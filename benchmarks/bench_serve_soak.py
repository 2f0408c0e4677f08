"""HTTP service soak: genuine clients served while stalled, trickling and disconnecting ones hang.

Starts `cxrlabel serve` (its own process, default limits) on a checkpoint made here with
weights 'none', then for the given time runs, all at once:

* N genuine clients (127.0.0.1), each with its own keep-alive connection, POSTing one film as
  fast as it is answered;
* S stalled clients, each from its own loopback address (127.0.0.10, .11, ...: under the
  per-client cap, so every one is held), sending headers and 100 bytes of a 1 MB body, then
  1 byte every 2 s until the server cuts them off (reconnecting at once when it does);
* G greedy clients from one address (127.0.0.3), more than the per-client cap allows;
* D clients that send headers and part of a multipart body, then hang up.

Reports genuine throughput, p50/p99 latency, status counts per kind of client, the server's
RSS before (after a warm-up with the same clients), midway, at its peak and after, and the
tracebacks in its log; writes a JSON file (--out). Goal: no status
but 200 (or 503 busy) for genuine clients, flat memory, no tracebacks.

    .venv/bin/python benchmarks/bench_serve_soak.py                     # tiny CNN, 4 clients, 30 s
    .venv/bin/python benchmarks/bench_serve_soak.py --model densenet121 --size 224 --seconds 60
"""

from __future__ import annotations

import argparse
import json
import os
import select
import socket
import tempfile
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import torch
from bench_serve import _checkpoint, _film, _free_port, _start_server

from cxrlabel.fileio import atomic_write_text
from cxrlabel.training.execution import cpu_name

STALL_BODY = 1_000_000  # declared Content-Length of a stalled upload


@dataclass
class Tally:
    """What one kind of client saw."""

    statuses: Counter[str] = field(default_factory=Counter)
    latencies: list[float] = field(default_factory=list)
    held_s: list[float] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def add(self, status: str, seconds: float | None = None, held: float | None = None) -> None:
        with self.lock:
            self.statuses[status] += 1
            if seconds is not None:
                self.latencies.append(seconds)
            if held is not None:
                self.held_s.append(held)


# --------------------------------------------------------------------------------------------
# The server
# --------------------------------------------------------------------------------------------


def rss_mib(pid: int) -> float:
    """Resident memory of process `pid` from /proc (psutil is not a dependency)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no VmRSS for process {pid}")


def sample_rss(pid: int, stop: threading.Event, samples: list[float]) -> None:
    while not stop.wait(0.5):
        samples.append(rss_mib(pid))


# --------------------------------------------------------------------------------------------
# Clients
# --------------------------------------------------------------------------------------------


def genuine(url: str, data: bytes, name: str, stop: threading.Event, tally: Tally) -> None:
    with httpx.Client(base_url=url, timeout=120) as http:
        while not stop.is_set():
            started = time.perf_counter()
            try:
                response = http.post("/predict", files={"file": (name, data)})
            except httpx.HTTPError as exc:
                tally.add(type(exc).__name__)
                continue
            tally.add(str(response.status_code), time.perf_counter() - started)


def _upload_headers(port: int, length: int, content_type: str) -> bytes:
    return (
        f"POST /predict HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nContent-Type: {content_type}\r\n"
        f"Content-Length: {length}\r\n\r\n"
    ).encode()


def _status(sock: socket.socket) -> str:
    """The status code of the server's answer on `sock`, or how the connection ended."""
    sock.settimeout(10)
    data = b""
    try:
        while b"\r\n" not in data:
            chunk = sock.recv(4096)
            if not chunk:
                return "closed" if not data else "partial"
            data += chunk
    except (TimeoutError, OSError):
        return "no answer"
    return data.split(b" ", 2)[1].decode()


def stalled(port: int, source: str, stop: threading.Event, tally: Tally, pause: float) -> None:
    """Headers and 100 bytes, then 1 byte every 2 s until the server answers; again."""
    while not stop.is_set():
        started = time.monotonic()
        try:
            sock = socket.create_connection(("127.0.0.1", port), 10, source_address=(source, 0))
        except OSError as exc:
            tally.add(type(exc).__name__)
            stop.wait(pause)
            continue
        with sock:
            sock.sendall(_upload_headers(port, STALL_BODY, "application/octet-stream"))
            sock.sendall(b"\0" * 100)
            answered = False
            while not stop.is_set() and not answered:
                answered = bool(select.select([sock], [], [], 2.0)[0])
                if not answered:
                    try:
                        sock.sendall(b"\0")
                    except OSError:
                        answered = True
            if answered:
                tally.add(_status(sock), held=time.monotonic() - started)
            else:
                tally.add("still held at the end", held=time.monotonic() - started)
        stop.wait(pause)


def disconnecting(port: int, stop: threading.Event, tally: Tally) -> None:
    """A multipart upload of a named file, cut off after its first 100 bytes of content."""
    boundary = "soakboundary"
    head = (
        f'--{boundary}\r\nContent-Disposition: form-data; name="file"; '
        'filename="Jane_Doe_19700101.jpg"\r\nContent-Type: image/jpeg\r\n\r\n'
    ).encode()
    content_type = f"multipart/form-data; boundary={boundary}"
    while not stop.is_set():
        try:
            with socket.create_connection(("127.0.0.1", port), 10) as sock:
                sock.sendall(_upload_headers(port, 500_000, content_type) + head + b"\0" * 100)
                stop.wait(0.3)
            tally.add("hung up")
        except OSError as exc:
            tally.add(type(exc).__name__)
        stop.wait(0.2)


# --------------------------------------------------------------------------------------------
# The run
# --------------------------------------------------------------------------------------------


def soak(
    args: argparse.Namespace, url: str, port: int, film: Path, seconds: float
) -> dict[str, Tally]:
    data = film.read_bytes()
    tallies = {kind: Tally() for kind in ("genuine", "stalled", "greedy", "disconnecting")}
    stop = threading.Event()
    threads = [
        threading.Thread(target=genuine, args=(url, data, film.name, stop, tallies["genuine"]))
        for _ in range(args.clients)
    ]
    threads += [
        threading.Thread(
            target=stalled, args=(port, f"127.0.0.{10 + k}", stop, tallies["stalled"], 0.0)
        )
        for k in range(args.stalled)
    ]
    threads += [
        threading.Thread(target=stalled, args=(port, "127.0.0.3", stop, tallies["greedy"], 1.0))
        for _ in range(args.greedy)
    ]
    threads += [
        threading.Thread(target=disconnecting, args=(port, stop, tallies["disconnecting"]))
        for _ in range(args.disconnecting)
    ]
    for thread in threads:
        thread.start()
    stop.wait(seconds)
    stop.set()
    for thread in threads:
        thread.join(60)
    return tallies


def summary(tallies: dict[str, Tally], seconds: float) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for kind, tally in tallies.items():
        entry: dict[str, Any] = {"statuses": dict(sorted(tally.statuses.items()))}
        if tally.latencies:
            ok = np.array(tally.latencies) * 1e3
            p50, p99 = np.percentile(ok, [50, 99])
            entry.update(p50_ms=round(p50, 1), p99_ms=round(p99, 1), max_ms=round(ok.max(), 1))
        if tally.held_s:
            entry.update(held_s_median=round(float(np.median(tally.held_s)), 2))
            entry.update(held_s_max=round(max(tally.held_s), 2))
        out[kind] = entry
    served = tallies["genuine"].statuses["200"]
    out["genuine"]["throughput_per_s"] = round(served / seconds, 2)
    return out


def print_table(results: dict[str, Any]) -> None:
    print(f"{'clients':<15} {'n':>3}  statuses / latency")
    for kind in ("genuine", "stalled", "greedy", "disconnecting"):
        entry = results["clients"][kind]
        statuses = ", ".join(f"{k}: {v}" for k, v in entry["statuses"].items()) or "-"
        print(f"{kind:<15} {results['counts'][kind]:>3}  {statuses}")
        if "p50_ms" in entry:
            print(f"{'':<20}{entry['throughput_per_s']} requests/s, latency p50 "
                  f"{entry['p50_ms']:.0f} ms, p99 {entry['p99_ms']:.0f} ms, "
                  f"max {entry['max_ms']:.0f} ms")  # fmt: skip
        if "held_s_median" in entry:
            print(f"{'':<20}held {entry['held_s_median']} s median, {entry['held_s_max']} s max")
    rss = results["server_rss_mib"]
    print(f"server RSS      before {rss['before']:.1f} MiB, midway {rss['midway']:.1f}, "
          f"peak {rss['peak']:.1f}, after {rss['after']:.1f}")  # fmt: skip
    log = results["server_log"]
    print(f"server log      {log['tracebacks']} tracebacks, {log['disconnect_lines']} "
          f"disconnect lines, {log['warnings_or_errors']} warnings/errors")  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="tiny", help="backbone: tiny, densenet121...")
    parser.add_argument("--size", type=int, default=224, help="model input size")
    parser.add_argument("--clients", type=int, default=4, help="genuine clients")
    parser.add_argument("--stalled", type=int, default=18, help="stalled, own address each")
    parser.add_argument("--greedy", type=int, default=6, help="stalled from one address")
    parser.add_argument("--disconnecting", type=int, default=2)
    parser.add_argument("--seconds", type=float, default=30.0)
    parser.add_argument("--warmup", type=float, default=10.0, help="seconds, not counted")
    parser.add_argument("--out", type=Path, default=Path("runs/bench/serve_soak.json"))
    args = parser.parse_args()

    machine = f"{cpu_name()}, {os.cpu_count()} CPUs, torch {torch.__version__}"
    print(f"machine         {machine}")
    with tempfile.TemporaryDirectory(prefix="bench-soak-") as tmp:
        film = _film(Path(tmp))
        checkpoint = _checkpoint(Path(tmp), args.model, args.size)
        print(f"model           {args.model} (weights none), {args.size} px; film {film.name}, "
              f"{film.stat().st_size:,} bytes; {args.seconds:g} s")  # fmt: skip
        port, log_path = _free_port(), Path(tmp) / "server.log"
        server = _start_server(checkpoint, port, log_path)
        url = f"http://127.0.0.1:{port}"
        try:
            # Warm up with the same clients (thread pool, allocator arenas), not counted.
            soak(args, url, port, film, args.warmup)
            time.sleep(1.0)
            before = rss_mib(server.pid)
            samples: list[float] = []
            stop_sampling = threading.Event()
            sampler = threading.Thread(target=sample_rss, args=(server.pid, stop_sampling, samples))
            sampler.start()
            started = time.perf_counter()
            tallies = soak(args, url, port, film, args.seconds)
            wall = time.perf_counter() - started
            stop_sampling.set()
            sampler.join()
            time.sleep(1.0)  # let the server drop the connections just closed
            after = rss_mib(server.pid)
        finally:
            server.terminate()
            server.wait(timeout=30)
        log_text = log_path.read_text(errors="replace")
    lines = log_text.splitlines()
    results = {
        "machine": machine,
        "model": args.model,
        "size": args.size,
        "seconds": round(wall, 1),
        "counts": {
            "genuine": args.clients,
            "stalled": args.stalled,
            "greedy": args.greedy,
            "disconnecting": args.disconnecting,
        },
        "clients": summary(tallies, wall),
        "server_rss_mib": {
            "before": round(before, 1),
            "peak": round(max(samples, default=after), 1),
            "midway": round(samples[len(samples) // 2] if samples else after, 1),
            "every_10_s": [round(x, 1) for x in samples[19::20]],  # sampled every 0.5 s
            "after": round(after, 1),
        },
        "server_log": {
            "tracebacks": log_text.count("Traceback"),
            "disconnect_lines": sum("disconnected during an upload" in line for line in lines),
            "warnings_or_errors": sum(
                line.startswith(("WARNING", "ERROR")) or " ERROR " in line for line in lines
            ),
            "file_name_logged": "Jane_Doe" in log_text,
        },
    }
    print_table(results)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(args.out, json.dumps(results, indent=2))
    print(f"wrote           {args.out}")


if __name__ == "__main__":
    main()
