"""Kubernetes beyond one pod: k8s/multinode-job.yaml (an Indexed Job, built-in kinds) and k8s/pytorchjob.yaml
(the Kubeflow training operator's PyTorchJob).

Static checks: the built-in objects against the Kubernetes API schemas (kubernetes-validate, strict), the rules
the API server checks beyond the schema (podFailurePolicy needs restartPolicy Never ...), and the numbers and
names that must agree (node count, the rendezvous name JOB-0.SERVICE, ports, grace period and reserve). No
package ships the PyTorchJob's CRD schema (kubeflow-training 1.9.4 holds only generated Python models), so the
PyTorchJob gets a structural check: its own fields against those models' field lists, each pod template
against the Kubernetes schema (as a PodTemplate), and the same entrypoint, volumes and settings as the Job.

End to end: the Job's entrypoint, run here as the kubelet runs it, once per pod (two "pods" on this machine,
one process each, JOB_COMPLETION_INDEX 0 and 1, the rendezvous on localhost), around real tiny training runs;
each attempt's pods replaced as the Job controller replaces failed pods, until pod 0 succeeds (successPolicy).
The interrupted runs must reproduce an uninterrupted 2-rank run's losses exactly.
"""
from __future__ import annotations

import copy
import os
import re
import signal
import socket
import subprocess
import time
from pathlib import Path

import pytest

from helpers.paths import ROOT as REPO
from helpers.shared import shared_run
from helpers.templates import (K8S_VERSION, PYTHON, assert_bash_syntax, assert_same_losses, clean_env, container_env,
                               end_events, launches, logged_steps, manifest_objects, status_of, tiny_args, wait_for)

MULTINODE = REPO / "k8s" / "multinode-job.yaml"
PYTORCHJOB = REPO / "k8s" / "pytorchjob.yaml"
STEPS = 54


def objects() -> dict[str, dict]:
    return manifest_objects(MULTINODE)


def entrypoint_text() -> str:
    return objects()["ConfigMap"]["data"]["entrypoint.sh"]


def pod_spec(job: dict) -> dict:
    return job["spec"]["template"]["spec"]


# ---------------------------------------------------------------------------------------------------------
# static checks: the Indexed Job
def test_multinode_objects_match_the_kubernetes_schemas():
    kubernetes_validate = pytest.importorskip("kubernetes_validate")
    found = objects()
    assert set(found) == {"PersistentVolumeClaim", "ConfigMap", "Service", "Job"}
    for obj in found.values():
        kubernetes_validate.validate(obj, K8S_VERSION, strict=True)  # strict: a typo'd field is an error too


@pytest.mark.parametrize("breakage", ["typo_field", "wrong_type"])
def test_the_schema_check_rejects_a_broken_multinode_job(breakage):
    kubernetes_validate = pytest.importorskip("kubernetes_validate")
    job = copy.deepcopy(objects()["Job"])
    if breakage == "typo_field":
        job["spec"]["successPolicy"]["rules"][0]["succeededIndex"] = job["spec"]["successPolicy"]["rules"][0].pop(
            "succeededIndexes")
    else:
        job["spec"]["backoffLimitPerIndex"] = "twenty"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(job, K8S_VERSION, strict=True)


def test_k8s_multinode_entrypoint_syntax(tmp_path):
    assert_bash_syntax(entrypoint_text(), tmp_path)


