"""Bounded load test: the real app, started here on loopback, driven by concurrent gradio_client users.

    python -m benchmarks.bench_load                                   # offline profile, 8 clients, 160 requests
    python -m benchmarks.bench_load --profile tiny --clients 2 --requests 6 --no-write

Starts ``python app.py`` on 127.0.0.1 with a free port (never a share link) and waits until it answers, then sends
a fixed number of requests from N clients (one browser session each) with a wall-clock cap: describe, classify and
retrieve on the shipped example clips, plus bad inputs that must come back as the app's own message (counted as
expected refusals, not errors). Prints a table per endpoint (requests, errors, p50/p95/max latency) with the server's
RSS before, at peak and after, and writes the "Load" section of benchmarks/RESULTS.md when nothing failed. The server
is stopped on every exit path. Exit status 1 when any request failed or did not finish.
"""
from __future__ import annotations

import argparse
import os
import queue
import re
import shlex
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from gradio_client import Client, handle_file
from gradio_client.exceptions import AppError

from benchmarks.bench_datastore import machine_facts, write_section
from engine.config import PROJECT_ROOT

HOST = "127.0.0.1"  # loopback only, on purpose: no flag changes it
RESULTS = PROJECT_ROOT / "benchmarks" / "RESULTS.md"
SECTION_TITLE = "## Load (benchmarks/bench_load.py)"
EXAMPLES = sorted((PROJECT_ROOT / "assets" / "examples").glob("*.flac"))
# Classes of the example clips: every clip's own class is in the list, whichever CLAP the profile serves.
CLASSES = "siren\npiano\nhelicopter\nknocking\ntrumpet\nclock ticking\ndripping water\nwoman speaking"
TEMPLATE = "This is a sound of {}."
NOT_AUDIO_NAME = "not_audio.wav"
# The order requests are handed out in (cycled): a refusal early, so even a 6-request run has one.
PATTERN = ("describe", "classify", "bad_audio", "retrieve", "describe", "classify", "describe", "classify",
           "describe", "retrieve", "classify", "bad_classes", "describe", "classify", "describe", "classify")


# --------------------------------------------------------------------------------------------------------------------
# the server


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def rss_mb(pid: int) -> float:
    """Resident memory of the server process, psutil when installed, else /proc (Linux)."""
    try:
        import psutil
        return psutil.Process(pid).memory_info().rss / 2**20
    except ImportError:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
        raise RuntimeError(f"no VmRSS for process {pid}") from None


def server_command(profile: str, port: int, overrides: Sequence[str]) -> list[str]:
    # server.share=false beats any AUDIOSCRIBE_SERVER__SHARE in the environment: this script never opens a link.
    command = [sys.executable, "app.py", "--profile", profile, "--host", HOST, "--port", str(port),
               "--set", "server.share=false"]
    for item in overrides:
        command += ["--set", item]
    return command


def wait_ready(process: subprocess.Popen, url: str, log: Path, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"the app exited with {process.returncode} before serving:\n{tail(log)}")
        try:
            with urllib.request.urlopen(url, timeout=5) as response:
                if response.status == 200:
                    return
        except OSError:  # not listening yet
            pass
        time.sleep(0.5)
    raise TimeoutError(f"the app did not answer at {url} within {timeout_s:.0f} s:\n{tail(log)}")


def wait_engine_ready(url: str, timeout_s: float) -> None:
    """Wait until the engine has finished loading in the background (a datastore the app builds on first start):
    requests before that are refused by design and would count as errors of the load run."""
    client = Client(url, verbose=False)
    deadline = time.monotonic() + timeout_s
    try:
        while time.monotonic() < deadline:
            status = client.predict(api_name="/status")
            if status.get("readiness") == "ready":
                return
            if status.get("readiness") == "failed":
                raise RuntimeError(f"the app failed to load: {status.get('readiness_message')}")
            time.sleep(1.0)
    finally:
        client.close()
    raise TimeoutError(f"the app was not ready within {timeout_s:.0f} s")


def tail(log: Path, lines: int = 30) -> str:
    return "\n".join(log.read_text(errors="replace").splitlines()[-lines:])


def stop(process: subprocess.Popen) -> None:
    """SIGTERM the server's process group (it runs in its own session), SIGKILL if it lingers."""
    if process.poll() is not None:
        return
    for sig, grace in ((signal.SIGTERM, 15), (signal.SIGKILL, 5)):
        try:
            os.killpg(process.pid, sig)
        except ProcessLookupError:
            return
        try:
            process.wait(grace)
            return
        except subprocess.TimeoutExpired:
            continue


