#!/usr/bin/env python3
"""hookgate side by side with what a user would otherwise deploy.

Every scenario forwards signed ~700-byte webhooks from wrk to the same
fast sink (nginx answering 200), on 127.0.0.1, in one run, interleaved.
Ratios between scenarios of one run are the result; absolute numbers drift
between machines. See bench/README.md.
"""

import argparse
import base64
import hashlib
import hmac
import json
import os
import pathlib
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request

HERE = pathlib.Path(__file__).resolve().parent
ROOT = HERE.parent
HOOKGATE = ROOT / "target" / "release" / "hookgate"
SECRET = "bench-secret-0123456789abcdef"
SINK_PORT, SERVER_PORT, ADMIN_PORT = 18100, 18200, 18300
# nats-server for the durable-nats scenario: clients here, monitoring one above.
NATS_PORT = 18400
CLK_TCK = os.sysconf("SC_CLK_TCK")
CORES = os.cpu_count() or 1


def payload(i: int) -> bytes:
    job_id = f"8a7c1f3e-5b2d-4c9a-9e41-{i:012d}"
    return json.dumps(
        {
            "data": {
                "job_id": job_id,
                "callback_url": "https://gw.example.com/results?tenant=acme&filename=clip.mp4",
                "is_error": False,
                "result": {
                    "policy_categories": [
                        {"name": "ARMS_AMMO", "description": "Arms & Ammunition", "risk_level": "HIGH"},
                        {"name": "DEATH_INJURY_MILITARY", "description": "Death, Injury or Military Conflict", "risk_level": "MEDIUM"},
                        {"name": "HATE_SPEECH", "description": "Hate speech", "risk_level": "LOW"},
                    ],
                    "metadata": {"width": 720, "height": 480, "fps": 30, "duration": 11.6, "seconds_processed": 11},
                    "url": f"https://cdn.example.com/videos/2026/11/30/{job_id}/clip.mp4",
                    "thumbnail_url": f"https://cdn.example.com/thumbs/2026/11/30/{job_id}.jpg",
                },
            }
        },
        separators=(",", ":"),
    ).encode()


def write_bodies(path: pathlib.Path, count: int) -> int:
    with path.open("w") as f:
        for i in range(count):
            body = payload(i)
            sig = base64.b64encode(hmac.new(SECRET.encode(), body, hashlib.sha256).digest()).decode()
            f.write(f"{sig}\t{body.decode()}\n")
    return len(payload(0))


# --- processes and /proc --------------------------------------------------


def tree(pid: int) -> list[int]:
    """pid and all its descendants."""
    children: dict[int, list[int]] = {}
    for stat in pathlib.Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
            children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
        except (OSError, IndexError, ValueError):
            continue
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        todo.extend(children.get(p, []))
    return out


def cpu_seconds(pids: list[int]) -> float:
    total = 0
    for p in pids:
        try:
            fields = pathlib.Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[1].split()
            total += int(fields[11]) + int(fields[12])
        except (OSError, IndexError):
            continue
    return total / CLK_TCK


def peak_rss_kib(pids: list[int]) -> int:
    total = 0
    for p in pids:
        try:
            for line in pathlib.Path(f"/proc/{p}/status").read_text().splitlines():
                if line.startswith("VmHWM:"):
                    total += int(line.split()[1])
        except OSError:
            continue
    return total


def rss_kib(pid: int) -> int:
    for line in pathlib.Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def machine_busy_seconds() -> float:
    fields = [int(x) for x in pathlib.Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    idle = fields[3] + fields[4]
    return (sum(fields[:8]) - idle) / CLK_TCK


def wait_http(url: str, timeout: float = 20.0) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            urllib.request.urlopen(url, timeout=1)
            return
        except urllib.error.HTTPError:
            return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"{url} did not come up")


