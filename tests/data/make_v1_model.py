# Written with the code of commit 5c5471e (before UINMF): a v1 model and the data it was fitted on.
import numpy as np, scipy.sparse as sp
from onlinemf.engine import OnlineINMF
from onlinemf.model_io import save_model
from onlinemf.readers import MemorySource
rng = np.random.default_rng(14)
Xs = {}
for i, n in enumerate((120, 90)):
    H = rng.gamma(1.0, 1.0, size=(n, 3)); W = rng.gamma(1.0, 1.0, size=(3, 30))
    Xs[f"d{i}"] = rng.poisson(H @ W * (1 + 0.3 * i)).astype(np.float32)
np.savez_compressed("tests/data/v1_model_data.npz", **Xs)
genes = [f"g{j}" for j in range(30)]
src = [MemorySource(sp.csr_matrix(X), name=n, var_names=genes) for n, X in Xs.items()]
est = OnlineINMF(3, batch_size=50, max_epochs=3, chunk_size=20, random_state=5, n_threads=1).fit(src)
save_model("tests/data/v1_model.h5", est, scaling={"d0": np.arange(30.0)}, info={"fixture": "v1"})
print(est.W_.sum(), est.n_steps_)
