"""Which queue rows are related to a sample — same image, same caption text — for `eim.same_image` and
`eim.same_text`. Our extension, NOT from the paper: there every row but the sample's own is a negative,
including the other captions of its image and duplicate captions.

    negative  (default, the paper) related rows stay ordinary negatives
    positive  related rows join the sample's own row as positives (multi-positive InfoNCE)
    masked    related rows are removed from the InfoNCE denominator

A row related both ways (same image and same text) with different modes is a positive if either mode
is `positive`. Groups come from the training split, built once per stage:

    related = related_rows(train.samples, config.eim)   # None when both options are `negative`
    rows, roles = related.for_batch(batch["indices"])    # [B, R] each, for queue_infonce_related
"""
from __future__ import annotations

import re

import torch

from eimctl.eim.losses import RELATED_MASKED, RELATED_POSITIVE

RELATION_MODES = ("negative", "positive", "masked")
_ROLE_OF_MODE = {"positive": RELATED_POSITIVE, "masked": RELATED_MASKED}


def normalise_caption(text: str) -> str:
    """Lower case, punctuation dropped, whitespace collapsed: "A dog, running." == "a dog running"."""
    return " ".join(re.sub(r"[^\w\s]", " ", text.lower()).split())


class _Relation:
    """One way of being related: each row's group, and the rows of every group."""

    def __init__(self, labels: list[str], role: int):
        self.role = role
        group_of_label: dict[str, int] = {}
        self.group_of = [group_of_label.setdefault(label, len(group_of_label)) for label in labels]
        self.members: list[list[int]] = [[] for _ in group_of_label]
        for row, group in enumerate(self.group_of):
            self.members[group].append(row)


class RelatedRows:
    """The related rows of every training sample, looked up per batch."""

    def __init__(self, samples: list, same_image: str, same_text: str):
        relations = [(same_image, [s.image_id for s in samples]),
                     (same_text, [normalise_caption(s.caption) for s in samples])]
        # Positive relations first, so a row related both ways keeps the positive role.
        self.relations = sorted((_Relation(labels, _ROLE_OF_MODE[mode]) for mode, labels in relations
                                 if mode != "negative"), key=lambda relation: relation.role != RELATED_POSITIVE)

    def for_batch(self, indices: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(rows, roles) [B, R]: each sample's related rows other than itself; role 0 pads short rows."""
        per_sample = []
        for index in indices.tolist():
            roles: dict[int, int] = {}
            for relation in self.relations:
                for row in relation.members[relation.group_of[index]]:
                    if row != index:
                        roles.setdefault(row, relation.role)
            per_sample.append(roles)
        width = max([len(roles) for roles in per_sample] + [1])
        rows = torch.zeros(len(per_sample), width, dtype=torch.long)
        kinds = torch.zeros(len(per_sample), width, dtype=torch.long)
        for position, roles in enumerate(per_sample):
            rows[position, :len(roles)] = torch.tensor(list(roles.keys()), dtype=torch.long)
            kinds[position, :len(roles)] = torch.tensor(list(roles.values()), dtype=torch.long)
        return rows, kinds


def related_rows(samples: list, eim) -> RelatedRows | None:
    """The stage's related rows, or None when both options are `negative` (the paper's loss runs)."""
    if eim.same_image == "negative" and eim.same_text == "negative":
        return None
    return RelatedRows(samples, eim.same_image, eim.same_text)