def test_multinode_job_numbers_and_names_agree():
    found = objects()
    job, svc, pvc, cm = found["Job"], found["Service"], found["PersistentVolumeClaim"], found["ConfigMap"]
    spec, pod = job["spec"], pod_spec(job)
    (container,) = pod["containers"]
    env = container_env(job)
    # one pod per node, each knowing the node count; pod 0 found as JOB-0.SERVICE through the headless Service
    assert spec["completionMode"] == "Indexed"
    assert spec["parallelism"] == spec["completions"] == int(env["GPT_SIMPLE_NNODES"]) >= 2
    assert svc["spec"]["clusterIP"] == "None" and svc["spec"]["publishNotReadyAddresses"] is True
    assert pod["subdomain"] == svc["metadata"]["name"]
    assert svc["spec"]["selector"] == {"batch.kubernetes.io/job-name": job["metadata"]["name"]}
    assert env["GPT_SIMPLE_MASTER_ADDR"] == f"{job['metadata']['name']}-0.{svc['metadata']['name']}"
    port = int(env["GPT_SIMPLE_MASTER_PORT"])
    assert [p["port"] for p in svc["spec"]["ports"]] == [port]
    assert [p["containerPort"] for p in container["ports"]] == [port]
    # rules the API server checks beyond the schema: podFailurePolicy, backoffLimitPerIndex and
    # podReplacementPolicy Failed need restartPolicy Never; successPolicy needs an Indexed Job
    assert pod["restartPolicy"] == "Never" and spec["podReplacementPolicy"] == "Failed"
    fail_rule, ignore_rule = spec["podFailurePolicy"]["rules"]
    assert fail_rule["action"] == "FailJob" and fail_rule["onExitCodes"]["containerName"] == container["name"]
    assert fail_rule["onExitCodes"]["values"] == [int(env["GPT_SIMPLE_FAILED_EXIT_CODE"])]
    assert ignore_rule == {"action": "Ignore", "onPodConditions": [{"type": "DisruptionTarget", "status": "True"}]}
    assert spec["successPolicy"] == {"rules": [{"succeededIndexes": "0", "succeededCount": 1}]}
    assert spec["backoffLimitPerIndex"] >= 1 and spec["maxFailedIndexes"] == 0 and "backoffLimit" not in spec
    # time: SIGKILL must not cut the final save short; the Job's deadline must not cut every attempt
    reserve, max_runtime = float(env["GPT_SIMPLE_RESERVE_SECONDS"]), float(env["GPT_SIMPLE_MAX_RUNTIME"])
    grace = pod["terminationGracePeriodSeconds"]
    assert grace >= reserve + 30 and reserve < max_runtime
    assert spec["activeDeadlineSeconds"] >= max_runtime + grace
    # storage every pod mounts at once, the entrypoint from this file's ConfigMap
    assert pvc["spec"]["accessModes"] == ["ReadWriteMany"]
    volumes = {v["name"]: v for v in pod["volumes"]}
    mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
    assert volumes["run"]["persistentVolumeClaim"]["claimName"] == pvc["metadata"]["name"]
    assert volumes["entrypoint"]["configMap"]["name"] == cm["metadata"]["name"]
    assert env["GPT_SIMPLE_OUTPUT_DIR"].startswith(mounts["run"].rstrip("/") + "/")
    assert container["command"] == ["bash", f"{mounts['entrypoint']}/entrypoint.sh"]
    text = entrypoint_text()
    assert re.search(r"^ *RESTART=75\b", text, re.M)
    # the decision logic is the templates' own (scripts/template_lib.sh), sourced, not a copy
    assert '. "$TEMPLATE_LIB"' in text
    assert not re.search(r"^\s*(read_status|run_trainer|held_after)\(\)", text, re.M)


# ---------------------------------------------------------------------------------------------------------
# static checks: the PyTorchJob
# The fields of kubeflow.org/v1 PyTorchJob, from kubeflow-training 1.9.4's generated models
# (kubeflow_org_v1_py_torch_job*.py, _run_policy.py, _replica_spec.py): the CRD's schema is not packaged.
PYTORCHJOB_FIELDS = {"apiVersion", "kind", "metadata", "spec", "status"}
PYTORCHJOB_SPEC_FIELDS = {"elasticPolicy", "nprocPerNode", "pytorchReplicaSpecs", "runPolicy"}
RUN_POLICY_FIELDS = {"activeDeadlineSeconds", "backoffLimit", "cleanPodPolicy", "managedBy", "schedulingPolicy",
                     "suspend", "ttlSecondsAfterFinished"}