@contextmanager
def running_app(profile: str, overrides: Sequence[str], log: Path, start_timeout_s: float
                ) -> Iterator[tuple[subprocess.Popen, str]]:
    """The app in a child process; stopped however the block exits (errors, Ctrl-C, SIGTERM via SystemExit)."""
    port = free_port()
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "GRADIO_ANALYTICS_ENABLED": "False"}
    with open(log, "wb") as out:
        # Own session: a Ctrl-C reaches only this script, which then stops the server in order.
        process = subprocess.Popen(server_command(profile, port, overrides), cwd=PROJECT_ROOT, env=env,
                                   stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                                   start_new_session=True)
    try:
        url = f"http://{HOST}:{port}/"
        wait_ready(process, url, log, start_timeout_s)
        wait_engine_ready(url, start_timeout_s)
        yield process, url
    finally:
        stop(process)


class PeakSampler(threading.Thread):
    """Samples the server's RSS every ``interval_s`` so the peak between 'before' and 'after' is seen."""

    def __init__(self, pid: int, interval_s: float = 0.2) -> None:
        super().__init__(daemon=True)
        self.pid, self.interval_s, self.peak_mb = pid, interval_s, 0.0
        self._done = threading.Event()

    def run(self) -> None:
        while not self._done.is_set():
            try:
                self.peak_mb = max(self.peak_mb, rss_mb(self.pid))
            except (OSError, RuntimeError):  # the process is gone; the run reports that elsewhere
                return
            self._done.wait(self.interval_s)

    def finish(self) -> float:
        self._done.set()
        self.join()
        return self.peak_mb


# --------------------------------------------------------------------------------------------------------------------
# requests


@dataclass
class Request:
    """One kind of request: what to send, and how to tell a right answer (or the right refusal) from a wrong one."""

    api_name: str
    args: Callable[[int, Path], tuple]  # (request index, not-audio file) -> positional arguments
    check: Callable[[Any], str] = lambda _: ""  # a successful answer -> "" or what is wrong with it
    refusal: str = ""  # a refusal: the message must contain this (the app's own typed error, not Gradio's generic one)


@dataclass
class Outcome:
    kind: str
    seconds: float
    status: str  # ok | refused | error | unfinished
    message: str = ""


def clip(index: int) -> Any:
    return handle_file(str(EXAMPLES[index % len(EXAMPLES)]))


def check_table(table: Any) -> str:
    return "" if isinstance(table, dict) and table.get("data") else f"no caption rows: {str(table)[:200]}"


def check_describe(value: Any) -> str:
    info, generated, table, *_ = value
    if not isinstance(generated, str) or not generated.strip():
        return f"no generated caption: {generated!r}"
    return check_table(table)


def check_classify(value: Any) -> str:
    _, label, *_ = value
    got = {c["label"] for c in label.get("confidences", [])} if isinstance(label, dict) else set()
    want = set(CLASSES.splitlines())
    return "" if got == want else f"scores for {sorted(got)}, expected {sorted(want)}"


REQUESTS: dict[str, Request] = {
    "describe": Request("/describe", lambda i, _: (clip(i), 5), check_describe),
    "classify": Request("/classify", lambda i, _: (clip(i), CLASSES, TEMPLATE, False, 0.5), check_classify),
    "retrieve": Request("/retrieve", lambda i, _: (clip(i), 5), lambda v: check_table(v[1])),
    # A text file named .wav: the upload succeeds, decoding must fail with a message naming the file (not its path).
    "bad_audio": Request("/describe", lambda _, bad: (handle_file(str(bad)), 5),
                         refusal=f"Could not decode '{NOT_AUDIO_NAME}'"),
    "bad_classes": Request("/classify", lambda i, _: (clip(i), " , ", TEMPLATE, False, 0.5),
                           refusal="Type at least one class name"),
}


def judge_refusal(spec: Request, message: str) -> str:
    """'refused' for the expected typed message, else 'error' (a generic 'upstream app raised', a server path...)."""
    leaked_path = re.search(r"[/\\][^\s'\"]*" + re.escape(NOT_AUDIO_NAME), message)
    return "refused" if spec.refusal and spec.refusal in message and not leaked_path else "error"


def ask(client: Client, api_name: str, args: tuple, timeout_s: float) -> Any:
    job = client.submit(*args, api_name=api_name)
    try:
        return job.result(timeout=timeout_s)
    except TimeoutError:
        job.cancel()  # frees its place in the server's queue
        raise


