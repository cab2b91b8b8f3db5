"""The fit on a real Dask cluster (``LocalCluster``, 2 worker processes, never a mock) equals the local fit.

Tolerance: none. The cluster runs the same work units (the same rows, read by the workers from the input file),
each with the same code and BLAS on one thread, and the client adds their statistics in unit order, so the
distributed model equals the local one to the bit (W, every V/A/B, the objective). A worker killed mid-fit is
replaced and its units rerun: still the same model.
"""

import copy
import os
import shutil
import signal
import subprocess
import sys
import time

import h5py
import numpy as np
import pytest
from click.testing import CliRunner

from onlinemf import _keys
from onlinemf._errors import InputError
from onlinemf.engine import OnlineINMF
from onlinemf.preprocess import prepare
from onlinemf.readers import open_sources

distributed = pytest.importorskip("distributed")
psutil = pytest.importorskip("psutil")  # a dependency of distributed

PARAMS = {"n_components": 6, "batch_size": 400, "max_epochs": 2, "random_state": 3, "n_threads": 1}
FIT_ARGS = ["--k", "6", "--epochs", "2", "--batch-size", "400", "--seed", "3", "--n-genes", "300", "--batch-key",
            "batch", "--no-umap", "--no-cluster", "--quiet"]


@pytest.fixture(scope="module")
def client():
    with distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None) as cluster, \
            distributed.Client(cluster) as c:
        yield c


@pytest.fixture(scope="module")
def demo(demo_data, tmp_path_factory):
    """The 3,000-cell demo, split by batch, prepared on 300 genes (memory cache, as the pipeline does locally)."""
    path = tmp_path_factory.mktemp("dask") / "demo.h5ad"
    shutil.copy(demo_data / "pbmc_demo.h5ad", path)
    sources = open_sources([path], batch_key="batch")
    prepared = prepare(sources, n_genes=300, cache="memory")
    yield path, prepared
    for s in [*prepared.sources, *sources]:
        s.close()


def assert_same_model(a: OnlineINMF, b: OnlineINMF) -> None:
    np.testing.assert_array_equal(a.W_, b.W_)
    assert a.dataset_names_ == b.dataset_names_
    for name in a.dataset_names_:
        for key in ("V_", "A_", "B_", "A_old_", "B_old_"):
            np.testing.assert_array_equal(getattr(a, key)[name], getattr(b, key)[name], err_msg=f"{key}[{name}]")
    assert a.objective_ == b.objective_
    assert a.n_steps_ == b.n_steps_


def test_distributed_fit_equals_local_fit(client, demo):
    _, prepared = demo
    local = OnlineINMF(**PARAMS).fit(prepared.sources)
    remote = OnlineINMF(**PARAMS).fit(prepared.sources, client=client)
    assert local.n_steps_ > 10
    assert_same_model(local, remote)


def test_distributed_update_equals_local_update(client, demo):
    _, prepared = demo
    first, second = prepared.sources
    base = OnlineINMF(**PARAMS).fit([first])
    state = base._state()
    local = OnlineINMF._from_state(copy.deepcopy(state)).update([second])  # updates work in place
    remote = OnlineINMF._from_state(copy.deepcopy(state)).update([second], client=client)
    assert_same_model(local, remote)


def test_killed_worker_mid_fit_gives_the_same_model(client, demo):
    _, prepared = demo
    local = OnlineINMF(**PARAMS).fit(prepared.sources)
    pids = client.run(os.getpid)
    killed = []

    def kill_one(est, position):
        if position["done"] == 3 and not killed:
            victim = next(iter(pids.values()))
            os.kill(victim, signal.SIGKILL)
            killed.append(victim)

    remote = OnlineINMF(**PARAMS).fit(prepared.sources, client=client, callback=kill_one)
    assert killed
    assert_same_model(local, remote)
    client.wait_for_workers(2, timeout=120)  # the nanny restarts it; leave the cluster as found


