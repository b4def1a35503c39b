#!/usr/bin/env bash
# Container tests, for real, with podman: ./docker/test.sh
# (tests/run.sh calls it.)
#
# On a machine with no Docker engine and no registry (see
# docker/podman_play.py for what podman 4.3 cannot run as written), it:
#   1. installs podman and runc with apt-get when podman is missing (as
#      root), and writes /etc/containers/containers.conf when there is none;
#   2. validates every manifest in docker/kubernetes/ with
#      `kubernetes-validate --strict` (installed into docker/.venv), and
#      checks compose.yaml's shape;
#   3. builds ivrguard and the stand-in app (docker/test-backend) as static
#      binaries, and their images from this repository's Dockerfiles — the
#      runtime stage of docker/Dockerfile itself, with BINARY_FROM=prebuilt;
#   4. plays docker/kubernetes/ with `podman kube play` and, against the pod:
#      a signed webhook reaches the app as ciphertext that decrypts to what
#      the caller typed; an unsigned one is refused and never reaches it;
#      the app cannot be reached from outside the pod; ivrguard runs as uid
#      65532 with no capabilities, no new privileges, seccomp and a read-only
#      root; `ivrguard health` passes inside it; SIGTERM drains and exits 0;
#   5. runs the compose topology (internal network, service name
#      `legacy-app`, config mounted read-only): ivrguard in `scratch`
#      resolves the service name through the network's DNS, and the image's
#      HEALTHCHECK passes;
#   6. removes every pod, container, network and image it made (on any exit).
#
# It never skips: if podman cannot run here, it fails and says why.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
DOCKER="$ROOT/docker"
VENV="$DOCKER/.venv"
PYTHON="${PYTHON:-python3}"
START=$SECONDS
NAME="ivrguard-test-$$"
WORK="$(mktemp -d "${TMPDIR:-/tmp}/$NAME.XXXXXX")"

phase() { printf '\n==> [docker %4ss] %s\n' "$((SECONDS - START))" "$*"; }
die() { printf '\nERROR (docker/test.sh): %s\n' "$*" >&2; exit 1; }
need() { command -v "$1" >/dev/null 2>&1 || die "'$1' not found on PATH: $2"; }
ok() { printf '  ok  %s\n' "$*"; }

# Everything this script creates is named "$NAME..." or listed here.
IMAGES=()
cleanup() {
  local status=$?
  set +e
  phase "removing what the test created"
  if command -v podman >/dev/null 2>&1; then
    podman pod rm --ignore -f -t 0 "$NAME-pod-0" >/dev/null 2>&1
    podman rm --ignore -f -t 0 "$NAME-ivrguard" "$NAME-legacy-app" "$NAME-check" >/dev/null 2>&1
    podman network rm -f "$NAME-edge" "$NAME-backend" >/dev/null 2>&1
    podman volume rm -f "$NAME-ivrguard-config" >/dev/null 2>&1
    for image in "${IMAGES[@]}"; do podman rmi -f "$image" >/dev/null 2>&1; done
  fi
  rm -rf "$WORK"
  exit $status
}
trap cleanup EXIT

# Shows what a container said, then fails.
die_with_logs() {
  local message=$1
  shift
  for ctr in "$@"; do
    printf '\n--- podman logs %s (last 30 lines) ---\n' "$ctr" >&2
    podman logs --tail 30 "$ctr" >&2 2>&1 || true
  done
  die "$message"
}

# N distinct free TCP ports (held open together while picked).
free_ports() {
  "$PYTHON" -c 'import socket, sys
socks = [socket.socket() for _ in range(int(sys.argv[1]))]
for s in socks: s.bind(("127.0.0.1", 0))
print(" ".join(str(s.getsockname()[1]) for s in socks))' "$1"
}

# Polls a URL until it answers 2xx, for up to $2 seconds.
wait_for() {
  local url=$1 seconds=$2
  for _ in $(seq $((seconds * 5))); do
    curl -fsS -o /dev/null --max-time 1 "$url" 2>/dev/null && return 0
    sleep 0.2
  done
  return 1
}

