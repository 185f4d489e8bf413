"""A newcomer's first run: a missing model ends `serve run` and `python -m serve_graph serve` at
once with one clear message; Ctrl-C and SIGTERM leave no process behind; GET /, /healthz and
/readyz tell liveness from readiness while the model is missing, then loaded."""
import io
import os
import signal
import subprocess
import sys
import time
import zipfile

import pytest
import requests

from audio_files import encode, tone
from serve_graph.engine import make_random_repo
from serve_graph.launch import launch, write_config
from serve_graph.procs import alive, cmdline, descendants, kill_all, wait_gone
from serve_process import ServeProcess, free_port

pytestmark = pytest.mark.serve
SERVE_RUN = [sys.executable, "-m", "ray.serve.scripts", "run"]


def run_watching(cmd, cwd, env, timeout=120):
    """Run `cmd` to its end, noting every process it starts; (exit code, output, seconds,
    the processes seen)."""
    start = time.monotonic()
    proc = subprocess.Popen(cmd, cwd=cwd, env={**os.environ, **env}, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, start_new_session=True)
    seen = set()
    while proc.poll() is None and time.monotonic() - start < timeout:
        seen.update(descendants(proc.pid))
        time.sleep(0.2)
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGKILL)
    output = proc.communicate()[0].decode(errors="replace")
    return proc.returncode, output, time.monotonic() - start, seen


def assert_all_gone(pids, within=15.):
    left = wait_gone(pids, within)
    assert not left, f"still running: {left}"


def assert_clear_message(output: str, missing: str) -> None:
    message = output[output.index("error: the model 'htdemucs' cannot be loaded"):]
    assert missing in message and "python -m serve_graph make-repo models" in message
    assert "Traceback" not in message  # the message is the last word, not a stack


def test_serve_run_without_the_model_exits_at_once_with_one_message(tmp_path):
    config = write_config(tmp_path / "serve_config.yaml", port=free_port(), host="127.0.0.1")
    missing = str(tmp_path / "no_models_here")
    code, output, seconds, seen = run_watching(SERVE_RUN + [config.name], tmp_path,
                                               {"SERVE_GRAPH_MODEL_REPO": missing})
    assert code != 0 and seconds < 60, output[-3000:]
    assert_clear_message(output, missing)
    assert seen and "Deploying" not in output.split("error: the model")[1]
    assert_all_gone(seen)


def test_an_application_that_fails_to_deploy_is_reported_at_once(tmp_path, tiny_repo):
    """`serve run` keeps running when the application cannot be built (here: an arg the
    service does not know); the launcher's callers read Serve's verdict from the log instead
    of waiting for an answer that never comes."""
    from serve_process import tiny_service
    start = time.monotonic()
    with pytest.raises(RuntimeError, match="failed to deploy") as failed:
        tiny_service(tmp_path, tiny_repo, args={"no_such_arg": 1})
    assert "unknown application args: ['no_such_arg']" in str(failed.value)
    assert time.monotonic() - start < 120


def test_cli_serve_without_the_model_exits_before_starting_ray(tmp_path):
    missing = str(tmp_path / "absent")
    code, output, seconds, seen = run_watching(
        [sys.executable, "-m", "serve_graph", "serve", "--model-repo", missing], tmp_path, {})
    assert code == 2 and seconds < 30, output
    assert_clear_message(output, missing)
    assert not any("raylet" in " ".join(cmdline(pid)) for pid in seen if alive(pid))


def test_cli_serve_refuses_the_fused_kernels_on_this_cpu_before_starting_ray(tmp_path,
                                                                             tiny_repo):
    """`dconv: triton` with the model on this machine's CPU outside Triton's interpreter: one
    line, exit 2, no Ray (the Separate replicas would otherwise fail in their constructors)."""
    config = write_config(tmp_path / "serve_config.yaml", port=free_port(), host="127.0.0.1",
                          args={"dconv": "triton", "device": "cpu"})
    code, output, seconds, seen = run_watching(
        [sys.executable, "-m", "serve_graph", "serve", "--config", str(config), "--model-repo",
         str(tiny_repo)], tmp_path, {"TRITON_INTERPRET": "0"})
    assert code == 2 and seconds < 30, output
    assert "error: dconv 'triton' needs a CUDA device" in output and "Traceback" not in output
    assert not any("raylet" in " ".join(cmdline(pid)) for pid in seen if alive(pid))


@pytest.mark.parametrize("command,sig", [("serve run", signal.SIGTERM),
                                         ("python -m serve_graph serve", signal.SIGINT)],
                         ids=["serve-run-sigterm", "cli-ctrl-c"])  # cli SIGTERM: below
