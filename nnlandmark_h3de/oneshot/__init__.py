"""One-shot landmark detection: one labelled image (the template) + unlabelled images -> pseudo-labels.

Each method turns the template's landmarks into `PseudoLabels` per unlabelled case (points plus a
per-landmark confidence); `pseudo_dataset.write_pseudo_label_dataset` writes them, with the template
and re-posed copies of it, as an nnU-Net raw dataset ready for the usual plan/train/predict
(`nnLandmark_oneshot` on the command line).

- `pseudo_labels`: the `PseudoLabels` type, `pseudo_labels.json`, reading the template.
- `registration_labels`: the registration baseline (affine, refined, + optional demons; SimpleITK).
- `pseudo_dataset`: the dataset writer.
"""
from nnlandmark_h3de.oneshot.pseudo_labels import (PSEUDO_LABELS_FILE, OneShotError, OneShotWarning, PseudoLabels,
                                                   load_pseudo_labels, read_pseudo_labels_file, save_pseudo_labels)
