"""``-o NAME.zarr`` writes the results as an AnnData zarr store, the same content as the ``.h5ad`` results, and a
``.zarr`` output never replaces a folder that is not an earlier results store."""

from __future__ import annotations

import os
from pathlib import Path

import anndata as ad
import numpy as np
import pytest
from click.testing import CliRunner
from onlinemf.cli import main

from onlinemf import InputError
from onlinemf._files import (
    atomic_output_dir,
    check_output_path,
    remove_stale_temporaries,
    temporary_prefix,
)

REPO = Path(__file__).resolve().parents[1]
TINY = REPO / "data" / "kang_pbmc_rliger_tiny.h5ad"
FAST = ["--k", "4", "--epochs", "1", "--batch-size", "200", "--no-umap", "--no-cluster", "--quiet", "--seed", "3"]


def _fit(tmp_path: Path, output: Path, *extra: str):
    result = CliRunner().invoke(main, ["fit", str(TINY), "-o", str(output), "--model", str(tmp_path / "m.h5"),
                                       *FAST, *extra], catch_exceptions=False)
    return result


def _assert_same_uns(a, b):
    assert set(a) == set(b)
    for key, value in a.items():
        if isinstance(value, dict):
            _assert_same_uns(value, b[key])
        elif isinstance(value, np.ndarray) and value.dtype.kind in "fiub":
            np.testing.assert_array_equal(value, b[key])
        else:
            assert np.all(np.asarray(value) == np.asarray(b[key])), key


def test_fit_writes_zarr_with_the_h5ad_content(tmp_path):
    assert _fit(tmp_path, tmp_path / "res.h5ad").exit_code == 0
    result = _fit(tmp_path, tmp_path / "res.zarr")
    assert result.exit_code == 0, result.output
    h5, zr = ad.read_h5ad(tmp_path / "res.h5ad"), ad.read_zarr(tmp_path / "res.zarr")
    assert list(zr.obs_names) == list(h5.obs_names) and list(zr.var_names) == list(h5.var_names)
    assert set(zr.obsm) == set(h5.obsm) and set(zr.varm) == set(h5.varm)
    for key in h5.obsm:
        np.testing.assert_array_equal(zr.obsm[key], h5.obsm[key])
    for key in h5.varm:
        np.testing.assert_array_equal(zr.varm[key], h5.varm[key])
    timings = ("timings", "seconds")
    _assert_same_uns({k: v for k, v in h5.uns["inmf"].items() if k not in timings},
                     {k: v for k, v in zr.uns["inmf"].items() if k not in timings})
    # A rerun replaces the earlier store whole, and leaves no temporary behind.
    assert _fit(tmp_path, tmp_path / "res.zarr").exit_code == 0
    assert ad.read_zarr(tmp_path / "res.zarr").n_obs == h5.n_obs
    assert not [p for p in os.listdir(tmp_path) if p.endswith(".tmp")]


def test_copy_x_into_zarr(tmp_path):
    result = _fit(tmp_path, tmp_path / "res.zarr", "--copy-x")
    assert result.exit_code == 0, result.output
    got, src = ad.read_zarr(tmp_path / "res.zarr"), ad.read_h5ad(TINY)
    assert (got.X != src.X).nnz == 0 and got.X.shape == src.X.shape


def test_zarr_output_refuses_a_folder_of_the_users(tmp_path):
    folder = tmp_path / "mine.zarr"
    folder.mkdir()
    (folder / "notes.txt").write_text("keep me")
    result = CliRunner().invoke(main, ["fit", str(TINY), "-o", str(folder), "--model", str(tmp_path / "m.h5"), *FAST])
    assert result.exit_code != 0 and "not an earlier onlinemf results store" in result.output
    assert (folder / "notes.txt").read_text() == "keep me"
    (tmp_path / "file.zarr").write_text("x")
    with pytest.raises(InputError, match="found a file"):
        check_output_path(tmp_path / "file.zarr")
    (tmp_path / "empty.zarr").mkdir()
    check_output_path(tmp_path / "empty.zarr")
    with pytest.raises(InputError, match="found a folder"):
        check_output_path(tmp_path)


def test_atomic_output_dir_failure_and_stale_temporaries(tmp_path):
    target = tmp_path / "out.zarr"
    with pytest.raises(RuntimeError), atomic_output_dir(target) as tmp:
        (tmp / "part").write_text("half")
        raise RuntimeError
    assert not target.exists() and os.listdir(tmp_path) == []
    stale = tmp_path / f"{temporary_prefix(target).replace(str(os.getpid()), '999999999')}abcd.tmp"
    (stale / "sub").mkdir(parents=True)
    assert remove_stale_temporaries(target) == [stale] and not stale.exists()
