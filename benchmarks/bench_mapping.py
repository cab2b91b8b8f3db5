"""Reference mapping, leave one batch out: fit on all batches but one, map the held-back batch, score its labels.

Usage (from the repository root, with the project's venv)::

    .venv/bin/python benchmarks/bench_mapping.py                          # 3 datasets, seeds 1-5, all variants
    .venv/bin/python benchmarks/bench_mapping.py --datasets cellbench5 --seeds 1 --variants qnorm-euclidean
    .venv/bin/python benchmarks/bench_mapping.py --novel                  # + a cell type absent from the reference
    .venv/bin/python benchmarks/bench_mapping.py --pyliger                # + pyliger 0.2.4's projection, same vote

Per dataset, held-out batch and seed: the reference batches are prepared and factorised as ``onlinemf fit``
does (rliger normalisation, gene selection and scaling; online iNMF k=20, lam=5, 5 epochs), their H
quantile-normalised (``postprocess.quantile_norm``) and the reference quantiles summarised
(``mapping.reference_quantiles``). The held-out batch is prepared on the model's genes and projected on W
(V = 0, as ``onlinemf project``), then labelled by one of these variants:

* ``qnorm-euclidean``: query H aligned with the stored reference quantiles
  (``mapping.align_to_reference``), Euclidean kNN vote among the reference's normalised H;
* ``qnorm-cosine``: the same alignment, cosine kNN;
* ``qnorm-scaled-cosine``: the same alignment; query and reference normalised H both divided per factor by
  the factor's RMS over the reference's normalised H, cosine kNN;
* ``raw-scaled-cosine``: no quantile alignment; every dataset's raw H divided per factor by its RMS within
  that dataset, cosine kNN against the reference's scaled raw H;
* ``raw-cosine`` (what ``onlinemf project --reference`` does): raw H, cosine kNN.

Scores against the held-out batch's ``obs['cell_type']``: accuracy, macro-F1, and calibration: accuracy of the
cells whose confidence falls in each tenth 0-0.1, ..., 0.9-1.0. ``--novel``: each cell type in turn is removed
from the reference batches (the model never sees it); the held-out batch keeps it; reported: mean confidence
and mapping distance of that type's cells against the others', and the AUROC of each as a novelty score.

Figures in ``benchmarks/README.md`` ("Reference mapping"); results also go to
``benchmarks/_work/mapping_results.json``.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import anndata as ad
import numpy as np
from scipy.stats import rankdata
from sklearn.metrics import f1_score
from threadpoolctl import threadpool_limits

from onlinemf import OnlineINMF, mapping, postprocess
from onlinemf.preprocess import prepare
from onlinemf.readers import MemorySource

BENCH = Path(__file__).resolve().parent
WORK = BENCH / "_work"
DATA = Path("/work/shared/data")
DATASETS = {
    "cellbench5": DATA / "cellbench_5cl_celseq2_3plates.h5ad",
    "cellbench3": DATA / "cellbench_3cl_celseq2_dropseq.h5ad",
    "baron": DATA / "baron_pancreas_cider_xspecies.h5ad",
}
TARGETS = {"cellbench5": 0.95, "cellbench3": 0.9}
BATCH_KEY, LABEL_KEY = "batch", "cell_type"
VARIANTS = ("qnorm-euclidean", "qnorm-cosine", "qnorm-scaled-cosine", "raw-scaled-cosine", "raw-cosine")
PYLIGER_PYTHON = BENCH / "_venvs" / "pyliger" / "bin" / "python"
PYLIGER_RUNNER = BENCH / "_runners" / "mapping_pyliger.py"


# ---------------------------------------------------------------- one split
def batches(adata) -> list[str]:
    return [str(b) for b in adata.obs[BATCH_KEY].cat.categories if (adata.obs[BATCH_KEY] == b).any()]


def sources_of(adata) -> list[MemorySource]:
    return [MemorySource(adata.X[np.flatnonzero(adata.obs[BATCH_KEY].astype(str) == b)], name=b,
                         var_names=adata.var_names) for b in batches(adata)]


def fit_reference(ref, *, k: int, seed: int, batch_size: int | None):
    """As ``onlinemf fit``: returns (model, genes, H stacked, dataset per cell, H_norm, reference quantiles)."""
    sources = sources_of(ref)
    prepared = prepare(sources, cache="memory")
    size = batch_size or min(5000, min(s.n_cells for s in sources))
    est = OnlineINMF(n_components=k, lam=5.0, batch_size=size, max_epochs=5, random_state=seed)
    est.fit(prepared.sources)
    Hs = [est.transform_source(s, dataset=s.name)[0] for s in prepared.sources]
    datasets = np.concatenate([[s.name] * s.n_cells for s in prepared.sources])
    H = np.concatenate(Hs)
    H_norm, _ = postprocess.quantile_norm(H, datasets, random_state=seed)
    quantiles = mapping.reference_quantiles(H, datasets, random_state=seed)
    return est, prepared.genes, H, datasets, H_norm, quantiles


def project_query(est, genes, query) -> np.ndarray:
    """As ``onlinemf project``: the query prepared on the model's genes, H on W only."""
    prepared = prepare([MemorySource(query.X, name="query", var_names=query.var_names)], genes=genes, cache="memory")
    return est.transform_source(prepared.sources[0], dataset=None)[0]


