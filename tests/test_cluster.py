"""The graph on a real multi-node Ray cluster: three Ray nodes on this machine (a head with the
Ingress and Serve's proxy, a "codec" node with Decode and Encode, a "model" node with Separate),
placed through serve_config.yaml's `resources`, a song separated over HTTP, and Ray's own
accounting showing where the audio went; and the batch command joined to the same cluster, its
model actor and decode tasks placed by the nodes' resources.


The audio's path is read from each node's object store (`GetNodeStats` of its raylet: bytes
created in that store, including copies pulled from other nodes) and the placement from Ray's
state API (`list_actors`). Every Ray process here is started by `ray.cluster_utils.Cluster`
and stopped by it.
"""
import io
import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest
import requests

from audio_files import encode, tone
from serve_process import UNCACHED, ServeProcess, free_port

pytestmark = pytest.mark.serve

NODES = {"head": {"num_cpus": 2, "resources": {"ingress_node": 1}},
         "codec": {"num_cpus": 2, "resources": {"codec_node": 1}},
         "model": {"num_cpus": 2, "resources": {"model_node": 1}}}
PLACEMENT = {"Ingress": "ingress_node", "Decode": "codec_node", "Encode": "codec_node",
             "Separate": "model_node"}  # deployment: the custom resource of its node
SONG_SECONDS = 12.


@pytest.fixture(scope="module")
def cluster():
    """Three Ray nodes on 127.0.0.1, stopped (every process) when the module is done."""
    from ray.cluster_utils import Cluster
    from serve_graph.launch import LOOPBACK_RAY
    with pytest.MonkeyPatch.context() as patch:
        for name, value in LOOPBACK_RAY.items():  # Ray's servers on 127.0.0.1 only
            patch.setenv(name, value)
        ray_cluster = Cluster(initialize_head=True, head_node_args={
            **NODES["head"], "node_ip_address": "127.0.0.1", "include_dashboard": True})
        try:
            for name in ("codec", "model"):
                ray_cluster.add_node(**NODES[name], node_ip_address="127.0.0.1")
            ray_cluster.wait_for_nodes()
            yield ray_cluster
        finally:
            ray_cluster.shutdown()


# Run as a separate Ray driver (a fresh process with Ray kept on loopback): prints, as JSON,
# which node each Serve replica is on (state API) and the bytes created so far in each node's
# object store (its own objects and the copies pulled from other nodes), by node resource.
PROBE = r"""
import json, sys, ray
from ray._private.internal_api import node_stats
from ray.util.state import list_actors
ray.init(address=sys.argv[1], logging_level="warning")
nodes = [node for node in ray.nodes() if node["Alive"]]
name = {node["NodeID"]: next(key for key in node["Resources"] if key.endswith("_node"))
        for node in nodes}
replicas = list_actors(detail=True, filters=[("state", "=", "ALIVE")])
placed = {}
for actor in replicas:
    if actor.class_name.startswith("ServeReplica:separation:"):
        placed.setdefault(actor.class_name.rsplit(":", 1)[1], []).append(name[actor.node_id])
created = {name[node["NodeID"]]: node_stats(node["NodeManagerAddress"], node["NodeManagerPort"],
                                            include_memory_info=False
                                            ).store_stats.cumulative_created_bytes
           for node in nodes}
print(json.dumps({"placed": placed, "created": created}))
"""


def probe(address: str) -> dict:
    from serve_graph.launch import LOOPBACK_RAY
    done = subprocess.run([sys.executable, "-c", PROBE, address], capture_output=True,
                          text=True, timeout=120, env={**os.environ, **LOOPBACK_RAY})
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def serve_on(cluster, tiny_repo, folder, args: dict, deployments: dict) -> ServeProcess:
    """serve_config.yaml with `args` and `deployments` overridden, deployed on `cluster`.
    On a cluster the replicas get the raylets' environment, not `serve run`'s: the model repo
    goes in the config."""
    from serve_graph.launch import LOOPBACK_RAY, launch, write_config
    port = free_port()
    config = write_config(folder / "serve_config.yaml", port=port, host="127.0.0.1",
                          args={"cluster": True, "model_repo": str(tiny_repo), **UNCACHED,
                                **args},
                          deployments=deployments)
    env = {**LOOPBACK_RAY, "RAY_ADDRESS": cluster.address}
    return ServeProcess(config, port, env, folder / "serve.log", start=launch)