cd "$ROOT"

# ---------------------------------------------------------------------------
phase "podman"
need curl "install curl"
need cargo "install Rust from https://rustup.rs"
if ! command -v podman >/dev/null 2>&1; then
  [[ $(id -u) -eq 0 ]] || die "podman is not installed, and installing it needs root: apt-get install podman runc"
  command -v apt-get >/dev/null 2>&1 || die "podman is not installed and there is no apt-get to install it with"
  echo "podman missing: apt-get install podman runc"
  { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq podman runc >/dev/null; } \
    || die "apt-get install podman runc failed"
fi
# The adjustments podman needs on these machines (no systemd, restricted
# ulimits): only written when there is no config, never over one.
if [[ ! -e /etc/containers/containers.conf && $(id -u) -eq 0 ]]; then
  mkdir -p /etc/containers
  cat >/etc/containers/containers.conf <<'CONF'
[containers]
default_ulimits = ["nofile=1024:1024", "nproc=1024:1024"]
[engine]
runtime = "runc"
cgroup_manager = "cgroupfs"
CONF
  echo "wrote /etc/containers/containers.conf"
fi
podman info >/dev/null 2>"$WORK/podman-info.err" \
  || die "podman cannot run here: $(tail -n 3 "$WORK/podman-info.err")"
echo "$(podman --version), rootful: $([[ $(id -u) -eq 0 ]] && echo yes || echo no)"

# ---------------------------------------------------------------------------
phase "kubernetes-validate --strict (docker/.venv)"
STAMP="$VENV/.installed-requirements"
WANT="$(sha256sum "$DOCKER/requirements.txt" | cut -d' ' -f1)"
if [[ -x "$VENV/bin/kubernetes-validate" && -f "$STAMP" && "$(cat "$STAMP")" == "$WANT" ]]; then
  echo "up to date, skipping pip install"
else
  rm -rf "$VENV"
  "$PYTHON" -m venv "$VENV" || die "could not create $VENV (on Debian/Ubuntu: apt-get install python3-venv)"
  "$VENV/bin/python" -m pip install --disable-pip-version-check --quiet --requirement "$DOCKER/requirements.txt" \
    || die "pip install -r docker/requirements.txt failed"
  echo "$WANT" >"$STAMP"
fi
# The newest Kubernetes it knows, and 1.30: the oldest with preStop `sleep`
# on by default.
for version in "" 1.30.0; do
  "$VENV/bin/kubernetes-validate" --strict --quiet ${version:+-k "$version"} "$DOCKER"/kubernetes/*.yaml \
    || die "docker/kubernetes/ does not validate${version:+ against Kubernetes $version}"
done
ok "docker/kubernetes/*.yaml valid (strict) for Kubernetes $("$VENV/bin/kubernetes-validate" --help | sed -n 's/.*Defaults to \([0-9.]*\).*/\1/p') and 1.30"

# compose.yaml: there is no compose engine here, so check the properties the
# README promises from the file itself.
"$VENV/bin/python" - "$DOCKER/compose.yaml" <<'PY' || die "docker/compose.yaml lost a property the README promises (see above)"
import re, sys, yaml
compose = yaml.safe_load(open(sys.argv[1]))
services, networks = compose["services"], compose["networks"]
problems = []
published = sorted(name for name, s in services.items() if s.get("ports"))
if published != ["ivrguard"]:
    problems.append(f"only ivrguard may publish ports, found {published}")
if not networks["backend"].get("internal"):
    problems.append("network 'backend' must be internal")
for name, s in services.items():
    if s.get("restart") != "unless-stopped":
        problems.append(f"{name}: restart must be unless-stopped")
    if not s.get("healthcheck", {}).get("test"):
        problems.append(f"{name}: no healthcheck")
    if name != "ivrguard" and s.get("networks") != ["backend"]:
        problems.append(f"{name}: must be on the internal network only")
    for var, value in (s.get("environment") or {}).items():
        if re.search(r"TOKEN|KEY", var) and not str(value).startswith("${"):
            problems.append(f"{name}: {var} must come from docker/.env, not the file")