def rms_scaled(H: np.ndarray, datasets: np.ndarray) -> np.ndarray:
    out = np.empty_like(H, dtype=np.float64)
    for d in np.unique(datasets):
        m = datasets == d
        rms = np.sqrt((H[m].astype(np.float64) ** 2).sum(axis=0) / max(m.sum() - 1, 1))
        out[m] = np.divide(H[m], rms, out=np.zeros_like(H[m], dtype=np.float64), where=rms > 0)
    return out


def label_query(variant: str, fitted, H_query, ref_labels, seed: int) -> mapping.LabelTransfer:
    _, _, H, datasets, H_norm, quantiles = fitted
    if variant.startswith("qnorm"):
        Hq, _ = mapping.align_to_reference(H_query, quantiles, random_state=seed)
        if variant == "qnorm-scaled-cosine":
            rms = np.sqrt((H_norm.astype(np.float64) ** 2).mean(axis=0))
            rms[rms == 0] = 1.0
            return mapping.transfer_labels(Hq / rms, H_norm / rms, ref_labels, metric="cosine", random_state=seed)
        metric = variant.split("-")[1]
        return mapping.transfer_labels(Hq, H_norm, ref_labels, metric=metric, random_state=seed)
    if variant == "raw-scaled-cosine":
        return mapping.transfer_labels(rms_scaled(H_query, np.zeros(len(H_query))), rms_scaled(H, datasets),
                                       ref_labels, metric="cosine", random_state=seed)
    if variant == "raw-cosine":
        return mapping.transfer_labels(H_query, H, ref_labels, metric="cosine", random_state=seed)
    msg = f"unknown variant {variant}"
    raise ValueError(msg)


def scores(truth: np.ndarray, result: mapping.LabelTransfer) -> dict:
    pred = result.labels.astype(str)
    correct = pred == truth
    bins = np.minimum((result.confidence * 10 - 1e-6).astype(int), 9)  # (0, 0.1] -> 0, ..., (0.9, 1] -> 9
    calibration = {f"{b / 10:.1f}-{(b + 1) / 10:.1f}": [int((bins == b).sum()), float(correct[bins == b].mean())]
                   for b in range(10) if (bins == b).any()}
    return {"accuracy": float(correct.mean()), "macro_f1": float(f1_score(truth, pred, average="macro")),
            "calibration": calibration, "median_confidence": float(np.median(result.confidence)),
            "median_distance": float(np.median(result.distance))}


