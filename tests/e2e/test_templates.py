"""The orchestration templates: slurm/resume_chain.sh, k8s/job.yaml, scripts/local_loop.sh.

Static checks: bash syntax of every script, the Kubernetes objects against the Kubernetes API schemas
(kubernetes-validate), and the numbers that must agree with each other. End-to-end checks run the real
scripts around real tiny training runs (configs/tiny.toml on CPU) and compare each orchestrated run's loss
trace with an uninterrupted run of the same config: N interrupted jobs must equal one long job.

The SLURM test needs a SLURM cluster: one already answering `sinfo`, or one that scripts/ci_slurm.sh can
install and start (root + apt). Elsewhere it is skipped, saying why; GPT_SIMPLE_REQUIRE_SLURM=1 (set it in
CI) turns that skip into a failure.
"""
from __future__ import annotations

import copy
import os
import re
import signal
import subprocess
import time
from pathlib import Path

import pytest
import yaml

from helpers.paths import ROOT as REPO
from helpers.templates import (K8S_VERSION, PYTHON, TERMINAL, assert_bash_syntax, assert_same_losses,  # noqa: F401
                               clean_env, container_env, end_events, events, finish_reference, launches, logged_steps,
                               loss_trace, manifest_objects, start_reference, status_of, tiny_args, wait_for)

LOCAL_LOOP = REPO / "scripts" / "local_loop.sh"
CHAIN = REPO / "slurm" / "resume_chain.sh"
CI_SLURM = REPO / "scripts" / "ci_slurm.sh"
K8S_JOB = REPO / "k8s" / "job.yaml"
SHELL_SCRIPTS = [CHAIN, LOCAL_LOOP, CI_SLURM]


# ---------------------------------------------------------------------------------------------------------
# helpers
def k8s_objects() -> dict[str, dict]:
    return manifest_objects(K8S_JOB)


def entrypoint_text() -> str:
    return k8s_objects()["ConfigMap"]["data"]["entrypoint.sh"]


# ---------------------------------------------------------------------------------------------------------
# static checks
@pytest.mark.parametrize("script", SHELL_SCRIPTS, ids=lambda p: str(p.relative_to(REPO)))
def test_shell_syntax(script: Path):
    r = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert script.read_text().startswith("#!/usr/bin/env bash\n")
    assert os.access(script, os.X_OK), f"{script} is not executable"


def test_k8s_entrypoint_syntax(tmp_path):
    assert_bash_syntax(entrypoint_text(), tmp_path)


def test_k8s_manifests_match_the_kubernetes_schemas():
    kubernetes_validate = pytest.importorskip("kubernetes_validate")
    objects = k8s_objects()
    assert set(objects) == {"PersistentVolumeClaim", "ConfigMap", "Job"}
    for kind, obj in objects.items():
        # strict: an unknown field (a typo) is an error too
        kubernetes_validate.validate(obj, K8S_VERSION, strict=True)


@pytest.mark.parametrize("breakage", ["typo_field", "wrong_type", "bad_volume"])
def test_k8s_validation_rejects_a_broken_manifest(breakage):
    """The schema check above is real: the same validator refuses a damaged copy of the Job."""
    kubernetes_validate = pytest.importorskip("kubernetes_validate")
    job = copy.deepcopy(k8s_objects()["Job"])
    pod = job["spec"]["template"]["spec"]
    if breakage == "typo_field":
        pod["containers"][0]["volumeMount"] = pod["containers"][0].pop("volumeMounts")
    elif breakage == "wrong_type":
        job["spec"]["backoffLimit"] = "twenty"
    else:
        pod["volumes"][0]["persistentVolumeClaim"] = {"readOnly": True}  # claimName is required
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(job, K8S_VERSION, strict=True)