if "IVRGUARD_KEY" in (services["legacy-app"].get("environment") or {}):
    problems.append("legacy-app must not get the encryption key")
app_values = [str(v) for v in (services["legacy-app"].get("environment") or {}).values()]
if any("TWILIO_AUTH_TOKEN" in v for v in app_values):
    problems.append("legacy-app must not get the Twilio auth token (give it APP_AUTH_TOKEN)")
if not any(v.startswith("${APP_AUTH_TOKEN") for v in app_values):
    problems.append("legacy-app must validate with its own token, ${APP_AUTH_TOKEN}")
if "./config:/etc/ivrguard:ro" not in services["ivrguard"]["volumes"]:
    problems.append("ivrguard's config directory must be mounted read-only (a directory: a file mount hides edits)")
for p in problems:
    print("  compose.yaml:", p, file=sys.stderr)
sys.exit(1 if problems else 0)
PY
ok "compose.yaml: only ivrguard published, app and bank on an internal network, secrets from .env (the app's own token, not Twilio's), config read-only"

# ---------------------------------------------------------------------------
phase "static binaries"
TRIPLE="$(rustc -vV | sed -n 's/^host: //p')"
export RUSTFLAGS="-C target-feature=+crt-static"
# IVRGUARD_CONTAINER_PROFILE=release tests the exact shipped build (fat LTO,
# several minutes); the default profile is the same code without LTO.
PROFILE="${IVRGUARD_CONTAINER_PROFILE:-container-test}"
cargo build --profile "$PROFILE" --target "$TRIPLE" --bin ivrguard || die "static build of ivrguard failed"
cargo build --release --target "$TRIPLE" --manifest-path "$DOCKER/test-backend/Cargo.toml" \
  --target-dir "$ROOT/target/test-backend" || die "static build of docker/test-backend failed"
unset RUSTFLAGS
BIN="$ROOT/target/$TRIPLE/$PROFILE/ivrguard"
BACKEND_BIN="$ROOT/target/test-backend/$TRIPLE/release/ivrguard-test-backend"
for b in "$BIN" "$BACKEND_BIN"; do
  ldd "$b" 2>&1 | grep -qE 'statically linked|not a dynamic executable' \
    || die "$b is dynamically linked: it cannot run in a scratch image"
done
ok "ivrguard $(stat -c %s "$BIN") bytes, test backend $(stat -c %s "$BACKEND_BIN") bytes, both static"

# ---------------------------------------------------------------------------
phase "images"
read -r HTTP_PORT ADMIN_PORT COMPOSE_PORT <<<"$(free_ports 3)"
"$VENV/bin/python" "$DOCKER/podman_play.py" "$DOCKER/kubernetes" "$WORK/secrets" "$NAME" \
  "$HTTP_PORT" "$ADMIN_PORT" "$WORK/play.yaml" "$WORK/vars.sh"
# shellcheck source=/dev/null
source "$WORK/vars.sh"

# ivrguard: the runtime stage of docker/Dockerfile, from the binary above.
# Docker format, so HEALTHCHECK is kept (OCI images have no field for it).
mkdir -p "$WORK/ctx/config" "$WORK/backend-ctx"
cp "$BIN" "$WORK/ctx/ivrguard"
cp "$ROOT/config/ivrguard.toml" "$WORK/ctx/config/"
cp "$BACKEND_BIN" "$WORK/backend-ctx/"
# The prebuilt/binary stages leave untagged images behind: remember which
# untagged images existed, remove the new ones after the builds.
DANGLING_BEFORE="$(podman images -q --filter dangling=true | sort -u)"
IMAGES+=("$IVRGUARD_IMAGE")
podman build --quiet --format docker -f "$DOCKER/Dockerfile" \
  --build-arg BINARY_FROM=prebuilt --build-arg PREBUILT=ivrguard \
  -t "$IVRGUARD_IMAGE" "$WORK/ctx" >/dev/null || die "podman build of docker/Dockerfile (runtime stage) failed"
