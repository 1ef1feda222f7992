"""docker/kubernetes.yaml rewritten into what `podman kube play` (podman 4.3) runs on one machine; used by
bench/kube_check.sh, which says why each rewrite is needed (bench/kube_check.md):

    python bench/kube_podman.py docker/kubernetes.yaml --image kdsearch:cpu=localhost/kdsearch:cpu > play.yaml

- Service: podman has none. Each Deployment becomes a Pod named after its Service (same name), and on a
  podman network a pod's name resolves as a host name, so `postgres:5432` reaches the database as in a cluster.
- Deployment: podman runs it, but names its pod `NAME-pod-0`, which the Services' names do not reach.
- Job: not a kind podman 4.3 plays. A Job of `parallelism: N` becomes N Pods (NAME-0 … NAME-N-1) with the
  Job's restart policy; Kubernetes' Job bookkeeping (completion, backoffLimit) is not reproduced.
- Secret with secretKeyRef: podman 4.3 stores a played Secret as YAML and then fails to read it as JSON
  ("secret … is not valid JSON"): the values are put in the env directly.
- `$(VAR)` in env values and args: Kubernetes expands them from the container's earlier env; podman
  passes them on literally: expanded here.
- ports: podman 4.3 publishes every containerPort on the host's 0.0.0.0 (it collided with this machine's
  own PostgreSQL on 5432, and would expose the servers beyond 127.0.0.1): dropped; pods reach each other
  on the podman network without them.
- image: replaced as --image OLD=NEW says (locally built stand-ins for images that cannot be pulled here).
"""

from __future__ import annotations

import argparse
import copy
import re
import sys
from typing import Any

import yaml

VARIABLE = re.compile(r"\$\((\w+)\)")


def for_podman(docs: list[dict[str, Any]], images: dict[str, str]) -> list[dict[str, Any]]:
    """The manifests as podman 4.3 plays them (see the module's docstring), in the same order."""
    secrets = {doc["metadata"]["name"]: doc.get("stringData", {}) for doc in docs if doc["kind"] == "Secret"}
    services = {doc["metadata"]["name"]: doc for doc in docs if doc["kind"] == "Service"}
    played = []
    for doc in docs:
        kind, name = doc["kind"], doc["metadata"]["name"]
        if kind in ("Secret", "Service"):
            continue
        if kind == "Deployment":
            labels = doc["spec"]["template"]["metadata"]["labels"]
            service = services.get(name)
            if service is None or service["spec"]["selector"] != labels:
                raise ValueError(f"Deployment {name}: no Service of the same name selects its pods")
            played.append(_pod(name, doc["spec"]["template"], "Always", secrets, images))
        elif kind == "Job":
            count = doc["spec"].get("parallelism", 1)
            template = doc["spec"]["template"]
            for index in range(count):
                pod_name = f"{name}-{index}" if count > 1 else name
                played.append(_pod(pod_name, template, template["spec"]["restartPolicy"], secrets, images))
        else:
            played.append(doc)
    return played


def _pod(name: str, template: dict, restart: str, secrets: dict, images: dict[str, str]) -> dict[str, Any]:
    spec = copy.deepcopy(template["spec"])
    spec["restartPolicy"] = restart
    for container in spec["containers"]:
        container["image"] = images.get(container["image"], container["image"])
        container.pop("ports", None)
        values: dict[str, str] = {}
        for variable in container.get("env", []):
            if "valueFrom" in variable:
                reference = variable.pop("valueFrom")["secretKeyRef"]
                variable["value"] = secrets[reference["name"]][reference["key"]]
            variable["value"] = _expand(variable["value"], values)
            values[variable["name"]] = variable["value"]
        if "args" in container:
            container["args"] = [_expand(arg, values) for arg in container["args"]]
    return {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": name, "labels": template.get("metadata", {}).get("labels", {})},
            "spec": spec}  # fmt: skip


def _expand(text: str, values: dict[str, str]) -> str:
    """Kubernetes' $(VAR) from the container's earlier env; an undefined one is an error (Kubernetes would
    leave it as it is, which is never what a manifest means)."""
    return VARIABLE.sub(lambda match: values[match.group(1)], text)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("manifest")
    parser.add_argument("--image", action="append", default=[], help="OLD=NEW, repeatable")
    args = parser.parse_args()
    images = dict(item.split("=", 1) for item in args.image)
    with open(args.manifest) as handle:
        docs = [doc for doc in yaml.safe_load_all(handle) if doc]
    yaml.safe_dump_all(for_podman(docs, images), sys.stdout, sort_keys=False)


if __name__ == "__main__":
    main()