class Server:
    def __init__(self, argv, cwd=None, env=None, ready=None):
        self.proc = subprocess.Popen(
            argv, cwd=cwd, env={**os.environ, **(env or {})}, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            start_new_session=True,
        )
        try:
            wait_http(ready or f"http://127.0.0.1:{SERVER_PORT}/")
        except BaseException:
            self.stop()
            raise

    def pids(self) -> list[int]:
        return tree(self.proc.pid)

    def stop(self) -> None:
        try:
            os.killpg(self.proc.pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()


# --- the contenders ---------------------------------------------------------


def nginx_conf(tmp: pathlib.Path, name: str, workers: int, port: int, location: str) -> pathlib.Path:
    prefix = tmp / name
    prefix.mkdir(exist_ok=True)
    conf = prefix / "nginx.conf"
    conf.write_text(
        f"""
worker_processes {workers};
pid {prefix}/nginx.pid;
error_log {prefix}/error.log warn;
events {{ worker_connections 4096; }}
http {{
  access_log off;
  client_body_temp_path {prefix}/body;
  proxy_temp_path {prefix}/proxy;
  keepalive_requests 1000000;
  upstream sink {{ server 127.0.0.1:{SINK_PORT}; keepalive 64; keepalive_requests 1000000; }}
  server {{
    listen 127.0.0.1:{port} reuseport backlog=4096;
    client_max_body_size 1m;
    location / {{ {location} }}
  }}
}}
"""
    )
    return conf


def nginx(conf: pathlib.Path, port: int) -> Server:
    return Server(["nginx", "-c", str(conf), "-g", "daemon off;"], ready=f"http://127.0.0.1:{port}/")


def hookgate_conf(tmp: pathlib.Path, mode: str, sink: str, verify: bool = True, nats: str | None = None,
                  window: str = "24h") -> pathlib.Path:
    d = tmp / f"hookgate-{mode}{'-nats' if nats else ''}"
    if d.exists():
        shutil.rmtree(d)
    d.mkdir()
    (d / "rules.toml").write_text(
        f'[destinations.sink]\nurl = "{sink}"\n[[rules]]\nname = "all"\nforward = ["sink"]\n'
    )
    secrets = '[{ name = "current", env = "BENCH_SECRET" }]' if verify else "[]"
    (d / "hookgate.toml").write_text(
        f"""
[server]
listen = "127.0.0.1:{SERVER_PORT}"
max_connections = 4096
[admin]
listen = "127.0.0.1:{ADMIN_PORT}"
[verify]
secrets = {secrets}
required = {str(verify).lower()}
[delivery]
mode = "{mode}"
[spool]
path = "{d / 'spool'}"
max_bytes = "{'1GiB' if nats else '8GiB'}"
{f'backend = "nats"{chr(10)}nats = {{ servers = ["{nats}"] }}' if nats else ""}
[dedupe]
# The shipped window. Durable scenarios send a new job id on every request;
# direct mode keeps no dedupe index.
window = "{window}"
[log]
format = "json"
level = "warn"
"""
    )
    return d / "hookgate.toml"


def start_hookgate(conf: pathlib.Path, binary: pathlib.Path = HOOKGATE) -> Server:
    return Server([str(binary), "serve", "--config", str(conf)], env={"BENCH_SECRET": SECRET},
                  ready=f"http://127.0.0.1:{ADMIN_PORT}/readyz")


class Together:
    """Servers that make one scenario: their CPU and memory count together."""

    def __init__(self, *servers):
        self.servers = servers

    def pids(self) -> list[int]:
        return [p for s in self.servers for p in s.pids()]

    def stop(self) -> None:
        for s in reversed(self.servers):
            s.stop()


def start_nats(tmp: pathlib.Path) -> Server:
    """One nats-server with JetStream (file storage, R1), a fresh store."""
    store = tmp / "nats"
    if store.exists():
        shutil.rmtree(store)
    return Server(["nats-server", "-js", "-sd", str(store), "-a", "127.0.0.1", "-p", str(NATS_PORT),
                   "-m", str(NATS_PORT + 1)], ready=f"http://127.0.0.1:{NATS_PORT + 1}/healthz")


def start_hookgate_on_nats(tmp: pathlib.Path, sink: str) -> Together:
    nats = start_nats(tmp)
    try:
        conf = hookgate_conf(tmp, "durable", sink, verify=False, nats=f"nats://127.0.0.1:{NATS_PORT}")
        return Together(nats, start_hookgate(conf))
    except BaseException:
        nats.stop()
        raise


def start_python(module: str, python: pathlib.Path, workers: int) -> Server:
    return Server(
        [str(python), "-m", "uvicorn", f"receivers.{module}:app", "--host", "127.0.0.1", "--port", str(SERVER_PORT),
         "--workers", str(workers), "--log-level", "warning", "--no-access-log"],
        cwd=HERE, env={"BENCH_SECRET": SECRET, "BENCH_TARGET": f"http://127.0.0.1:{SINK_PORT}/hook"},
    )


# --- load -------------------------------------------------------------------


def wrk(url: str, bodies: pathlib.Path | str, seconds: float, connections: int, threads: int) -> dict:
    """`bodies`: a file of pre-signed webhooks, or "unique:PREFIX" for a new
    unsigned job id on every request (post.lua)."""
    argv = ["wrk", f"-t{threads}", f"-c{connections}", f"-d{round(seconds)}s", "--timeout", "5s", "-s", str(HERE / "post.lua"),
            url, "--", str(bodies), str(threads)]
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    _, status, usage = os.wait4(proc.pid, 0)
    out = proc.stdout.read()
    m = re.search(r"^RESULT (\{.*\})$", out, re.M)
    if not m:
        raise RuntimeError(f"wrk failed:\n{out}")
    result = json.loads(m.group(1))
    result["wrk_cpu_s"] = usage.ru_utime + usage.ru_stime
    return result


def durable(name: str) -> bool:
    return "durable" in name


def write_bytes(pids: list[int]) -> int:
    """Bytes the processes have caused to be written to storage."""
    total = 0
    for p in pids:
        try:
            for line in pathlib.Path(f"/proc/{p}/io").read_text().splitlines():
                if line.startswith("write_bytes:"):
                    total += int(line.split()[1])
        except OSError:
            pass
    return total


def count_fsyncs(pids: list[int]):
    """perf counting fsync and fdatasync calls of `pids` until stopped;
    None where perf cannot."""
    if not shutil.which("perf"):
        return None
    return subprocess.Popen(
        ["perf", "stat", "-x,", "-e", "syscalls:sys_enter_fsync,syscalls:sys_enter_fdatasync",
         "-p", ",".join(map(str, pids))],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def fsyncs_counted(perf) -> int | None:
    if perf is None:
        return None
    perf.send_signal(signal.SIGINT)
    _, err = perf.communicate(timeout=10)
    counts = [int(l.split(",")[0]) for l in err.splitlines() if ",syscalls:" in l and l.split(",")[0].isdigit()]
    return sum(counts) if counts else None


def measure(name, server: Server, sink: Server, url, bodies, args) -> dict:
    if durable(name):
        # A new job id on every request, for the whole run and the warm-up.
        bodies = f"unique:{name.replace(' ', '_')}-{time.time_ns()}"
    wrk(url, bodies, 1, args.connections, args.threads)  # warm up: connections, pools, caches
    pids, sink_pids = server.pids(), sink.pids()
    cpu0, sink0, busy0 = cpu_seconds(pids), cpu_seconds(sink_pids), machine_busy_seconds()
    written0 = write_bytes(pids)
    perf = count_fsyncs(pids) if durable(name) else None
    r = wrk(url, bodies, args.duration, args.connections, args.threads)
    fsyncs = fsyncs_counted(perf)
    pids = server.pids()
    cpu, sink_cpu, busy = cpu_seconds(pids) - cpu0, cpu_seconds(sink_pids) - sink0, machine_busy_seconds() - busy0
    written = write_bytes(pids) - written0
    seconds = r["duration_us"] / 1e6
    ok = r["requests"] - r["status_errors"]
    accounted = cpu + sink_cpu + r["wrk_cpu_s"]
    return {
        "scenario": name,
        "rps": ok / seconds,
        "requests": r["requests"],
        "errors": r["status_errors"] + r["connect_errors"] + r["read_errors"] + r["write_errors"] + r["timeouts"],
        "p50_ms": r["p50_us"] / 1000,
        "p99_ms": r["p99_us"] / 1000,
        "p999_ms": r["p999_us"] / 1000,
        "server_cpu_s": cpu,
        "server_cpu_ms_per_1k": 1e6 * cpu / max(ok, 1),
        "sink_cpu_ms_per_1k": 1e6 * sink_cpu / max(ok, 1),
        "wrk_cpu_s": r["wrk_cpu_s"],
        "machine_busy_s": busy,
        "unaccounted_cpu_s": busy - accounted,
        "noisy": busy - accounted > 0.1 * CORES * seconds,
        "peak_rss_mib": peak_rss_kib(pids) / 1024,
        "fsyncs_per_s": fsyncs / seconds if fsyncs is not None else None,
        "written_bytes_per_webhook": written / max(ok, 1),
        "written_kib_per_fsync": written / 1024 / fsyncs if fsyncs else None,
    }


def scenarios(tmp: pathlib.Path, python: pathlib.Path | None, baseline: pathlib.Path | None):
    sink_url = f"http://127.0.0.1:{SINK_PORT}/hook"
    url = f"http://127.0.0.1:{SERVER_PORT}/results"
    proxy = 'proxy_pass http://sink; proxy_http_version 1.1; proxy_set_header Connection "";'
    out = [
        ("sink alone", lambda: None, f"http://127.0.0.1:{SINK_PORT}/results"),
        ("nginx 1 worker", lambda: nginx(nginx_conf(tmp, "nginx1", 1, SERVER_PORT, proxy), SERVER_PORT), url),
        ("nginx 2 workers", lambda: nginx(nginx_conf(tmp, "nginx2", 2, SERVER_PORT, proxy), SERVER_PORT), url),
        ("hookgate direct", lambda: start_hookgate(hookgate_conf(tmp, "direct", sink_url)), url),
        ("hookgate durable", lambda: start_hookgate(hookgate_conf(tmp, "durable", sink_url, verify=False)), url),
    ]
    if shutil.which("nats-server"):
        # The queue in JetStream (one local server, R1): hookgate's and the
        # server's CPU and memory together.
        out.append(("hookgate durable-nats", lambda: start_hookgate_on_nats(tmp, sink_url), url))
    if baseline:
        # An earlier build, side by side with this one: before and after.
        out += [
            ("baseline direct", lambda: start_hookgate(hookgate_conf(tmp, "direct", sink_url), baseline), url),
            ("baseline durable", lambda: start_hookgate(hookgate_conf(tmp, "durable", sink_url, verify=False), baseline), url),
        ]
    if python:
        out += [
            ("fastapi+httpx", lambda: start_python("fastapi_httpx", python, CORES), url),
            ("fastapi+aiohttp", lambda: start_python("fastapi_aiohttp", python, CORES), url),
        ]
    return out


def summarize(runs: list[dict]) -> dict:
    by: dict[str, list[dict]] = {}
    for r in runs:
        by.setdefault(r["scenario"], []).append(r)
    summary = {}
    for name, rs in by.items():
        def med(k):
            return statistics.median(r[k] for r in rs)
        summary[name] = {
            "runs": len(rs),
            "rps": med("rps"), "rps_min": min(r["rps"] for r in rs), "rps_max": max(r["rps"] for r in rs),
            "p50_ms": med("p50_ms"), "p99_ms": med("p99_ms"), "p999_ms": med("p999_ms"),
            "cpu_ms_per_1k": med("server_cpu_ms_per_1k"), "sink_cpu_ms_per_1k": med("sink_cpu_ms_per_1k"),
            # The least disturbed run of each: a shared machine only ever
            # makes a run slower, never faster.
            "best": {
                "rps": max(r["rps"] for r in rs),
                "p99_ms": min(r["p99_ms"] for r in rs),
                "cpu_ms_per_1k": min(r["server_cpu_ms_per_1k"] for r in rs),
            },
            "peak_rss_mib": max(r["peak_rss_mib"] for r in rs),
            "errors": sum(r["errors"] for r in rs),
            "noisy_runs": sum(r["noisy"] for r in rs),
            "written_bytes_per_webhook": med("written_bytes_per_webhook"),
        }
        fsynced = [r for r in rs if r.get("fsyncs_per_s") is not None]
        if fsynced:
            summary[name]["fsyncs_per_s"] = statistics.median(r["fsyncs_per_s"] for r in fsynced)
            per = [r["written_kib_per_fsync"] for r in fsynced if r["written_kib_per_fsync"] is not None]
            summary[name]["written_kib_per_fsync"] = statistics.median(per) if per else None
    return summary


def report(summary: dict, args) -> str:
    nginx = [summary[k] for k in ("nginx 1 worker", "nginx 2 workers") if k in summary]
    nginx_best = max(nginx, key=lambda s: s["rps"]) if nginx else None
    python = [summary[k] for k in ("fastapi+httpx", "fastapi+aiohttp") if k in summary]
    python_best = max(python, key=lambda s: s["rps"]) if python else None
    lines = [
        f"{args.duration}s x {args.repeat} runs per scenario, interleaved; wrk -t{args.threads} -c{args.connections}; "
        f"{CORES} cores; medians (min-max)",
        "",
        f"{'scenario':<18} {'req/s':>22} {'p50 ms':>7} {'p99 ms':>7} {'p99.9':>7} {'CPU ms/1k':>9} {'RSS MiB':>8} "
        f"{'x nginx':>7} {'x python':>8} {'errors':>6} {'noisy':>5}",
    ]
    for name, s in summary.items():
        rng = f"{s['rps']:.0f} ({s['rps_min']:.0f}-{s['rps_max']:.0f})"
        cpu = "-" if name == "sink alone" else f"{s['cpu_ms_per_1k']:.1f}"
        rss = "-" if name == "sink alone" else f"{s['peak_rss_mib']:.1f}"
        xpy = f"{s['rps'] / python_best['rps']:.1f}" if python_best else "-"
        xng = f"{s['rps'] / nginx_best['rps']:.2f}" if nginx_best else "-"
        lines.append(
            f"{name:<18} {rng:>22} {s['p50_ms']:>7.2f} {s['p99_ms']:>7.2f} {s['p999_ms']:>7.2f} {cpu:>9} {rss:>8} "
            f"{xng:>7} {xpy:>8} {s['errors']:>6} {s['noisy_runs']:>5}"
        )
    lines.append("")
    lines.append("CPU ms/1k: server CPU time per 1000 webhooks (the sink's is measured apart). noisy: runs where the")
    lines.append("machine was busier than the server, the sink and wrk account for (by more than 10% of its cores).")
    lines.append("")
    stored = {name: s for name, s in summary.items() if "fsyncs_per_s" in s}
    if stored:
        lines.append("writes (durable: a new job id on every request, dedupe.window 24h; fsync = fsync + fdatasync calls):")
        lines.append(f"{'scenario':<24} {'fsyncs/s':>9} {'webhooks/fsync':>15} {'KiB written/fsync':>18} {'bytes written/webhook':>22}")
        for name, st in stored.items():
            per = f"{st['rps'] / st['fsyncs_per_s']:.1f}" if st["fsyncs_per_s"] else "-"
            kib = f"{st['written_kib_per_fsync']:.1f}" if st["written_kib_per_fsync"] is not None else "-"
            lines.append(f"{name:<24} {st['fsyncs_per_s']:>9.0f} {per:>15} {kib:>18} {st['written_bytes_per_webhook']:>22.0f}")
        lines.append("")
    direct, durable = summary.get("hookgate direct"), summary.get("hookgate durable")
    if direct and durable and nginx_best:
        nginx_top = max(nginx, key=lambda s: s["best"]["rps"])
        python_top = max(python, key=lambda s: s["best"]["rps"]) if python else None
        d, n = direct["best"], nginx_top["best"]
        lines.append(f"{'targets:':<35}{'medians':<25}best runs")
        lines.append(f"  direct  >= 1.0x nginx req/s:     {direct['rps'] / nginx_best['rps']:<24.2f} {d['rps'] / n['rps']:.2f}")
        lines.append(f"  direct  p99 <= nginx p99 (ms):   {direct['p99_ms']:.2f} vs {nginx_best['p99_ms']:<16.2f} {d['p99_ms']:.2f} vs {n['p99_ms']:.2f}")
        lines.append(f"  direct  CPU/webhook <= nginx:    {direct['cpu_ms_per_1k']:.1f} vs {nginx_best['cpu_ms_per_1k']:<16.1f} {d['cpu_ms_per_1k']:.1f} vs {n['cpu_ms_per_1k']:.1f} ms per 1k")
        lines.append(f"  durable >= 0.6x nginx req/s:     {durable['rps'] / nginx_best['rps']:<24.2f} {durable['best']['rps'] / n['rps']:.2f}")
        lines.append(f"  durable p99 <= 3x nginx p99:     {durable['p99_ms']:.2f} vs {3 * nginx_best['p99_ms']:<16.2f} {durable['best']['p99_ms']:.2f} vs {3 * n['p99_ms']:.2f}")
        if python_best:
            lines.append(f"  direct  >= 20x best Python:      {direct['rps'] / python_best['rps']:<24.1f} {d['rps'] / python_top['best']['rps']:.1f}")
        full = next((v for k, v in summary.items() if k.startswith("durable @")), None)
        if full:
            lines.append(f"  full index within 20% of durable: {full['rps'] / durable['rps']:<24.2f} {full['best']['rps'] / durable['best']['rps']:.2f}")
            lines.append(f"  full index RSS < 150 MB:         {full['peak_rss_mib']:.0f} MiB")
        lines.append("  idle RSS < 15 MB:                see 'idle RSS' below")
        lines.append("best runs: each scenario's fastest run, lowest p99 and lowest CPU, against the nginx with the")
        lines.append("fastest run: a shared machine only ever makes a run slower, so these are the least disturbed.")
    return "\n".join(lines)


def idle_rss(tmp: pathlib.Path) -> dict:
    out = {}
    for mode in ("direct", "durable"):
        server = start_hookgate(hookgate_conf(tmp, mode, f"http://127.0.0.1:{SINK_PORT}/hook"))
        time.sleep(1)
        out[mode] = rss_kib(server.proc.pid) / 1024
        server.stop()
    return out


def full_index(tmp: pathlib.Path, ids: int, sink: Server, bodies, args) -> list[dict]:
    """Durable mode at steady state with `ids` job ids already inside the
    dedupe window (delivered, so only the dedupe index holds them): filled
    through the webhook port as production would, then measured like the
    durable scenario, `args.repeat` times on the same index."""
    conf = hookgate_conf(tmp, "durable", f"http://127.0.0.1:{SINK_PORT}/hook", verify=False)
    server = start_hookgate(conf)
    url = f"http://127.0.0.1:{SERVER_PORT}/results"
    name = f"durable @{ids // 1_000_000}M ids"
    try:
        accepted, started = 0, time.time()
        while accepted < ids:
            r = wrk(url, f"unique:fill-{time.time_ns()}", 30, args.connections, args.threads)
            accepted += r["requests"] - r["status_errors"]
            spool = conf.parent / "spool" / "spool.redb"
            print(f"  filling: {accepted} ids after {time.time() - started:.0f} s, {r['requests'] / 30:.0f} req/s, "
                  f"RSS {rss_kib(server.proc.pid) // 1024} MiB, spool {spool.stat().st_size >> 20} MiB", flush=True)
        runs = []
        for rep in range(args.repeat):
            r = measure(name, server, sink, url, bodies, args)
            r["ids_in_window"] = accepted
            r["spool_mib"] = (conf.parent / "spool" / "spool.redb").stat().st_size / 2**20
            runs.append(r)
            print(f"[{rep + 1}/{args.repeat}] {name:<18} {r['rps']:>9.0f} req/s  p99 {r['p99_ms']:.2f} ms  "
                  f"cpu {r['server_cpu_ms_per_1k']:.1f} ms/1k  RSS {r['peak_rss_mib']:.0f} MiB", flush=True)
        return runs
    finally:
        server.stop()


def scale(tmp: pathlib.Path, count: int, args, binary: pathlib.Path = HOOKGATE) -> dict:
    """Downstream down; `count` webhooks accepted in durable mode; RSS over
    time; spool bytes per webhook; then the drain rate once it is up."""
    conf = hookgate_conf(tmp, "durable", f"http://127.0.0.1:{SINK_PORT + 1}/hook", verify=False)
    server = start_hookgate(conf, binary)
    metrics_url = f"http://127.0.0.1:{ADMIN_PORT}/metrics"

    def gauge(name: str) -> float:
        text = urllib.request.urlopen(metrics_url, timeout=5).read().decode()
        return sum(float(l.rsplit(" ", 1)[1]) for l in text.splitlines() if l.startswith(name + "{") or l.startswith(name + " "))

    samples, started = [], time.time()
    while True:
        queued = gauge("hookgate_queue_depth")
        samples.append((round(time.time() - started, 1), int(queued), rss_kib(server.proc.pid) // 1024))
        print(f"  t={samples[-1][0]}s queued={samples[-1][1]} rss={samples[-1][2]} MiB", flush=True)
        if queued >= count:
            break
        wrk(f"http://127.0.0.1:{SERVER_PORT}/results", f"unique:scale-{time.time_ns()}", 10, args.connections, args.threads)
    queued = int(gauge("hookgate_queue_depth"))
    spool = conf.parent / "spool" / "spool.redb"
    file_bytes = spool.stat().st_size
    sink = nginx(nginx_conf(tmp, "sink2", 1, SINK_PORT + 1, 'return 200 "ok";'), SINK_PORT + 1)
    t0, first = time.time(), None
    while True:
        left = gauge("hookgate_queue_depth")
        if first is None and left < queued:
            first = time.time()
        samples.append((round(time.time() - started, 1), int(left), rss_kib(server.proc.pid) // 1024))
        if left == 0:
            break
        time.sleep(1)
    drained = time.time()
    server.stop()
    sink.stop()
    return {
        "queued": queued,
        "spool_file_bytes": file_bytes,
        "spool_bytes_per_webhook": file_bytes / queued,
        "rss_mib_max": max(s[2] for s in samples),
        "drain_wait_s": (first or drained) - t0,
        "drain_rate_per_s": queued / (drained - (first or t0)),
        "samples": samples,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--duration", type=float, default=10)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--connections", type=int, default=32)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--python", type=pathlib.Path, help="a Python with fastapi, uvicorn, httpx, aiohttp")
    ap.add_argument("--only", action="append", help="run only scenarios whose name contains this")
    ap.add_argument("--scale", type=int, metavar="N", help="also run the scale scenario with N webhooks")
    ap.add_argument("--ids", type=int, metavar="N",
                    help="also run durable mode with N job ids already in the dedupe window (e.g. 10000000)")
    ap.add_argument("--baseline", type=pathlib.Path, metavar="BINARY",
                    help="an earlier hookgate build, run as 'baseline direct' and 'baseline durable' "
                         "(and in the scale scenario) beside this one")
    args = ap.parse_args()
    if args.baseline:
        args.baseline = args.baseline.resolve()

    results_dir = HERE / "results"
    results_dir.mkdir(exist_ok=True)
    with tempfile.TemporaryDirectory() as t:
        tmp = pathlib.Path(t)
        bodies = tmp / "bodies.txt"
        size = write_bodies(bodies, 40000)
        print(f"payload {size} bytes, 40000 distinct signed webhooks", flush=True)
        sink = nginx(nginx_conf(tmp, "sink", 1, SINK_PORT, 'return 200 "ok";'), SINK_PORT)
        runs = []
        try:
            plan = scenarios(tmp, args.python, args.baseline)
            if args.only:
                plan = [p for p in plan if any(o in p[0] for o in args.only)]
            for rep in range(args.repeat):
                for name, start, url in plan:
                    server = start() or sink
                    try:
                        r = measure(name, server, sink, url, bodies, args)
                    finally:
                        if server is not sink:
                            server.stop()
                    runs.append(r)
                    print(f"[{rep + 1}/{args.repeat}] {name:<18} {r['rps']:>9.0f} req/s  p99 {r['p99_ms']:.2f} ms  "
                          f"cpu {r['server_cpu_ms_per_1k']:.1f} ms/1k  errors {r['errors']}{'  NOISY' if r['noisy'] else ''}",
                          flush=True)
            if args.ids:
                runs += full_index(tmp, args.ids, sink, bodies, args)
            rss = idle_rss(tmp)
            scaled = scale(tmp, args.scale, args) if args.scale else None
            scaled_baseline = (scale(tmp, args.scale, args, args.baseline)
                               if args.scale and args.baseline else None)
        finally:
            sink.stop()
    summary = summarize(runs)
    text = report(summary, args) if runs else "(no throughput scenarios selected)"
    text += f"\nidle RSS: direct {rss['direct']:.1f} MiB, durable {rss['durable']:.1f} MiB"
    for label, run in (("scale", scaled), ("scale (baseline)", scaled_baseline)):
        if run:
            text += (f"\n{label}: {run['queued']} queued with the downstream down: peak RSS {run['rss_mib_max']} MiB, "
                     f"spool {run['spool_bytes_per_webhook']:.0f} bytes/webhook on disk; drained at "
                     f"{run['drain_rate_per_s']:.0f}/s once it was back (first delivery after {run['drain_wait_s']:.1f} s)")
    print("\n" + text)
    stamp = time.strftime("%Y%m%dT%H%M%S")
    (results_dir / f"{stamp}.json").write_text(json.dumps(
        {"args": vars(args) | {"python": str(args.python), "baseline": str(args.baseline)}, "runs": runs, "summary": summary, "idle_rss_mib": rss,
         "scale": scaled, "scale_baseline": scaled_baseline}, indent=2))
    (results_dir / f"{stamp}.txt").write_text(text + "\n")
    print(f"\nresults: bench/results/{stamp}.json")


if __name__ == "__main__":
    sys.exit(main())