IMAGES+=("$APP_IMAGE")
podman build --quiet --format docker -f "$DOCKER/test-backend/Dockerfile" \
  -t "$APP_IMAGE" "$WORK/backend-ctx" >/dev/null || die "podman build of docker/test-backend failed"
for image in $(comm -13 <(echo "$DANGLING_BEFORE") <(podman images -q --filter dangling=true | sort -u)); do
  podman rmi -f "$image" >/dev/null 2>&1 || true
done

SIZE="$(podman image inspect --format '{{.Size}}' "$IVRGUARD_IMAGE")"
(( SIZE < 15000000 )) || die "image $IVRGUARD_IMAGE is $SIZE bytes; the target is under 15 MB"
ok "$IVRGUARD_IMAGE: $SIZE bytes (< 15 MB)"
inspect() { podman image inspect --format "$1" "$IVRGUARD_IMAGE"; }
[[ "$(inspect '{{.Config.User}}')" == "65532:65532" ]] || die "image user is '$(inspect '{{.Config.User}}')', want 65532:65532"
[[ "$(inspect '{{json .Config.Entrypoint}} {{json .Config.Cmd}}')" == '["/ivrguard"] ["run"]' ]] \
  || die "entrypoint/cmd are $(inspect '{{json .Config.Entrypoint}} {{json .Config.Cmd}}')"
[[ "$(inspect '{{json .Config.Healthcheck.Test}}')" == '["CMD","/ivrguard","health"]' ]] \
  || die "healthcheck is $(inspect '{{json .Config.Healthcheck.Test}}')"
inspect '{{json .Config.Env}}' | grep -q '"IVRGUARD_CONFIG=/etc/ivrguard/ivrguard.toml"' || die "IVRGUARD_CONFIG not set in the image"
[[ "$(inspect '{{range $p, $_ := .Config.ExposedPorts}}{{$p}} {{end}}')" == "8080/tcp 9901/tcp " ]] || die "exposed ports: $(inspect '{{.Config.ExposedPorts}}')"
ok "user 65532:65532, ENTRYPOINT /ivrguard, CMD run, HEALTHCHECK ivrguard health, IVRGUARD_CONFIG, ports 8080 9901"

# ---------------------------------------------------------------------------
phase "Kubernetes manifests under podman kube play"
[[ "$SECRET_KEYS" == "app-auth-token ivrguard-key twilio-auth-token" ]] \
  || die "secret.yaml's keys changed ($SECRET_KEYS): update docker/test.sh"
[[ "$APP_SECRET_KEYS" == "app-auth-token" ]] \
  || die "the app container is given the Secret's keys '$APP_SECRET_KEYS'; it must get its own token only"
