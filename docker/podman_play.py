"""Turns docker/kubernetes/*.yaml into one stream for `podman kube play`.

Used by docker/test.sh. The manifests are written for Kubernetes; podman 4.3
(Debian 12, the test machines) runs them with these exceptions, and only
these are changed here — everything else (images, args, probes, security
context, the ConfigMap and its mount, resources) is played as written:

1. Secret volumes: podman 4.3 writes each value base64-encoded into the
   mounted file (and crashes when `optional` is unset), so the Secret's
   files are written by docker/test.sh to a host directory and mounted from
   there (hostPath), at the same path with the same names.
2. `secretKeyRef` environment variables: podman 4.3 expects a different
   secret format for those than for volumes. Only the app uses one (its
   own token, `app-auth-token`); the test's stand-in app needs none, so it
   is dropped, and the keys it named are reported (APP_SECRET_KEYS).
3. replicas: podman runs each replica as a separate pod publishing the same
   host ports; one is played.
4. Host ports: podman publishes every containerPort on the host. They get
   the free ports docker/test.sh picked, so nothing collides with a fixed
   8080/9901 on the machine.
5. The Deployment's and the ConfigMap's names get the test's prefix, so
   the pod, its containers and the volume podman makes of the ConfigMap
   cannot collide with anything else on the machine (and are removed by
   name afterwards).

Usage: podman_play.py MANIFEST_DIR SECRET_DIR NAME HTTP_PORT ADMIN_PORT OUT_YAML OUT_VARS
OUT_VARS receives shell assignments the test sources (image names, the
public URL, pod and container names).
"""

import shlex
import sys
from pathlib import Path

import yaml


def main() -> None:
    manifests, secret_dir, name, http_port, admin_port, out_yaml, out_vars = sys.argv[1:]
    docs = []
    for path in sorted(Path(manifests).glob("*.yaml")):
        docs.extend(d for d in yaml.safe_load_all(path.read_text()) if d)
    by_kind = {}
    for d in docs:
        by_kind.setdefault(d["kind"], []).append(d)

    (deployment,) = by_kind["Deployment"]
    (configmap,) = by_kind["ConfigMap"]
    (secret,) = by_kind["Secret"]
    pod = deployment["spec"]["template"]["spec"]
    containers = {c["name"]: c for c in pod["containers"]}
    ivrguard, app = containers["ivrguard"], containers["app"]

    # 1. Secret volume -> the same files from a host directory.
    for volume in pod["volumes"]:
        if "secret" in volume:
            assert volume["secret"]["secretName"] == secret["metadata"]["name"]
            volume.pop("secret")
            volume["hostPath"] = {"path": secret_dir, "type": "Directory"}
    # 2. secretKeyRef environment variables.
    app_secret_keys = sorted(
        e["valueFrom"]["secretKeyRef"]["key"]
        for e in app.get("env", [])
        if "secretKeyRef" in e.get("valueFrom", {})
    )
    for container in pod["containers"]:
        container["env"] = [
            e for e in container.get("env", []) if "secretKeyRef" not in e.get("valueFrom", {})
        ]
    # 3. One replica.
    deployment["spec"]["replicas"] = 1
    # 4. Host ports.
    host_ports = {"http": int(http_port), "admin": int(admin_port)}
    for port in ivrguard["ports"]:
        port["hostPort"] = host_ports[port["name"]]
    # 5. Names.
    deployment["metadata"]["name"] = name
    configmap_name = configmap["metadata"]["name"]
    configmap["metadata"]["name"] = f"{name}-{configmap_name}"
    for volume in pod["volumes"]:
        if volume.get("configMap", {}).get("name") == configmap_name:
            volume["configMap"]["name"] = configmap["metadata"]["name"]

    stream = [configmap, deployment]
    Path(out_yaml).write_text(yaml.safe_dump_all(stream, sort_keys=False))

    toml = configmap["data"]["ivrguard.toml"]
    public_url = next(
        line.split("=", 1)[1].strip().strip('"')
        for line in toml.splitlines()
        if line.strip().startswith("public_url")
    )
    pod_name = f"{name}-pod-0"
    assignments = {
        "IVRGUARD_IMAGE": ivrguard["image"],
        "APP_IMAGE": app["image"],
        "PUBLIC_URL": public_url,
        "SECRET_KEYS": " ".join(sorted(secret["stringData"])),
        "APP_SECRET_KEYS": " ".join(app_secret_keys),
        "POD": pod_name,
        "IVRGUARD_CTR": f"{pod_name}-ivrguard",
        "APP_CTR": f"{pod_name}-app",
    }
    Path(out_vars).write_text(
        "".join(f"{k}={shlex.quote(v)}\n" for k, v in assignments.items())
    )


if __name__ == "__main__":
    main()
