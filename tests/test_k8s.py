"""The Kubernetes manifests (deploy/k8s/) as the cluster and the code see them. Read as kustomize renders them
(kustomization.yaml: its manifests, and its ConfigMaps made from settings.env), and checked against what
`kubectl kustomize` renders where kubectl is installed: every manifest is valid for the newest Kubernetes
kubernetes-validate ships schemas for (strict: no field the API does not have); the kustomization lists them
all; only the host agents' namespace admits privileged pods, and every other pod meets the "restricted" level
its namespace enforces; both namespaces deny ingress by default, and the NetworkPolicies open each port to
its callers only (the host agents' to the orchestrator API alone); every variable a container gets is a
setting; every ConfigMap, Secret key and volume claim a pod reads exists in the pod's namespace; the peers'
addresses name the Services. And, with the services started as the manifests start them (the orchestrator
API in-process beside the other services and the gateway, a host agent as a process of its own; no VM),
every probe names a service the process registers and every readiness probe answers SERVING. Also the
administrator key the manifests give the registry from a Secret (VERS_ADMIN_KEY)."""

from __future__ import annotations

import asyncio
import functools
import re
import secrets
import shutil
import subprocess
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import httpx
import kubernetes_validate  # type: ignore[import-untyped]  # ships no type information
import pytest
import pytest_asyncio
import yaml  # type: ignore[import-untyped]  # types-PyYAML is not among the dev tools
from cryptography.fernet import Fernet
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from kubernetes_validate.utils import latest_version  # type: ignore[import-untyped]

from services.common.settings import Settings
from services.inprocess import HostAgentProcess, InProcessPlatform
from tests.conftest import ROOT, Platform, discard, kill_vms_under
from tests.conftest import test_settings as suite_settings  # renamed: pytest would collect `test_settings` as a test

MANIFESTS = ROOT / "deploy" / "k8s"
KUSTOMIZATION = MANIFESTS / "kustomization.yaml"
# Filled in by the operator and applied apart from the kustomization (it holds placeholders, never values).
SECRET_TEMPLATE = MANIFESTS / "secrets.example.yaml"
WORKLOADS = ("Deployment", "DaemonSet")
SETTINGS_VARIABLES = {field.validation_alias for field in Settings.model_fields.values()}
PROBES = ("startupProbe", "readinessProbe", "livenessProbe")
HOSTS_NAMESPACE = "vers-hosts"
NAMESPACE_NAME_LABEL = "kubernetes.io/metadata.name"  # the label Kubernetes gives every namespace, its name

# Who calls whom (by the workloads' names), as the NetworkPolicies must allow it and nothing more.
ANYONE = "a pod of another namespace"
CALLERS = {
    "vers-gateway": {ANYONE, "vers-gateway", "vers-registry", "vers-tagging", "vers-orchestrator", "vers-host-agent"},
    "vers-registry": {"vers-gateway", "vers-tagging", "vers-orchestrator", "vers-host-agent"},
    "vers-tagging": {"vers-gateway", "vers-registry", "vers-orchestrator", "vers-host-agent"},
    "vers-orchestrator": {"vers-gateway", "vers-registry", "vers-tagging", "vers-host-agent"},
    "vers-host-agent": {"vers-orchestrator"},
}


def documents(path: Path) -> list[dict[str, Any]]:
    return [document for document in yaml.safe_load_all(path.read_text()) if document]


def kustomization() -> dict[str, Any]:
    return documents(KUSTOMIZATION)[0]


def env_file(path: Path) -> dict[str, str]:
    """A kustomize `envs` file: KEY=VALUE lines, the value verbatim; blank lines and `#` lines skipped."""
    data = {}
    for line in path.read_text().splitlines():
        if line.strip() and not line.lstrip().startswith("#"):
            key, separator, value = line.partition("=")
            assert separator, f"{path.name}: {line!r} is not KEY=VALUE"
            data[key.strip()] = value
    return data