ok "the app container gets its own token (app-auth-token) from the Secret, never the Twilio token or the key"
TOKEN="test-token-$RANDOM$RANDOM"
APP_TOKEN="$("$BIN" keygen)"
KEY="$("$BIN" keygen)"
# The Secret's files, as the kubelet would mount them (0440, group 65532).
mkdir -p "$WORK/secrets"
printf '%s' "$TOKEN" >"$WORK/secrets/twilio-auth-token"
printf '%s' "$APP_TOKEN" >"$WORK/secrets/app-auth-token"
printf '%s' "$KEY" >"$WORK/secrets/ivrguard-key"
chmod 0750 "$WORK/secrets" && chmod 0440 "$WORK/secrets"/*
chgrp -R 65532 "$WORK/secrets" 2>/dev/null || chmod 0755 "$WORK/secrets" "$WORK/secrets"/*

# The placeholders in secret.yaml must stop ivrguard, not run it.
mkdir -p "$WORK/placeholders" "$WORK/cm"
sed -n 's/^  \([a-z-]*\): \(REPLACE_WITH_.*\)$/\1 \2/p' "$DOCKER/kubernetes/secret.yaml" \
  | while read -r key value; do printf '%s\n' "$value" >"$WORK/placeholders/$key"; done
chmod 0755 "$WORK/placeholders" && chmod 0644 "$WORK/placeholders"/*
"$VENV/bin/python" -c 'import sys, yaml; print(yaml.safe_load(open(sys.argv[1]))["data"]["ivrguard.toml"], end="")' \
  "$DOCKER/kubernetes/configmap.yaml" >"$WORK/cm/ivrguard.toml"
chmod 0755 "$WORK/cm" && chmod 0644 "$WORK/cm/ivrguard.toml"
if podman run --rm --name "$NAME-check" -v "$WORK/cm:/etc/ivrguard:ro" -v "$WORK/placeholders:/run/secrets/ivrguard:ro" \
  "$IVRGUARD_IMAGE" check >/dev/null 2>"$WORK/check.err"; then
  die "ivrguard accepted the placeholder values of secret.yaml"
fi
REFUSAL="$(grep '^ivrguard:' "$WORK/check.err" || true)"
[[ "$REFUSAL" == *ivrguard-key* ]] || die "placeholder refusal does not name the key file: $(cat "$WORK/check.err")"
ok "secret.yaml's placeholders are refused: $REFUSAL"

podman kube play "$WORK/play.yaml" >"$WORK/play.out" 2>&1 \
  || { cat "$WORK/play.out" >&2; die "podman kube play failed"; }
wait_for "http://127.0.0.1:$ADMIN_PORT/readyz" 20 \
  || die_with_logs "ivrguard in the pod did not become ready on its admin port" "$IVRGUARD_CTR" "$APP_CTR"
ok "pod $POD up; /readyz on the admin port answers 200"

# A signed webhook, as Twilio sends it, to the pod's published port.
CALL_SID="CA$(printf '%032x' $RANDOM)"
CANARY="8$RANDOM$RANDOM"   # what the caller typed; must never reach the app
export TWILIO_AUTH_TOKEN="$TOKEN"
SIG="$("$BIN" sign --token-env TWILIO_AUTH_TOKEN --url "$PUBLIC_URL/voice?step=getPin" \
  --param CallSid="$CALL_SID" --param Digits="$CANARY")"
STATUS="$(curl -sS -o "$WORK/answer" -w '%{http_code}' --max-time 10 "http://127.0.0.1:$HTTP_PORT/voice?step=getPin" \
  -H "X-Twilio-Signature: $SIG" --data-urlencode "CallSid=$CALL_SID" --data-urlencode "Digits=$CANARY")"
[[ "$STATUS" == 200 ]] && grep -q captured "$WORK/answer" \
  || die_with_logs "signed webhook: HTTP $STATUS, $(cat "$WORK/answer")" "$IVRGUARD_CTR" "$APP_CTR"
podman logs "$APP_CTR" >"$WORK/app.log" 2>&1
podman logs "$IVRGUARD_CTR" >"$WORK/ivrguard.log" 2>&1
grep -q "request POST /voice?step=getPin signature=[A-Za-z0-9+/=]* body=CallSid=$CALL_SID&Digits=" "$WORK/app.log" \
  || die_with_logs "the app did not log the forwarded request" "$APP_CTR"
if grep -q "$CANARY" "$WORK/app.log" "$WORK/ivrguard.log"; then
  die "plaintext Digits reached the app's or ivrguard's log"
fi
CIPHERTEXT="$(sed -n 's/.*&Digits=\([0-9a-f]*\).*/\1/p' "$WORK/app.log" | tail -n 1)"
export IVRGUARD_TEST_KEY="$KEY"
[[ "$(printf '%s\n' "$CIPHERTEXT" | "$BIN" decrypt --key-env IVRGUARD_TEST_KEY)" == "$CANARY" ]] \
  || die "the app's Digits ($CIPHERTEXT) does not decrypt to what the caller typed"
