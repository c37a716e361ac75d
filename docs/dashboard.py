"""Draws docs/dashboard.png: the Grafana dashboard's panels, each from its own
PromQL, evaluated on a real Prometheus that scraped a real gateway under load.

Run through docs/dashboard (it installs what this needs and builds hookgate):

    docs/dashboard                 # about two minutes of load
    docs/dashboard --seconds 60

What runs, all on 127.0.0.1: `hookgate listen` as the internal services,
`hookgate serve` (durable) routing by risk level and tenant to it and to an
archive host that is down (retries, an open circuit, dead letters), a
Prometheus scraping the admin port every second, and senders mixing signed
results, webhooks signed with the previous secret, bad signatures,
malformed bodies, duplicates and vendor errors; half-way through, the rules
are edited twice (one invalid version, then a valid one). Then every panel
of dashboards/hookgate.json is queried over the run and drawn where the
dashboard places it.
"""

import argparse
import base64
import hashlib
import hmac
import json
import pathlib
import random
import socket
import subprocess
import tempfile
import threading
import time
import urllib.parse
import urllib.request

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

ROOT = pathlib.Path(__file__).resolve().parent.parent
CURRENT, PREVIOUS = "dashboard-current-secret-0123", "dashboard-previous-secret-0123"
CATEGORIES = [("ARMS_AMMO", "HIGH"), ("HATE_SPEECH", "MEDIUM"), ("DEATH_INJURY_MILITARY", "MEDIUM"),
              ("SEXUAL", "LOW"), ("SPAM", "LOW"), ("DRUGS", "HIGH")]
RULES = """
[destinations.trust-safety]
url = "http://127.0.0.1:{listen}/trust-safety"
[destinations.review-queue]
url = "http://127.0.0.1:{listen}/review"
[destinations.tenant-archive]
# Nothing listens here: retries, an open circuit, then dead letters.
url = "http://127.0.0.1:{down}/archive"
max_attempts = 4

[[rules]]
name = "high-risk"
match = {{ min_risk = "HIGH" }}
forward = ["trust-safety"]
continue = true

[[rules]]
name = "tenant-archive"
match = {{ query = {{ tenant = ["acme", "globex"] }} }}
forward = ["tenant-archive"]
continue = true

[[rules]]
name = "medium-review"
match = {{ min_risk = "MEDIUM" }}
forward = ["review-queue"]

[[rules]]
name = "default"
forward = ["review-queue"]
"""


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(url, what, seconds=30):
    deadline = time.time() + seconds
    while time.time() < deadline:
        try:
            with urllib.request.urlopen(url, timeout=1):
                return
        except OSError:
            time.sleep(0.1)
    raise SystemExit(f"{what} did not come up ({url})")


def body(job_id, rng):
    if rng.random() < 0.05:
        result = {"error": "Failed to decode video."}
        return {"data": {"job_id": job_id, "is_error": True, "result": result}}
    found = rng.sample(CATEGORIES, rng.choice([0, 1, 1, 2]))
    cats = [{"name": n, "description": n.title(), "risk_level": r} for n, r in found]
    return {"data": {"job_id": job_id, "is_error": False,
                     "result": {"policy_categories": cats, "metadata": {"width": 720}}}}


def sign(secret, raw):
    return base64.b64encode(hmac.new(secret.encode(), raw, hashlib.sha256).digest()).decode()


def sender(url, stop, seed, rate):
    rng = random.Random(seed)
    sent = []
    while not stop.is_set():
        started = time.time()
        job_id = f"dash-{seed}-{len(sent)}"
        if sent and rng.random() < 0.02:
            job_id = rng.choice(sent)  # a duplicate
        raw = json.dumps(body(job_id, rng)).encode()
        roll = rng.random()
        headers = {"Content-Type": "application/json"}
        if roll < 0.03:
            headers["X-Hub-Signature-256"] = sign("not-the-secret-at-all", raw)
        elif roll < 0.04:
            raw = b"{not json"
            headers["X-Hub-Signature-256"] = sign(CURRENT, raw)
        elif roll < 0.12:
            headers["X-Hub-Signature-256"] = sign(PREVIOUS, raw)
        else:
            headers["X-Hub-Signature-256"] = sign(CURRENT, raw)
        tenant = rng.choice(["acme", "globex", "initech", None])
        query = f"?tenant={tenant}" if tenant else ""
        request = urllib.request.Request(url + query, data=raw, headers=headers)
        try:
            with urllib.request.urlopen(request, timeout=5):
                pass
        except OSError:
            pass  # refusals are what some of these are for
        sent.append(job_id)
        time.sleep(max(0.0, 1.0 / rate - (time.time() - started)))


def query_range(prom, expr, start, end, step):
    params = urllib.parse.urlencode({"query": expr, "start": start, "end": end, "step": step})
    with urllib.request.urlopen(f"{prom}/api/v1/query_range?{params}", timeout=30) as r:
        return json.load(r)["data"]["result"]


def legend(fmt, labels):
    if not fmt:
        return ",".join(f"{k}={v}" for k, v in labels.items()) or "value"
    for k, v in labels.items():
        fmt = fmt.replace("{{" + k + "}}", v)
    return fmt