def auroc(score: np.ndarray, positive: np.ndarray) -> float:
    """Probability that a positive cell scores above a negative one (ties count half)."""
    ranks = rankdata(score)
    n_pos, n_neg = int(positive.sum()), int((~positive).sum())
    return float((ranks[positive].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


# ---------------------------------------------------------------- experiments
def leave_one_batch_out(name: str, adata, seeds, variants, args) -> list[dict]:
    rows = []
    for held in batches(adata):
        in_query = (adata.obs[BATCH_KEY].astype(str) == held).to_numpy()
        ref, query = adata[~in_query].copy(), adata[in_query].copy()
        truth = query.obs[LABEL_KEY].astype(str).to_numpy()
        for seed in seeds:
            t = time.perf_counter()
            fitted = fit_reference(ref, k=args.k, seed=seed, batch_size=args.batch_size)
            H_query = project_query(fitted[0], fitted[1], query)
            ref_labels = np.concatenate([ref.obs[LABEL_KEY].astype(str).to_numpy()[(ref.obs[BATCH_KEY].astype(str) == b).to_numpy()]
                                         for b in batches(ref)])
            fit_s = time.perf_counter() - t
            for variant in variants:
                t = time.perf_counter()
                result = label_query(variant, fitted, H_query, ref_labels, seed)
                row = {"dataset": name, "query": held, "seed": seed, "variant": variant, "fit_s": fit_s,
                       "map_s": time.perf_counter() - t, **scores(truth, result)}
                rows.append(row)
                print(f"{name:10s} query={held:10s} seed={seed} {variant:18s} acc={row['accuracy']:.3f} "
                      f"F1={row['macro_f1']:.3f}", flush=True)
    return rows


def novel_type(name: str, adata, seeds, variants, args) -> list[dict]:
    """Each cell type in turn absent from the reference batches; every batch in turn the query."""
    rows = []
    types = sorted(adata.obs[LABEL_KEY].astype(str).unique())
    for held in batches(adata):
        in_query = (adata.obs[BATCH_KEY].astype(str) == held).to_numpy()
        query = adata[in_query].copy()
        truth = query.obs[LABEL_KEY].astype(str).to_numpy()
        for novel in types:
            keep = ~in_query & (adata.obs[LABEL_KEY].astype(str) != novel).to_numpy()
            ref = adata[keep].copy()
            positive = truth == novel
            if positive.sum() < 5 or len(batches(ref)) < len(batches(adata)) - 1:
                continue
            for seed in seeds:
                fitted = fit_reference(ref, k=args.k, seed=seed, batch_size=args.batch_size)
                H_query = project_query(fitted[0], fitted[1], query)
                ref_labels = np.concatenate([ref.obs[LABEL_KEY].astype(str).to_numpy()[(ref.obs[BATCH_KEY].astype(str) == b).to_numpy()]
                                             for b in batches(ref)])
                for variant in variants:
                    rows.append(_novel_row(name, held, novel, seed, variant, truth, positive,
                                           label_query(variant, fitted, H_query, ref_labels, seed)))
    return rows


def _novel_row(name, held, novel, seed, variant, truth, positive, result) -> dict:
        known_correct = float((result.labels.astype(str)[~positive] == truth[~positive]).mean())
        row = {"dataset": name, "query": held, "novel": novel, "seed": seed, "variant": variant,
               "n_novel": int(positive.sum()),
               "conf_novel": float(result.confidence[positive].mean()),
               "conf_known": float(result.confidence[~positive].mean()),
               "dist_novel": float(np.median(result.distance[positive])),
               "dist_known": float(np.median(result.distance[~positive])),
               "auroc_distance": auroc(result.distance, positive),
               "auroc_low_confidence": auroc(-result.confidence, positive),
               "known_accuracy": known_correct}
        print(f"{name:10s} query={held:10s} novel={novel:20s} seed={seed} {variant:18s} conf {row['conf_novel']:.2f} vs "
              f"{row['conf_known']:.2f}  dist {row['dist_novel']:.2f} vs {row['dist_known']:.2f}  "
              f"AUROC dist {row['auroc_distance']:.2f} conf {row['auroc_low_confidence']:.2f}", flush=True)
        return row


def pyliger_mapping(name: str, path: Path, adata, seeds, args) -> list[dict]:
    """pyliger 0.2.4: its online iNMF on the reference, its projection of the query (``projection=True``) and its
    ``quantile_norm`` over reference + query (its only way to normalise a projected dataset), then our vote
    (cosine) on its projected H and on its normalised H."""
    rows = []
    pattern = WORK / f"mapping_pyliger_{name}_{{query}}_{{seed}}.npz"
    cmd = [str(PYLIGER_PYTHON), str(PYLIGER_RUNNER), "--input", str(path), "--queries", *batches(adata),
           "--seeds", *map(str, seeds), "--k", str(args.k), "--output", str(pattern)]
    if args.batch_size:
        cmd += ["--batch-size", str(args.batch_size)]
    done = subprocess.run(cmd, check=False, capture_output=True, text=True)
    if done.returncode != 0:
        print(f"pyliger failed on {name}: {done.stderr.strip().splitlines()[-1:]}", flush=True)
        return rows
    for held in batches(adata):
        for seed in seeds:
            out = Path(str(pattern).replace("{query}", held).replace("{seed}", str(seed)))
            res = np.load(out, allow_pickle=True)
            truth = res["query_labels"].astype(str)
            for variant, (query, ref) in {"pyliger raw-cosine": ("H_query", "H_ref"),
                                          "pyliger qnorm-cosine": ("H_norm_query", "H_norm_ref")}.items():
                result = mapping.transfer_labels(res[query], res[ref], res["ref_labels"].astype(str),
                                                 metric="cosine", random_state=seed)
                row = {"dataset": name, "query": held, "seed": seed, "variant": variant, **scores(truth, result)}
                rows.append(row)
                print(f"{name:10s} query={held:10s} seed={seed} {variant:18s} acc={row['accuracy']:.3f} "
                      f"F1={row['macro_f1']:.3f}", flush=True)
    return rows


# ---------------------------------------------------------------- report
def summarise(rows: list[dict]) -> None:
    print("\nLeave one batch out (mean over seeds; calibration pooled over queries and seeds)")
    print(f"{'dataset':10s} {'variant':18s} {'query':10s} {'accuracy':>9s} {'macro-F1':>9s} {'min acc':>8s}")
    keys = sorted({(r["dataset"], r["variant"]) for r in rows}, key=lambda x: (x[0], x[1]))
    for dataset, variant in keys:
        sel = [r for r in rows if r["dataset"] == dataset and r["variant"] == variant]
        for held in sorted({r["query"] for r in sel}):
            part = [r for r in sel if r["query"] == held]
            print(f"{dataset:10s} {variant:18s} {held:10s} {statistics.mean(r['accuracy'] for r in part):9.3f} "
                  f"{statistics.mean(r['macro_f1'] for r in part):9.3f} {min(r['accuracy'] for r in part):8.3f}")
        target = TARGETS.get(dataset)
        mean_acc = statistics.mean(r["accuracy"] for r in sel)
        print(f"{dataset:10s} {variant:18s} {'all':10s} {mean_acc:9.3f} {statistics.mean(r['macro_f1'] for r in sel):9.3f}"
              f" {min(r['accuracy'] for r in sel):8.3f}" + (f"   target {target}" if target else ""))
        pooled: dict[str, list] = {}
        for r in sel:
            for b, (n, acc) in r["calibration"].items():
                pooled.setdefault(b, []).append((n, acc))
        cal = "  ".join(f"{b}: {sum(n * a for n, a in v) / sum(n for n, _ in v):.2f} (n={sum(n for n, _ in v)})"
                        for b, v in sorted(pooled.items()))
        print(f"{'':10s} calibration {cal}")


def summarise_novel(rows: list[dict]) -> None:
    print("\nCell type absent from the reference (means over queries and seeds)")
    print(f"{'dataset':10s} {'variant':19s} {'novel type':20s} {'conf novel':>10s} {'known':>6s} {'dist novel':>10s} {'known':>6s} "
          f"{'AUROC dist':>10s} {'AUROC 1-conf':>12s} {'known acc':>9s}")
    for dataset, variant, novel in sorted({(r["dataset"], r["variant"], r["novel"]) for r in rows}):
        sel = [r for r in rows if r["dataset"] == dataset and r["novel"] == novel and r["variant"] == variant]

        def m(key, sel=sel):
            return statistics.mean(r[key] for r in sel)

        print(f"{dataset:10s} {variant:19s} {novel:20s} {m('conf_novel'):10.2f} {m('conf_known'):6.2f} {m('dist_novel'):10.2f} "
              f"{m('dist_known'):6.2f} {m('auroc_distance'):10.2f} {m('auroc_low_confidence'):12.2f} {m('known_accuracy'):9.3f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--datasets", nargs="+", default=list(DATASETS), choices=list(DATASETS))
    parser.add_argument("--seeds", nargs="+", type=int, default=[1, 2, 3, 4, 5])
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS)
    parser.add_argument("--k", type=int, default=20)
    parser.add_argument("--batch-size", type=int, default=None,
                        help="mini-batch; default the smallest reference batch (rliger's advice for small data)")
    parser.add_argument("--novel", action="store_true", help="also the absent-cell-type experiment")
    parser.add_argument("--no-lobo", action="store_true", help="skip the leave-one-batch-out accuracy runs")
    parser.add_argument("--pyliger", action="store_true", help=f"also pyliger 0.2.4 ({PYLIGER_PYTHON})")
    args = parser.parse_args()
    print(f"python {platform.python_version()}, {platform.machine()}, 1 BLAS thread", flush=True)
    rows, novel_rows = [], []
    with threadpool_limits(limits=1):
        for name in args.datasets:
            adata = ad.read_h5ad(DATASETS[name])
            if not args.no_lobo:
                rows += leave_one_batch_out(name, adata, args.seeds, args.variants, args)
            if args.pyliger:
                if not PYLIGER_PYTHON.exists():
                    sys.exit(f"--pyliger: no {PYLIGER_PYTHON}; create it: python3 -m venv benchmarks/_venvs/pyliger && "
                             "benchmarks/_venvs/pyliger/bin/pip install pyliger==0.2.4 'setuptools<81'")
                rows += pyliger_mapping(name, DATASETS[name], adata, args.seeds, args)
            if args.novel:
                novel_rows += novel_type(name, adata, args.seeds, args.variants, args)
    if rows:
        summarise(rows)
    if novel_rows:
        summarise_novel(novel_rows)
    WORK.mkdir(exist_ok=True)
    (WORK / "mapping_results.json").write_text(json.dumps({"lobo": rows, "novel": novel_rows}, indent=1))


if __name__ == "__main__":
    main()