@functools.cache
def _rendered() -> tuple[dict[str, Any], ...]:
    found = [document for name in kustomization()["resources"] for document in documents(MANIFESTS / name)]
    for generator in kustomization().get("configMapGenerator", []):
        data: dict[str, str] = {}
        for name in generator.get("envs", []):
            data |= env_file(MANIFESTS / name)
        metadata = {
            "name": generator["name"],
            "namespace": generator["namespace"],
            "labels": generator.get("options", {}).get("labels", {}),
        }
        found.append({"apiVersion": "v1", "kind": "ConfigMap", "metadata": metadata, "data": data})
    return tuple(found)


def rendered() -> list[dict[str, Any]]:
    """What `kubectl apply -k deploy/k8s` applies, as this module reads the kustomization: its resources and the
    ConfigMaps of its configMapGenerator, named without kustomize's hash suffix, images not yet replaced."""
    return list(_rendered())


def resources(kind: str, namespace: str | None = None) -> list[dict[str, Any]]:
    return [document for document in rendered() if document["kind"] == kind and namespace in (None, document["metadata"].get("namespace"))]


def template_secrets() -> dict[tuple[str, str], dict[str, str]]:
    """The Secrets the operator creates (secrets.example.yaml), by namespace and name: their keys and placeholders."""
    return {(secret["metadata"]["namespace"], secret["metadata"]["name"]): secret["stringData"] for secret in documents(SECRET_TEMPLATE)}


@dataclass(frozen=True)
class Container:
    """One container of a Deployment or DaemonSet, with what it runs as."""

    workload: str
    namespace: str
    spec: dict[str, Any]
    volumes: list[dict[str, Any]]

    @property
    def module(self) -> str:
        """The service it runs: `python -m services.<module>`."""
        command = self.spec["command"]
        assert command[:2] == ["python", "-m"] and command[2].startswith("services."), f"{self.workload}: {command}"
        return str(command[2].removeprefix("services."))

    @property
    def env(self) -> dict[str, dict[str, Any]]:
        return {variable["name"]: variable for variable in self.spec.get("env", [])}

    @property
    def role(self) -> str:
        return str(self.env.get("VERS_ORCHESTRATOR_ROLE", {}).get("value", "all"))


def workloads() -> list[dict[str, Any]]:
    return [workload for kind in WORKLOADS for workload in resources(kind)]


def containers() -> list[Container]:
    found = []
    for workload in workloads():
        pod = workload["spec"]["template"]["spec"]
        namespace = workload["metadata"]["namespace"]
        found += [Container(workload["metadata"]["name"], namespace, spec, pod.get("volumes", [])) for spec in pod["containers"]]
    return found


def test_every_manifest_is_valid_for_the_newest_kubernetes() -> None:
    version = latest_version()
    checked = 0
    for document in [*rendered(), *documents(SECRET_TEMPLATE)]:
        try:
            kubernetes_validate.validate(document, version, strict=True)
        except kubernetes_validate.ValidationError as error:
            where = ".".join(str(part) for part in error.path)
            name = f"{document['kind']} {document['metadata'].get('namespace', '')}/{document['metadata']['name']}"
            pytest.fail(f"{name} is not valid for Kubernetes {version}: {where}: {error.message}")
        checked += 1
    assert checked >= 20


def test_kustomization_lists_every_manifest_but_the_secret_template() -> None:
    """Each resource names its namespace (there are two, so the kustomization sets none), one namespace.yaml makes."""
    found = kustomization()
    assert sorted(found["resources"]) == sorted(
        path.name for path in MANIFESTS.glob("*.yaml") if path not in (KUSTOMIZATION, SECRET_TEMPLATE)
    )
    assert "namespace" not in found, "the kustomization would move every resource into one namespace"
    namespaces = {namespace["metadata"]["name"] for namespace in resources("Namespace")}
    assert namespaces == {"vers", HOSTS_NAMESPACE}
    for document in [*rendered(), *documents(SECRET_TEMPLATE)]:
        if document["kind"] != "Namespace":
            assert document["metadata"].get("namespace") in namespaces, f"{document['kind']} {document['metadata']['name']}"