# What the app got is signed with its own token (upstream.auth_token_file).
FORWARDED_SIG="$(sed -n 's/^request POST [^ ]* signature=\([^ ]*\) .*/\1/p' "$WORK/app.log" | tail -n 1)"
[[ "$FORWARDED_SIG" == "$(APP_TOKEN="$APP_TOKEN" "$BIN" sign --token-env APP_TOKEN \
  --url "$PUBLIC_URL/voice?step=getPin" --param CallSid="$CALL_SID" --param Digits="$CIPHERTEXT")" ]] \
  || die "the app got signature $FORWARDED_SIG, not the one its own token makes over what it got"
ok "what the app got is signed with its own token (app-auth-token)"
grep -q '"signature":"valid"' "$WORK/ivrguard.log" && grep -q '"encrypted_fields":"Digits"' "$WORK/ivrguard.log" \
  || die_with_logs "ivrguard's access log lacks the valid, encrypted request" "$IVRGUARD_CTR"
ok "signed webhook: 200 with the app's TwiML; the app got Digits as ${#CIPHERTEXT} hex characters that decrypt to the caller's input; no plaintext in either log"

REQUESTS="$(grep -c '^request ' "$WORK/app.log")"
STATUS="$(curl -sS -o /dev/null -w '%{http_code}' --max-time 10 "http://127.0.0.1:$HTTP_PORT/voice?step=getPin" \
  -H "X-Twilio-Signature: $SIG" --data-urlencode "CallSid=$CALL_SID" --data-urlencode "Digits=0000")"
[[ "$STATUS" == 403 ]] || die "a webhook with a signature over other parameters got $STATUS, want 403"
[[ "$(podman logs "$APP_CTR" 2>&1 | grep -c '^request ')" == "$REQUESTS" ]] || die "a refused webhook reached the app"
ok "wrongly signed webhook: 403, and the app received nothing"

INFRA="$(podman pod inspect --format '{{.InfraContainerID}}' "$POD")"
POD_IP="$(podman inspect --format '{{range .NetworkSettings.Networks}}{{.IPAddress}}{{end}}' "$INFRA")"
[[ -n "$POD_IP" ]] || die "cannot find the pod's IP"
curl -fsS -o /dev/null --max-time 3 "http://$POD_IP:9901/healthz" || die "ivrguard's admin port is not on the pod IP ($POD_IP), so kubelet probes would fail"
if curl -sS -o /dev/null --max-time 3 "http://$POD_IP:3000/" 2>/dev/null; then
  die "the app answers on the pod IP ($POD_IP:3000): it must only be reachable through ivrguard"
fi
ok "from outside the pod ($POD_IP): admin port answers (kubelet probes work), app port 3000 does not"

PID="$(podman inspect --format '{{.State.Pid}}' "$IVRGUARD_CTR")"
STATUS_FILE="$(cat "/proc/$PID/status")"
uids() { awk -v f="$1:" '$1 == f { print $2, $3, $4, $5 }' <<<"$STATUS_FILE"; }
[[ "$(uids Uid)" == "65532 65532 65532 65532" ]] || die "ivrguard runs with uids $(uids Uid), want 65532"
[[ "$(uids Gid)" == "65532 65532 65532 65532" ]] || die "ivrguard runs with gids $(uids Gid), want 65532"
[[ "$(awk '$1 == "CapEff:" { print $2 }' <<<"$STATUS_FILE")" == 0000000000000000 ]] || die "ivrguard has capabilities: $(grep Cap <<<"$STATUS_FILE")"
[[ "$(awk '$1 == "NoNewPrivs:" { print $2 }' <<<"$STATUS_FILE")" == 1 ]] || die "ivrguard may gain privileges (NoNewPrivs is not set)"
[[ "$(awk '$1 == "Seccomp:" { print $2 }' <<<"$STATUS_FILE")" == 2 ]] || die "ivrguard runs without a seccomp filter"
[[ "$(podman inspect --format '{{.HostConfig.ReadonlyRootfs}}' "$IVRGUARD_CTR")" == true ]] || die "ivrguard's root file system is writable"
podman top "$IVRGUARD_CTR" user huser | sed 's/^/      /'
ok "ivrguard: uid/gid 65532 (not root), no capabilities, no new privileges, seccomp filter, read-only root"

