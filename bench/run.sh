#!/usr/bin/env bash
# bench/run.sh — ivrguard against nginx, HAProxy and the backend alone, on
# loopback, in one run, so every ratio compares numbers taken minutes apart
# on the same (shared, noisy) machine. See bench/RESULTS.md for how to read
# the output.
#
#   bench/run.sh                 # ~15 min after the build, root for apt-get
#   ROUNDS=3 DURATION=5 bench/run.sh
#
# What it does:
#  1. installs wrk, nginx and haproxy from Debian if missing; builds
#     ivrguard as the image ships it (--release, glibc linked statically)
#     and the open-loop generator (bench/openloop.rs) --release;
#  2. starts a static-TwiML backend (nginx, 1 worker, `return 200`) and, in
#     front of it: nginx proxy_pass (worker_processes auto, upstream
#     keep-alive), HAProxy (nbthread 2, http-reuse always) and ivrguard
#     (verify + encrypt Digits + re-sign + JSON access log; stdout appended
#     to a file in the work directory, counted and truncated after each run);
#  3. sends BODIES (1,000) distinct signed webhooks through each, in turn
#     (bench/bodies.py writes them from bench/webhook.form: each its own
#     CallSid, Digits and I-Twilio-Idempotency-Token, signed with Python's
#     hmac; wrk's Lua request() and bench/openloop.rs cycle through them),
#     after checking that every target answers every one with the TwiML:
#       a. saturation, closed loop: wrk -t1 -c32, ROUNDS x DURATION s per
#          target, the order rotated every round, the 1 KB <Gather> webhooks;
#          req/s, p50, p99, the CPU each target used per request (from
#          /proc/<pid>/stat; its kernel part too), wrk's own and the
#          backend's; and what the CPUs would leave a proxy per request at
#          1.3x the better proxy's rate (meaningful on an otherwise idle
#          machine), beside the kernel time alone nginx and ivrguard spent;
#       b. the same, SPEECH_ROUNDS rounds, with 2 KB webhooks carrying a
#          SpeechResult (perf notes, section A5) instead of Digits;
#       c. fixed rate, open loop (bench/openloop.rs, no coordinated
#          omission): RATES req/s (200, 2,000 and 10,000), FIXED_ROUNDS x
#          FIXED_SECONDS s per target, percentiles over all rounds' samples
#          pooled;
#  4. ivrguard's memory: idle RSS at start-up and again IDLE_WAIT s after
#     the saturation rounds, RSS while 1,000 keep-alive connections are
#     held open (and nginx's and HAProxy's with the same 1,000), peak RSS
#     after 1,000 connections under load and the idle RSS IDLE_WAIT s after
#     that burst; start-up to ready (/readyz answers 200), median of 5;
#  5. prints per-target min/median/max and the per-round ratios (flagged
#     noisy when they spread over more than 10 % of the median), the added
#     latency over the backend alone at each fixed rate, and the protocol's
#     validity checks (perf notes, section A5): the backend alone serves at
#     least twice the best proxy (wrk is not the bottleneck), and wrk's
#     request count agrees with ivrguard's access-log lines and with the
#     requests the backend served (its nginx stub_status, on BASE_PORT + 8).
#
# nginx and HAProxy log nothing by default (ivrguard writes its JSON access
# log to a file, so the comparison is against it); ANCHOR_LOGS=1 gives both
# an access log to a file too.
#
# Nothing is pinned by default: all four targets share both cores with the
# generator, as a sidecar shares its pod. PIN=1 runs the generator on CPU 0
# and the servers on CPU 1 (a per-core view; every proxy then gets one
# worker/thread).
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
ANCHOR_LOGS=${ANCHOR_LOGS:-0} # 1: nginx and HAProxy write an access log to a file, as ivrguard does

ROUNDS=${ROUNDS:-5}
DURATION=${DURATION:-10}
SPEECH_ROUNDS=${SPEECH_ROUNDS:-3}
BODIES=${BODIES:-1000}
WARMUP=${WARMUP:-5}
CONNS=${CONNS:-32}
RATES=${RATES:-"200 2000 10000"}
FIXED_ROUNDS=${FIXED_ROUNDS:-3}
FIXED_SECONDS=${FIXED_SECONDS:-10}
PIN=${PIN:-0}
BASE_PORT=${BASE_PORT:-27100}
KEEP=${KEEP:-0}
# Seconds of quiet before an "idle after traffic" RSS reading.
IDLE_WAIT=${IDLE_WAIT:-6}