def _without_hash_suffix(value: Any, generated: set[str]) -> Any:
    """`value` with every generated ConfigMap's name `NAME-<hash>` back to NAME."""
    if isinstance(value, dict):
        return {key: _without_hash_suffix(item, generated) for key, item in value.items()}
    if isinstance(value, list):
        return [_without_hash_suffix(item, generated) for item in value]
    if isinstance(value, str):
        found = re.fullmatch(r"(.+)-[a-z0-9]{10}", value)
        if found and found[1] in generated:
            return found[1]
    return value


def _with_images(value: Any, images: dict[str, str]) -> Any:
    """`value` with each container's image replaced as the kustomization's `images` replace it."""
    if isinstance(value, dict):
        return {key: images.get(item, item) if key == "image" else _with_images(item, images) for key, item in value.items()}
    if isinstance(value, list):
        return [_with_images(item, images) for item in value]
    return value


def test_kubectl_renders_the_kustomization_as_this_module_reads_it() -> None:
    if shutil.which("kubectl") is None:
        pytest.skip("kubectl is not installed: the kustomization is read by this module alone")
    answer = subprocess.run(["kubectl", "kustomize", str(MANIFESTS)], capture_output=True, text=True, timeout=120)
    assert answer.returncode == 0, answer.stderr
    generated = {generator["name"] for generator in kustomization().get("configMapGenerator", [])}
    images = {image["name"]: f"{image['newName']}:{image['newTag']}" for image in kustomization().get("images", [])}

    def key(document: dict[str, Any]) -> tuple[str, str, str]:
        return document["kind"], document["metadata"].get("namespace", ""), document["metadata"]["name"]

    by_kubectl = sorted((_without_hash_suffix(document, generated) for document in yaml.safe_load_all(answer.stdout) if document), key=key)
    by_us = sorted((_with_images(document, images) for document in rendered()), key=key)
    assert [key(document) for document in by_kubectl] == [key(document) for document in by_us]
    for ours, theirs in zip(by_us, by_kubectl, strict=True):
        assert ours == theirs, key(ours)


# Pod Security


def pod_security_levels() -> dict[str, str]:
    return {
        namespace["metadata"]["name"]: namespace["metadata"]["labels"]["pod-security.kubernetes.io/enforce"]
        for namespace in resources("Namespace")
    }


def test_only_the_host_agents_namespace_is_privileged() -> None:
    """And it holds the host agents only: every other pod runs where the "restricted" level is enforced."""
    levels = pod_security_levels()
    assert levels == {"vers": "restricted", HOSTS_NAMESPACE: "privileged"}
    hosted = [
        (workload["kind"], workload["metadata"]["name"]) for workload in workloads() if workload["metadata"]["namespace"] == HOSTS_NAMESPACE
    ]
    assert hosted == [("DaemonSet", "vers-host-agent")]
    for container in containers():
        if container.spec.get("securityContext", {}).get("privileged"):
            assert container.namespace == HOSTS_NAMESPACE, container.workload


# Pod Security Standards, "restricted": the volume types a pod may use
RESTRICTED_VOLUMES = {"configMap", "csi", "downwardAPI", "emptyDir", "ephemeral", "persistentVolumeClaim", "projected", "secret"}


def restricted_violations(pod: dict[str, Any]) -> list[str]:
    """What in `pod` the "restricted" Pod Security level refuses (the rules these manifests could break)."""
    found = [f"{field}: true" for field in ("hostNetwork", "hostPID", "hostIPC") if pod.get(field)]
    found += [
        f"volume {volume['name']}: {kind}" for volume in pod.get("volumes", []) for kind in set(volume) - {"name"} - RESTRICTED_VOLUMES
    ]
    pod_context = pod.get("securityContext", {})
    for container in [*pod.get("initContainers", []), *pod["containers"]]:
        context = container.get("securityContext", {})
        name = container["name"]
        if context.get("privileged"):
            found.append(f"{name}: privileged")
        if context.get("allowPrivilegeEscalation") is not False:
            found.append(f"{name}: allowPrivilegeEscalation is not false")
        capabilities = context.get("capabilities", {})
        if "ALL" not in capabilities.get("drop", []) or set(capabilities.get("add", [])) - {"NET_BIND_SERVICE"}:
            found.append(f"{name}: capabilities {capabilities}")
        if not context.get("runAsNonRoot", pod_context.get("runAsNonRoot")):
            found.append(f"{name}: runAsNonRoot is not true")
        if context.get("runAsUser", pod_context.get("runAsUser")) == 0:
            found.append(f"{name}: runAsUser 0")
        if context.get("seccompProfile", pod_context.get("seccompProfile", {})).get("type") not in ("RuntimeDefault", "Localhost"):
            found.append(f"{name}: no seccompProfile RuntimeDefault or Localhost")
        found += [f"{name}: hostPort {port['hostPort']}" for port in container.get("ports", []) if port.get("hostPort")]
    return found