REPLICA_SPEC_FIELDS = {"replicas", "restartPolicy", "template"}
RESTART_POLICIES = {"Always", "OnFailure", "Never", "ExitCode"}
CLEAN_POD_POLICIES = {"All", "Running", "None"}


def pytorchjob() -> dict:
    import yaml
    (doc,) = [d for d in yaml.safe_load_all(PYTORCHJOB.read_text()) if d]
    return doc


def test_pytorchjob_structure():
    kubernetes_validate = pytest.importorskip("kubernetes_validate")
    ptj = pytorchjob()
    assert (ptj["apiVersion"], ptj["kind"]) == ("kubeflow.org/v1", "PyTorchJob")
    assert set(ptj) <= PYTORCHJOB_FIELDS and set(ptj["spec"]) <= PYTORCHJOB_SPEC_FIELDS
    run_policy = ptj["spec"]["runPolicy"]
    assert set(run_policy) <= RUN_POLICY_FIELDS and run_policy["cleanPodPolicy"] in CLEAN_POD_POLICIES
    assert "elasticPolicy" not in ptj["spec"], "elastic membership means in-job restarts (docs/orchestration.md)"
    replicas = ptj["spec"]["pytorchReplicaSpecs"]
    assert set(replicas) == {"Master", "Worker"} and replicas["Master"]["replicas"] == 1
    nodes = sum(r["replicas"] for r in replicas.values())
    for role, replica in replicas.items():
        assert set(replica) <= REPLICA_SPEC_FIELDS and replica["restartPolicy"] in RESTART_POLICIES
        # the pod template is a core object: the Kubernetes schema checks it, strictly
        template = {"apiVersion": "v1", "kind": "PodTemplate", "metadata": {"name": role.lower()},
                    "template": replica["template"]}
        kubernetes_validate.validate(template, K8S_VERSION, strict=True)

    # the same entrypoint, storage and settings as the Indexed Job's
    multinode = objects()
    job_pod = pod_spec(multinode["Job"])
    (job_container,) = job_pod["containers"]
    job_env = container_env(multinode["Job"])
    shared = {o["metadata"]["name"] for o in multinode.values()
              if o["metadata"]["labels"].get("gpt-simple/part") == "shared"}
    assert shared == {multinode["PersistentVolumeClaim"]["metadata"]["name"],
                      multinode["ConfigMap"]["metadata"]["name"]}
    for replica in replicas.values():
        pod = replica["template"]["spec"]
        (container,) = pod["containers"]
        assert container["name"] == "pytorch"  # the operator's default container name
        assert container["command"] == job_container["command"]
        assert container["volumeMounts"] == job_container["volumeMounts"]
        assert pod["volumes"] == job_pod["volumes"]
        env = {e["name"]: e["value"] for e in container["env"]}
        assert set(env) == set(job_env)
        assert int(env["GPT_SIMPLE_NNODES"]) == nodes
        assert env["GPT_SIMPLE_MASTER_ADDR"] == f"{ptj['metadata']['name']}-master-0"  # the operator's Service
        assert [p["containerPort"] for p in container["ports"]] == [int(env["GPT_SIMPLE_MASTER_PORT"])]
        # OnFailure restarts in place on 75; a run that must not be retried has to exit 0 (the Job's own
        # failure code, 3, would be retried as well)
        assert replica["restartPolicy"] == "OnFailure" and env["GPT_SIMPLE_FAILED_EXIT_CODE"] == "0"
        assert pod["terminationGracePeriodSeconds"] >= float(env["GPT_SIMPLE_RESERVE_SECONDS"]) + 30
        for same in ("GPT_SIMPLE_MAX_RUNTIME", "GPT_SIMPLE_RESERVE_SECONDS", "GPT_SIMPLE_OUTPUT_DIR"):
            assert env[same] == job_env[same]
    # restarts of every pod count: at least one attempt per pod
    assert run_policy["backoffLimit"] >= nodes
    assert run_policy["activeDeadlineSeconds"] >= float(job_env["GPT_SIMPLE_MAX_RUNTIME"]) + 420


