"""Names of the slots onlinemf writes into AnnData, defined once.

The results file of the CLI uses the constants below. ``onlinemf.tl.integrate`` writes into a user's AnnData
under :func:`slots` of its ``key_added`` ("inmf" by default), where every name carries the key, so that two
runs with different keys never share a slot, and its UMAP never replaces the user's ``obsm['X_umap']``.
"""

from __future__ import annotations

from typing import NamedTuple

UNS = "inmf"  # default key: uns entry (parameters, objective, timings)


class Slots(NamedTuple):
    """Where one ``tl.integrate`` run writes, as ``(attribute, key)`` pairs by :meth:`items`."""

    obsm_h: str
    obsm_h_norm: str
    obsm_umap: str
    obs_cluster: str
    varm_w: str
    var_selected: str
    uns: str

    def items(self) -> list[tuple[str, str]]:
        """``(AnnData attribute, key)`` of every slot, e.g. ``("obsm", "X_inmf")``."""
        return [(field.split("_", 1)[0], name) for field, name in zip(self._fields, self, strict=True)]


def slots(key: str = UNS) -> Slots:
    """The slot names of ``key``: ``obsm['X_<key>']``, ``obsm['X_<key>_norm']``, ``obsm['X_<key>_umap']``,
    ``obs['<key>_cluster']``, ``varm['W_<key>']``, ``var['<key>_selected']`` and ``uns['<key>']``."""
    return Slots(obsm_h=f"X_{key}", obsm_h_norm=f"X_{key}_norm", obsm_umap=f"X_{key}_umap",
                 obs_cluster=f"{key}_cluster", varm_w=f"W_{key}", var_selected=f"{key}_selected", uns=key)


_DEFAULT = slots(UNS)
OBSM_H = _DEFAULT.obsm_h  # H, cells x K
OBSM_H_NORM = _DEFAULT.obsm_h_norm  # quantile-normalised H
OBSM_UMAP = "X_umap"  # UMAP of the results file (a new file: scanpy's default basis)
OBS_CLUSTER = _DEFAULT.obs_cluster
OBS_DATASET = "inmf_dataset"  # results file: dataset each cell was factorised in (the batch)
VARM_W = _DEFAULT.varm_w  # W^T, genes x K, zeros for genes not selected
VAR_SELECTED = _DEFAULT.var_selected
# project --reference (reference mapping, onlinemf.mapping)
OBS_LABEL = "inmf_label"  # label voted by the nearest reference cells
OBS_LABEL_CONFIDENCE = "inmf_label_confidence"  # share of those neighbours carrying it
OBS_MAPPING_DISTANCE = "inmf_mapping_distance"  # distance to them, in units of the reference's own