def test_every_pod_of_a_restricted_namespace_meets_the_restricted_level() -> None:
    levels = pod_security_levels()
    checked = 0
    for workload in workloads():
        if levels[workload["metadata"]["namespace"]] == "restricted":
            assert not restricted_violations(workload["spec"]["template"]["spec"]), workload["metadata"]["name"]
            checked += 1
    assert checked == 4
    host_agent = next(workload for workload in workloads() if workload["metadata"]["name"] == "vers-host-agent")
    assert restricted_violations(host_agent["spec"]["template"]["spec"]), "the check finds nothing to refuse in a privileged pod"


# NetworkPolicies


@dataclass(frozen=True)
class Pod:
    """A pod as NetworkPolicies see it: its namespace, its labels and its named ports."""

    name: str
    namespace: str
    labels: dict[str, str]
    ports: dict[str, int]


def pods() -> list[Pod]:
    found = []
    for workload in workloads():
        template = workload["spec"]["template"]
        ports = {
            port.get("name", str(port["containerPort"])): port["containerPort"]
            for container in template["spec"]["containers"]
            for port in container.get("ports", [])
        }
        found.append(Pod(workload["metadata"]["name"], workload["metadata"]["namespace"], template["metadata"]["labels"], ports))
    return found


OUTSIDER = Pod(ANYONE, "default", {"app.kubernetes.io/name": "vers-orchestrator"}, {})  # wearing a platform label, in vain


def selects(selector: dict[str, Any], labels: dict[str, str]) -> bool:
    """A label selector's verdict on `labels` (an empty selector selects everything)."""
    if any(labels.get(key) != value for key, value in selector.get("matchLabels", {}).items()):
        return False
    for expression in selector.get("matchExpressions", []):
        present, value = expression["key"] in labels, labels.get(expression["key"])
        operator = expression["operator"]
        if (
            (operator == "In" and (not present or value not in expression["values"]))
            or (operator == "NotIn" and present and value in expression["values"])
            or (operator == "Exists" and not present)
            or (operator == "DoesNotExist" and present)
        ):
            return False
    return True


def isolates(policy: dict[str, Any], target: Pod) -> bool:
    spec = policy["spec"]
    ingress = "Ingress" in spec.get("policyTypes", ["Ingress"])
    return ingress and policy["metadata"]["namespace"] == target.namespace and selects(spec["podSelector"], target.labels)


def peer_admits(peer: dict[str, Any], policy_namespace: str, source: Pod) -> bool:
    assert "ipBlock" not in peer, "an ipBlock is not read here: name pods by namespace and labels"
    if "namespaceSelector" in peer:
        namespace_ok = selects(peer["namespaceSelector"], {NAMESPACE_NAME_LABEL: source.namespace})
    else:
        namespace_ok = source.namespace == policy_namespace
    return namespace_ok and selects(peer.get("podSelector", {}), source.labels)


def port_admits(rule_port: dict[str, Any], target: Pod, port: int) -> bool:
    if rule_port.get("protocol", "TCP") != "TCP":
        return False
    first = rule_port.get("port")
    if first is None:
        return True
    if isinstance(first, str):
        if first not in target.ports:
            return False
        first = target.ports[first]
    return bool(first <= port <= rule_port.get("endPort", first))


