#!/usr/bin/env python3
"""Offline checks of the Kubernetes manifests, run by CI (.ci/run).

- every built-in resource validates against the Kubernetes schemas
  (kubernetes-validate, strict: unknown fields are errors);
- base/kustomization.yaml lists every manifest in base/;
- the monitoring component's PrometheusRule groups are exactly
  dashboards/alerts.yml's, and its PodMonitor selects the pods;
- base/hookgate.toml and base/rules.toml (the ConfigMap's files) pass
  `hookgate check`;
- built with `kubectl kustomize` where kubectl is installed (otherwise
  reported as skipped), the base builds as it is in a clone and its
  generated ConfigMap validates too;
- secret.sh refuses an empty secret, and otherwise prints a Secret that
  validates, with the keys the Deployment mounts;
- the termination grace period covers the preStop sleep plus
  shutdown.grace;
- the JetStream overlay (jetstream/, built with `kubectl kustomize` where
  kubectl is installed; otherwise reported as skipped) validates the same
  way, runs 3 replicas with no spool volume, and its hookgate.toml passes
  `hookgate check` with spool.backend = "nats"; its rules.toml is the
  base's (a link, so `hookgate check --config jetstream/hookgate.toml`
  checks what the pods get).

Usage: check.py HOOKGATE_BINARY
"""

import pathlib
import shutil
import subprocess
import sys
import tempfile
import tomllib

import kubernetes_validate
import yaml

KUBERNETES = "1.33.0"
KUBERNETES_DIR = pathlib.Path(__file__).resolve().parent
HERE = KUBERNETES_DIR / "base"
MONITORING = KUBERNETES_DIR / "components" / "monitoring"
ROOT = KUBERNETES_DIR.parent.parent
CRDS = {"PodMonitor", "PrometheusRule"}

failures = []


def fail(message):
    failures.append(message)
    print(f"FAIL {message}")


def main(hookgate):
    kustomization = yaml.safe_load((HERE / "kustomization.yaml").read_text())
    listed = set(kustomization["resources"])
    present = {p.name for p in HERE.glob("*.yaml")} - {"kustomization.yaml"}
    if listed != present:
        fail(f"kustomization.yaml lists {sorted(listed)}, the directory has {sorted(present)}")

    docs = {}
    files = [HERE / name for name in sorted(listed)] + sorted(MONITORING.glob("*.yaml"))
    for path in files:
        name = path.relative_to(KUBERNETES_DIR)
        for doc in yaml.safe_load_all(path.read_text()):
            docs[doc["kind"]] = doc
            if doc["kind"] in CRDS | {"Component"}:
                continue
            try:
                kubernetes_validate.validate(doc, KUBERNETES, strict=True)
                print(f"ok   {name}: {doc['kind']} {doc['metadata']['name']} (Kubernetes {KUBERNETES}, strict)")
            except kubernetes_validate.ValidationError as e:
                fail(f"{name}: {doc['kind']}: {e.message} at {'.'.join(map(str, e.path))}")

    alerts = yaml.safe_load((ROOT / "dashboards" / "alerts.yml").read_text())
    rule = docs["PrometheusRule"]
    if rule["apiVersion"] != "monitoring.coreos.com/v1" or rule["spec"]["groups"] != alerts["groups"]:
        fail("prometheusrule.yaml: spec.groups differs from dashboards/alerts.yml")
    else:
        print("ok   prometheusrule.yaml matches dashboards/alerts.yml")
    monitor = docs["PodMonitor"]
    pod_labels = docs["Deployment"]["spec"]["template"]["metadata"]["labels"]
    if not monitor["spec"]["selector"]["matchLabels"].items() <= pod_labels.items():
        fail("podmonitor.yaml: its selector does not select the Deployment's pods")

    config = {name: (HERE / name).read_text() for name in ("hookgate.toml", "rules.toml")}
    check_config(hookgate, "base/hookgate.toml", config)

    gateway = tomllib.loads(config["hookgate.toml"])
    grace = gateway["shutdown"]["grace"]
    assert grace.endswith("s"), grace
    pod = docs["Deployment"]["spec"]["template"]["spec"]
    sidecar = next(c for c in pod["containers"] if c["name"] == "hookgate")
    pre_stop = sidecar["lifecycle"]["preStop"]["sleep"]["seconds"]
    if pod["terminationGracePeriodSeconds"] < pre_stop + int(grace[:-1]):
        fail("deployment.yaml: terminationGracePeriodSeconds is shorter than preStop + shutdown.grace")
    else:
        print(f"ok   terminationGracePeriodSeconds {pod['terminationGracePeriodSeconds']} >= preStop {pre_stop} + grace {grace}")
    security = sidecar["securityContext"]
    expected = {"allowPrivilegeEscalation": False, "readOnlyRootFilesystem": True, "runAsNonRoot": True}
    if any(security.get(k) != v for k, v in expected.items()) or security["capabilities"]["drop"] != ["ALL"]:
        fail("deployment.yaml: the hookgate container's securityContext is not restrictive")

    built = build("")
    if built is not None:
        for doc in built:
            if doc["kind"] == "ConfigMap":
                try:
                    kubernetes_validate.validate(doc, KUBERNETES, strict=True)
                    print(f"ok   generated {doc['kind']} {doc['metadata']['name']} (strict)")
                except kubernetes_validate.ValidationError as e:
                    fail(f"generated {doc['kind']}: {e.message}")
    check_overlay(hookgate)
    check_secret_script()

    if failures:
        print(f"{len(failures)} problems")
        sys.exit(1)
    print("all manifests ok")


