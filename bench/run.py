"""`make bench`: direct vs LiteLLM proxy vs TokenOpen on one fast fake upstream, in one run.

Starts bench/fake_fast.py, the gateway exactly as `make run` does (bootstrap, then gunicorn
with one gevent worker, a fresh SQLite database under a temp folder, billing and logging on),
the floor of our stack (bench/floor_app.py: Flask on the same gunicorn+gevent, answering a
canned body or relaying with our upstream client) and the LiteLLM proxy from
bench/.litellm-venv (one worker, no database, a master key), then measures each target in
turn with Debian's `wrk` (as fast as answered, then paced below saturation) and a small stream
client, with each target's CPU per request. Prints a markdown table; writes
bench/results/latest.json and .md; a full run also refreshes the table in bench/README.md.
Read the ratios: the machine is shared and noisy.

    .venv/bin/python bench/run.py [--only direct,tokenopen] [--duration 5] [--skip-burst]
"""
import argparse
import asyncio
import datetime
import http.client
import json
import os
import re
import secrets
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request

BENCH = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(BENCH)
PYTHON = sys.executable
LITELLM = os.path.join(BENCH, ".litellm-venv", "bin", "litellm")
RESULTS = os.path.join(BENCH, "results")
TARGETS = ("direct", "floor", "litellm", "tokenopen")
# Table columns in order; "floor" is two: Flask answering a canned body, Flask relaying.
COLUMNS = ("direct", "floor_canned", "floor_relay", "litellm", "tokenopen")
PACED_SECONDS = 10
MODEL = "bench-model"
SLOW_MODEL = "slow-model"
BODY = {"model": MODEL, "messages": [{"role": "user", "content": "hello there"}]}
MEMBER = "bench@example.com"
LITELLM_VERSION = "1.106.12"


