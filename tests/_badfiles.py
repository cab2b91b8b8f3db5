"""Makers of bad input files for the reliability tests (each returns the path it wrote).

Good files are small copies of the tiny Kang fixture (600 cells x 249 genes, ``obs['batch']`` ctrl/stim)
so that the same helpers serve inputs that must fail and inputs that must work.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import anndata as ad
import h5py
import numpy as np
import pandas as pd
import scipy.sparse as sp

REPO = Path(__file__).resolve().parents[1]
TINY = REPO / "data" / "kang_pbmc_rliger_tiny.h5ad"
FAST = ["--k", "6", "--epochs", "2", "--batch-size", "200", "--no-umap", "--no-cluster", "--quiet"]


def digest(path) -> str:
    """SHA-256 of a file's bytes."""
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def snapshot(folder) -> dict[str, str]:
    """Relative path -> SHA-256 of every file under ``folder`` ("dir" for folders; hidden temporaries included)."""
    folder = Path(folder)
    return {str(p.relative_to(folder)): digest(p) if p.is_file() else "dir" for p in sorted(folder.rglob("*"))}


def tiny(path) -> Path:
    """A writable copy of the tiny Kang file."""
    shutil.copyfile(TINY, path)
    Path(path).chmod(0o644)
    return Path(path)


def tiny_adata() -> ad.AnnData:
    adata = ad.read_h5ad(TINY)
    adata.X = sp.csr_matrix(adata.X, dtype=np.float32)
    return adata


def write_counts(path, X, *, var_names=None, batches=None, compression=None, **kwargs) -> Path:
    """An .h5ad of matrix ``X`` (cells x genes), genes ``g0..`` and two batches a/b by default."""
    n, m = X.shape
    obs = pd.DataFrame(index=[f"c{i}" for i in range(n)])
    obs["batch"] = pd.Categorical(batches if batches is not None else np.where(np.arange(n) % 2, "b", "a"))
    var = pd.DataFrame(index=var_names if var_names is not None else [f"g{j}" for j in range(m)])
    ad.AnnData(X=X, obs=obs, var=var, **kwargs).write_h5ad(path, compression=compression)
    return Path(path)


def with_x(path, change, *, dtype=np.float32, **kwargs) -> Path:
    """The tiny Kang data with ``X`` replaced by ``change(dense X as dtype)`` (CSR), written to ``path``."""
    adata = tiny_adata()
    dense = change(adata.X.toarray().astype(dtype))
    adata.X = sp.csr_matrix(dense)
    adata.write_h5ad(path, **kwargs)
    return Path(path)


def subset(path, cells=None, genes=None, *, var_names=None) -> Path:
    """Some cells/genes of the tiny Kang data (optionally renamed genes) as a new .h5ad."""
    adata = tiny_adata()
    adata = adata[cells if cells is not None else slice(None), genes if genes is not None else slice(None)].copy()
    if var_names is not None:
        adata.var_names = var_names
    adata.write_h5ad(path)
    return Path(path)


def text_file(path) -> Path:
    Path(path).write_text("cell,gene,count\nc1,CD3E,4\n")
    return Path(path)


def truncated(path) -> Path:
    """The first half of the tiny Kang file's bytes."""
    data = TINY.read_bytes()
    Path(path).write_bytes(data[: len(data) // 2])
    return Path(path)


def corrupted_middle(path) -> Path:
    """A gzip-chunked .h5ad whose middle chunk of ``X/data`` has garbage bytes: the file opens and its
    first cells read, a block in the middle fails to decompress."""
    adata = tiny_adata()
    adata.write_h5ad(path, compression="gzip")
    with h5py.File(path, "r") as h5:
        data = h5["X/data"]
        n_chunks = data.id.get_num_chunks()
        assert n_chunks >= 3, "need several chunks to corrupt one in the middle"
        info = data.id.get_chunk_info(n_chunks // 2)
    with open(path, "r+b") as fh:
        fh.seek(info.byte_offset + 4)
        fh.write(bytes(range(256))[: max(8, min(64, info.size - 8))])
    return Path(path)


def hdf5_not_anndata(path) -> Path:
    with h5py.File(path, "w") as h5:
        h5["matrix_of_something"] = np.arange(12).reshape(3, 4)
    return Path(path)


def without_x(path) -> Path:
    tiny(path)
    with h5py.File(path, "r+") as h5:
        del h5["X"]
    return Path(path)


def string_x(path) -> Path:
    """X/data replaced by a string dataset of the same length."""
    tiny(path)
    with h5py.File(path, "r+") as h5:
        n = h5["X/data"].shape[0]
        del h5["X/data"]
        h5["X/data"] = np.array([b"12"] * n)
    return Path(path)


def overflow_float32(path) -> Path:
    """float64 counts with one value of 1e39, which becomes inf when cast to float32."""
    def change(X):
        X[5, 3] = 1e39
        return X

    return with_x(path, change, dtype=np.float64)


def tenx_v2_two_genomes(path) -> Path:
    """A 10x v2 file with the same 4 cells under two genome groups."""
    rng = np.random.default_rng(0)
    with h5py.File(path, "w") as h5:
        for genome in ("hg19", "mm10"):
            X = sp.csc_matrix(rng.poisson(2.0, size=(30, 40)).astype(np.int32))  # genes x cells
            g = h5.create_group(genome)
            g["data"], g["indices"], g["indptr"] = X.data, X.indices, X.indptr
            g["shape"] = np.array(X.shape)
            g["barcodes"] = np.array([f"AC{i}".encode() for i in range(40)])
            g["gene_names"] = np.array([f"{genome}_g{j}".encode() for j in range(30)])
            g["genes"] = np.array([f"ENS{j}".encode() for j in range(30)])
    return Path(path)


# ----------------------------------------------------------------------------- model files
def edit_model(src, path, edit) -> Path:
    """A copy of model ``src`` with ``edit(h5py.File)`` applied."""
    shutil.copyfile(src, path)
    with h5py.File(path, "r+") as f:
        edit(f)
    return Path(path)


def set_attr(key, value):
    def edit(f):
        f.attrs[key] = value

    return edit


def replace_dataset(key, data=None, **kwargs):
    def edit(f):
        del f[key]
        f.create_dataset(key, data=data, **kwargs)

    return edit


def pickled_dataset(key):
    """Replace ``key`` with an opaque blob holding a pickle (as a careless writer would store an object)."""
    import pickle

    def edit(f):
        del f[key]
        f[key] = np.void(pickle.dumps({"W": [1, 2, 3]}))

    return edit


def object_dataset(key):
    """Replace ``key`` with a variable-length (object dtype) string dataset."""
    def edit(f):
        shape = f[key].shape
        del f[key]
        f.create_dataset(key, data=np.full(shape, "x", dtype=object), dtype=h5py.string_dtype())

    return edit


def params_json(src):
    with h5py.File(src, "r") as f:
        return json.loads(f.attrs["params"])