def check_config(hookgate, what, files):
    """`hookgate check` on a ConfigMap's files, written to a directory."""
    with tempfile.TemporaryDirectory() as tmp:
        for name, text in files.items():
            (pathlib.Path(tmp) / name).write_text(text)
        out = subprocess.run(
            [hookgate, "check", "--config", str(pathlib.Path(tmp) / "hookgate.toml")],
            capture_output=True,
            text=True,
        )
        print(out.stdout + out.stderr, end="")
        if out.returncode != 0:
            fail(f"{what}: hookgate check failed")
        else:
            print(f"ok   {what} passes hookgate check")


def build(directory):
    """`kubectl kustomize` of a directory under deploy/kubernetes, as
    documents; None (reported) without kubectl or on failure."""
    if shutil.which("kubectl") is None:
        print(f"SKIP kustomize build of {directory or '.'}: kubectl is not installed")
        return None
    out = subprocess.run(
        ["kubectl", "kustomize", str(KUBERNETES_DIR / directory)],
        capture_output=True,
        text=True,
    )
    if out.returncode != 0:
        fail(f"{directory or '.'}: kubectl kustomize failed: {out.stderr}")
        return None
    return list(yaml.safe_load_all(out.stdout))


def check_secret_script():
    """secret.sh: an empty secret is refused; a real one becomes a Secret
    with the files the Deployment mounts."""
    script = KUBERNETES_DIR / "secret.sh"
    empty = subprocess.run([script], capture_output=True, text=True, env={"PATH": "/usr/bin:/bin", "VENDOR_SECRET": ""})
    if empty.returncode != 1 or "VENDOR_SECRET is empty" not in empty.stderr:
        fail(f"secret.sh accepted an empty secret: {empty.returncode} {empty.stderr}")
    else:
        print("ok   secret.sh refuses an empty VENDOR_SECRET")
    if shutil.which("kubectl") is None:
        print("SKIP secret.sh output: kubectl is not installed")
        return
    env = {"PATH": "/usr/bin:/bin", "VENDOR_SECRET": "a-vendor-secret-of-length", "PREVIOUS_SECRET": "the-one-before-it-0000"}
    made = subprocess.run([script], capture_output=True, text=True, env=env)
    if made.returncode != 0:
        fail(f"secret.sh failed: {made.stderr}")
        return
    secret = yaml.safe_load(made.stdout)
    try:
        kubernetes_validate.validate(secret, KUBERNETES, strict=True)
    except kubernetes_validate.ValidationError as e:
        fail(f"secret.sh: {e.message}")
        return
    keys = set(secret["data"])
    if secret["metadata"]["name"] != "hookgate-secrets" or keys != {"current", "previous", "admin-token"}:
        fail(f"secret.sh made {secret['metadata']['name']} with {sorted(keys)}")
    else:
        print("ok   secret.sh makes hookgate-secrets with current, previous and admin-token (strict)")


def check_overlay(hookgate):
    """The JetStream overlay, as kustomize builds it."""
    built = build("jetstream")
    if built is None:
        return
    docs = {}
    for doc in built:
        docs[doc["kind"]] = doc
        if doc["kind"] in CRDS:
            continue
        try:
            kubernetes_validate.validate(doc, KUBERNETES, strict=True)
        except kubernetes_validate.ValidationError as e:
            fail(f"jetstream/: {doc['kind']}: {e.message} at {'.'.join(map(str, e.path))}")
    deployment = docs["Deployment"]
    pod = deployment["spec"]["template"]["spec"]
    volumes = {v["name"] for v in pod.get("volumes", [])}
    mounts = {m["name"] for c in pod["containers"] for m in c.get("volumeMounts", [])}
    if deployment["spec"]["replicas"] != 3 or "spool" in volumes | mounts:
        fail("jetstream/: not 3 replicas without a spool volume")
    else:
        print("ok   jetstream/: 3 replicas, no spool volume, every resource valid (strict)")
    link = KUBERNETES_DIR / "jetstream" / "rules.toml"
    if not link.is_symlink() or link.resolve() != (HERE / "rules.toml").resolve():
        fail("jetstream/rules.toml is not a link to base/rules.toml")
    config = docs["ConfigMap"]["data"]
    if tomllib.loads(config["hookgate.toml"])["spool"].get("backend") != "nats":
        fail("jetstream/: hookgate.toml does not use the nats backend")
    check_config(hookgate, "jetstream/ configmap", config)


if __name__ == "__main__":
    main(sys.argv[1])