# ---------------------------------------------------------------------------------------------------------
# the entrypoint, end to end: two pods on this machine
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def pod_env(tmp_path: Path, out: Path, demo: Path, index: int, port: int, **more: str) -> dict:
    job_env = container_env(objects()["Job"])
    env = clean_env(**{**job_env, "GPT_SIMPLE_HOME": str(REPO), "GPT_SIMPLE_CONFIG": "configs/tiny.toml",
                       "GPT_SIMPLE_OUTPUT_DIR": str(out),
                       "GPT_SIMPLE_EXTRA_ARGS": " ".join(tiny_args(demo, STEPS, 3) + ["--training.save_steps", "5"]),
                       "GPT_SIMPLE_TERMINATION_LOG": str(tmp_path / f"termination-log-{index}"),
                       "GPT_SIMPLE_MASTER_ADDR": "127.0.0.1", "GPT_SIMPLE_MASTER_PORT": str(port),
                       "GPT_SIMPLE_HELD_WAIT": "60", "GPT_SIMPLE_SHUTDOWN_TIMEOUT": "60",
                       "JOB_COMPLETION_INDEX": str(index), "NPROC": "1", "PYTHON": PYTHON,
                       "HOSTNAME": f"gpt-simple-multinode-{index}"})
    env.pop("GPT_SIMPLE_RESERVE_SECONDS")  # the test's reserve is in the extra args
    env.pop("GPT_SIMPLE_MAX_RUNTIME")
    env.update(more)
    return env


def start_pods(tmp_path: Path, out: Path, demo: Path, attempt: int, **more: str) -> list[subprocess.Popen]:
    """One attempt: every pod of the Job, each in a session of its own (a pod's processes die together). In the
    cluster a replacement pod has a new address; here each attempt gets a new port."""
    script = tmp_path / "entrypoint.sh"
    script.write_text(entrypoint_text())
    port = free_port()
    pods = []
    for index in range(int(container_env(objects()["Job"])["GPT_SIMPLE_NNODES"])):
        log = open(tmp_path / f"attempt-{attempt}-pod-{index}.log", "w")
        pods.append(subprocess.Popen(["bash", str(script)], cwd=REPO, stdout=log, stderr=subprocess.STDOUT,
                                     env=pod_env(tmp_path, out, demo, index, port, **more),
                                     start_new_session=True))
    return pods


def wait_pods(pods: list[subprocess.Popen], timeout: float = 300) -> list[int]:
    try:
        return [p.wait(timeout=timeout) for p in pods]
    finally:
        for p in pods:
            if p.poll() is None:
                lose_pod(p)


def descendants(pid: int) -> list[int]:
    children = subprocess.run(["ps", "-o", "pid=", "--ppid", str(pid)], capture_output=True, text=True).stdout.split()
    return [d for c in map(int, children) for d in (c, *descendants(c))]


def lose_pod(pod: subprocess.Popen) -> None:
    """SIGKILL everything in the pod, as a lost node or a deleted pod's cgroup: torchrun starts its workers in
    sessions of their own, so the process group alone would leave the worker training."""
    for pid in [pod.pid, *descendants(pod.pid)]:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    pod.wait()


def pod_log(tmp_path: Path, attempt: int, index: int) -> str:
    return (tmp_path / f"attempt-{attempt}-pod-{index}.log").read_text()


def run_job(tmp_path: Path, out: Path, demo: Path, first_attempt: int, attempts: int, **more: str) -> list:
    """What the Job controller does: replace the pods that failed with 75, until pod 0 succeeds."""
    codes = []
    for attempt in range(first_attempt, first_attempt + attempts):
        codes.append(wait_pods(start_pods(tmp_path, out, demo, attempt, **more)))
        if codes[-1][0] == 0:  # successPolicy: index 0 succeeded, the Job is complete
            return codes
        assert codes[-1] == [75, 75], (codes, pod_log(tmp_path, attempt, 0)[-3000:],
                                       pod_log(tmp_path, attempt, 1)[-3000:])
        assert status_of(out) == "STOPPED"
    raise AssertionError(f"not COMPLETED after {attempts} attempts: {codes}")