@pytest.fixture
def service(cluster, tiny_repo, tmp_path):
    placed = {name: {"ray_actor_options": {"resources": {resource: 0.1}}}
              for name, resource in PLACEMENT.items()}
    server = serve_on(cluster, tiny_repo, tmp_path, {}, placed)
    yield server
    server.stop()


def test_song_crosses_nodes_through_the_object_store_not_the_ingress(cluster, service):
    before = probe(cluster.address)
    # each replica on the node serve_config.yaml names
    assert before["placed"] == {name: [node] for name, node in PLACEMENT.items()}
    song = encode(tone(SONG_SECONDS, 44100, 2), 44100, "mp3")
    response = requests.post(service.url + "/separate", files={"audio_file": ("song.mp3", song)},
                             data={"mp3_bitrate": "128"}, timeout=300)
    assert response.status_code == 200, response.text
    stems = zipfile.ZipFile(io.BytesIO(response.content)).namelist()
    assert stems == ["drums.mp3", "bass.mp3", "other.mp3", "vocals.mp3"]
    after = probe(cluster.address)
    grown = {node: after["created"][node] - before["created"][node] for node in after["created"]}
    mix_bytes = SONG_SECONDS * 44100 * 2 * np.float32().nbytes  # [C, T] float32
    # Decode's mix and, pulled from the model node, 4 stems of every window: >= 5 mixes
    assert grown["codec_node"] >= 5 * mix_bytes, grown
    # the mix pulled from the codec node and the window outputs made here: >= 5 mixes
    assert grown["model_node"] >= 5 * mix_bytes, grown
    # the Ingress's node only ever held the MP3 upload and the ZIP (twice: Encode -> Ingress,
    # Ingress -> HTTP proxy), never decoded audio
    carried = len(song) + 2 * len(response.content) + 2**20
    assert carried < mix_bytes  # so the check below can tell
    assert grown["ingress_node"] < carried, grown


def test_placement_spreads_the_graph_over_every_node(cluster, tiny_repo, tmp_path):
    """`serve_graph.placement` (what the Modal cluster and KubeRay deploy) on three equal
    nodes: a Separate, a Decode and an Encode replica on each node, and a song separated."""
    from serve_graph.placement import NodeShape, application_args, deployment_overrides
    shape = NodeShape(gpus=0, cpus=2, nodes=len(NODES))
    server = serve_on(cluster, tiny_repo, tmp_path, application_args(shape),
                      deployment_overrides(shape))
    try:
        placed = probe(cluster.address)["placed"]
        every_node = sorted(next(iter(node["resources"])) for node in NODES.values())
        for name in ("Separate", "Decode", "Encode"):
            assert sorted(placed[name]) == every_node, (name, placed)
        song = encode(tone(4., 44100, 2), 44100, "wav16")
        response = requests.post(server.url + "/separate", data={"two_stems": "vocals"},
                                 files={"audio_file": ("song.wav", song)}, timeout=300)
        assert response.status_code == 200, response.text
    finally:
        server.stop()


def test_modal_cluster_head_waits_for_every_node(cluster):
    """The Modal cluster's head (`modal_deploy.app.wait_for_nodes`, run before it deploys the
    graph) against this real cluster: it returns once the nodes are there and says how many
    joined when they are not."""
    from serve_graph.launch import LOOPBACK_RAY
    script = ("import sys; from modal_deploy.app import wait_for_nodes; "
              "wait_for_nodes(sys.argv[1], int(sys.argv[2]), timeout=float(sys.argv[3]))")
    env = {**os.environ, **LOOPBACK_RAY, "MODAL_CONFIG_PATH": os.devnull}
    for nodes, timeout, code in ((len(NODES), 60, 0), (len(NODES) + 1, 3, 1)):
        done = subprocess.run([sys.executable, "-c", script, cluster.address, str(nodes),
                               str(timeout)], capture_output=True, text=True, timeout=120,
                              env=env, cwd=Path(__file__).resolve().parents[1])
        assert done.returncode == code, done.stderr[-2000:]
    assert f"only {len(NODES)} of {len(NODES) + 1} nodes joined" in done.stderr