def test_k8s_job_numbers_agree():
    objects = k8s_objects()
    job, pvc, cm = objects["Job"], objects["PersistentVolumeClaim"], objects["ConfigMap"]
    spec, pod = job["spec"], job["spec"]["template"]["spec"]
    container = pod["containers"][0]
    env = container_env(job)
    assert pod["restartPolicy"] == "OnFailure"
    # podFailurePolicy is only accepted with restartPolicy Never: the API server would refuse this Job
    assert "podFailurePolicy" not in spec
    assert spec["backoffLimit"] >= 1
    reserve = float(env["GPT_SIMPLE_RESERVE_SECONDS"])
    max_runtime = float(env["GPT_SIMPLE_MAX_RUNTIME"])
    grace = pod["terminationGracePeriodSeconds"]
    assert grace >= reserve + 30, "SIGKILL would cut the final save short"
    assert reserve < max_runtime
    assert spec["activeDeadlineSeconds"] >= max_runtime + grace, "the Job deadline would cut every attempt"
    # the volumes the container uses are the objects of this file
    volumes = {v["name"]: v for v in pod["volumes"]}
    mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
    assert volumes["run"]["persistentVolumeClaim"]["claimName"] == pvc["metadata"]["name"]
    assert volumes["entrypoint"]["configMap"]["name"] == cm["metadata"]["name"]
    assert env["GPT_SIMPLE_OUTPUT_DIR"].startswith(mounts["run"].rstrip("/") + "/"), "output_dir not on the PVC"
    assert container["command"] == ["bash", f"{mounts['entrypoint']}/entrypoint.sh"]
    assert "entrypoint.sh" in cm["data"]
    # the entrypoint's restart code is the one OnFailure acts on (non-zero), and the docs say so
    assert re.search(r"^ *RESTART=75\b", entrypoint_text(), re.M)
    assert "75" in (REPO / "docs" / "orchestration.md").read_text()


def test_slurm_header():
    text = CHAIN.read_text()
    directives = [l for l in text.splitlines() if l.startswith("#SBATCH")]
    first_command = next(i for i, l in enumerate(text.splitlines()) if l.strip() and not l.startswith("#"))
    last_directive = max(i for i, l in enumerate(text.splitlines()) if l.startswith("#SBATCH"))
    assert last_directive < first_command, "sbatch ignores #SBATCH lines after the first command"
    assert any(re.fullmatch(r"#SBATCH --signal=B:USR1@\d+", l) for l in directives)
    assert any(l.startswith("#SBATCH --time=") for l in directives)
    # site-specific lines are there, but commented out
    site = text.split("SITE-SPECIFIC", 1)[1].split("end of site-specific", 1)[0]
    assert "##SBATCH --account=" in site and "##SBATCH --partition=" in site
    assert all(l.startswith("#") for l in site.splitlines()[1:] if l.strip())
    assert "--dependency=\"afterany:$JOB\"" in text
    assert "--signals-to-handle=SIGTERM,SIGINT,SIGUSR1,SIGUSR2" in text


def test_k8s_readme_variant_validates():
    """k8s/README.md shows a restartPolicy Never + podFailurePolicy variant; it must be valid too."""
    kubernetes_validate = pytest.importorskip("kubernetes_validate")
    readme = REPO / "k8s" / "README.md"
    blocks = re.findall(r"```yaml\n(.*?)```", readme.read_text(), re.S)
    assert blocks, "k8s/README.md has no yaml block"
    for block in blocks:
        for obj in yaml.safe_load_all(block):
            if obj:
                kubernetes_validate.validate(obj, K8S_VERSION, strict=True)
                pod = obj["spec"]["template"]["spec"]
                if "podFailurePolicy" in obj["spec"]:
                    assert pod["restartPolicy"] == "Never"


# ---------------------------------------------------------------------------------------------------------
# local loop, end to end
def run_loop(outdir: Path, args: list[str], timeout: float = 400, **env: str) -> subprocess.CompletedProcess:
    env = clean_env(GPT_SIMPLE_CONFIG="configs/tiny.toml", GPT_SIMPLE_OUTPUT_DIR=str(outdir),
                    GPT_SIMPLE_RETRY_DELAY="0", **env)
    return subprocess.run(["bash", str(LOCAL_LOOP), *args], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=timeout)