def test_stopping_leaves_no_process_behind(tmp_path, tiny_repo, command, sig):
    """And, started by `launch` (`serve_graph.serve_run`): the graph is built in the
    launcher's own process, the config's deployment options applied (Separate's runtime_env
    reaches its replica), and no build task of Serve's imports it again."""
    port = free_port()
    config = write_config(tmp_path / "serve_config.yaml", port=port, host="127.0.0.1",
                          deployments={"Separate": {"ray_actor_options": {"runtime_env": {
                              "env_vars": {"SERVE_GRAPH_PROBE": "seen"}}}}})

    def start(config_path, env, **popen):
        if command == "serve run":
            return launch(config_path, env, **popen)
        return subprocess.Popen([sys.executable, "-m", "serve_graph", "serve", "--config",
                                 str(config_path)], env={**os.environ, **env},
                                start_new_session=True, **popen)
    server = ServeProcess(config, port, {"SERVE_GRAPH_MODEL_REPO": str(tiny_repo)},
                          tmp_path / "serve.log", start=start)
    started = descendants(server.pid)
    try:
        assert any("raylet" in arg for pid in started for arg in cmdline(pid))
        if command == "serve run":
            assert_built_in_the_launcher(tmp_path / "serve.log", started)
            assert_serve_processes_without_pandas([server.pid] + started)
    except AssertionError:
        server.kill()  # no service left behind by a failed check
        raise
    process = server._proc
    process.send_signal(sig)
    process.wait(90)
    assert_all_gone(started + [process.pid])
    server.stop()


def assert_built_in_the_launcher(log, started) -> None:
    text = log.read_text(errors="replace")
    assert "building the application in this process" in text
    assert "Importing and building app" not in text  # Serve's build task never ran
    separate = [pid for pid in started if "ServeReplica:separation:Separate" in
                " ".join(cmdline(pid))]
    assert separate, "no Separate replica"
    with open(f"/proc/{separate[0]}/environ", "rb") as environ:
        assert b"SERVE_GRAPH_PROBE=seen" in environ.read().split(b"\0")


def assert_serve_processes_without_pandas(pids) -> None:
    """The launcher and every Serve process (controller, proxy, replicas; the one with its own
    runtime_env too) started without pandas (`serve_graph.lean_imports`)."""
    kinds = ("ServeController", "ProxyActor", "ServeReplica")
    serve = [pid for pid in pids
             if pid == pids[0] or any(kind in " ".join(cmdline(pid)) for kind in kinds)]
    assert len(serve) >= 7, [cmdline(pid) for pid in serve]  # with the proxy and 4 replicas
    for pid in serve:
        with open(f"/proc/{pid}/maps") as maps:
            assert "/pandas/" not in maps.read(), cmdline(pid)


def start_in_background_of_a_script(config_path, env, **popen) -> subprocess.Popen:
    """`python -m serve_graph serve &` as a script starts it: with SIGINT ignored, which the
    launcher and every process it starts inherit."""
    script = 'trap "" INT; exec "$0" -m serve_graph serve --config "$1"'
    return subprocess.Popen(["bash", "-c", script, sys.executable, str(config_path)],
                            env={**os.environ, **env}, start_new_session=True, **popen)


def test_a_script_s_background_service_stops_on_sigterm_within_15_s(tmp_path, tiny_repo):
    """SIGTERM stops it, Ray's processes included, although SIGINT (by which the launcher stops
    `serve run`) came ignored; a second SIGTERM and a Ctrl-C during the stop do not cut it
    short and leave `serve run` and Ray running."""
    port = free_port()
    config = write_config(tmp_path / "serve_config.yaml", port=port, host="127.0.0.1")
    server = ServeProcess(config, port, {"SERVE_GRAPH_MODEL_REPO": str(tiny_repo)},
                          tmp_path / "serve.log", start=start_in_background_of_a_script)
    started = descendants(server.pid)
    assert any("raylet" in arg for pid in started for arg in cmdline(pid))
    start = time.monotonic()
    for stop_signal in (signal.SIGTERM, signal.SIGTERM, signal.SIGINT):  # the 2nd, 3rd: ignored
        server._proc.send_signal(stop_signal)
        time.sleep(0.5)
    left = wait_gone(started + [server.pid], 15.)
    seconds = time.monotonic() - start
    server.stop()
    kill_all(wait_gone(started, 0.))  # orphans, if the stop failed: by PID, not by tree
    assert not left, f"still running {seconds:.1f} s after SIGTERM: " + "; ".join(
        f"{pid} {' '.join(cmdline(pid))[:80]}" for pid in left)
    assert server._proc.returncode == 0