def reaches(source: Pod, target: Pod, port: int) -> bool:
    """Whether the NetworkPolicies let `source` open a TCP connection to `target` on `port`."""
    policies = [policy for policy in resources("NetworkPolicy") if isolates(policy, target)]
    if not policies:
        return True
    for policy in policies:
        for rule in policy["spec"].get("ingress", []):
            peers = rule.get("from", [])
            peer_ok = not peers or any(peer_admits(peer, policy["metadata"]["namespace"], source) for peer in peers)
            rule_ports = rule.get("ports", [])
            if peer_ok and (not rule_ports or any(port_admits(rule_port, target, port) for rule_port in rule_ports)):
                return True
    return False


def test_every_workloads_namespace_denies_ingress_by_default() -> None:
    for namespace in {workload["metadata"]["namespace"] for workload in workloads()}:
        assert any(
            policy["spec"]["podSelector"] == {} and "Ingress" in policy["spec"]["policyTypes"] and not policy["spec"].get("ingress")
            for policy in resources("NetworkPolicy", namespace)
        ), f"namespace {namespace} has no NetworkPolicy denying ingress to all its pods"


def test_every_workload_is_one_whose_callers_are_known() -> None:
    assert {pod.name for pod in pods()} == set(CALLERS)


@pytest.mark.parametrize("target_name", sorted(CALLERS))
def test_each_port_is_open_to_its_callers_only(target_name: str) -> None:
    """The host agents' port only to the orchestrator API's pods; the gateway's to anyone (users come through an
    Ingress controller or a load balancer); each service's to the workloads that call it."""
    everyone = [*pods(), OUTSIDER]
    target = next(pod for pod in everyone if pod.name == target_name)
    assert target.ports, target_name
    for port in target.ports.values():
        callers = {source.name for source in everyone if reaches(source, target, port)}
        assert callers == CALLERS[target_name], f"{target_name}:{port}"
        assert not reaches(OUTSIDER, target, port + 1) or target_name == "vers-gateway", f"{target_name}:{port + 1}"


# What the pods read


def test_every_variable_a_container_gets_is_a_setting() -> None:
    """A variable only other variables expand ($(POD_IP)) is the one exception: the process never reads it."""
    config_keys = {(config["metadata"]["namespace"], config["metadata"]["name"]): set(config["data"]) for config in resources("ConfigMap")}
    for container in containers():
        expanded = {name for variable in container.env.values() for name in re.findall(r"\$\((\w+)\)", variable.get("value", ""))}
        given = set(container.env)
        for source in container.spec.get("envFrom", []):
            given |= config_keys[container.namespace, source["configMapRef"]["name"]]
        unknown = given - SETTINGS_VARIABLES - expanded
        assert not unknown, f"{container.workload} sets variables no setting reads: {sorted(unknown)}"


def test_every_config_map_secret_and_claim_a_pod_reads_is_in_its_namespace() -> None:
    """A pod reads only its own namespace's: the ConfigMaps the kustomization makes, the Secrets the operator
    creates from secrets.example.yaml, the claims the manifests make."""
    config_maps = {(config["metadata"]["namespace"], config["metadata"]["name"]): set(config["data"]) for config in resources("ConfigMap")}
    claims = {(claim["metadata"]["namespace"], claim["metadata"]["name"]) for claim in resources("PersistentVolumeClaim")}
    secret_keys = {name: set(keys) for name, keys in template_secrets().items()}
    for container in containers():
        here = container.namespace
        for source in container.spec.get("envFrom", []):
            assert (here, source["configMapRef"]["name"]) in config_maps, f"{container.workload}: {source}"
        for variable in container.env.values():
            reference = variable.get("valueFrom", {})
            if "secretKeyRef" in reference:
                secret = reference["secretKeyRef"]
                assert secret["key"] in secret_keys.get((here, secret["name"]), set()), f"{container.workload} in {here}: {secret}"
            if "configMapKeyRef" in reference:
                config = reference["configMapKeyRef"]
                assert config["key"] in config_maps.get((here, config["name"]), set()), f"{container.workload} in {here}: {config}"
        for volume in container.volumes:
            if "secret" in volume:
                for item in volume["secret"]["items"]:
                    assert item["key"] in secret_keys.get((here, volume["secret"]["secretName"]), set()), f"{container.workload}: {item}"
            if "persistentVolumeClaim" in volume:
                assert (here, volume["persistentVolumeClaim"]["claimName"]) in claims, f"{container.workload} in {here}: {volume}"