@pytest.mark.slow
def test_local_loop_resumes_until_completed(tmp_path, demo_data):
    steps = 60
    ref = start_reference(demo_data, tmp_path / "reference", steps)
    out = tmp_path / "loop"
    t0 = time.time()
    # >= 0.2 s a step: at most ~50 steps fit a 15 s job on any machine, so 60 steps take 2 attempts or more
    r = run_loop(out, tiny_args(demo_data, steps, 3), GPT_SIMPLE_MAX_RUNTIME="15", GPT_SIMPLE_DRILL="step=0.2")
    print(f"local loop: {time.time() - t0:.0f}s")
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-2000:]
    assert status_of(out) == "COMPLETED"
    runs = launches(out)
    logs = sorted((out / "logs").glob("attempt-*.log"))
    assert len(runs) >= 2, f"the run needed a single attempt: make it longer ({r.stdout[-2000:]})"
    assert len(logs) == len(runs), [p.name for p in logs]
    for i, (launch, log) in enumerate(zip(runs, logs)):
        (end,) = end_events(launch)
        if i < len(runs) - 1:
            assert end["event"] == "stop" and end["reason"] == "deadline (GPT_SIMPLE_MAX_RUNTIME)", end
            assert "STOPPED" in log.read_text()
        else:
            assert end["event"] == "complete"
            assert "COMPLETED" in log.read_text()
        assert launch[0]["deadline_source"] == "GPT_SIMPLE_MAX_RUNTIME"
    assert "run COMPLETED" in (out / "logs" / "loop.log").read_text()
    finish_reference(ref, tmp_path / "reference")
    assert_same_losses(out, tmp_path / "reference")

    # a finished run: the loop trains no more
    again = run_loop(out, tiny_args(demo_data, steps, 3))
    assert again.returncode == 0 and "run COMPLETED" in again.stdout
    assert len(launches(out)) == len(runs)


# The orchestration contract's minimal example, as a user would paste it (only the budget and the pause
# are shortened); the config is YAML because the example's is.
SEED_LOOP = """
export GPT_SIMPLE_MAX_RUNTIME=15 # stop ~15 s in, save, exit 0
while true; do
gpt-simple train --config config.yaml
status=$(gpt-simple status --output_dir ./outputs 2>/dev/null || true)
echo "$status" | grep -qE "COMPLETED|HALTED" && break # HALTED needs attention
sleep 0 # otherwise resume and continue
done
"""


@pytest.mark.slow
def test_the_contracts_minimal_shell_loop_runs_to_completed(tmp_path, demo_data):
    from gpt_simple.config import load_config
    cfg = load_config(REPO / "configs" / "tiny.toml", tiny_args(demo_data, 60, 3) + ["--data.demo", "false"])
    cfg.training.output_dir = "./outputs"
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(cfg.to_dict()))
    # >= 0.2 s a step (as in the local-loop test): the run takes 2 launches or more on any machine
    env = clean_env(PATH=f"{Path(PYTHON).parent}{os.pathsep}{os.environ['PATH']}", GPT_SIMPLE_DRILL="step=0.2")
    r = subprocess.run(["bash", "-c", SEED_LOOP], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=400)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    out = tmp_path / "outputs"
    assert status_of(out) == "COMPLETED"
    runs = launches(out)
    assert len(runs) >= 2, "one launch finished the run: the loop was not exercised"
    assert all(end_events(run)[0]["event"] == "stop" for run in runs[:-1])
    assert loss_trace(out)[-1][0] == 60


def test_the_contracts_template_names_point_at_the_templates():
    names = {"slurm_resume_chain.sh": CHAIN, "kubernetes_job.yaml": K8S_JOB, "local_loop.sh": LOCAL_LOOP}
    for name, template in names.items():
        assert (REPO / "examples" / "orchestrators" / name).resolve() == template.resolve(), name