def free_port():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_http(url, proc, timeout=60):
    """Poll `url` until it answers below 500; fail early when `proc` died, and stop it when
    it never answers (the caller has not taken it into its list of processes to stop yet)."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"process for {url} exited with {proc.returncode}")
        try:
            with urllib.request.urlopen(url, timeout=1) as response:
                if response.status < 500:
                    return
        except OSError:
            pass
        time.sleep(0.2)
    stop(proc)
    raise RuntimeError(f"{url} did not come up in {timeout} s")


def start(args, log_path, **kwargs):
    """Popen in its own session (so stop() ends its children too), output to `log_path`."""
    log = open(log_path, "w")
    return subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                            **kwargs)


def stop(proc):
    if proc is None or proc.poll() is not None:
        return
    os.killpg(proc.pid, signal.SIGINT)
    try:
        proc.wait(15)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(5)


def rss_mb(pid, field="VmRSS"):
    """Resident memory (or its peak with field=VmHWM) of `pid` in MB."""
    with open(f"/proc/{pid}/status") as fh:
        for line in fh:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    return None


def children(pid):
    with open(f"/proc/{pid}/task/{pid}/children") as fh:
        return [int(p) for p in fh.read().split()]


def cpu_seconds(pid):
    """CPU time (user + system) used so far by `pid` and every process under it: steadier
    than latency on a shared machine, whose speed varies from minute to minute."""
    try:
        with open(f"/proc/{pid}/stat") as fh:
            fields = fh.read().rsplit(")", 1)[1].split()
        ticks = int(fields[11]) + int(fields[12])  # utime, stime
        kids = children(pid)
    except (OSError, IndexError):
        return 0.0
    return ticks / os.sysconf("SC_CLK_TCK") + sum(cpu_seconds(kid) for kid in kids)


# --- the targets ---------------------------------------------------------------------------

class Target:
    """A base URL, its auth and the process to watch for memory and CPU."""

    def __init__(self, name, base, auth="", proc=None):
        self.name, self.base, self.auth, self.proc = name, base, auth, proc
        self.url = base + "/v1/chat/completions"
        self.worker_pid = None


def start_fake(port, workdir, slow_interval, slow_chunks):
    proc = start([PYTHON, os.path.join(BENCH, "fake_fast.py"), "--port", str(port),
                  "--slow-interval", str(slow_interval), "--slow-chunks", str(slow_chunks)],
                 os.path.join(workdir, "fake.log"))
    wait_http(f"http://127.0.0.1:{port}/_health", proc)
    return proc


def gateway_env(workdir, port):
    """The environment of `make run` with a fresh database: one worker, no Redis."""
    env = dict(os.environ)
    for name in ("TOKENOPEN_REDIS_URL", "WEB_CONCURRENCY", "TOKENOPEN_DATABASE_URL"):
        env.pop(name, None)
    env.update({"TOKENOPEN_DATABASE_URL": f"sqlite:///{workdir}/tokenopen.db",
                "TOKENOPEN_SECRET_KEY": secrets.token_hex(16),
                "HOST": "127.0.0.1", "PORT": str(port)})
    return env


def flask_cli(env, *args):
    """One admin CLI command, as an admin would type it; returns its stdout."""
    done = subprocess.run([PYTHON, "-m", "flask", "--app", "app", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=120)
    if done.returncode:
        raise RuntimeError(f"flask {' '.join(args)} failed: {done.stderr[-2000:]}")
    return done.stdout


def start_tokenopen(workdir, upstream):
    """Bootstrap, seed a member with credits and a priced channel on the fake, then serve."""
    port = free_port()
    env = gateway_env(workdir, port)
    flask_cli(env, "bootstrap")
    flask_cli(env, "groups", "set", "default", "--rpm", "0", "--tpm", "0")
    flask_cli(env, "users", "create", MEMBER, "--password", secrets.token_hex(8))
    flask_cli(env, "credits", "grant", MEMBER, "1000000")
    flask_cli(env, "channels", "add", "fake", "--type", "openai", "--base-url", upstream,
              "--api-key", "sk-fake-upstream", "--models", f"{MODEL},{SLOW_MODEL}")
    for model in (MODEL, SLOW_MODEL):
        flask_cli(env, "prices", "set", model, "--input", "1", "--output", "2")
    key = flask_cli(env, "keys", "create", MEMBER, "--name", "bench").strip().splitlines()[-1]
    proc = start([os.path.join(ROOT, ".venv", "bin", "gunicorn"), "-c", "gunicorn.conf.py",
                  "wsgi:app"], os.path.join(workdir, "gunicorn.log"), cwd=ROOT, env=env)
    wait_http(f"http://127.0.0.1:{port}/healthz", proc)
    target = Target("tokenopen", f"http://127.0.0.1:{port}", key, proc)
    target.worker_pid = children(proc.pid)[0]
    target.env = env
    return target


def start_floor(workdir, upstream):
    """bench/floor_app.py on gunicorn+gevent, one worker, as `make run` serves TokenOpen:
    two targets, Flask answering a canned body and Flask relaying with our upstream client."""
    port = free_port()
    env = dict(os.environ, FLOOR_UPSTREAM=upstream, PYTHONPATH=ROOT)
    config = os.path.join(workdir, "floor.conf.py")  # not gunicorn.conf.py: its hooks start
    with open(config, "w") as fh:                     # the hold keeper
        fh.write("control_socket_disable = True\n")
    proc = start([os.path.join(ROOT, ".venv", "bin", "gunicorn"), "-c", config,
                  "-k", "gevent", "-w", "1",
                  "--worker-connections", "2000", "--keep-alive", "75",
                  "-b", f"127.0.0.1:{port}", "bench.floor_app:app"],
                 os.path.join(workdir, "floor.log"), cwd=ROOT, env=env)
    wait_http(f"http://127.0.0.1:{port}/", proc)
    targets = []
    for name, prefix in (("floor_canned", "/canned"), ("floor_relay", "/relay")):
        target = Target(name, f"http://127.0.0.1:{port}{prefix}", proc=proc)
        target.worker_pid = children(proc.pid)[0]
        targets.append(target)
    return targets


def litellm_unavailable():
    """Why the LiteLLM proxy cannot run here, or None."""
    if not os.path.exists(LITELLM):
        return (f"{LITELLM} is missing: `make bench-litellm` installs "
                f"litellm[proxy]=={LITELLM_VERSION} there")
    return None


def start_litellm(workdir, upstream):
    port = free_port()
    config = os.path.join(workdir, "litellm.yaml")
    with open(config, "w") as fh:
        fh.write(f"""model_list:
  - model_name: {MODEL}
    litellm_params:
      model: openai/{MODEL}
      api_base: {upstream}/v1
      api_key: sk-fake-upstream