def test_the_host_agents_secret_copies_the_services_values() -> None:
    """The agents' Secret holds only values the services' Secrets hold too (the same placeholder for each)."""
    found = template_secrets()
    services = {key: value for (namespace, _), keys in found.items() if namespace == "vers" for key, value in keys.items()}
    agents = found[HOSTS_NAMESPACE, "vers-host-agent"]
    assert agents == {key: services[key] for key in agents}
    assert "VERS_ADMIN_KEY" not in agents


def test_the_peers_addresses_name_their_services() -> None:
    """REGISTRY_ADDR, TAGGING_ADDR and ORCHESTRATOR_ADDR, in each namespace's settings, name a Service (by
    SERVICE.NAMESPACE from another namespace) with that port, selecting the pods that serve it; a host agent
    gives the API the port it listens on."""
    services = {(service["metadata"]["namespace"], service["metadata"]["name"]): service["spec"] for service in resources("Service")}
    serving = {(container.namespace, container.module, container.role): container for container in containers()}
    checked = 0
    for config in resources("ConfigMap"):
        here = config["metadata"]["namespace"]
        for module, role in (("registry", "all"), ("tagging", "all"), ("orchestrator", "api")):
            host, _, port = config["data"][f"{module.upper()}_ADDR"].rpartition(":")
            name, _, namespace = host.partition(".")
            service = services.get((namespace or here, name))
            assert service, f"{here}: {module.upper()}_ADDR names no Service"
            assert int(port) in {entry["port"] for entry in service["ports"]}, f"{here}: {module.upper()}_ADDR"
            container = serving[namespace or here, module, role]
            workload = next(workload for workload in workloads() if workload["metadata"]["name"] == container.workload)
            assert selects({"matchLabels": service["selector"]}, workload["spec"]["template"]["metadata"]["labels"]), service
            checked += 1
    assert checked == 6
    agent = next(container for container in containers() if container.role == "host")
    ports = {port["containerPort"] for port in agent.spec["ports"]}
    for variable in ("VERS_HOST_ADDR", "VERS_HOST_LISTEN_ADDR"):
        assert int(agent.env[variable]["value"].rpartition(":")[2]) in ports, variable


def test_the_secret_template_holds_placeholders_only() -> None:
    for secret in documents(SECRET_TEMPLATE):
        for key, value in secret["stringData"].items():
            assert "REPLACE_ME" in value, f"{secret['metadata']['name']}.{key} holds a value, not a placeholder"


# The services as the manifests start them


ADMIN_KEY = "vers_" + "k8s-test-administrator-key-0123456789"


@dataclass
class Started:
    """The platform (registry, tagging, the orchestrator API, the gateway) and a host agent, by manifest role."""

    platform: InProcessPlatform
    agent_addr: str

    def grpc_addr(self, container: Container) -> str:
        if container.module == "orchestrator" and container.role == "host":
            return self.agent_addr
        assert container.role in ("all", "api"), container.workload
        return self.platform.settings.addr(container.module)


@pytest_asyncio.fixture(scope="module")
async def started(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Started]:
    """The API gets, besides its role, what the manifests give it and every host shares (check_role): the
    orchestrator's database (a SQLite file here), the service secret, the environment variables' key and the
    commit store; the agent gets the same (HostAgentProcess.beside)."""
    folder = tmp_path_factory.mktemp("k8s")
    store = folder / "commit-store"
    store.mkdir()
    settings = suite_settings(folder / "api")
    settings = settings.model_copy(
        update={
            "orchestrator_role": "api",
            "orchestrator_database_url": settings.database_url("orchestrator"),
            "service_secret": secrets.token_hex(32),
            "env_vars_key": Fernet.generate_key().decode(),
            "commit_store": str(store),
            "admin_key": ADMIN_KEY,
        }
    )
    platform = await Platform.start(settings)
    agent = HostAgentProcess.beside(platform.settings, "k8s-node", folder / "host")
    agent.start()
    try:
        yield Started(platform, agent.env["VERS_HOST_ADDR"])
    finally:
        agent.stop()
        kill_vms_under(agent.run_dir)
        kill_vms_under(platform.settings.vm_run_dir)
        await platform.stop()
        discard(folder)