def send(client: Client, kind: str, index: int, not_audio: Path, timeout_s: float) -> Outcome:
    """One request, timed from submit to answer (upload, queueing and processing included)."""
    spec = REQUESTS[kind]
    started = time.perf_counter()
    try:
        value = ask(client, spec.api_name, spec.args(index, not_audio), timeout_s)
    except TimeoutError:
        return Outcome(kind, time.perf_counter() - started, "unfinished", f"no answer within {timeout_s:.0f} s")
    except AppError as e:
        message = str(e)
        return Outcome(kind, time.perf_counter() - started, judge_refusal(spec, message), message)
    except Exception as e:  # noqa: BLE001 - any other failure is an error to count and show, not to crash on
        return Outcome(kind, time.perf_counter() - started, "error", f"{type(e).__name__}: {e}")
    seconds = time.perf_counter() - started
    if spec.refusal:
        return Outcome(kind, seconds, "error", f"accepted a bad input (expected '{spec.refusal}')")
    problem = spec.check(value)
    return Outcome(kind, seconds, "error" if problem else "ok", problem)


def schedule(total: int) -> "queue.Queue[tuple[int, str]]":
    jobs: queue.Queue[tuple[int, str]] = queue.Queue()
    for i in range(total):
        jobs.put((i, PATTERN[i % len(PATTERN)]))
    return jobs


def worker(client: Client, jobs: queue.Queue, deadline: float, stop: threading.Event, not_audio: Path,
           request_timeout_s: float, outcomes: list[Outcome]) -> None:
    """Takes the next request until none is left, the time cap is reached or the run is interrupted (list.append
    is thread-safe)."""
    while (left := deadline - time.monotonic()) > 0 and not stop.is_set():
        try:
            index, kind = jobs.get_nowait()
        except queue.Empty:
            return
        outcomes.append(send(client, kind, index, not_audio, min(request_timeout_s, left)))


def run_load(url: str, args: argparse.Namespace, not_audio: Path) -> tuple[list[Outcome], float, int]:
    """(outcomes, wall seconds, requests never sent because the time cap came first)."""
    clients = [Client(url, verbose=False) for _ in range(args.clients)]  # one session each, made before the clock
    jobs = schedule(args.requests)
    outcomes: list[Outcome] = []
    started = time.perf_counter()
    deadline = time.monotonic() + args.max_seconds
    stop = threading.Event()
    threads = [threading.Thread(target=worker, daemon=True,
                                args=(c, jobs, deadline, stop, not_audio, args.request_timeout, outcomes))
               for c in clients]
    for t in threads:
        t.start()
    try:
        for t in threads:
            t.join()
    finally:
        stop.set()  # on Ctrl-C: nothing new is sent; requests in flight fail fast once the server is stopped
    wall = time.perf_counter() - started
    for c in clients:
        c.close()
    return outcomes, wall, jobs.qsize()


# --------------------------------------------------------------------------------------------------------------------
# summary and report


def stats(outcomes: list[Outcome]) -> dict:
    answered = [o for o in outcomes if o.status != "unfinished"]
    ms = np.array([o.seconds * 1000 for o in answered]) if answered else np.zeros(1)
    return {"requests": len(answered), "ok": sum(o.status == "ok" for o in answered),
            "refused": sum(o.status == "refused" for o in answered),
            "errors": sum(o.status == "error" for o in answered),
            "unfinished": len(outcomes) - len(answered),
            "p50_ms": float(np.percentile(ms, 50)), "p95_ms": float(np.percentile(ms, 95)), "max_ms": float(ms.max())}


def summarize(outcomes: list[Outcome], wall: float, unsent: int, rss: dict) -> dict:
    kinds = [k for k in REQUESTS if any(o.kind == k for o in outcomes)]
    total = stats(outcomes)
    total["unfinished"] += unsent
    return {**total, "wall_s": wall, **rss, "by_kind": {k: stats([o for o in outcomes if o.kind == k]) for k in kinds},
            "error_messages": [f"{o.kind}: {o.message}" for o in outcomes if o.status in ("error", "unfinished")]}