def test_health_tells_liveness_from_readiness(tmp_path):
    """Started without the model (as on a cluster): alive, not ready, 503 for work; the model
    put in place later is picked up without a restart."""
    repo = tmp_path / "models"
    repo.mkdir()
    port = free_port()
    config = write_config(tmp_path / "serve_config.yaml", port=port, host="127.0.0.1",
                          args={"require_model": False})
    server = ServeProcess(config, port, {"SERVE_GRAPH_MODEL_REPO": str(repo)},
                          tmp_path / "serve.log", ready_path="/")  # it is not ready: no model
    url = server.url
    try:
        health = requests.get(url + "/", timeout=30).json()
        assert health["status"] == "unavailable"
        assert health["models"]["htdemucs"]["state"] == "missing"
        assert str(repo) in health["models"]["htdemucs"]["detail"]
        assert requests.get(url + "/healthz", timeout=30).status_code == 200
        ready = requests.get(url + "/readyz", timeout=30)
        assert ready.status_code == 503 and ready.json()["error"] == "not_ready"
        song = encode(tone(1.5, 44100, 2), 44100, "wav16")
        refused = requests.post(url + "/separate", files={"audio_file": ("a.wav", song)},
                                timeout=60)
        assert refused.status_code == 503, refused.text
        assert refused.json()["error"] == "model_unavailable"
        assert "htdemucs.yaml" in refused.json()["detail"]

        make_random_repo(repo, "htdemucs", size="tiny")
        ready = requests.get(url + "/readyz", timeout=60)
        assert ready.status_code == 200 and ready.json()["status"] == "ready"
        assert requests.get(url + "/", timeout=30).json()["status"] == "ok"
        stems = requests.post(url + "/separate", files={"audio_file": ("a.wav", song)},
                              data={"mp3": "false"}, timeout=120)
        assert stems.status_code == 200, stems.text
        assert len(zipfile.ZipFile(io.BytesIO(stems.content)).namelist()) == 4
    finally:
        server.kill()


def test_the_launcher_without_the_model_exits_before_starting_ray(tmp_path):
    config = write_config(tmp_path / "serve_config.yaml", port=free_port(), host="127.0.0.1")
    missing = str(tmp_path / "absent")
    code, output, seconds, seen = run_watching(
        [sys.executable, "-m", "serve_graph.serve_run", str(config)], tmp_path,
        {"SERVE_GRAPH_MODEL_REPO": missing})
    assert code == 2 and seconds < 30, output
    assert_clear_message(output, missing)
    assert not any("raylet" in " ".join(cmdline(pid)) for pid in seen if alive(pid))


# the launcher with its port check passed (as when the port is taken between that check and
# the proxy's bind): Serve's proxy then fails to bind once the application is up
PORT_TAKEN_LATE = """import sys
from serve_graph import preflight, serve_run
preflight.port_message = lambda http_options: None
sys.exit(serve_run.main(sys.argv[1:]))
"""


def test_a_proxy_that_cannot_bind_after_the_check_ends_the_launcher_naming_why(tmp_path,
                                                                                 tiny_repo):
    """The port taken after the launcher's own check: the application starts, Serve's proxy
    cannot bind, and the launcher says so, exits 1 and leaves no process behind."""
    import socket
    taken = socket.socket()
    taken.bind(("127.0.0.1", free_port()))
    taken.listen()
    port = taken.getsockname()[1]
    config = write_config(tmp_path / "serve_config.yaml", port=port, host="127.0.0.1")
    try:
        code, output, seconds, seen = run_watching(
            [sys.executable, "-c", PORT_TAKEN_LATE, str(config)], tmp_path,
            {"SERVE_GRAPH_MODEL_REPO": str(tiny_repo)}, timeout=120)
    finally:
        taken.close()
    assert code == 1, output[-3000:]
    assert ("Deploying app 'separation' failed with exception:\nthe HTTP proxy did not start: "
            f"RuntimeError: Failed to bind to address '127.0.0.1:{port}'") in output, output[-3000:]
    assert_all_gone(seen)


def test_the_launcher_with_its_port_taken_exits_at_once_naming_it(tmp_path, tiny_repo):
    """Another server on the config's HTTP port: one message naming the address, exit 2,
    before Ray starts (Serve's proxy binds beside the replicas starting, so it would find out
    only once everything else had started)."""
    import socket
    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen()
    port = taken.getsockname()[1]
    config = write_config(tmp_path / "serve_config.yaml", port=port, host="127.0.0.1")
    try:
        code, output, seconds, seen = run_watching(
            [sys.executable, "-m", "serve_graph.serve_run", str(config)], tmp_path,
            {"SERVE_GRAPH_MODEL_REPO": str(tiny_repo)}, timeout=60)
    finally:
        taken.close()
    assert code == 2 and seconds < 30, output
    assert f"error: the service cannot listen on 127.0.0.1:{port}: Address already in use" in (
        output), output
    assert "Traceback" not in output
    assert not any("raylet" in " ".join(cmdline(pid)) for pid in seen)
