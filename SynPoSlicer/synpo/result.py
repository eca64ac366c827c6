"""What one run carries, torch-free: per-slice records and the volume result.

Shared by the engine (volume.py fills them), the server (sends them) and clients (the CLI's
`--server` path and the Slicer module rebuild them), so none of those needs torch.
"""
from dataclasses import asdict, dataclass, field
from typing import Dict, List, Optional

import numpy as np

from .support import Support

# "interpolated": between two decoded slices of a thin-slice walk (VolumeConfig.walk_spacing_mm),
# filled by shape-based interpolation: no prompts of its own.
STATUSES = ("support", "present", "interpolated", "absent", "not reached")
FOUND = ("support", "present", "interpolated")      # the statuses with the target in the result


@dataclass
class SliceRecord:
    label: int
    index: int                     # slice index along the slicing axis
    status: str                    # one of STATUSES
    score: float = 0.0             # mean fused confidence inside the mask
    sam_iou: float = 0.0
    overlap_prev: float = 0.0      # fraction of this mask inside the neighbouring (previous) mask
    reason: str = ""               # why an "absent" slice was judged so; on a present or interpolated
                                   # one, what changed its mask ("previous kept", "bridged", "N px added")
    positive: List[List[float]] = field(default_factory=list)   # x (column), y (row) in the slice
    negative: List[List[float]] = field(default_factory=list)
    box: Optional[List[int]] = None

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "SliceRecord":
        known = {k: d[k] for k in cls.__dataclass_fields__ if k in d}
        return cls(**known)


@dataclass
class VolumeResult:
    labels: np.ndarray                       # [k, j, i] the support's label values (uint8 when < 256, else int32)
    confidence: Dict[int, np.ndarray]        # label -> [k, j, i] float32 in [0, 1] (may be empty: not asked for)
    records: List[SliceRecord]
    support: Support
    modality: str
    features: List[str]
    timings: Dict[str, float]
    computed: List[int] = field(default_factory=list)     # slices whose embeddings and confidence were computed
    # label -> slice along the slicing axis -> (H, W) bool: the voxels assembly.drop_thin_ends took off
    # a label's last slices (volume.tip_ratio). Not in `labels`; a re-run compares its walks with the
    # labels as they were before that trim (Session.add_support), so an Update neither loses nor
    # re-adds them behind the rule's back.
    trimmed: Dict[int, Dict[int, np.ndarray]] = field(default_factory=dict, repr=False)
    # slice along the slicing axis -> (H, W) bool: the voxels assembly.grow_edges gave a label's rim
    # (volume.edge_grow). In `labels`; a re-run compares its walks with the labels without them.
    grown: Dict[int, np.ndarray] = field(default_factory=dict, repr=False)
    # label -> slice along the slicing axis -> (H, W) bool: the voxels of the label's own walked mask
    # that the assembly gave to another label or dropped (an overlap, an enclosed label outside its
    # encloser). Not in `labels` as the label's; with them a re-run has each walk's own previous masks
    # (walk.keep_agreed: a walk that agrees with them keeps them, not what the assembly left of them).
    overridden: Dict[int, Dict[int, np.ndarray]] = field(default_factory=dict, repr=False)


def support_to_dict(support: Support) -> dict:
    return {"axis": support.axis, "labels": list(support.labels),
            "slices": {str(k): list(v) for k, v in support.slices.items()}}


def support_from_dict(d: dict) -> Support:
    return Support(axis=int(d["axis"]), labels=[int(v) for v in d["labels"]],
                   slices={int(k): [int(s) for s in v] for k, v in d["slices"].items()})