def test_input_missing_on_the_workers_names_worker_and_path(client, demo_data, tmp_path):
    path = tmp_path / "gone.h5ad"
    shutil.copy(demo_data / "pbmc_demo.h5ad", path)
    sources = open_sources([path], batch_key="batch")
    try:
        prepared = prepare(sources, n_genes=300)
        path.unlink()  # this process keeps its open handle; the workers cannot open the file any more
        with pytest.raises(InputError, match=r"worker tcp://.* cannot see the input .*gone\.h5ad"):
            OnlineINMF(**PARAMS).fit(prepared.sources, client=client)
    finally:
        for s in sources:
            s.close()


def test_in_memory_data_is_refused_with_a_client(client):
    X = np.random.default_rng(0).random((50, 20)).astype(np.float32)
    with pytest.raises(InputError, match="files the workers can reach.*MemorySource"):
        OnlineINMF(n_components=3, batch_size=20, max_epochs=1).fit(X, client=client)


def test_not_a_client_is_refused(demo):
    _, prepared = demo
    with pytest.raises(InputError, match="expected a dask.distributed.Client"):
        OnlineINMF(**PARAMS).fit(prepared.sources, client="tcp://127.0.0.1:8786")


def model_arrays(path) -> dict:
    out = {}
    with h5py.File(path, "r") as f:
        f.visititems(lambda name, obj: out.__setitem__(name, obj[()]) if isinstance(obj, h5py.Dataset) else None)
    return out


def assert_same_h(local_results, remote_results) -> None:
    with h5py.File(local_results, "r") as a, h5py.File(remote_results, "r") as b:
        for key in (_keys.OBSM_H, _keys.OBSM_H_NORM):
            np.testing.assert_array_equal(a["obsm"][key][()], b["obsm"][key][()], err_msg=key)


def test_project_on_the_cluster_equals_local(client, demo, tmp_path):
    from onlinemf import pipelines

    path, _ = demo
    common = {"outputs": pipelines.OutputOptions(cluster=False, umap=False)}
    pipelines.fit([path], model=tmp_path / "m.h5", reading=pipelines.InputOptions(batch_key="batch"),
                  params=pipelines.ModelParams(k=6, epochs=1, batch_size=400, seed=3),
                  selection=pipelines.GeneSelection(n_genes=300), **common)
    pipelines.project(tmp_path / "m.h5", [path], output=tmp_path / "pl.h5ad", **common)
    pipelines.project(tmp_path / "m.h5", [path], output=tmp_path / "pd.h5ad", client=client, **common)
    assert_same_h(tmp_path / "pl.h5ad", tmp_path / "pd.h5ad")


def descendants() -> set[int]:
    return {p.pid for p in psutil.Process().children(recursive=True)}


def test_cli_scheduler_local_equals_local_and_leaves_no_process(client, demo, tmp_path):
    from onlinemf.cli import main

    path, _ = demo
    before = descendants()  # the module's cluster
    runner = CliRunner()
    res = runner.invoke(main, ["fit", str(path), *FIT_ARGS, "-o", str(tmp_path / "d.h5ad"), "--model",
                               str(tmp_path / "d.h5"), "--scheduler", "local:2"])
    assert res.exit_code == 0, res.output
    res = runner.invoke(main, ["fit", str(path), *FIT_ARGS, "-o", str(tmp_path / "l.h5ad"), "--model",
                               str(tmp_path / "l.h5")])
    assert res.exit_code == 0, res.output
    local, remote = model_arrays(tmp_path / "l.h5"), model_arrays(tmp_path / "d.h5")
    assert sorted(local) == sorted(remote)
    for key in local:
        np.testing.assert_array_equal(local[key], remote[key], err_msg=key)
    assert_same_h(tmp_path / "l.h5ad", tmp_path / "d.h5ad")  # the final H pass ran on the cluster
    deadline = time.monotonic() + 30
    while (left := descendants() - before) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not left, f"processes left by --scheduler local:2: {left}"


