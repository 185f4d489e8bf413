"""CPU settings chosen for the machine (serve_graph/engine/cpu_settings.py): the rules, the
forcing variable, the refusal of bf16 where the CPU lacks it, and the memory setting's real
effect on page faults in processes that run torch."""
import copy
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from audio_files import encode, tone
from serve_graph.__main__ import main as cli_main
from serve_graph.engine import cpu_settings
from serve_graph.engine.cpu_settings import (ENV, KEEP_TUNABLES, CpuSettings, Machine, choose,
                                             precision_problem)

AVX2_GLIBC = Machine(frozenset({"avx2", "fma"}), "glibc", "madvise", "madvise", 8)
AMX_MUSL = Machine(frozenset({"avx2", "avx512f", "avx512_bf16", "amx_tile", "amx_bf16"}), "",
                   "always", "defer", 4)


def test_rules_follow_the_machine_and_the_precision(monkeypatch):
    monkeypatch.delenv("OMP_WAIT_POLICY", raising=False)
    assert choose("fp32", AVX2_GLIBC, "auto") == CpuSettings(
        memory="keep", attention="sdpa", omp_wait="default", threads=8, source="auto")
    assert choose("bf16", AMX_MUSL, "") == CpuSettings(
        memory="default", attention="fast-path", omp_wait="default", threads=4, source="auto")
    monkeypatch.setenv("OMP_WAIT_POLICY", "PASSIVE")  # as a deployment's runtime_env sets it
    assert choose("fp32", AVX2_GLIBC, "auto").omp_wait == "passive"


def test_forcing_variable(monkeypatch):
    monkeypatch.delenv("OMP_WAIT_POLICY", raising=False)
    assert choose("fp32", AVX2_GLIBC, "off") == CpuSettings()  # PyTorch's defaults
    assert choose("fp32", AVX2_GLIBC, "0,threads=3") == CpuSettings(threads=3, source="forced")
    forced = choose("fp32", AVX2_GLIBC, "memory=huge-pages, omp_wait=passive")
    assert forced == CpuSettings(memory="huge-pages", attention="sdpa", omp_wait="passive",
                                 threads=8, source="forced")
    monkeypatch.setenv(ENV, "auto,attention=fast-path")
    assert choose("fp32", AVX2_GLIBC).attention == "fast-path"
    for bad, named in (("memory=lots", "memory must be one of"), ("speed=max", "NAME=VALUE"),
                       ("threads=two", "whole number"), ("threads=-1", ">= 0")):
        with pytest.raises(ValueError, match=named) as caught:
            choose("fp32", AVX2_GLIBC, bad)
        assert ENV in str(caught.value)


def test_process_env_merges_glibc_tunables(monkeypatch):
    monkeypatch.setenv("GLIBC_TUNABLES", "glibc.malloc.tcache_count=0:glibc.malloc.mmap_max=9")
    env = CpuSettings(memory="keep", omp_wait="passive").process_env()
    assert env == {"GLIBC_TUNABLES": ":".join(("glibc.malloc.tcache_count=0",) + KEEP_TUNABLES),
                   "OMP_WAIT_POLICY": "PASSIVE"}
    assert CpuSettings(memory="huge-pages").process_env() == {"THP_MEM_ALLOC_ENABLE": "1"}
    assert CpuSettings().process_env() == {}


def test_shipped_config_gives_separate_the_memory_tunables():
    config = yaml.safe_load((Path(__file__).parents[1] / "serve_config.yaml").read_text())
    separate = next(d for d in config["applications"][0]["deployments"]
                    if d["name"] == "Separate")
    env = separate["ray_actor_options"]["runtime_env"]["env_vars"]
    assert env["GLIBC_TUNABLES"] == ":".join(KEEP_TUNABLES)


def test_model_runner_takes_the_attention_path_chosen(tiny_model, monkeypatch):
    import torch as th
    from serve_graph.engine import ModelRunner
    for forced, fast_path in (("attention=fast-path", True), ("auto", False)):
        monkeypatch.setenv(ENV, forced)
        ModelRunner(copy.deepcopy(tiny_model), "cpu", "fp32")
        assert th.backends.mha.get_fastpath_enabled() is fast_path