general_settings:
  master_key: sk-bench-master
litellm_settings:
  telemetry: false
""")
    env = dict(os.environ, LITELLM_LOCAL_MODEL_COST_MAP="True")
    env.pop("DATABASE_URL", None)
    proc = start([LITELLM, "--config", config, "--host", "127.0.0.1", "--port", str(port),
                  "--num_workers", "1"], os.path.join(workdir, "litellm.log"), cwd=workdir,
                 env=env)
    wait_http(f"http://127.0.0.1:{port}/health/liveliness", proc, timeout=120)
    target = Target("litellm", f"http://127.0.0.1:{port}", "sk-bench-master", proc)
    target.worker_pid = proc.pid
    return target


# --- measurements -------------------------------------------------------------------------

def wrk(target, connections, duration, rate=None):
    """wrk's figures for `connections` keep-alive connections (latencies in ms), and the
    target's CPU per request. With `rate`, the connections are paced to offer about `rate`
    requests/s in all (random pauses, post.lua); without, each sends as fast as answered."""
    env = dict(os.environ, BENCH_BODY=json.dumps(BODY), BENCH_AUTH=target.auth)
    if rate:
        env["BENCH_DELAY_MS"] = str(1000 * connections / rate)
    threads = 1 if connections == 1 else 2
    cpu_pid = target.proc.pid if target.proc else None
    cpu_before = cpu_seconds(cpu_pid) if cpu_pid else None
    out = subprocess.run(["wrk", "-t", str(threads), "-c", str(connections), "-d", f"{duration}s",
                          "--timeout", "30s", "-s", os.path.join(BENCH, "lua", "post.lua"),
                          target.url], env=env, capture_output=True, text=True,
                         timeout=duration + 60)
    cpu = cpu_seconds(cpu_pid) - cpu_before if cpu_pid else None
    line = next(l for l in out.stdout.splitlines() if l.startswith("BENCH_JSON "))
    raw = json.loads(line[len("BENCH_JSON "):])
    errors = {k[len("errors_"):]: v for k, v in raw.items() if k.startswith("errors_") and v}
    return {"connections": connections, "duration_s": duration, "requests": raw["requests"],
            "rps": round(raw["requests"] / (raw["duration_us"] / 1e6), 1),
            "p50_ms": raw["p50"] / 1000, "p95_ms": raw["p95"] / 1000,
            "p99_ms": raw["p99"] / 1000, "max_ms": raw["max"] / 1000,
            "errors": sum(errors.values()), "errors_by_kind": errors,
            "offered_rps": rate,
            "cpu_ms_per_request": round(1000 * cpu / raw["requests"], 3)
            if cpu is not None and raw["requests"] else None}


def pct(values, p):
    values = sorted(values)
    return values[min(len(values) - 1, max(0, round(p / 100 * len(values)) - 1))]


def ttft(target, count):
    """Time to the first content token of `count` sequential streams on one keep-alive
    connection, in ms (the fake sends every event at once; "Hello" is the first token)."""
    host, port = target.base.split("//")[1].split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=30)
    headers = {"Content-Type": "application/json"}
    if target.auth:
        headers["Authorization"] = f"Bearer {target.auth}"
    body = json.dumps(dict(BODY, stream=True))
    firsts, totals = [], []
    for _ in range(count):
        started = time.perf_counter()
        conn.request("POST", "/v1/chat/completions", body=body, headers=headers)
        response = conn.getresponse()
        seen = b""
        while b"Hello" not in seen:
            data = response.read1(65536)
            if not data:
                raise RuntimeError(f"{target.name}: stream ended without a token: {seen[:300]}")
            seen += data
        firsts.append((time.perf_counter() - started) * 1000)
        response.read()
        totals.append((time.perf_counter() - started) * 1000)
    conn.close()
    return {"streams": count, "p50_ms": round(statistics.median(firsts), 3),
            "p95_ms": round(pct(firsts, 95), 3), "p99_ms": round(pct(firsts, 99), 3),
            "whole_stream_p50_ms": round(statistics.median(totals), 3)}


async def _one_stream(host, port, payload, started, deadline):
    """Open a stream; return (seconds to first token, completed?)."""
    reader, writer = await asyncio.wait_for(asyncio.open_connection(host, port), deadline)
    try:
        writer.write(payload)
        await writer.drain()
        seen = b""
        while b"Hello" not in seen:
            data = await asyncio.wait_for(reader.read(65536), deadline)
            if not data:  # answered without a token: keep the answer as a failure example
                raise RuntimeError(seen[:300].decode("utf-8", "replace"))
            seen += data
        first = time.perf_counter() - started
        while True:  # keep the stream open to its end, as a chat client would
            data = await asyncio.wait_for(reader.read(65536), deadline)
            if not data:
                return first, b"[DONE]" in seen
            seen = seen[-64:] + data
    finally:
        writer.close()


def burst(target, streams, timeout):
    """`streams` slow streams opened at once: when every one had its first token, and the
    worker's memory while they ran."""
    host, port = target.base.split("//")[1].split(":")
    body = json.dumps({"model": SLOW_MODEL, "stream": True,
                       "messages": [{"role": "user", "content": "hello there"}]}).encode()
    payload = (f"POST /v1/chat/completions HTTP/1.1\r\nHost: {host}:{port}\r\n"
               f"Authorization: Bearer {target.auth}\r\nContent-Type: application/json\r\n"
               f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n").encode() + body
    samples = []
    stop_sampling = threading.Event()

    def sample():
        while not stop_sampling.is_set():
            samples.append(rss_mb(target.worker_pid))
            stop_sampling.wait(0.1)
    sampler = threading.Thread(target=sample, daemon=True)
    before = rss_mb(target.worker_pid)
    sampler.start()

    async def run_all():
        started = time.perf_counter()
        return await asyncio.gather(*(_one_stream(host, int(port), payload, started, timeout)
                                      for _ in range(streams)), return_exceptions=True)
    results = asyncio.run(run_all())
    stop_sampling.set()
    sampler.join()
    firsts = [r[0] for r in results if isinstance(r, tuple) and r[0] is not None]
    failures = [repr(r)[:200] for r in results if not isinstance(r, tuple)]
    return {"streams": streams, "first_token": len(firsts),
            "completed": sum(1 for r in results if isinstance(r, tuple) and r[1]),
            "failed": len(results) - len(firsts), "failure_examples": failures[:3],
            "all_first_tokens_s": round(max(firsts), 2) if firsts else None,
            "first_token_p50_s": round(statistics.median(firsts), 2) if firsts else None,
            "first_token_p99_s": round(pct(firsts, 99), 2) if firsts else None,
            "rss_before_mb": round(before, 1), "rss_peak_mb": round(max(samples + [before]), 1),
            "worker_peak_rss_vmhwm_mb": round(rss_mb(target.worker_pid, "VmHWM"), 1)}


def measure(target, args):
    """Every figure of one target, with a short warm-up first (the floors: sequential and 50
    connections only; they have no streams)."""
    floor = target.name.startswith("floor")
    print(f"-- {target.name}: warm-up, sequential / 50 / 200 connections"
          + ("" if floor else f" and {args.ttft_streams} streams"), flush=True)
    wrk(target, 4, 1)
    if floor:
        figures = {"sequential": wrk(target, 1, args.duration)}
        figures["c50"] = wrk(target, 50, args.duration)
        print(f"   {target.name}: sequential p50 {figures['sequential']['p50_ms']:.2f} ms, "
              f"50 connections {figures['c50']['rps']} req/s", flush=True)
        return figures
    ttft(target, 5)
    figures = {"sequential": wrk(target, 1, args.duration)}
    # wrk counts the requests that finish inside its window, and a saturated server finishes
    # its first ones only after about connections / throughput seconds: the window must be
    # several times that (here 5x, at most 20 s) or the rate reads low.
    for name, connections, basis in (("c50", 50, "sequential"), ("c200", 200, "c50")):
        rate = max(figures[basis]["rps"], 1)
        figures[name] = wrk(target, connections,
                            max(args.duration, min(20, round(5 * connections / rate))))
    figures["ttft"] = ttft(target, args.ttft_streams)
    if target.worker_pid:
        figures["rss_after_load_mb"] = round(rss_mb(target.worker_pid), 1)
    print(f"   {target.name}: " + ", ".join(
        f"{k} p50 {figures[k]['p50_ms']:.2f} ms {figures[k].get('rps', '')}"
        for k in ("sequential", "c50", "c200", "ttft")), flush=True)
    return figures


def paced_rate(results, args):
    """The offered load of the paced runs: --paced-rate, else half what the LiteLLM proxy
    answered at 50 connections (a load both gateways can carry), else 100 req/s."""
    if args.paced_rate:
        return args.paced_rate
    litellm = results["targets"].get("litellm", {}).get("c50", {}).get("rps")
    return max(1, round(litellm / 2)) if litellm else 100


def measure_paced(targets, results, args):
    """Latency at 50 connections below saturation, where a closed loop at 50 connections only
    measures its own queue (50 / throughput): every target at one common offered rate, and
    the gateways and floors also at half their own 50-connection throughput."""
    common = paced_rate(results, args)
    duration = max(args.duration, PACED_SECONDS)
    for target in targets:
        figures = results["targets"][target.name]
        print(f"-- {target.name}: 50 connections paced at {common} req/s", flush=True)
        figures["c50_paced"] = wrk(target, 50, duration, rate=common)
        if target.name != "direct":
            half = max(1, round(figures["c50"]["rps"] / 2))
            print(f"-- {target.name}: 50 connections paced at {half} req/s (half its own)",
                  flush=True)
            figures["c50_half"] = wrk(target, 50, duration, rate=half)


# --- report -------------------------------------------------------------------------------

def _errors(fig):
    """' (N errors: kind n, ...)' when wrk saw any (a timeout is a reply slower than 30 s)."""
    if not fig.get("errors"):
        return ""
    kinds = ", ".join(f"{k} {v}" for k, v in fig.get("errors_by_kind", {}).items())
    return f" ({fig['errors']} errors{': ' + kinds if kinds else ''})"


def table(results):
    """The markdown table of one run (added = this target minus direct)."""
    measured = [t for t in COLUMNS if t in results["targets"]]
    direct = results["targets"].get("direct")
    names = {"direct": "direct to upstream", "floor_canned": "floor: Flask, canned body",
             "floor_relay": "floor: Flask relaying", "litellm": f"LiteLLM proxy {LITELLM_VERSION}",
             "tokenopen": "TokenOpen"}

    def cell(name, section, keys, added=True, basis=None):
        fig = results["targets"][name].get(section)
        if fig is None:
            return "—"
        base = (direct or {}).get(basis or section)
        if name == "direct" or not base or not added:
            text = " / ".join(f"{fig[k]:.2f}" for k in keys) + " ms"
        else:
            text = " / ".join(f"+{fig[k] - base[k]:.2f}" for k in keys) + " ms"
        if section == "c50_half":
            text += f" at {fig['offered_rps']:,} req/s"
        return text + _errors(fig)

    def rps(name, section):
        fig = results["targets"][name].get(section)
        if fig is None:
            return "—"
        text = f"{fig['rps']:,.0f}"
        if name == "tokenopen" and results["targets"].get("litellm", {}).get(section, {}).get("rps"):
            text += f" ({fig['rps'] / results['targets']['litellm'][section]['rps']:.1f}× LiteLLM)"
        return text + _errors(fig)

    def cpu(name):
        fig = results["targets"][name].get("c50") or {}
        value = fig.get("cpu_ms_per_request")
        return "—" if value is None else f"{value:.2f} ms"
    keys = ("p50_ms", "p95_ms", "p99_ms")
    paced = (direct or {}).get("c50_paced", {}).get("offered_rps")
    rows = [
        ("latency p50 / p95 / p99, sequential, non-stream (direct; others: added)",
         [cell(n, "sequential", keys) for n in measured]),
        ("latency p50 / p95 / p99 at 50 connections, each sending as fast as answered "
         "(direct; others: added)", [cell(n, "c50", keys) for n in measured]),
    ]
    if paced:
        rows += [
            (f"latency p50 / p95 / p99 at 50 connections paced at {paced:,} req/s in all "
             "(direct; others: added)", [cell(n, "c50_paced", keys) for n in measured]),
            ("latency p50 / p95 / p99 at 50 connections paced at half the target's own "
             f"throughput (added to direct at {paced:,} req/s)",
             [cell(n, "c50_half", keys, basis="c50_paced") for n in measured]),
        ]
    rows += [
        ("requests/s at 50 connections", [rps(n, "c50") for n in measured]),
        ("CPU per request at 50 connections (the target's processes)",
         [cpu(n) for n in measured]),
        ("requests/s at 200 connections", [rps(n, "c200") for n in measured]),
        ("time to first token p50 / p95 / p99, sequential streams (direct; others: added)",
         [cell(n, "ttft", keys) for n in measured]),
    ]
    idle = [f"{results['targets'][n]['rss_idle_mb']:.0f} MB"
            if results["targets"][n].get("rss_idle_mb") else "—" for n in measured]
    rows.append(("worker RSS idle (after start, before any request)", idle))
    burst_fig = results.get("burst")
    if burst_fig:
        text = (f"{burst_fig['first_token']}/{burst_fig['streams']} got a first token, "
                f"all within {burst_fig['all_first_tokens_s']} s (p50 "
                f"{burst_fig['first_token_p50_s']} s, p99 {burst_fig['first_token_p99_s']} s); "
                f"{burst_fig['completed']} completed; worker RSS peak "
                f"{burst_fig['rss_peak_mb']:.0f} MB")
        rows.append((f"{burst_fig['streams']} concurrent slow streams, one worker",
                     [text if n == "tokenopen" else "—" for n in measured]))
    lines = ["| | " + " | ".join(names[n] for n in measured) + " |",
             "|---|" + "---:|" * len(measured)]
    lines += [f"| {label} | " + " | ".join(cells) + " |" for label, cells in rows]
    return "\n".join(lines)


def update_readme(markdown, results):
    path = os.path.join(BENCH, "README.md")
    with open(path) as fh:
        text = fh.read()
    block = (f"<!-- bench:latest -->\nLatest full run: {results['date']}, commit "
             f"{results.get('commit', '?')}, "
             f"{results['machine']['cpus']} CPUs, load average before the run "
             f"{results['machine']['load_before']}; {results['settings']['duration_s']} s per "
             f"wrk run, fake upstream alone: {results['targets']['direct']['c50']['rps']:,.0f} "
             f"req/s at 50 connections.\n\n{markdown}\n<!-- /bench:latest -->")
    text = re.sub(r"<!-- bench:latest -->.*?<!-- /bench:latest -->", lambda _: block, text,
                  flags=re.S)
    with open(path, "w") as fh:
        fh.write(text)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--only", default=",".join(TARGETS),
                        help="comma-separated subset of direct,floor,litellm,tokenopen")
    parser.add_argument("--duration", type=int, default=6, help="seconds per wrk run")
    parser.add_argument("--ttft-streams", type=int, default=200)
    parser.add_argument("--streams", type=int, default=2000, help="burst size (TokenOpen)")
    parser.add_argument("--skip-burst", action="store_true")
    parser.add_argument("--slow-interval", type=float, default=1.0,
                        help="seconds between chunks of a burst stream")
    parser.add_argument("--slow-chunks", type=int, default=5, help="tokens per burst stream")
    parser.add_argument("--paced-rate", type=int, default=0,
                        help="req/s offered by the paced runs at 50 connections "
                             "(default: half the LiteLLM proxy's 50-connection throughput)")
    parser.add_argument("--skip-paced", action="store_true")
    parser.add_argument("--report", metavar="JSON",
                        help="only print the table of a saved run (e.g. bench/results/latest.json)")
    parser.add_argument("--no-readme", action="store_true",
                        help="do not refresh bench/README.md even after a full run")
    args = parser.parse_args()
    if args.report:
        with open(args.report) as fh:
            print(table(json.load(fh)))
        return
    wanted = [t for t in args.only.split(",") if t]
    unknown = set(wanted) - set(TARGETS)
    if unknown:
        parser.error(f"unknown targets: {', '.join(sorted(unknown))}")
    if not shutil.which("wrk"):
        sys.exit("wrk is missing: apt-get install -y wrk (make bench does it)")
    if "direct" not in wanted:
        wanted.insert(0, "direct")  # the added figures need the baseline
    skipped = {}
    if "litellm" in wanted and litellm_unavailable():
        skipped["litellm"] = litellm_unavailable()
        wanted.remove("litellm")
        print(f"LiteLLM skipped: {skipped['litellm']}", flush=True)

    workdir = tempfile.mkdtemp(prefix="tokenopen-bench-")
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT,
                            capture_output=True, text=True).stdout.strip()
    results = {"date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
               "commit": commit,
               "machine": {"cpus": os.cpu_count(),
                           "load_before": round(os.getloadavg()[0], 2)},
               "settings": {"duration_s": args.duration, "ttft_streams": args.ttft_streams,
                            "burst_streams": 0 if args.skip_burst else args.streams,
                            "slow_interval_s": args.slow_interval,
                            "slow_chunks": args.slow_chunks, "body": BODY},
               "targets": {}, "skipped": skipped, "workdir": workdir}
    procs = []
    began = time.time()
    try:
        fake_port = free_port()
        procs.append(start_fake(fake_port, workdir, args.slow_interval, args.slow_chunks))
        upstream = f"http://127.0.0.1:{fake_port}"
        targets = [Target("direct", upstream, proc=procs[-1])]
        if "floor" in wanted:
            print("starting the floor (Flask on gunicorn+gevent)...", flush=True)
            targets += start_floor(workdir, upstream)
            procs.append(targets[-1].proc)
        if "tokenopen" in wanted:
            print("starting TokenOpen (bootstrap, seed, gunicorn)...", flush=True)
            targets.append(start_tokenopen(workdir, upstream))
            procs.append(targets[-1].proc)
        if "litellm" in wanted:
            print("starting the LiteLLM proxy...", flush=True)
            try:
                targets.append(start_litellm(workdir, upstream))
                procs.append(targets[-1].proc)
            except RuntimeError as err:
                skipped["litellm"] = f"{err}; see {workdir}/litellm.log"
                print(f"LiteLLM skipped: {skipped['litellm']}", flush=True)
        time.sleep(1)
        targets.sort(key=lambda t: COLUMNS.index(t.name))
        for target in targets:
            idle = round(rss_mb(target.worker_pid), 1) \
                if target.worker_pid and not target.name.startswith("floor") else None
            results["targets"][target.name] = dict(measure(target, args), rss_idle_mb=idle)
        if not args.skip_paced:
            measure_paced(targets, results, args)
        tokenopen = next((t for t in targets if t.name == "tokenopen"), None)
        if tokenopen and not args.skip_burst:
            print(f"-- tokenopen: {args.streams} concurrent slow streams", flush=True)
            results["burst"] = burst(tokenopen, args.streams, timeout=90)
    finally:
        for proc in reversed(procs):
            stop(proc)
        results["elapsed_s"] = round(time.time() - began, 1)
        os.makedirs(RESULTS, exist_ok=True)
        with open(os.path.join(RESULTS, "latest.json"), "w") as fh:
            json.dump(results, fh, indent=2)

    markdown = table(results)
    with open(os.path.join(RESULTS, "latest.md"), "w") as fh:
        fh.write(f"{results['date']}\n\n{markdown}\n")
    print("\n" + markdown + f"\n\n(bench took {results['elapsed_s']} s; "
          f"bench/results/latest.json has every figure)")
    full = set(results["targets"]) == set(COLUMNS) and "burst" in results and \
        "c50_paced" in results["targets"]["tokenopen"]
    if full and not args.no_readme:
        update_readme(markdown, results)
        print("bench/README.md updated")


if __name__ == "__main__":
    main()