podman exec "$IVRGUARD_CTR" /ivrguard health >"$WORK/health.out" 2>&1 \
  || die "'ivrguard health' failed inside the container: $(cat "$WORK/health.out")"
ok "podman exec $IVRGUARD_CTR /ivrguard health: $(cat "$WORK/health.out")"
if podman exec "$IVRGUARD_CTR" /ivrguard health --url http://127.0.0.1:1/healthz >"$WORK/health.out" 2>&1; then
  die "'ivrguard health' passed against a closed port"
fi
ok "and it fails against a closed port: $(cat "$WORK/health.out")"

podman stop -t 20 "$IVRGUARD_CTR" >/dev/null 2>>"$WORK/podman.err"
[[ "$(podman inspect --format '{{.State.ExitCode}}' "$IVRGUARD_CTR")" == 0 ]] \
  || die_with_logs "ivrguard did not exit 0 on SIGTERM" "$IVRGUARD_CTR"
ok "SIGTERM: ivrguard drained and exited 0"
podman pod rm -f -t 0 "$POD" >/dev/null 2>>"$WORK/podman.err"

# ---------------------------------------------------------------------------
phase "compose topology: service name resolved inside scratch"
# compose.yaml's layout without a compose engine: the app on an internal
# network under the service name `legacy-app`, ivrguard on it and on an edge
# network with the published port, docker/config mounted read-only.
# A copy of docker/config, edited below as an operator would.
cp -r "$DOCKER/config" "$WORK/compose-config" && chmod -R a+rX "$WORK/compose-config"
TOKEN2="test-token-2-$RANDOM$RANDOM"
podman network create "$NAME-edge" >/dev/null
podman network create --internal "$NAME-backend" >/dev/null
podman run -d --name "$NAME-legacy-app" --network "$NAME-backend" --network-alias legacy-app "$APP_IMAGE" >/dev/null 2>>"$WORK/podman.err"
podman run -d --name "$NAME-ivrguard" --network "$NAME-edge" --network "$NAME-backend" \
  -p "127.0.0.1:$COMPOSE_PORT:8080" --read-only --cap-drop ALL --security-opt no-new-privileges \
  -v "$WORK/compose-config:/etc/ivrguard:ro" \
  -e TWILIO_AUTH_TOKEN="$TOKEN" -e TWILIO_AUTH_TOKEN_SECONDARY="$TOKEN2" -e APP_AUTH_TOKEN="$APP_TOKEN" \
  -e IVRGUARD_KEY="$KEY" \
  -e IVRGUARD__TWILIO__PUBLIC_URL="http://127.0.0.1:$COMPOSE_PORT" "$IVRGUARD_IMAGE" >/dev/null 2>>"$WORK/podman.err"
PID="$(podman inspect --format '{{.State.Pid}}' "$NAME-ivrguard")"
HOSTS_FILE="$(cat "/proc/$PID/root/etc/hosts")" || die "cannot read the container's /etc/hosts (/proc/$PID/root)"
if grep -qw legacy-app <<<"$HOSTS_FILE"; then
  die "legacy-app is in the container's /etc/hosts: this check must go through DNS"
fi
for _ in $(seq 50); do
  podman exec "$NAME-ivrguard" /ivrguard health >/dev/null 2>&1 && break
  sleep 0.2
done
SIG="$("$BIN" sign --token-env TWILIO_AUTH_TOKEN --url "http://127.0.0.1:$COMPOSE_PORT/voice" \
  --param CallSid="$CALL_SID" --param Digits="$CANARY")"
STATUS="$(curl -sS -o "$WORK/answer" -w '%{http_code}' --max-time 10 "http://127.0.0.1:$COMPOSE_PORT/voice" \
  -H "X-Twilio-Signature: $SIG" --data-urlencode "CallSid=$CALL_SID" --data-urlencode "Digits=$CANARY")"