def table(summary: dict) -> str:
    lines = ["| request | endpoint | requests | ok | expected refusals | errors | p50 ms | p95 ms | max ms |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    rows = [(k, REQUESTS[k].api_name, s) for k, s in summary["by_kind"].items()] + [("**all**", "", summary)]
    for name, api, s in rows:
        lines.append(f"| {name} | {api} | {s['requests']} | {s['ok']} | {s['refused']} | {s['errors']} | "
                     f"{s['p50_ms']:.0f} | {s['p95_ms']:.0f} | {s['max_ms']:.0f} |")
    return "\n".join(lines)


def report(summary: dict, args: argparse.Namespace, command: str) -> str:
    m = machine_facts()
    s = summary
    return "\n".join([
        f"Command: `{command}`  ", f"Date: {time.strftime('%Y-%m-%dT%H:%M:%S%z')}  ",
        f"Machine: {m['cpu']}, {m['usable_cores']} usable cores; Python {m['python']}, torch {m['torch']}. Shared "
        "machine: other processes may have been running, so latencies are upper bounds.", "",
        f"Profile `{args.profile}`, app on {HOST} (loopback), {args.clients} concurrent gradio_client sessions, "
        f"{args.requests} requests planned with a {args.max_seconds:.0f}-s cap: {s['requests']} answered in "
        f"{s['wall_s']:.1f} s ({s['requests'] / max(s['wall_s'], 1e-9):.2f} req/s), {s['unfinished']} unfinished. "
        f"Latency is submit to answer (upload, queue wait and work). Clips: the {len(EXAMPLES)} files of "
        f"assets/examples in turn; expected refusals are a text file named `{NOT_AUDIO_NAME}` and an empty class "
        "list, each answered with the app's own message.", "",
        table(s), "",
        f"Server RSS: {s['rss_before_mb']:.0f} MB before, {s['rss_peak_mb']:.0f} MB peak (sampled every 0.2 s), "
        f"{s['rss_after_mb']:.0f} MB after.", "",
        # Closed loop: a session sends its next request only when answered, so by Little's law the latency is about
        # sessions / throughput whatever the endpoint; said here so nobody reads it as the cost of one request.
        f"Each session waits for its answer before sending again, so latency is mostly queue wait: about "
        f"{args.clients} sessions / {s['requests'] / max(s['wall_s'], 1e-9):.2f} req/s = "
        f"{1000 * args.clients * s['wall_s'] / max(s['requests'], 1):.0f} ms for every endpoint (Gradio runs one "
        "request per event at a time by default, and the machine's cores are shared by server and clients)."])


# --------------------------------------------------------------------------------------------------------------------
# main


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m benchmarks.bench_load", description=__doc__.split("\n\n")[0])
    p.add_argument("--profile", default="offline", help="app profile to serve (default: offline)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.FIELD=VALUE",
                   help="passed on to app.py --set (repeatable)")
    p.add_argument("--clients", type=int, default=8, help="concurrent client sessions (default: 8)")
    p.add_argument("--requests", type=int, default=160, help="requests in all (default: 160)")
    p.add_argument("--max-seconds", type=float, default=300.0, help="cap on the load phase (default: 300)")
    p.add_argument("--request-timeout", type=float, default=120.0, help="longest wait for one answer (default: 120)")
    p.add_argument("--start-timeout", type=float, default=300.0, help="longest wait for the app to start "
                   "(default: 300; a first start may build a datastore)")
    p.add_argument("--no-write", action="store_true", help="print only; leave RESULTS.md alone")
    args = p.parse_args(argv)
    if min(args.clients, args.requests) < 1 or min(args.max_seconds, args.request_timeout) <= 0:
        p.error("--clients and --requests must be at least 1, the times positive")
    return args


def main(argv: Sequence[str] | None = None) -> dict:
    """Run the benchmark; returns the summary (requests, errors, unfinished, p50_ms, p95_ms, rss_*_mb, by_kind...)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="bench-load-") as tmp:
        not_audio = Path(tmp) / NOT_AUDIO_NAME
        not_audio.write_text("this is not audio\n")
        with running_app(args.profile, args.overrides, Path(tmp) / "app.log", args.start_timeout) as (process, url):
            rss = {"rss_before_mb": rss_mb(process.pid)}
            sampler = PeakSampler(process.pid)
            sampler.start()
            try:
                outcomes, wall, unsent = run_load(url, args, not_audio)
            finally:
                rss["rss_peak_mb"] = sampler.finish()
            rss["rss_after_mb"] = rss_mb(process.pid)
            rss["rss_peak_mb"] = max(rss.values())  # the sampler may miss the endpoints
    summary = summarize(outcomes, wall, unsent, rss)
    text = report(summary, args, shlex.join(["python", "-m", "benchmarks.bench_load", *argv]))
    print(text)
    for message in summary["error_messages"]:
        print(f"FAILED {message}", file=sys.stderr)
    if not args.no_write:
        if summary["errors"] or summary["unfinished"]:
            print("Not written to RESULTS.md: the run had errors or unfinished requests.", file=sys.stderr)
        else:
            write_section(RESULTS, f"{SECTION_TITLE}\n\n{text}", title=SECTION_TITLE)
    return summary


def _exit_on_sigterm(*_: object) -> None:
    raise SystemExit(143)  # unwinds through running_app's finally, so the server is stopped too


if __name__ == "__main__":
    signal.signal(signal.SIGTERM, _exit_on_sigterm)
    result = main()
    sys.exit(1 if result["errors"] or result["unfinished"] else 0)
