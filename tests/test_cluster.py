"""Past one machine: a Ray cluster of two nodes (ray.cluster_utils.Cluster, both on this machine)
renders into an S3 server on loopback, with actors on both nodes, and writes the dataset one
process writes. Nothing may assume the driver's disk is the workers': OUT is on S3 only."""

from __future__ import annotations

import json
import logging
import os

import pytest
from conftest import run_cli, small_recipe, write_recipe

from synthgen.output.outdir import COMMITS, PACKS
from synthgen.recipe.schema import load_recipe
from synthgen.run.generate import generate
from synthgen.run.launch import Execution

ray = pytest.importorskip("ray")
from ray.cluster_utils import Cluster  # noqa: E402


def files(fs, root: str) -> dict[str, bytes]:
    """Every file under an S3 prefix but the bookkeeping, by path relative to it."""
    found = {}
    for path in fs.find(root):
        relative = path.removeprefix(root.rstrip("/") + "/")
        if not relative.startswith(".synthgen/"):
            found[relative] = fs.cat_file(path)
    return found


@pytest.mark.slow
def test_two_node_ray_cluster_writes_the_one_process_dataset_to_s3(
    tmp_path, s3_server, monkeypatch, caplog
):
    fs, env = s3_server
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION",
                 "AWS_ENDPOINT_URL", "NO_PROXY"):  # fmt: skip
        monkeypatch.setenv(name, env[name])  # the raylets (and so the actors) inherit them
    recipe = write_recipe(tmp_path / "r.yaml", small_recipe(num_samples=12, shard_size=3))
    run_cli("generate", str(recipe), "-o", "s3://bucket/one", "--device", "cpu", env=env)
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1})
    cluster.add_node(num_cpus=1)
    try:
        ray.init(address=cluster.address, log_to_driver=False)
        execution = Execution(devices=("cpu", "cpu"), executor="ray", ray_address=cluster.address)
        with caplog.at_level(logging.INFO, logger="synthgen"):
            result = generate(load_recipe(recipe), "s3://bucket/cluster", execution)
        nodes = {
            r.getMessage().rsplit(" ", 1)[1]
            for r in caplog.records
            if "on Ray node" in r.getMessage()
        }
        assert len(ray.nodes()) == 2
    finally:
        ray.shutdown()
        cluster.shutdown()
    assert result.finalized and not result.failed and result.rendered == 12
    assert len(nodes) == 2, nodes  # one actor per node, each rendered shards
    one, many = files(fs, "bucket/one"), files(fs, "bucket/cluster")
    assert sorted(one) == sorted(many)
    for path in one:  # the manifest and card too: they record nothing of where shards ran
        assert one[path] == many[path], path
    assert not os.path.exists(tmp_path / "s3:")  # nothing went to a local path named like OUT
    packs = [json.loads(fs.cat_file(p))["records"] for p in fs.find(f"bucket/cluster/{PACKS}")]
    assert len(packs) == 2  # each actor packs the records it committed when it is closed
    committed = {
        p.rsplit("/", 1)[1].removesuffix(".json") for p in fs.ls(f"bucket/cluster/{COMMITS}")
    }
    assert sorted(name for pack in packs for name in pack) == sorted(committed)