def test_ctrl_c_closes_the_local_cluster(demo, tmp_path):
    path, _ = demo
    env = dict(os.environ, OMP_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    cmd = [sys.executable, "-m", "onlinemf.cli", "fit", str(path), "--k", "6", "--epochs", "200", "--batch-size",
           "100", "--n-genes", "300", "--batch-key", "batch", "--no-umap", "--no-cluster", "--quiet",
           "-o", str(tmp_path / "x.h5ad"), "--model", str(tmp_path / "x.h5"), "--scheduler", "local:2"]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    parent = psutil.Process(proc.pid)
    workers: set[int] = set()
    deadline = time.monotonic() + 180
    while len(workers) < 2:  # the two worker processes (spawned by the nannies; other helpers may exist)
        assert proc.poll() is None, proc.stderr.read()
        assert time.monotonic() < deadline, "the cluster's workers did not start"
        with_children = [p for p in parent.children(recursive=True) if p.is_running()]
        workers = {p.pid for p in with_children if "spawn" in " ".join(p.cmdline())}
        time.sleep(0.2)
    tree = {p.pid for p in parent.children(recursive=True)}
    time.sleep(1.0)  # let the run reach the cluster
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    deadline = time.monotonic() + 30
    alive = tree
    while alive and time.monotonic() < deadline:
        alive = {pid for pid in tree if psutil.pid_exists(pid) and psutil.Process(pid).status() != psutil.STATUS_ZOMBIE}
        time.sleep(0.2)
    assert not alive, f"orphan processes after Ctrl-C: {alive}"
    assert not (tmp_path / "x.h5").exists()


def test_scheduler_without_dask_says_how_to_install(monkeypatch, demo, tmp_path):
    from onlinemf.cli import main

    path, _ = demo
    monkeypatch.setitem(sys.modules, "distributed", None)  # as if the extra were not installed
    res = CliRunner().invoke(main, ["fit", str(path), *FIT_ARGS, "-o", str(tmp_path / "n.h5ad"), "--scheduler",
                                    "local:2"])
    assert res.exit_code == 1
    assert "pip install 'onlinemf[dask]'" in res.output
    assert not (tmp_path / "n.h5ad").exists()


@pytest.mark.parametrize(("value", "message"), [
    ("local:0", "expected local:N with N a positive number"),
    ("local:two", "expected local:N with N a positive number"),
    ("no-such-scheduler.json", "found no such file"),
])
def test_bad_scheduler_values(value, message, demo, tmp_path):
    from onlinemf.cli import main

    path, _ = demo
    res = CliRunner().invoke(main, ["fit", str(path), *FIT_ARGS, "-o", str(tmp_path / "n.h5ad"), "--scheduler", value])
    assert res.exit_code == 1
    assert message in res.output


@pytest.mark.parametrize("dataset", ["own factors", "projection on W"])
def test_h_pass_on_the_cluster_equals_the_local_pass(client, demo, dataset):
    from onlinemf._dask import transform_source

    _, prepared = demo
    est = OnlineINMF(**PARAMS).fit(prepared.sources)
    for source in prepared.sources:
        name = source.name if dataset == "own factors" else None
        H, loss = est.transform_source(source, dataset=name, block_size=1500, with_objective=name is not None)
        H_remote, loss_remote = transform_source(est, source, client, dataset=name, block_size=1500,
                                                 with_objective=name is not None)
        np.testing.assert_array_equal(H, H_remote)
        assert loss == loss_remote


def test_zarr_store_on_the_cluster_equals_h5ad_locally(client, demo, tmp_path):
    import warnings

    import anndata as ad

    from onlinemf.readers import open_zarr_sources

    path, prepared = demo
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ad.read_h5ad(path).write_zarr(tmp_path / "demo.zarr")
    zr = open_zarr_sources(tmp_path / "demo.zarr", batch_key="batch")
    pz = prepare(zr, genes=prepared.genes)
    local = OnlineINMF(**PARAMS).fit(prepared.sources)
    remote = OnlineINMF(**PARAMS).fit(pz.sources, client=client)
    assert_same_model(local, remote)


def assert_same_stats(local, remote) -> None:
    assert [s.name for s in local] == [s.name for s in remote]
    for a, b in zip(local, remote, strict=True):
        for key in ("lib_size", "gene_sum", "gene_sumsq", "gene_nnz", "var_names"):
            np.testing.assert_array_equal(getattr(a, key), getattr(b, key), err_msg=f"{a.name}: {key}")
        assert (a.n_cells, a.n_empty_cells) == (b.n_cells, b.n_empty_cells)


@pytest.mark.parametrize("batch_key", ["batch", None])
def test_statistics_pass_on_the_cluster_equals_the_local_pass(client, demo, batch_key):
    """Chunks of 700 cells: 5 for the whole file, or 5 blocks of the two interleaved batch splits' union."""
    from onlinemf._dask import stats_pass
    from onlinemf.preprocess import compute_stats_all

    path, _ = demo
    sources = open_sources([path], batch_key=batch_key)
    try:
        local = compute_stats_all(sources, block_size=700)
        seen: list[int] = []
        with distributed.get_task_stream(client) as stream:
            remote = stats_pass(client, sources, 700, seen.append)
        assert_same_stats(local, remote)
        assert sum(seen) == sum(s.n_cells for s in sources) and len(seen) == 5
        ran = [t for t in stream.data if t["key"].startswith("chunk_statistics")]
        assert len(ran) == 5 and {t["worker"] for t in ran} <= set(client.scheduler_info()["workers"])
        # and through prepare: the same genes and scale factors
        a = prepare(sources, n_genes=300, block_size=700)
        b = prepare(sources, n_genes=300, block_size=700, stats_pass=lambda *args: stats_pass(client, *args))
        np.testing.assert_array_equal(a.genes, b.genes)
        for name in a.scales:
            np.testing.assert_array_equal(a.scales[name], b.scales[name])
    finally:
        for s in sources:
            s.close()


def test_statistics_pass_input_missing_on_the_workers(client, demo_data, tmp_path):
    from onlinemf._dask import stats_pass

    path = tmp_path / "gone_stats.h5ad"
    shutil.copy(demo_data / "pbmc_demo.h5ad", path)
    sources = open_sources([path], batch_key="batch")
    try:
        path.unlink()
        with pytest.raises(InputError, match=r"worker tcp://.* cannot see the input .*gone_stats\.h5ad"):
            stats_pass(client, sources, 1000)
    finally:
        for s in sources:
            s.close()


def test_worker_memory_caches_stay_under_their_byte_cap(client, demo):
    """Eight prepared datasets (the demo's two batches on four gene sets), each cached on the workers on first use:
    with a cap of 1.5 datasets, each worker keeps at most that much, drops the rest to file reads, and the H pass
    and a fit still equal the local ones."""
    from onlinemf import _remote
    from onlinemf._dask import transform_source

    path, prepared = demo
    sources = open_sources([path], batch_key="batch")
    sets = [prepare(sources, n_genes=n, cache="memory") for n in (300, 250, 200, 150)]
    sizes = []
    for p in sets:
        for s in p.sources:
            s.build_cache()
            X = s._cache._X
            sizes.append(X.data.nbytes + X.indices.nbytes + X.indptr.nbytes)
    cap = int(1.5 * max(sizes))
    client.run(_remote.close_worker_sources)
    client.run(_remote.set_worker_cache_bytes, cap)
    try:
        est = OnlineINMF(**PARAMS).fit(prepared.sources)
        for p in sets:
            model = OnlineINMF(**{**PARAMS, "max_epochs": 1}).fit(p.sources)
            for s in p.sources:
                H, _ = model.transform_source(s, dataset=s.name, block_size=1500)
                np.testing.assert_array_equal(H, transform_source(model, s, client, dataset=s.name, block_size=1500)[0])
        held = client.run(_remote.worker_cache_bytes)
        assert all(b <= cap for b in held.values()) and sum(held.values()) > 0, (held, cap)
        assert sum(client.run(lambda: len(_remote._uncached)).values()) >= 8 - 2  # at most one per worker kept
        assert_same_model(est, OnlineINMF(**PARAMS).fit(prepared.sources, client=client))
        assert all(b <= cap for b in client.run(_remote.worker_cache_bytes).values())
        # without a cap the same datasets would hold several times as much
        assert sum(sizes) > 2 * cap
    finally:
        client.run(_remote.set_worker_cache_bytes, None)
        client.run(_remote.close_worker_sources)
        for p in sets:
            p.close()
        for s in sources:
            s.close()