def grpc_containers() -> Iterator[tuple[Container, str, dict[str, Any]]]:
    for container in containers():
        for probe in PROBES:
            if "grpc" in container.spec.get(probe, {}):
                yield container, probe, container.spec[probe]["grpc"]


async def registered_services(address: str, timeout: float = 60) -> set[str]:
    """The services the process at `address` serves, by its reflection; waits for it to listen."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            async with grpc.aio.insecure_channel(address) as channel:
                stream = reflection_pb2_grpc.ServerReflectionStub(channel).ServerReflectionInfo(
                    iter([reflection_pb2.ServerReflectionRequest(list_services="")]), timeout=5
                )
                async for answer in stream:
                    return {service.name for service in answer.list_services_response.service}
        except grpc.aio.AioRpcError:
            if time.monotonic() > deadline:
                raise
            await asyncio.sleep(0.2)
    raise AssertionError(f"{address} listed no services")


async def health(address: str, service: str, timeout: float = 60) -> str:
    """The health the process at `address` reports for `service`, once SERVING or after `timeout`."""
    deadline = time.monotonic() + timeout
    async with grpc.aio.insecure_channel(address) as channel:
        while True:
            try:
                answer = await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=service), timeout=5)
                status = health_pb2.HealthCheckResponse.ServingStatus.Name(answer.status)
            except grpc.aio.AioRpcError as error:
                status = error.code().name
            if status == "SERVING" or time.monotonic() > deadline:
                return status
            await asyncio.sleep(0.2)


async def test_every_probe_names_a_service_the_process_registers(started: Started) -> None:
    checked = set()
    for container, probe, grpc_probe in grpc_containers():
        address = started.grpc_addr(container)
        assert grpc_probe["service"] in await registered_services(address), f"{container.workload} {probe}: {grpc_probe}"
        checked.add((container.module, container.role))
    assert checked == {("registry", "all"), ("tagging", "all"), ("orchestrator", "api"), ("orchestrator", "host")}


async def test_every_readiness_probe_answers_serving(started: Started) -> None:
    for container in containers():
        probe = container.spec["readinessProbe"]
        if "grpc" in probe:
            status = await health(started.grpc_addr(container), probe["grpc"]["service"])
            assert status == "SERVING", f"{container.workload}: {probe['grpc']} answered {status}"
        else:
            assert container.module == "gateway", container.workload
            async with httpx.AsyncClient(base_url=started.platform.url, timeout=30) as http:
                answer = await http.get(probe["httpGet"]["path"])
            assert answer.status_code == 200, f"{container.workload}: {probe['httpGet']} answered {answer.status_code} {answer.text}"


async def test_the_administrator_key_comes_from_the_setting(started: Started) -> None:
    """VERS_ADMIN_KEY is the administrator's key, no admin.key is written, and changing it revokes the old one."""
    platform = started.platform
    assert not platform.settings.admin_key_file.exists()
    async with httpx.AsyncClient(base_url=platform.url, timeout=30) as http:
        answer = await http.post("/api/v1/admin/orgs", json={"name": "k8s-first"}, headers={"Authorization": f"Bearer {ADMIN_KEY}"})
        assert answer.status_code == 201, answer.text
        rotated = "vers_" + secrets.token_urlsafe(32)
        platform.settings = platform.settings.model_copy(update={"admin_key": rotated})
        await platform.restart("registry")
        await asyncio.sleep(platform.settings.auth_cache_seconds * 2)  # the services' caches of the old key lapse
        answer = await http.post("/api/v1/admin/orgs", json={"name": "k8s-second"}, headers={"Authorization": f"Bearer {ADMIN_KEY}"})
        assert answer.status_code == 401, answer.text
        answer = await http.post("/api/v1/admin/orgs", json={"name": "k8s-second"}, headers={"Authorization": f"Bearer {rotated}"})
        assert answer.status_code == 201, answer.text