# Run as a Ray driver after a batch: which node each of its model actors and decode tasks ran
# on (the state API keeps finished tasks and dead actors), by node resource.
BATCH_PROBE = r"""
import json, sys, ray
from ray.util.state import list_actors, list_tasks
ray.init(address=sys.argv[1], logging_level="warning")
name = {node["NodeID"]: next(key for key in node["Resources"] if key.endswith("_node"))
        for node in ray.nodes() if node["Alive"]}
actors = sorted({name[actor.node_id] for actor in list_actors(detail=True, limit=10000)
                 if "SeparateSongs" in actor.class_name})
decoders = sorted({name[task.node_id] for task in list_tasks(detail=True, limit=10000)
                   if "decode_song" in task.name and task.node_id})
print(json.dumps({"actors": actors, "decoders": decoders}))
"""


def test_a_batch_runs_its_model_on_one_node_and_decodes_on_another(cluster, tiny_repo,
                                                                     tmp_path):
    """`python -m serve_graph batch` joined to the cluster (RAY_ADDRESS, as `ray job submit`
    runs it): the model actor on the model node, decoding on the codec node, every song done,
    and an unknown resource refused before anything runs."""
    from serve_graph.launch import LOOPBACK_RAY
    songs = tmp_path / "songs"
    songs.mkdir()
    for index in range(4):
        (songs / f"song{index}.mp3").write_bytes(encode(tone(4., 44100, 2, seed=index), 44100,
                                                        "mp3"))
    env = {**os.environ, **LOOPBACK_RAY, "RAY_ADDRESS": cluster.address}
    command = [sys.executable, "-m", "serve_graph", "batch", str(songs), str(tmp_path / "out"),
               "--model-repo", str(tiny_repo), "--format", "flac", "--songs-per-call", "2",
               "--actor-resource", "model_node"]
    done = subprocess.run(command + ["--decode-resource", "codec_node"], capture_output=True,
                          text=True, timeout=300, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "4 separated, 0 failed" in done.stderr
    assert all(len(list((tmp_path / "out" / f"song{index}").iterdir())) == 4
               for index in range(4))
    probed = subprocess.run([sys.executable, "-c", BATCH_PROBE, cluster.address],
                            capture_output=True, text=True, timeout=120, env=env)
    assert probed.returncode == 0, probed.stderr[-3000:]
    placed = json.loads(probed.stdout.strip().splitlines()[-1])
    assert placed == {"actors": ["model_node"], "decoders": ["codec_node"]}, placed

    command[5] = str(tmp_path / "elsewhere")  # an OUTPUT with every song still to run
    refused = subprocess.run(command + ["--decode-resource", "gpu_node"], capture_output=True,
                             text=True, timeout=300, env=env)
    assert refused.returncode == 2 and "no node of this Ray cluster has the resource 'gpu_node'" \
        in refused.stderr, refused.stderr[-3000:]


# Run as a Ray driver: a result cache entry in a folder every node sees (one machine), removed
# by `remove_everywhere`, as the job store does for a deleted job; what each node's task found.
REMOVAL = r"""
import json, sys, ray
from serve_graph.result_cache import ResultCache, remove_everywhere
ray.init(address=sys.argv[1], logging_level="warning")
cache, key = ResultCache(sys.argv[2], 2**20), "cd" * 32
cache.put(key, b"zip", {})
found = ray.get(remove_everywhere(sys.argv[2], key), timeout=60)
print(json.dumps({"found": sorted(found), "cached": cache.get(key) is not None}))
"""


def test_a_deleted_jobs_cache_entry_is_removed_on_every_node(cluster, tmp_path):
    """Each node keeps its own result cache, so a deleted job's entry is removed by a task on
    each live node: three tasks here; the folder is the same on these three nodes of one
    machine, so one of them found the entry."""
    from serve_graph.launch import LOOPBACK_RAY
    done = subprocess.run([sys.executable, "-c", REMOVAL, cluster.address, str(tmp_path)],
                          capture_output=True, text=True, timeout=120,
                          env={**os.environ, **LOOPBACK_RAY},
                          cwd=Path(__file__).resolve().parents[1])
    assert done.returncode == 0, done.stderr[-3000:]
    assert json.loads(done.stdout.strip().splitlines()[-1]) == {
        "found": [False] * (len(NODES) - 1) + [True], "cached": False}