def draw(dashboard, prom, start, end, out):
    rate_interval, step = "10s", 2
    panels = dashboard["panels"]
    height = max(p["gridPos"]["y"] + p["gridPos"]["h"] for p in panels)
    fig = plt.figure(figsize=(24 * 0.9, height * 0.33), facecolor="#111217")
    for panel in panels:
        g = panel["gridPos"]
        left, top = g["x"] / 24, 1 - g["y"] / height
        if panel["type"] == "row":
            fig.text(left + 0.004, top - 0.5 / height, panel["title"], color="#d8d9da",
                     fontsize=15, fontweight="bold", va="center")
            continue
        ax = fig.add_axes([left + 0.03 * g["w"] / 24, top - (g["h"] - 0.9) / height,
                           g["w"] / 24 * 0.94, (g["h"] - 1.8) / height], facecolor="#181b1f")
        ax.set_title(panel["title"], color="#d8d9da", fontsize=10, loc="left")
        ax.tick_params(colors="#8e8e8e", labelsize=7)
        for side in ax.spines.values():
            side.set_color("#2c3235")
        unit = panel.get("fieldConfig", {}).get("defaults", {}).get("unit", "")
        drawn = 0
        for target in panel.get("targets", []):
            expr = (target["expr"].replace("$instance", ".*")
                    .replace("$__rate_interval", rate_interval)
                    .replace("$__range", f"{int(end - start)}s"))
            for series in query_range(prom, expr, start, end, step):
                xs = [float(t) - start for t, _ in series["values"]]
                ys = [float(v) for _, v in series["values"]]
                name = legend(target.get("legendFormat", ""), series["metric"])
                if panel["type"] == "stat":
                    ax.text(0.5, 0.45 - 0.25 * drawn, f"{name}: {ys[-1]:.4g}" if name != "value" else f"{ys[-1]:.4g}",
                            color="#73bf69", fontsize=16, ha="center", va="center", transform=ax.transAxes)
                else:
                    ax.plot(xs, ys, linewidth=1.2, label=name[:40])
                drawn += 1
        if panel["type"] == "stat":
            ax.set_xticks([])
            ax.set_yticks([])
            if not drawn:
                ax.text(0.5, 0.45, "no data", color="#8e8e8e", ha="center", transform=ax.transAxes)
        elif drawn:
            ax.set_xlabel(f"seconds into the run ({unit})" if unit else "seconds into the run",
                          color="#8e8e8e", fontsize=7)
            ax.legend(fontsize=6, loc="upper left", facecolor="#181b1f", labelcolor="#d8d9da",
                      edgecolor="#2c3235", ncol=2)
        else:
            ax.text(0.5, 0.5, "no data (nothing of this kind happened)", color="#8e8e8e",
                    ha="center", transform=ax.transAxes, fontsize=8)
    fig.savefig(out, dpi=60, facecolor=fig.get_facecolor())
    print(f"wrote {out}")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hookgate", default=str(ROOT / "target/release/hookgate"))
    parser.add_argument("--prometheus", default="prometheus")
    parser.add_argument("--seconds", type=int, default=120, help="how long the load runs")
    parser.add_argument("--rate", type=int, default=60, help="webhooks per second per sender (4 senders)")
    parser.add_argument("--out", default=str(ROOT / "docs/dashboard.png"))
    args = parser.parse_args()

    listen, down, web, admin, prom_port = (free_port() for _ in range(5))
    with tempfile.TemporaryDirectory() as tmp:
        tmp = pathlib.Path(tmp)
        rules = tmp / "rules.toml"
        rules.write_text(RULES.format(listen=listen, down=down))
        (tmp / "hookgate.toml").write_text(f"""
[server]
listen = "127.0.0.1:{web}"
[admin]
listen = "127.0.0.1:{admin}"
[verify]
secrets = [{{ name = "current", env = "DASH_CURRENT" }}, {{ name = "previous", env = "DASH_PREVIOUS" }}]
[rules]
file = "rules.toml"
reload_interval = "1s"
[delivery]
mode = "durable"
timeout = "1s"
backoff_initial = "200ms"
backoff_max = "2s"
[spool]
path = "{tmp / 'spool'}"
""")
        (tmp / "prometheus.yml").write_text(
            "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\n"
            f"scrape_configs:\n  - job_name: hookgate\n    static_configs:\n      - targets: ['127.0.0.1:{admin}']\n")
        env = {"DASH_CURRENT": CURRENT, "DASH_PREVIOUS": PREVIOUS, "PATH": "/usr/bin:/bin"}
        log = open(tmp / "processes.log", "w")
        processes = [
            subprocess.Popen([args.hookgate, "listen", "--port", str(listen)], stdout=subprocess.DEVNULL, stderr=log),
            subprocess.Popen([args.hookgate, "serve", "--config", str(tmp / "hookgate.toml")], env=env,
                             stdout=log, stderr=log),
            subprocess.Popen([args.prometheus, f"--config.file={tmp / 'prometheus.yml'}",
                              f"--storage.tsdb.path={tmp / 'tsdb'}", f"--web.listen-address=127.0.0.1:{prom_port}",
                              "--log.level=warn"], stdout=log, stderr=log),
        ]
        try:
            prom = f"http://127.0.0.1:{prom_port}"
            wait_for(f"http://127.0.0.1:{admin}/readyz", "hookgate")
            wait_for(f"{prom}/-/ready", "prometheus")
            start = time.time()
            stop = threading.Event()
            senders = [threading.Thread(target=sender, args=(f"http://127.0.0.1:{web}/results", stop, i, args.rate))
                       for i in range(4)]
            for s in senders:
                s.start()
            time.sleep(args.seconds / 2)
            rules.write_text("[[rules]]\nname = \"half-written\"\nforward = [\"nowhere\"]\n")  # refused
            time.sleep(3)
            rules.write_text(RULES.format(listen=listen, down=down) + "\n# edited\n")
            time.sleep(args.seconds / 2)
            stop.set()
            for s in senders:
                s.join()
            time.sleep(5)  # the last scrapes
            dashboard = json.loads((ROOT / "dashboards/hookgate.json").read_text())
            draw(dashboard, prom, start, time.time(), args.out)
        finally:
            for p in processes:
                p.terminate()
            for p in processes:
                p.wait(timeout=30)


if __name__ == "__main__":
    main()