[[ "$STATUS" == 200 ]] && grep -q captured "$WORK/answer" \
  || die_with_logs "webhook through the compose topology: HTTP $STATUS, $(cat "$WORK/answer")" "$NAME-ivrguard" "$NAME-legacy-app"
podman logs "$NAME-ivrguard" 2>&1 | grep -q '"upstream_status":200' \
  || die_with_logs "ivrguard did not reach http://legacy-app:3000" "$NAME-ivrguard"
podman logs "$NAME-legacy-app" 2>&1 | grep -q "body=CallSid=$CALL_SID&Digits=[0-9a-f]" \
  || die_with_logs "the app did not get the encrypted webhook" "$NAME-legacy-app"
ok "http://legacy-app:3000 resolved by the network's DNS from inside scratch (not via /etc/hosts); the app got ciphertext"

# README, token rotation step 2 with compose: uncomment the secondary in the
# mounted config with an editor (sed -i writes a new file and renames it, as
# editors do) and SIGHUP. Found in review: with the file itself mounted, the
# container kept seeing the old file, and the reload changed nothing.
sign_with() {
  TWILIO_AUTH_TOKEN="$1" "$BIN" sign --token-env TWILIO_AUTH_TOKEN --url "http://127.0.0.1:$COMPOSE_PORT/voice" \
    --param CallSid="$CALL_SID" --param Digits="$CANARY"
}
post_signed() {
  curl -sS -o /dev/null -w '%{http_code}' --max-time 10 "http://127.0.0.1:$COMPOSE_PORT/voice" \
    -H "X-Twilio-Signature: $1" --data-urlencode "CallSid=$CALL_SID" --data-urlencode "Digits=$CANARY"
}
[[ "$(post_signed "$(sign_with "$TOKEN2")")" == 403 ]] || die "the secondary token was accepted before it was configured"
sed -i 's/^# secondary_auth_token_env = /secondary_auth_token_env = /' "$WORK/compose-config/ivrguard.toml"
grep -q '^secondary_auth_token_env' "$WORK/compose-config/ivrguard.toml" || die "docker/config/ivrguard.toml has no secondary_auth_token_env line to uncomment"
podman kill --signal HUP "$NAME-ivrguard" >/dev/null
for _ in $(seq 50); do
  podman logs "$NAME-ivrguard" 2>&1 | grep -q '"changed":"twilio.secondary_auth_token_env"' && break
  sleep 0.2
done
podman logs "$NAME-ivrguard" 2>&1 | grep '"configuration reloaded"' | grep -q '"changed":"twilio.secondary_auth_token_env"' \
  || die_with_logs "SIGHUP after editing the mounted config did not reload the secondary token" "$NAME-ivrguard"
[[ "$(post_signed "$(sign_with "$TOKEN2")")" == 200 ]] || die_with_logs "the secondary token is refused after the reload" "$NAME-ivrguard"
ok "compose: an edited config in the mounted directory (write-then-rename) is reloaded on SIGHUP; the secondary token is accepted"
# Secret files may be put beside it: neither git nor the image build takes them.
if git -C "$ROOT" rev-parse --git-dir >/dev/null 2>&1; then
  git -C "$ROOT" check-ignore -q docker/config/twilio-auth-token || die "docker/config/: a secret file put there would be tracked by git"
  git -C "$ROOT" check-ignore -q docker/config/ivrguard.toml && die "docker/config/ivrguard.toml is ignored by git"
fi
grep -qx 'docker/config' "$DOCKER/Dockerfile.dockerignore" || die "docker/config/ is in the image build context"
ok "docker/config/: secret files there are ignored by git and kept out of the build context"
HEALTH="$(podman healthcheck run "$NAME-ivrguard" 2>&1)" || die "the image's HEALTHCHECK failed: $HEALTH"
ok "the image's HEALTHCHECK (podman healthcheck run): ${HEALTH:-healthy}"

phase "container tests passed in $((SECONDS - START))s"
