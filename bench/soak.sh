#!/usr/bin/env bash
# bench/soak.sh — issue 4's load-and-soak run: SOAK_SECONDS (default 300) of
# sustained signed webhook traffic (1,000 distinct webhooks, in turn:
# bench/bodies.py, bench/requests.lua) through ivrguard at a fixed connection
# count (wrk -t1 -cCONNS), against a static-TwiML nginx backend on loopback.
# Reports requests served, errors (non-2xx + socket errors: must be 0), and
# ivrguard's RSS after warm-up and at the end (growth must stay under 10 %),
# sampled every 5 s into $WORK/rss.tsv. Not a test: a measurement for
# bench/RESULTS.md. Installs wrk, nginx and Python from Debian if missing.
set -euo pipefail
cd "$(dirname "$0")/.."
SOAK_SECONDS=${SOAK_SECONDS:-300}
CONNS=${CONNS:-32}
WARMUP=10

missing=()
command -v wrk >/dev/null || missing+=(wrk)
command -v nginx >/dev/null || missing+=(nginx)
command -v python3 >/dev/null || missing+=(python3)
if [ ${#missing[@]} -gt 0 ]; then
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
fi
cargo build --release --bin ivrguard >/dev/null 2>&1 || cargo build --release --bin ivrguard
IVRGUARD=${CARGO_TARGET_DIR:-target}/release/ivrguard

WORK=$(mktemp -d /tmp/ivrguard-soak.XXXXXX)
PIDS=()
cleanup() { for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; }
trap cleanup EXIT
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
wait_port() {
    for _ in $(seq 200); do (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null && return 0; sleep 0.05; done
    echo "nothing listening on port $1" >&2; exit 1
}
rss_kib() { awk '$1 == "VmRSS:" { print $2 }' "/proc/$1/status"; }

P_BACKEND=$(free_port); P_PROXY=$(free_port); P_ADMIN=$(free_port)
mkdir -p "$WORK/backend/logs"
cat >"$WORK/backend/nginx.conf" <<EOF
daemon off;
user root;
worker_processes 1;
pid $WORK/backend/nginx.pid;
error_log $WORK/backend/logs/error.log warn;
events { worker_connections 4096; }
http {
    access_log off;
    keepalive_requests 1000000;
    client_body_temp_path $WORK/backend/body;
    server {
        listen 127.0.0.1:$P_BACKEND;
        location / { default_type text/xml; return 200 '<Response><Say>ok</Say></Response>'; }
    }
}
EOF
nginx -c "$WORK/backend/nginx.conf" -p "$WORK/backend" & PIDS+=($!)

export SOAK_TOKEN=soak-auth-token-not-a-secret SOAK_KEY
SOAK_KEY=$("$IVRGUARD" keygen)
cat >"$WORK/ivrguard.toml" <<EOF
[server]
listen = "127.0.0.1:$P_PROXY"
admin_listen = "127.0.0.1:$P_ADMIN"
[upstream]
url = "http://127.0.0.1:$P_BACKEND"
[twilio]
auth_token_env = "SOAK_TOKEN"
public_url = "https://ivr.example.com"
[encryption]
key_env = "SOAK_KEY"
[log]
format = "json"
EOF
"$IVRGUARD" run --config "$WORK/ivrguard.toml" >"$WORK/access.log" 2>"$WORK/stderr.log" & PROXY_PID=$!
PIDS+=("$PROXY_PID")
wait_port "$P_BACKEND"; wait_port "$P_PROXY"

# bench/run.sh's 1,000 distinct signed 1 KB <Gather> webhooks, in turn.
export WRK_REQUESTS=$WORK/gather.http
python3 bench/bodies.py gather 1000 "$SOAK_TOKEN" "https://ivr.example.com/ivr/gather?step=pin" "$WRK_REQUESTS"
LUA=bench/requests.lua

echo "soak: wrk -t1 -c$CONNS for ${SOAK_SECONDS}s (+${WARMUP}s warm-up), load average $(cut -d' ' -f1-3 /proc/loadavg)"
wrk -t1 -c"$CONNS" -d"${WARMUP}s" -s "$LUA" "http://127.0.0.1:$P_PROXY" >/dev/null
RSS_START=$(rss_kib "$PROXY_PID")
( while kill -0 "$PROXY_PID" 2>/dev/null; do printf '%s\t%s\n' "$(date +%s)" "$(rss_kib "$PROXY_PID")"; sleep 5; done ) >"$WORK/rss.tsv" &
PIDS+=($!)
OUT=$(wrk -t1 -c"$CONNS" -d"${SOAK_SECONDS}s" -s "$LUA" "http://127.0.0.1:$P_PROXY")
RSS_END=$(rss_kib "$PROXY_PID")
RESULT=$(grep '^RESULT' <<<"$OUT")
field() { sed -n "s/.*[ ]$1=\([^ ]*\).*/\1/p" <<<"$RESULT"; }
REQUESTS=$(field requests); NON2XX=$(field non2xx); SOCKERR=$(field sockerr)
FORWARDED=$(grep -c '"signature":"valid"' "$WORK/access.log" || true)
GROWTH=$(awk -v a="$RSS_START" -v b="$RSS_END" 'BEGIN { printf "%.1f", (b - a) * 100 / a }')
echo "$RESULT"
echo "requests served: $REQUESTS; errors: non-2xx $NON2XX, socket $SOCKERR"
echo "access lines with a valid signature: $FORWARDED (includes the warm-up)"
echo "ivrguard RSS: $RSS_START KiB after warm-up -> $RSS_END KiB at the end ($GROWTH %); samples in $WORK/rss.tsv"
echo "load average at the end: $(cut -d' ' -f1-3 /proc/loadavg)"
status=0
[ "$NON2XX" = 0 ] && [ "$SOCKERR" = 0 ] || { echo "FAIL: errors during the soak"; status=1; }
awk -v g="$GROWTH" 'BEGIN { exit !(g < 10) }' || { echo "FAIL: RSS grew by $GROWTH % (limit 10 %)"; status=1; }
exit $status