@pytest.mark.slow
def test_local_loop_attempt_cap_error_and_refusal(tmp_path, demo_data):
    out = tmp_path / "run"
    args = tiny_args(demo_data, 2000, 3)
    # cap: one attempt of ~10 s is not enough for 2000 steps -> exit 4, the run is resumable
    r = run_loop(out, args, GPT_SIMPLE_MAX_RUNTIME="10", GPT_SIMPLE_MAX_ATTEMPTS="1")
    assert r.returncode == 4, r.stdout[-3000:] + r.stderr[-2000:]
    assert "attempt cap reached" in r.stdout
    assert status_of(out) == "STOPPED"
    # a real error: the checkpoint's architecture differs from the config -> the trainer records ERROR
    r = run_loop(out, [*args, "--model.n_layer", "3"], GPT_SIMPLE_MAX_RUNTIME="10")
    assert r.returncode == 1, r.stdout[-3000:]
    assert status_of(out) == "ERROR"
    assert "run ERROR" in r.stdout and "architecture" in r.stdout
    n = len(launches(out))
    assert n == 2
    # an ERROR run is not resumed, not even by a new loop
    r = run_loop(out, args, GPT_SIMPLE_MAX_RUNTIME="10")
    assert r.returncode == 1 and "run ERROR" in r.stdout
    assert len(launches(out)) == n
    assert len(list((out / "logs").glob("attempt-*.log"))) == 2
    # a loop started with SIGINT ignored (a `loop.sh &` in a script) cannot trap it: it says so first
    env = clean_env(GPT_SIMPLE_CONFIG="configs/tiny.toml", GPT_SIMPLE_OUTPUT_DIR=str(out))
    ignored = SIGINT_DEFAULT.replace("SIG_DFL", "SIG_IGN")
    r = subprocess.run([PYTHON, "-c", ignored, str(LOCAL_LOOP), *args], cwd=REPO, env=env, capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 1 and r.stdout.splitlines()[0] == (
        "[local_loop] warning: SIGINT is ignored in this shell (inherited from its parent): it cannot stop this loop")


SIGINT_DEFAULT = ("import os, signal, sys; signal.signal(signal.SIGINT, signal.SIG_DFL); "
                  "os.execvp('bash', ['bash', *sys.argv[1:]])")


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=lambda s: s.name)
def test_local_loop_signal_saves_and_ends_the_loop(tmp_path, demo_data, sig):
    out = tmp_path / "run"
    env = clean_env(GPT_SIMPLE_CONFIG="configs/tiny.toml", GPT_SIMPLE_OUTPUT_DIR=str(out),
                    GPT_SIMPLE_RETRY_DELAY="0")
    # SIGINT as a terminal's shell leaves it: whoever started the suite may have left it ignored (a `cmd &` in a
    # script ignores SIGINT, and every process after inherits that), and an ignored signal cannot be trapped
    proc = subprocess.Popen([PYTHON, "-c", SIGINT_DEFAULT, str(LOCAL_LOOP), *tiny_args(demo_data, 5000, 3)],
                            cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    try:
        wait_for(lambda: logged_steps(out) >= 3, 120, "the first logged steps")
        proc.send_signal(sig)  # to the loop only, as a scheduler or `kill` would
        output, _ = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:  # the loop and its trainer: a failed test leaves no job training on
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 128 + sig, output[-3000:]
    assert status_of(out) == "STOPPED"
    (launch,) = launches(out)
    (end,) = end_events(launch)
    assert end["event"] == "stop" and end["reason"].startswith("signal"), end
    assert any(e["event"] == "save" for e in launch)
    assert "start the loop again to resume" in output and "cannot stop this loop" not in output


# ---------------------------------------------------------------------------------------------------------
# Kubernetes entrypoint, end to end (the container's script, run here the way the kubelet runs it)
def entrypoint_env(tmp_path: Path, outdir: Path, demo: Path, steps: int, extra: str = "", **more: str):
    job_env = container_env(k8s_objects()["Job"])
    args = " ".join(tiny_args(demo, steps, 3)) + (" " + extra if extra else "")
    env = clean_env(**{**job_env, "GPT_SIMPLE_HOME": str(REPO), "GPT_SIMPLE_CONFIG": "configs/tiny.toml",
                       "GPT_SIMPLE_OUTPUT_DIR": str(outdir), "GPT_SIMPLE_EXTRA_ARGS": args,
                       "GPT_SIMPLE_TERMINATION_LOG": str(tmp_path / "termination-log"),
                       "PYTHON": PYTHON, "HOSTNAME": "pod-0"})
    env.pop("GPT_SIMPLE_RESERVE_SECONDS")  # the test's own reserve is in the extra args
    env.pop("GPT_SIMPLE_MAX_RUNTIME")
    env.update(more)
    return env


def write_entrypoint(tmp_path: Path) -> Path:
    path = tmp_path / "entrypoint.sh"
    path.write_text(entrypoint_text())
    return path


@pytest.mark.slow
def test_k8s_entrypoint_restarts_until_completed(tmp_path, demo_data):
    steps = 60
    ref = start_reference(demo_data, tmp_path / "reference", steps)
    out = tmp_path / "run"
    script = write_entrypoint(tmp_path)
    env = entrypoint_env(tmp_path, out, demo_data, steps, GPT_SIMPLE_MAX_RUNTIME="15")
    backoff_limit = k8s_objects()["Job"]["spec"]["backoffLimit"]
    # The first pod is deleted (SIGTERM, as on preemption) a few steps in, so the run takes two attempts or more
    # however fast this machine trains; the later ones stop on their deadline or complete.
    first = subprocess.Popen(["bash", str(script)], cwd=REPO, env=env, stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT, text=True)
    try:
        wait_for(lambda: logged_steps(out) >= 5 or first.poll() is not None, 120, "the first pod's first steps")
        first.send_signal(signal.SIGTERM)
        output, _ = first.communicate(timeout=120)
    finally:
        if first.poll() is None:
            first.kill()
    codes = [first.returncode]
    assert first.returncode == 75 and status_of(out) == "STOPPED", output[-3000:]
    while codes[-1] != 0 and len(codes) <= backoff_limit:  # what restartPolicy OnFailure does with the exit code
        r = subprocess.run(["bash", str(script)], cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
        codes.append(r.returncode)
        if r.returncode == 0:
            break
        assert r.returncode == 75, r.stdout[-3000:] + r.stderr[-2000:]
        assert status_of(out) == "STOPPED"
        assert "restarts the container" in (tmp_path / "termination-log").read_text()
    assert codes[-1] == 0 and len(codes) >= 2, codes
    assert status_of(out) == "COMPLETED"
    assert "COMPLETED" in (tmp_path / "termination-log").read_text()
    assert len(launches(out)) == len(codes)
    assert len(list((out / "logs").glob("k8s-pod-0-*.log"))) >= 1
    finish_reference(ref, tmp_path / "reference")
    assert_same_losses(out, tmp_path / "reference")
    # a restarted container of a finished run exits 0 at once
    r = subprocess.run(["bash", str(script)], cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and "run status at start: COMPLETED" in r.stdout
    assert len(launches(out)) == len(codes)


@pytest.mark.slow
def test_k8s_entrypoint_sigterm_error_and_crash(tmp_path, demo_data):
    out = tmp_path / "run"
    script = write_entrypoint(tmp_path)
    env = entrypoint_env(tmp_path, out, demo_data, 5000)
    # 1. pod termination: SIGTERM reaches only PID 1 (the entrypoint); the trainer must still save
    proc = subprocess.Popen(["bash", str(script)], cwd=REPO, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    try:
        wait_for(lambda: logged_steps(out) >= 3, 120, "the first logged steps")
        proc.send_signal(signal.SIGTERM)
        output, _ = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 75, output[-3000:]
    assert status_of(out) == "STOPPED"
    (end,) = end_events(launches(out)[0])
    assert end == {**end, "event": "stop", "reason": "signal SIGTERM"}

    # 2. a real ERROR (resuming with another architecture): exit 0 so that OnFailure does not retry it
    bad = entrypoint_env(tmp_path, out, demo_data, 5000, extra="--model.n_layer 3")
    r = subprocess.run(["bash", str(script)], cwd=REPO, env=bad, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stdout[-3000:]
    assert status_of(out) == "ERROR"
    message = (tmp_path / "termination-log").read_text()
    assert "run ERROR" in message and "Not restarting" in message and "architecture" in message
    n = len(launches(out))
    r = subprocess.run(["bash", str(script)], cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and "run status at start: ERROR" in r.stdout
    assert len(launches(out)) == n

    # 3. a real crash: the trainer is SIGKILLed mid-run (the OOM killer, a node loss)
    crashed = tmp_path / "crashed"
    trainer = subprocess.Popen([PYTHON, str(REPO / "train.py"), "--config", "configs/tiny.toml",
                                "--training.output_dir", str(crashed), *tiny_args(demo_data, 5000, 3)],
                               cwd=REPO, env=clean_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_for(lambda: logged_steps(crashed) >= 3, 120, "the first logged steps")
    finally:
        trainer.kill()
        trainer.wait()
    env_c = entrypoint_env(tmp_path, crashed, demo_data, 5000)
    r = subprocess.run(["bash", str(script)], cwd=REPO, env=env_c, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stdout[-3000:]
    assert "run status at start: CRASHED" in r.stdout
    assert "CRASHED" in (tmp_path / "termination-log").read_text()
    assert len(launches(crashed)) == 1


# ---------------------------------------------------------------------------------------------------------
# SLURM, end to end, on a real one-node cluster
@pytest.fixture(scope="session")
def slurm_cluster():
    required = os.environ.get("GPT_SIMPLE_REQUIRE_SLURM") == "1"

    def unavailable(reason: str):
        if required:
            pytest.fail(f"GPT_SIMPLE_REQUIRE_SLURM=1 but {reason}")
        pytest.skip(reason)

    check = subprocess.run(["bash", str(CI_SLURM), "check"], capture_output=True)
    if check.returncode == 0:
        yield
        return
    if os.geteuid() != 0:
        unavailable("no SLURM cluster answers, and starting one (scripts/ci_slurm.sh up) needs root")
    r = subprocess.run(["bash", str(CI_SLURM), "up"], capture_output=True, text=True, timeout=900)
    if r.returncode != 0:
        unavailable(f"scripts/ci_slurm.sh up failed (exit {r.returncode}): {r.stderr.strip()[-1500:]}")
    yield
    subprocess.run(["bash", str(CI_SLURM), "down"], capture_output=True, timeout=120)


def squeue_ids(name: str) -> list[str]:
    r = subprocess.run(["squeue", "-h", "-n", name, "-o", "%i"], capture_output=True, text=True)
    return r.stdout.split()


def launched_job(outdir: Path, attempt: int) -> str | None:
    """The id of the job whose chain attempt `attempt` launched the trainer, once it has."""
    path = outdir / "logs" / "chain.log"
    found = re.search(rf"job=(\d+) attempt={attempt}/\d+ launch: ", path.read_text()) if path.exists() else None
    return found.group(1) if found else None


def job_state(job_id: str) -> str:
    r = subprocess.run(["scontrol", "show", "job", job_id], capture_output=True, text=True)
    m = re.search(r"JobState=(\S+)", r.stdout)
    return m.group(1) if m else "?"


@pytest.mark.slow
def test_slurm_chain_resumes_until_completed(tmp_path, demo_data, slurm_cluster):
    # How many steps a job trains depends on the machine (CI's trained 95 in 20 s), so the test stops the first two
    # jobs itself, as Slurm's B:USR1 does, and the chain needs 3 jobs or more on any machine. Later jobs end on
    # their deadline or complete. Slurm 22.05 checks for signals to send every ~30 s, so B:USR1@20 comes 20-50 s
    # before the end: some jobs are signalled during set-up and train nothing (they still save nothing twice and
    # hand on). Hence the attempt cap of 20.
    steps = 100
    name = f"gs-chain-{os.getpid()}"
    out = tmp_path / "run"
    ref = start_reference(demo_data, tmp_path / "reference", steps)
    env = clean_env(GPT_SIMPLE_CONFIG="configs/tiny.toml", GPT_SIMPLE_OUTPUT_DIR=str(out),
                    GPT_SIMPLE_EXTRA_ARGS=" ".join(tiny_args(demo_data, steps, 40)), GPT_SIMPLE_MAX_ATTEMPTS="20")
    # --time=1 (minute); reserve 40 s: each job stops ~20 s in on its deadline, or earlier on the signal.
    t0 = time.time()
    r = subprocess.run(["bash", str(CHAIN), "submit", "--time=1", "--signal=B:USR1@20", f"--job-name={name}",
                        f"--output={tmp_path}/%x-%j.out"], cwd=REPO, env=env, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    first = r.stdout.split()[-1]
    try:
        # drive the first job's stop by hand, as Slurm's B:USR1 does: the signal goes to the batch shell only
        wait_for(lambda: logged_steps(out) >= 5, 180, "the first job's first steps")
        subprocess.run(["scancel", "--batch", "--signal=USR1", first], check=True)
        second = wait_for(lambda: launched_job(out, attempt=2), 180, "the second job's launch")
        resumed_at = logged_steps(out)
        wait_for(lambda: logged_steps(out) >= resumed_at + 5, 180, "the second job's first steps")
        # the second job may already have stopped on Slurm's own signal: then scancel finds it gone
        subprocess.run(["scancel", "--batch", "--signal=USR1", second])
        wait_for(lambda: not squeue_ids(name), 480, "the chain to end", interval=2)
    finally:
        for job_id in squeue_ids(name):
            subprocess.run(["scancel", job_id])
    print(f"slurm chain: {time.time() - t0:.0f}s")
    chain_log = (out / "logs" / "chain.log").read_text()
    assert status_of(out) == "COMPLETED", chain_log

    jobs = sorted({int(j) for j in re.findall(r"job=(\d+) .*launch: ", chain_log)})
    runs = launches(out)
    assert len(runs) == len(jobs) >= 3, f"{len(runs)} launches in {len(jobs)} jobs; make the run longer\n{chain_log}"
    for i, (job, launch) in enumerate(zip(jobs, runs)):
        assert launch[0]["deadline_source"] == "SLURM_JOB_END_TIME", launch[0]  # exported by the script
        (end,) = end_events(launch)
        job_log = (out / "logs" / f"slurm-{job}.log").read_text()
        if i < len(runs) - 1:
            assert end["event"] == "stop", end
            assert end["reason"] in ("signal SIGUSR1", "deadline (SLURM_JOB_END_TIME)"), end
            assert f"job={job} attempt={i + 1}/20 trainer exited with code 0; run status: STOPPED" in chain_log
            assert "STOPPED" in job_log
        else:
            assert end["event"] == "complete"
            assert "COMPLETED" in job_log
        # every job ended on its own, in time: Slurm did not kill it
        assert job_state(str(job)) == "COMPLETED", (job, job_state(str(job)))
    assert runs[0][-1]["reason"] == "signal SIGUSR1"  # the scancel --batch above, forwarded by the script
    # the last job cancelled the successor it had queued
    last_successor = re.findall(rf"job={jobs[-1]} .*queued successor job (\d+)", chain_log)
    if last_successor:
        assert job_state(last_successor[0]) == "CANCELLED"
        assert f"cancelled successor job {last_successor[0]}" in chain_log
    finish_reference(ref, tmp_path / "reference")
    assert_same_losses(out, tmp_path / "reference")

    # a job of a finished run exits at once and queues nothing
    r = subprocess.run(["sbatch", "--parsable", "--time=1", f"--job-name={name}", f"--output={tmp_path}/%x-%j.out",
                        str(CHAIN)], cwd=REPO, env=env, capture_output=True, text=True, check=True)
    late = r.stdout.strip().split(";")[0]
    wait_for(lambda: not squeue_ids(name), 120, "the late job to end", interval=1)
    chain_log = (out / "logs" / "chain.log").read_text()
    assert f"job={late} attempt=1/20 run already COMPLETED; chain ends" in chain_log
    assert not re.search(rf"job={late} .*queued successor", chain_log)
    assert len(launches(out)) == len(runs)
