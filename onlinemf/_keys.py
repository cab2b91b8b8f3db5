"""Names of the slots onlinemf writes into AnnData, defined once."""

OBSM_H = "X_inmf"  # H, cells x K
OBSM_H_NORM = "X_inmf_norm"  # quantile-normalised H
OBSM_UMAP = "X_umap"
OBS_CLUSTER = "inmf_cluster"
OBS_DATASET = "inmf_dataset"  # dataset each cell was factorised in (the batch)
VARM_W = "W_inmf"  # W^T, genes x K, zeros for genes not selected
VAR_SELECTED = "inmf_selected"
UNS = "inmf"