P_BACKEND=$((BASE_PORT + 1))
P_NGINX=$((BASE_PORT + 2))
P_HAPROXY=$((BASE_PORT + 3))
P_IVRGUARD=$((BASE_PORT + 4))
P_ADMIN=$((BASE_PORT + 5))
P_STARTUP=$((BASE_PORT + 6))
P_STARTUP_ADMIN=$((BASE_PORT + 7))
P_STATUS=$((BASE_PORT + 8)) # the backend's request count (nginx stub_status)
PUBLIC_ORIGIN=https://ivr.example.com
PATH_AND_QUERY='/ivr/gather?step=card'

say() { printf '\n== %s\n' "$*"; }
loadavg() { cut -d' ' -f1-3 /proc/loadavg; }

# ---------------------------------------------------------------- 1. tools
missing=()
command -v wrk >/dev/null || missing+=(wrk)
command -v nginx >/dev/null || [ -x /usr/sbin/nginx ] || missing+=(nginx)
command -v haproxy >/dev/null || [ -x /usr/sbin/haproxy ] || missing+=(haproxy)
command -v python3 >/dev/null || missing+=(python3)
if [ ${#missing[@]} -gt 0 ]; then
    say "installing ${missing[*]}"
    apt-get update && DEBIAN_FRONTEND=noninteractive apt-get install -y "${missing[@]}"
fi
export PATH=$PATH:/usr/sbin
# ivrguard as the image ships it (docker/Dockerfile): --release, glibc linked
# statically. Its memory is what a pod's RSS shows; the default, dynamically
# linked build also maps libc, libm and ld.so (about 1 MiB more).
say "building ivrguard as the image does (static, --release) and bench/openloop.rs"
TRIPLE=$(rustc -vV | sed -n 's/^host: //p')
RUSTFLAGS="-C target-feature=+crt-static" cargo build --release --target "$TRIPLE" --bin ivrguard
cargo build --release --example openloop
TARGET_DIR=${CARGO_TARGET_DIR:-$ROOT/target}
IVRGUARD=$TARGET_DIR/$TRIPLE/release/ivrguard
ldd "$IVRGUARD" 2>&1 | grep -qE 'statically linked|not a dynamic executable' ||
    { echo "$IVRGUARD is not statically linked" >&2; exit 1; }
OPENLOOP=$TARGET_DIR/release/examples/openloop

for port in $(seq "$P_BACKEND" "$P_STATUS"); do
    if (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null; then
        echo "port $port is in use; set BASE_PORT to another range" >&2
        exit 1
    fi
done

WORK=$(mktemp -d /tmp/ivrguard-bench.XXXXXX)
chmod 755 "$WORK"
PIDS=()
cleanup() {
    for pid in "${PIDS[@]}"; do kill "$pid" 2>/dev/null || true; done
    for pid in "${PIDS[@]}"; do wait "$pid" 2>/dev/null || true; done
    if [ "$KEEP" = 1 ]; then echo "work directory kept: $WORK"; else rm -rf "$WORK"; fi
}
trap cleanup EXIT
trap 'exit 130' INT TERM

if [ "$PIN" = 1 ]; then
    LOAD=(taskset -c 0)
    SERVE=(taskset -c 1)
    WORKERS=1
else
    LOAD=()
    SERVE=()
    WORKERS=auto
fi

wait_port() {
    for _ in $(seq 200); do
        (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null && return 0
        sleep 0.05
    done
    echo "nothing listening on port $1" >&2
    exit 1
}

# The CPU time (µs) used so far by processes and their child processes (all
# their threads): user and system time, or with `sys` first, the system
# (kernel) time alone.
cpu_us() {
    local total=0 pid times='$12 + $13'
    if [ "$1" = sys ]; then times='$13'; shift; fi
    for pid in "$@" $(for p in "$@"; do pgrep -P "$p" || true; done); do
        [ -r "/proc/$pid/stat" ] || continue
        total=$((total + $(awk "{ sub(/.*\\) /, \"\"); print $times }" "/proc/$pid/stat")))
    done
    echo $((total * 1000000 / $(getconf CLK_TCK)))
}

rss_kib() { awk -v f="$2" '$1 == f":" { print $2 }' "/proc/$1/status"; }
# The same, summed over a target's processes (nginx's master and workers).
target_rss_kib() { # target field
    local total=0 pid
    for pid in ${PID[$1]} $(pgrep -P "${PID[$1]}" || true); do
        total=$((total + $(rss_kib "$pid" "$2")))
    done
    echo "$total"
}

# ------------------------------------------------------------- 2. servers
TOKEN=bench-auth-token-not-a-secret-0001
export BENCH_TWILIO_TOKEN=$TOKEN
export BENCH_IVRGUARD_KEY=a154eb4c759711bc2538a7cc021e9e9f17dd8aa63151c62ca28a82a4a404203d

declare -A REQUESTS=([gather]=$WORK/gather.http [speech]=$WORK/speech.http)
for set in gather speech; do
    python3 bench/bodies.py "$set" "$BODIES" "$TOKEN" "$PUBLIC_ORIGIN$PATH_AND_QUERY" "${REQUESTS[$set]}"
done

TWIML='<?xml version="1.0" encoding="UTF-8"?><Response><Gather input="dtmf" numDigits="4" action="/ivr/gather?step=pin"><Say>Thank you. Now enter your four digit PIN.</Say></Gather></Response>'

nginx_conf() { # name workers body
    mkdir -p "$WORK/$1/logs"
    cat >"$WORK/$1/nginx.conf" <<EOF
daemon off;
user root;
worker_processes $2;
pid $WORK/$1/nginx.pid;
error_log $WORK/$1/logs/error.log warn;
events { worker_connections 4096; }
http {
    access_log off;
    keepalive_requests 1000000;
    keepalive_timeout 65s;
    client_body_temp_path $WORK/$1/body;
    proxy_temp_path $WORK/$1/proxy;
    fastcgi_temp_path $WORK/$1/fastcgi;
    uwsgi_temp_path $WORK/$1/uwsgi;
    scgi_temp_path $WORK/$1/scgi;
$3
}
EOF
}

nginx_conf backend 1 "
    server {
        listen 127.0.0.1:$P_BACKEND;
        location / {
            default_type text/xml;
            return 200 '$TWIML';
        }
    }
    server {
        listen 127.0.0.1:$P_STATUS;
        location / { stub_status; }
    }"
nginx_conf nginx "$WORKERS" "
    upstream app {
        server 127.0.0.1:$P_BACKEND;
        keepalive 64;
        keepalive_requests 1000000;
    }
    server {
        listen 127.0.0.1:$P_NGINX;
        $([ "$ANCHOR_LOGS" = 1 ] && echo "access_log $WORK/nginx/logs/access.log;")
        location / {
            proxy_pass http://app;
            proxy_http_version 1.1;
            proxy_set_header Connection \"\";
            proxy_set_header Host \$host;
        }
    }"

HAPROXY_THREADS=2
[ "$PIN" = 1 ] && HAPROXY_THREADS=1
cat >"$WORK/haproxy.cfg" <<EOF
global
    nbthread $HAPROXY_THREADS
    maxconn 4096
$([ "$ANCHOR_LOGS" = 1 ] && printf '    log stdout format raw local0')
defaults
    mode http
$([ "$ANCHOR_LOGS" = 1 ] && printf '    log global\n    option httplog')
    timeout connect 5s
    timeout client 30s
    timeout server 30s
    http-reuse always
frontend fe
    bind 127.0.0.1:$P_HAPROXY
    default_backend app
backend app
    server app1 127.0.0.1:$P_BACKEND
EOF

ivrguard_conf() { # file listen admin
    cat >"$1" <<EOF
[server]
listen = "127.0.0.1:$2"
admin_listen = "127.0.0.1:$3"
[upstream]
url = "http://127.0.0.1:$P_BACKEND"
[twilio]
auth_token_env = "BENCH_TWILIO_TOKEN"
public_url = "$PUBLIC_ORIGIN"
[encryption]
key_env = "BENCH_IVRGUARD_KEY"
[log]
format = "json"
level = "info"
EOF
}
ivrguard_conf "$WORK/ivrguard.toml" "$P_IVRGUARD" "$P_ADMIN"
ivrguard_conf "$WORK/startup.toml" "$P_STARTUP" "$P_STARTUP_ADMIN"

say "starting the backend, nginx, HAProxy and ivrguard (work dir $WORK)"
"${SERVE[@]}" nginx -c "$WORK/backend/nginx.conf" -p "$WORK/backend" &
PID_BACKEND=$!
PIDS+=("$PID_BACKEND")
wait_port "$P_BACKEND"
"${SERVE[@]}" nginx -c "$WORK/nginx/nginx.conf" -p "$WORK/nginx" &
PID_NGINX=$!
PIDS+=("$PID_NGINX")
"${SERVE[@]}" haproxy -db -f "$WORK/haproxy.cfg" >>"$WORK/haproxy.log" &
PID_HAPROXY=$!
PIDS+=("$PID_HAPROXY")
IVRGUARD_LOG=$WORK/ivrguard.stdout
"${SERVE[@]}" "$IVRGUARD" run --config "$WORK/ivrguard.toml" >>"$IVRGUARD_LOG" 2>"$WORK/ivrguard.stderr" &
PID_IVRGUARD=$!
PIDS+=("$PID_IVRGUARD")
wait_port "$P_NGINX"
wait_port "$P_HAPROXY"
wait_port "$P_IVRGUARD"
sleep 0.5
IDLE_RSS=$(rss_kib "$PID_IVRGUARD" VmRSS)

declare -A PORT=([backend]=$P_BACKEND [nginx]=$P_NGINX [haproxy]=$P_HAPROXY [ivrguard]=$P_IVRGUARD)
declare -A PID=([backend]=$PID_BACKEND [nginx]=$PID_NGINX [haproxy]=$PID_HAPROXY [ivrguard]=$PID_IVRGUARD)
TARGETS=(backend nginx haproxy ivrguard)

# Correctness first: every target answers every request with the TwiML,
# and ivrguard forwarded each (valid signature, the field encrypted).
say "checking that every target answers all $BODIES webhooks of each set"
for set in gather speech; do
    for t in "${TARGETS[@]}"; do
        "$OPENLOOP" check "127.0.0.1:${PORT[$t]}" "${REQUESTS[$set]}" '<Gather' >/dev/null ||
            { KEEP=1; echo "$t did not answer every $set webhook with the TwiML; see $WORK" >&2; exit 1; }
    done
done
sleep 0.3
for check in gather:Digits speech:SpeechResult; do
    forwarded=$(grep '"signature":"valid"' "$IVRGUARD_LOG" | grep -c "\"encrypted_fields\":\"${check#*:}\"" || true)
    if [ "$forwarded" != "$BODIES" ]; then
        echo "ivrguard verified and encrypted ${check#*:} in $forwarded of the $BODIES ${check%:*} webhooks; see $IVRGUARD_LOG" >&2
        KEEP=1
        exit 1
    fi
done
: >"$IVRGUARD_LOG"

# wrk sends the requests of a set in turn (bench/requests.lua: a Lua
# request() over a table built once, wrk2's advice), and reports its own CPU
# per request too.
LUA=$ROOT/bench/requests.lua

field() { sed -n "s/.*[ ]$1=\([^ ]*\).*/\1/p" <<<"$2"; }

# ------------------------------------------------- 3a. saturation (closed)
WARMUP_RESULTS=$WORK/warmup.txt
say "warm-up: ${WARMUP} s per target and set"
for set in gather speech; do
    for t in "${TARGETS[@]}"; do
        echo "set=$set target=$t $(WRK_REQUESTS=${REQUESTS[$set]} "${LOAD[@]}" wrk -t1 -c"$CONNS" \
            -d"${WARMUP}s" -s "$LUA" "http://127.0.0.1:${PORT[$t]}" | grep '^RESULT')" >>"$WARMUP_RESULTS"
    done
done
# The log writer batches: let the warm-up's last lines land before the
# count starts (as after each round below).
sleep 0.3
: >"$IVRGUARD_LOG"

# Requests the backend has served so far (its stub_status), for the check
# that every request wrk counted went through to it once.
backend_served() {
    local reply
    exec 3<>"/dev/tcp/127.0.0.1/$P_STATUS"
    printf 'GET / HTTP/1.0\r\n\r\n' >&3
    reply=$(cat <&3)
    exec 3<&-
    awk 'prev ~ /accepts handled requests/ { print $3; exit } { prev = $0 }' <<<"$reply"
}
# µs per request: DELTA_US over REQUESTS, to two decimals.
per_request() { # delta_us requests
    awk -v d="$1" -v r="${2:-0}" 'BEGIN { if (r > 0) printf "%.2f", d / r; else print "nan" }'
}
# wrk -t1 -cCONNS on each target in turn, ROUNDS times, the order rotated
# every round: one line per round and target in FILE.
saturate() { # set rounds file
    local set=$1 rounds=$2 file=$3 round t order out before after requests cpu lines served_before served
    local sys_before sys app_before app
    : >"$file"
    for round in $(seq "$rounds"); do
        order=()
        for i in 0 1 2 3; do order+=("${TARGETS[$(((i + round - 1) % 4))]}"); done
        for t in "${order[@]}"; do
            before=$(cpu_us "${PID[$t]}")
            sys_before=$(cpu_us sys "${PID[$t]}")
            app_before=$(cpu_us "${PID[backend]}")
            served_before=$(backend_served)
            out=$(WRK_REQUESTS=${REQUESTS[$set]} "${LOAD[@]}" wrk -t1 -c"$CONNS" -d"${DURATION}s" \
                -s "$LUA" "http://127.0.0.1:${PORT[$t]}" | grep '^RESULT')
            after=$(cpu_us "${PID[$t]}")
            sys=$(($(cpu_us sys "${PID[$t]}") - sys_before))
            app=$(($(cpu_us "${PID[backend]}") - app_before))
            # This reading counts itself too.
            served=$(($(backend_served) - served_before - 1))
            requests=$(field requests "$out")
            cpu=$(per_request $((after - before)) "$requests")
            lines=-
            if [ "$t" = ivrguard ]; then
                sleep 0.3
                lines=$(wc -l <"$IVRGUARD_LOG")
                : >"$IVRGUARD_LOG"
            fi
            echo "round=$round target=$t ${out#RESULT } cpu_us_per_req=$cpu sys_us_per_req=$(per_request "$sys" "$requests") backend_cpu_us_per_req=$(per_request "$app" "$requests") log_lines=$lines backend_served=$served" | tee -a "$file"
        done
    done
}
RESULTS=$WORK/saturation.txt
say "saturation, 1 KB <Gather> webhooks: wrk -t1 -c$CONNS -d${DURATION}s, $ROUNDS rounds, load average $(loadavg)"
LOAD_START=$(loadavg)
saturate gather "$ROUNDS" "$RESULTS"
LOAD_END=$(loadavg)
SATURATION_RSS_PEAK=$(rss_kib "$PID_IVRGUARD" VmHWM)
sleep "$IDLE_WAIT" # the wrk connections closed: idle again, after traffic
IDLE_AFTER_RSS=$(rss_kib "$PID_IVRGUARD" VmRSS)
SPEECH_RESULTS=$WORK/speech.txt
say "saturation, 2 KB SpeechResult webhooks: $SPEECH_ROUNDS rounds, load average $(loadavg)"
saturate speech "$SPEECH_ROUNDS" "$SPEECH_RESULTS"

# ---------------------------------------------------- 3b. fixed rate (open)
FIXED=$WORK/fixed.txt
: >"$FIXED"
for rate in $RATES; do
    say "fixed rate $rate req/s: openloop, $CONNS connections, $FIXED_ROUNDS x ${FIXED_SECONDS}s, load average $(loadavg)"
    for round in $(seq "$FIXED_ROUNDS"); do
        order=()
        for i in 0 1 2 3; do order+=("${TARGETS[$(((i + round - 1) % 4))]}"); done
        for t in "${order[@]}"; do
            out=$("${LOAD[@]}" "$OPENLOOP" rate "127.0.0.1:${PORT[$t]}" "${REQUESTS[gather]}" \
                "$rate" "$CONNS" "$FIXED_SECONDS" "$WORK/latency-$rate-$t-$round" | grep '^RESULT')
            echo "rate=$rate round=$round target=$t ${out#RESULT }" | tee -a "$FIXED"
        done
    done
done
# Percentiles over every sample of a target's rounds at one rate.
POOLED=$WORK/pooled.txt
: >"$POOLED"
for rate in $RATES; do
    for t in "${TARGETS[@]}"; do
        out=$("$OPENLOOP" pool "$WORK/latency-$rate-$t-"* | grep '^POOLED')
        echo "rate=$rate target=$t ${out#POOLED }" >>"$POOLED"
    done
done
: >"$IVRGUARD_LOG"

# ------------------------------------------------------------- 4. memory
say "memory: 1,000 keep-alive connections held open, then 1,000 under load"
# A target's RSS (KiB, its processes summed: nginx's master and workers)
# with 1,000 keep-alive connections open, each having sent one request.
declare -A HELD_RSS HELD
hold_1000() { # target
    local t=$1 hold_pid
    "${LOAD[@]}" "$OPENLOOP" hold "127.0.0.1:${PORT[$t]}" "${REQUESTS[gather]}" 1000 4 >"$WORK/hold-$t.txt" &
    hold_pid=$!
    PIDS+=("$hold_pid")
    for _ in $(seq 100); do
        grep -q HELD "$WORK/hold-$t.txt" 2>/dev/null && break
        sleep 0.1
    done
    sleep 1
    HELD_RSS[$t]=$(target_rss_kib "$t" VmRSS)
    HELD[$t]=$(cat "$WORK/hold-$t.txt")
    wait "$hold_pid" || true
}
hold_1000 ivrguard
WRK_REQUESTS=${REQUESTS[gather]} "${LOAD[@]}" wrk -t1 -c1000 -d5s -s "$LUA" "http://127.0.0.1:$P_IVRGUARD" |
    grep '^RESULT' >"$WORK/c1000.txt" || true
PEAK_RSS=$(rss_kib "$PID_IVRGUARD" VmHWM)
# The 1,000 connections closed: what ivrguard keeps once the burst is over
# (it hands freed memory back once connections close; README, Operations).
sleep "$IDLE_WAIT"
IDLE_AFTER_BURST_RSS=$(rss_kib "$PID_IVRGUARD" VmRSS)
# The same 1,000 connections held on nginx and HAProxy, for comparison.
hold_1000 nginx
hold_1000 haproxy
declare -A PROXY_RSS
for t in nginx haproxy ivrguard; do
    PROXY_RSS[$t]=$(target_rss_kib "$t" VmHWM)
done

say "start-up to ready (/readyz 200), 5 runs"
STARTUPS=()
for _ in 1 2 3 4 5; do
    out=$("$OPENLOOP" startup "http://127.0.0.1:$P_STARTUP_ADMIN/readyz" 5000 \
        "$IVRGUARD" run --config "$WORK/startup.toml")
    STARTUPS+=("$(field ms " $out")")
done

# -------------------------------------------------------------- 5. report
say "results"
median() { sort -g | awk '{ a[NR] = $1 } END { if (NR % 2) print a[(NR + 1) / 2]; else print (a[NR / 2] + a[NR / 2 + 1]) / 2 }'; }
minmax() { sort -g | awk 'NR == 1 { min = $1 } { max = $1 } END { print min " " max }'; }
col() { # file filter-regex key
    grep -E "$2" "$1" | sed -n "s/.* $3=\([^ ]*\).*/\1/p"
}
# One ratio per round: an awk expression over i, n, h and b (ivrguard,
# nginx, HAProxy, backend), from the lines of FILE that start with PREFIX.
ratio_rounds() { # key expression file prefix rounds
    local key=$1 file=$3 prefix=$4 rounds=$5
    for round in $(seq "$rounds"); do
        local i n h b
        i=$(col "$file" "^${prefix}round=$round target=ivrguard " "$key")
        n=$(col "$file" "^${prefix}round=$round target=nginx " "$key")
        h=$(col "$file" "^${prefix}round=$round target=haproxy " "$key")
        b=$(col "$file" "^${prefix}round=$round target=backend " "$key")
        awk -v i="$i" -v n="$n" -v h="$h" -v b="$b" "BEGIN { print $2 }"
    done
}

echo "machine: $(nproc) CPUs, $(sed -n 's/^model name\s*: //p' /proc/cpuinfo | head -1), Linux $(uname -r)"
echo "load average: before saturation $LOAD_START, after $LOAD_END, now $(loadavg)"
echo "pinning: $([ "$PIN" = 1 ] && echo 'generator CPU 0, servers CPU 1' || echo none)"
echo "access logs: ivrguard JSON to a file; nginx and HAProxy $([ "$ANCHOR_LOGS" = 1 ] && echo 'to a file' || echo off)"
echo
# min / median / max of the per-round ratios, flagged "noisy" when they
# spread over more than 10 % of the median (perf notes, section A5).
show_ratio() { # label key expression file prefix rounds
    local r min med max
    r=$(ratio_rounds "${@:2}")
    read -r min max <<<"$(minmax <<<"$r")"
    med=$(median <<<"$r")
    printf '  %-44s %s / %s / %s%s\n' "$1" "$min" "$med" "$max" \
        "$(awk -v a="$min" -v m="$med" -v b="$max" 'BEGIN { if (m > 0 && (b - a) / m > 0.10) printf "  (noisy: spread %.0f %% of the median)", 100 * (b - a) / m }')"
}
# "ok" for each line of stdin whose KEY is wrk's request count or up to
# CONNS more, else MISMATCH(key/requests); counted.
counts_agree() { # key
    awk -v key="$1" -v conns="$CONNS" '{ for (i = 1; i <= NF; i++) { split($i, kv, "="); v[kv[1]] = kv[2] }
        d = v[key] - v["requests"]; print (d >= 0 && d <= conns) ? "ok" : "MISMATCH(" v["target"] ":" v[key] "/" v["requests"] ")" }' |
        sort | uniq -c | tr '\n' ' '
}
# The issue's throughput target as CPU time: at 1.3x the better proxy's
# rate, the µs per request both CPUs leave a proxy once wrk and the backend
# have had theirs (as measured in ivrguard's round), against the kernel time
# alone that nginx and ivrguard spent per request. An upper bound: it
# assumes every cycle of both CPUs goes to these three and nothing else.
budget_report() { # file rounds
    local file=$1 rounds=$2 round per_round
    per_round=$(for round in $(seq "$rounds"); do
        awk -v r="$round" -v cpus="$(nproc)" '
            $1 == "round=" r { sub(/^target=/, "", $2); for (i = 3; i <= NF; i++) { split($i, kv, "="); v[$2, kv[1]] = kv[2] } }
            END {
                best = v["nginx", "rps"] > v["haproxy", "rps"] ? v["nginx", "rps"] : v["haproxy", "rps"]
                if (best > 0) printf "%.2f %s %s\n", cpus * 1e6 / (1.3 * best) - v["ivrguard", "wrk_cpu_us_per_req"] - v["ivrguard", "backend_cpu_us_per_req"], v["nginx", "sys_us_per_req"], v["ivrguard", "sys_us_per_req"]
            }' "$file"
    done)
    local column values label=("" "CPU µs/request left to a proxy at 1.3x the better"
        "  kernel µs/request of nginx (sys time)" "  kernel µs/request of ivrguard (sys time)")
    for column in 1 2 3; do
        values=$(cut -d' ' -f"$column" <<<"$per_round")
        printf '  %-52s %s / %s / %s\n' "${label[$column]}" \
            $(minmax <<<"$values" | cut -d' ' -f1) "$(median <<<"$values")" $(minmax <<<"$values" | cut -d' ' -f2)
    done
}
# The table and the ratios of one saturation phase.
saturation_report() { # file rounds title
    local file=$2 rounds=$3 t rps p50 p99 cpu
    echo "saturation, $1 (wrk -t1 -c$CONNS, ${DURATION}s x $rounds): min / median / max across rounds"
    printf '%-9s %26s %22s %22s %11s %11s %8s\n' target req/s p50_ms p99_ms cpu_us/req sys_us/req wrk_us
    for t in "${TARGETS[@]}"; do
        rps=$(col "$file" "target=$t " rps)
        p50=$(col "$file" "target=$t " p50_us | awk '{ print $1 / 1000 }')
        p99=$(col "$file" "target=$t " p99_us | awk '{ print $1 / 1000 }')
        cpu=$(col "$file" "target=$t " cpu_us_per_req)
        printf '%-9s %8s / %6s / %6s %6s / %5s / %5s %6s / %5s / %5s %11s %11s %8s\n' "$t" \
            $(minmax <<<"$rps" | cut -d' ' -f1) "$(median <<<"$rps")" $(minmax <<<"$rps" | cut -d' ' -f2) \
            $(minmax <<<"$p50" | cut -d' ' -f1) "$(median <<<"$p50")" $(minmax <<<"$p50" | cut -d' ' -f2) \
            $(minmax <<<"$p99" | cut -d' ' -f1) "$(median <<<"$p99")" $(minmax <<<"$p99" | cut -d' ' -f2) \
            "$(median <<<"$cpu")" "$(col "$file" "target=$t " sys_us_per_req | median)" \
            "$(col "$file" "target=$t " wrk_cpu_us_per_req | median)"
    done
    echo "ratios, per round (same minutes), min / median / max:"
    show_ratio "throughput ivrguard / nginx" rps "i / n" "$file" "" "$rounds"
    show_ratio "throughput ivrguard / HAProxy" rps "i / h" "$file" "" "$rounds"
    show_ratio "throughput ivrguard / better of the two" rps "i / (n > h ? n : h)" "$file" "" "$rounds"
    show_ratio "throughput ivrguard / backend alone" rps "i / b" "$file" "" "$rounds"
    show_ratio "p99 ivrguard / better (lower) of the two" p99_us "i / (n < h ? n : h)" "$file" "" "$rounds"
    show_ratio "cpu/request ivrguard / nginx" cpu_us_per_req "i / n" "$file" "" "$rounds"
    budget_report "$file" "$rounds"
    # Validity (perf notes, A5): wrk must not be the bottleneck, so the
    # backend alone must serve at least twice what the best proxy does.
    local headroom="b / (i > n ? (i > h ? i : h) : (n > h ? n : h))"
    show_ratio "backend alone / best proxy (must be >= 2)" rps "$headroom" "$file" "" "$rounds"
    ratio_rounds rps "$headroom" "$file" "" "$rounds" | awk '$1 < 2 { low++ } END { if (low) print "  WARNING: below 2 in " low " round(s): wrk may have limited the proxies there" }'
    # wrk does not count the requests still in flight when it stops: up to
    # CONNS more lines and backend requests than wrk's count are right.
    echo "  access-log lines = requests (ivrguard): $(grep 'target=ivrguard' "$file" | counts_agree log_lines)"
    echo "  backend requests = requests (every target): $(counts_agree backend_served <"$file")"
    echo
}
saturation_report "1 KB <Gather> webhooks, $BODIES distinct" "$RESULTS" "$ROUNDS"
saturation_report "2 KB SpeechResult webhooks, $BODIES distinct" "$SPEECH_RESULTS" "$SPEECH_ROUNDS"
bad=$(grep -Ev 'non2xx=0 sockerr=0' "$WARMUP_RESULTS" "$RESULTS" "$SPEECH_RESULTS" "$WORK/c1000.txt" || true)
[ -n "$bad" ] && echo "INVALID: non-2xx or socket errors in: $bad" && echo

echo "fixed rate, open loop (bench/openloop.rs, $CONNS connections, the 1 KB webhooks, latency from the intended send time when the connection was busy):"
# p50/p99/p999: over the samples of all rounds together; p99_intended:
# timed from the intended send time always (wrk2's model), the generator's
# own lateness included; lag_p99: how late the generator itself started
# its sends (a sleep overshoots; more so when the target keeps the cores
# busy), which p99_ms leaves out unless the connection was still busy.
printf '%-7s %-9s %10s %9s %9s %9s %12s %9s %9s %12s\n' rate target achieved p50_ms p99_ms p999_ms p99_intended lag_p99 errors client_us/req
for rate in $RATES; do
    for t in "${TARGETS[@]}"; do
        sel="^rate=$rate .*target=$t "
        printf '%-7s %-9s %10s %9s %9s %9s %12s %9s %9s %12s\n' "$rate" "$t" \
            "$(col "$FIXED" "$sel" achieved_rps | median)" \
            "$(col "$POOLED" "$sel" p50_ms)" \
            "$(col "$POOLED" "$sel" p99_ms)" \
            "$(col "$POOLED" "$sel" p999_ms)" \
            "$(col "$FIXED" "$sel" wrk2_p99_ms | median)" \
            "$(col "$FIXED" "$sel" send_lag_p99_ms | median)" \
            "$(col "$FIXED" "$sel" errors | awk '{ s += $1 } END { print s + 0 }')" \
            "$(col "$FIXED" "$sel" client_cpu_us_per_req | median)"
    done
done
echo "  (p50, p99, p999 pooled over $FIXED_ROUNDS rounds, the rest their median; lines per target, all rates: $(awk '{print $3}' "$FIXED" | sort | uniq -c | tr '\n' ' '))"
echo "  ratios, pooled:"
for rate in $RATES; do
    for key in p50_ms p99_ms; do
        printf '  %-44s %s\n' "${key%_ms} at $rate/s ivrguard / better of the two" "$(awk -v i="$(col "$POOLED" "^rate=$rate target=ivrguard " $key)" \
            -v n="$(col "$POOLED" "^rate=$rate target=nginx " $key)" -v h="$(col "$POOLED" "^rate=$rate target=haproxy " $key)" \
            'BEGIN { printf "%.2f", i / (n < h ? n : h) }')"
    done
done
echo "  added latency, pooled p50 / p99 minus the backend alone's (ms):"
for rate in $RATES; do
    added=()
    for t in nginx haproxy ivrguard; do
        added+=("$t $(for key in p50_ms p99_ms; do
            awk -v x="$(col "$POOLED" "^rate=$rate target=$t " $key)" \
                -v b="$(col "$POOLED" "^rate=$rate target=backend " $key)" 'BEGIN { printf "%+.3f\n", x - b }'
        done | paste -sd/ -)")
    done
    printf '  %-44s %s; %s; %s\n' "at $rate/s" "${added[@]}"
done
echo "  ratios, per round, min / median / max:"
for rate in $RATES; do
    show_ratio "p50 at $rate/s ivrguard / better of the two" p50_ms "i / (n < h ? n : h)" "$FIXED" "rate=$rate " "$FIXED_ROUNDS"
    show_ratio "p99 at $rate/s ivrguard / better of the two" p99_ms "i / (n < h ? n : h)" "$FIXED" "rate=$rate " "$FIXED_ROUNDS"
done
echo
echo "memory and start-up (ivrguard):"
echo "  idle RSS after start-up:                     $((IDLE_RSS / 1024)) MiB ($IDLE_RSS KiB)"
echo "  idle RSS after the saturation rounds:        $((IDLE_AFTER_RSS / 1024)) MiB ($IDLE_AFTER_RSS KiB)"
echo "  peak RSS after the saturation rounds:        $((SATURATION_RSS_PEAK / 1024)) MiB ($SATURATION_RSS_PEAK KiB)"
echo "  RSS with 1,000 keep-alive connections held:  $((HELD_RSS[ivrguard] / 1024)) MiB (${HELD_RSS[ivrguard]} KiB) [${HELD[ivrguard]}]"
echo "  peak RSS (VmHWM) after 1,000 conns under load: $((PEAK_RSS / 1024)) MiB ($PEAK_RSS KiB) [$(cat "$WORK/c1000.txt")]"
printf '  %-45s%s\n' "idle RSS $IDLE_WAIT s after that burst:" \
    "$((IDLE_AFTER_BURST_RSS / 1024)) MiB ($IDLE_AFTER_BURST_RSS KiB)"
echo "  for comparison, 1,000 connections held:     nginx $((HELD_RSS[nginx] / 1024)) MiB (${HELD_RSS[nginx]} KiB, master+workers) [${HELD[nginx]}], HAProxy $((HELD_RSS[haproxy] / 1024)) MiB (${HELD_RSS[haproxy]} KiB) [${HELD[haproxy]}]"
echo "  peak RSS of the whole run, for comparison:   nginx $((PROXY_RSS[nginx] / 1024)) MiB (master+workers, summed), HAProxy $((PROXY_RSS[haproxy] / 1024)) MiB, ivrguard $((PROXY_RSS[ivrguard] / 1024)) MiB"
echo "  start-up to ready (ms, 5 runs):              ${STARTUPS[*]} (median $(printf '%s\n' "${STARTUPS[@]}" | median))"