@pytest.fixture(scope="session")
def reference(tmp_path_factory, demo_data) -> Path:
    """The same run on 2 ranks, uninterrupted (one torchrun, no deadline); once per session."""
    def make(out: Path) -> None:
        cmd = [PYTHON, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
               str(REPO / "train.py"), "--config", "configs/tiny.toml", "--training.output_dir", str(out),
               *tiny_args(demo_data, STEPS, 10), "--training.save_steps", "5"]
        r = subprocess.run(cmd, cwd=REPO, env=clean_env(), capture_output=True, text=True, timeout=600)
        assert r.returncode == 0, r.stderr[-3000:]
        assert status_of(out) == "COMPLETED"
    return shared_run(tmp_path_factory, "k8s-multinode-reference", make)


@pytest.mark.slow
def test_two_pods_stop_on_their_deadline_and_resume_until_completed(tmp_path, demo_data, reference):
    out = tmp_path / "run"
    t0 = time.time()
    # >= 0.3 s a step: at most ~50 steps fit a 20 s attempt on any machine (set-up alone takes seconds), so 54
    # steps take 2 attempts or more; and 2 on a loaded one too (30 steps or more fit an attempt with 8 s of set-up)
    codes = run_job(tmp_path, out, demo_data, 1, 20, GPT_SIMPLE_MAX_RUNTIME="20", GPT_SIMPLE_DRILL="step=0.3")
    print(f"two pods, {len(codes)} attempts: {time.time() - t0:.0f}s")
    assert len(codes) >= 2, "one attempt finished the run: make it longer"
    assert status_of(out) == "COMPLETED"
    # every pod of an attempt decided alike, though only pod 0's rank 0 writes the status
    for attempt, attempt_codes in enumerate(codes[:-1], start=1):
        for index in (0, 1):
            assert "run STOPPED; exiting 75" in pod_log(tmp_path, attempt, index)
    runs = launches(out)
    assert len(runs) == len(codes)
    for launch in runs[:-1]:
        (end,) = end_events(launch)
        assert end["event"] == "stop" and end["reason"] == "deadline (GPT_SIMPLE_MAX_RUNTIME)", end
        assert launch[0]["world_size"] == 2
    assert end_events(runs[-1])[0]["event"] == "complete"
    assert "gpt-simple: run COMPLETED" in (tmp_path / "termination-log-0").read_text()
    assert_same_losses(out, reference)


@pytest.mark.slow
def test_a_lost_pod_makes_the_whole_group_restart(tmp_path, demo_data, reference):
    out = tmp_path / "run"
    pods = start_pods(tmp_path, out, demo_data, 1)
    try:
        wait_for(lambda: logged_steps(out) >= 8, 180, "the first checkpoint and a few steps more")
        lose_pod(pods[1])  # pod 1's node is lost: its entrypoint, torchrun and worker
        lost_at = time.time()
        code0 = pods[0].wait(timeout=150)
        survivor_s = time.time() - lost_at
    finally:
        for pod in pods:
            if pod.poll() is None:
                lose_pod(pod)
    # pod 0's trainer lost its peer: a transient failure, resumable; the pod fails (75) and is replaced
    assert code0 == 75, pod_log(tmp_path, 1, 0)[-3000:]
    assert status_of(out) == "STOPPED"
    (end,) = [e for e in launches(out)[0] if e["event"] in ("transient_failure", "error", "stop", "complete")]
    assert end["event"] == "transient_failure", end
    assert "run STOPPED; exiting 75" in pod_log(tmp_path, 1, 0)
    assert survivor_s < 120, f"pod 0 outlived its lost peer by {survivor_s:.0f}s"
    # the replacement pods meet again and finish the run with the uninterrupted losses
    codes = run_job(tmp_path, out, demo_data, 2, 4)
    assert codes[-1][0] == 0 and status_of(out) == "COMPLETED"
    assert_same_losses(out, reference)