def test_low_precision_needs_the_cpu_feature():
    problem = precision_problem("bf16", AVX2_GLIBC)
    assert "avx512_bf16" in problem and "AVX2" in problem and "fp32" in problem
    assert precision_problem("bf16", AMX_MUSL) is None
    assert "avx512_fp16" in precision_problem("fp16", AMX_MUSL)
    assert precision_problem("fp32", AVX2_GLIBC) is None


def test_service_start_checks_the_precision_where_the_model_runs_on_the_cpu(monkeypatch):
    from serve_graph.preflight import cpu_precision_problem
    monkeypatch.setattr(cpu_settings.Machine, "read", classmethod(lambda cls: AVX2_GLIBC))
    assert "avx512_bf16" in cpu_precision_problem("cpu", "bf16")
    assert cpu_precision_problem("cuda", "bf16") is None
    assert cpu_precision_problem("cpu", "fp32") is None


def test_this_machine_is_read():
    machine = Machine.read()
    assert machine.cores >= 1 and machine.kind
    assert machine.thp_enabled in ("always", "madvise", "never", "unknown")


def test_cli_refuses_bf16_on_a_cpu_without_it(tmp_path, tiny_repo, monkeypatch, capsys):
    monkeypatch.setattr(cpu_settings.Machine, "read", classmethod(lambda cls: AVX2_GLIBC))
    monkeypatch.setenv(ENV, "off")  # nothing process-wide is changed in this test process
    song = tmp_path / "song.wav"
    song.write_bytes(encode(tone(0.5, 44100, 2), 44100, "wav16"))
    code = cli_main(["separate", str(song), "--model-repo", str(tiny_repo), "--device", "cpu",
                     "--precision", "bf16", "--no-progress", "-o", str(tmp_path / "out.zip")])
    assert code == 2 and "avx512_bf16" in capsys.readouterr().err
    assert not (tmp_path / "out.zip").exists()


def test_cli_names_a_malformed_setting(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "serve_graph", "separate", str(tmp_path / "x"),
                           "--no-progress"], capture_output=True, text=True, timeout=60,
                          env=dict(os.environ, **{ENV: "memory=lots"}))
    assert proc.returncode == 2 and f"{ENV}: memory must be one of" in proc.stderr


# A forward-like loop, 16 times, on a thread (as in a Separate replica) or on the main thread
# (as in the CLI): 256 MiB of tensors made and freed; the page faults of the last 5 times,
# when glibc has settled where the blocks go.
FAULTS = """
import json, resource, sys, threading
from serve_graph.engine import cpu_settings
if sys.argv[1] == "prepare":
    cpu_settings.prepare_process(cpu_settings.CpuSettings(memory="keep"))
import torch
def faults():
    counts = []
    for _ in range(16):
        counts.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt)
        x = torch.ones(16 << 20)
        y = x * 2
        z = torch.cat([y, x])
        del x, y, z
    counts.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt)
    result.append(counts[-1] - counts[-6])
result = []
where = threading.Thread(target=faults) if sys.argv[2] == "thread" else None
where.start() if where else faults()
where.join() if where else None
print(json.dumps({"faults": result[0], "state": cpu_settings.memory_state()}))
"""


def test_kept_memory_is_not_page_faulted_again():
    keep_env = dict(os.environ, **CpuSettings(memory="keep").process_env())
    plain_env = {k: v for k, v in os.environ.items() if k not in ("GLIBC_TUNABLES",
                                                                  "THP_MEM_ALLOC_ENABLE")}
    runs = {"started with the tunables, thread": (keep_env, "none", "thread"),
            "prepare_process, main thread": (plain_env, "prepare", "main"),
            "PyTorch's default": (plain_env, "none", "main")}
    procs = {name: subprocess.Popen([sys.executable, "-c", FAULTS, how, where], env=env,
                                    stdout=subprocess.PIPE, text=True)
             for name, (env, how, where) in runs.items()}
    results = {name: json.loads(proc.communicate(timeout=120)[0]) for name, proc in procs.items()}
    pages = 5 * (256 << 20) // 4096  # five times 256 MiB of fresh 4 KiB pages
    assert results["started with the tunables, thread"]["state"] == "kept from the process start"
    assert results["prepare_process, main thread"]["state"] == "kept on the main thread"
    for name in ("started with the tunables, thread", "prepare_process, main thread"):
        assert results[name]["faults"] < pages / 4, results
    if Machine.read().thp_enabled != "always":  # with THP everywhere there are few to save
        assert results["PyTorch's default"]["faults"] > pages / 2, results
