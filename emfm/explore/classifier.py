"""A few-label pixel classifier on features: ilastik's workflow, with any feature source in place of its filters.

A random forest (ilastik's choice) or a logistic regression learns from the feature vectors of the labelled pixels
-- whole labelled slices or sparse scribbles -- and gives class probabilities for every pixel of any block of the
same features, so it predicts blockwise. Training draws at most ``max_pixels`` of the labelled pixels (seeded), which
keeps a whole labelled slice to seconds; each class keeps its share of them, because the forest learns the classes'
shares as their priors: on a synthetic slice, 2,000 pixels of each class instead of 4,000 drawn as they come cut
membrane IoU from 0.87 (the same as all 16,384 pixels) to 0.79.

The file it saves is skops (not pickle): loading builds only plain containers, arrays and scikit-learn estimators,
plus the one extra type a forest needs, named in :data:`TRUSTED`; a file that asks for anything else is refused.
"""

from __future__ import annotations

import math
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import skops.io
from sklearn.ensemble import RandomForestClassifier
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import Pipeline, make_pipeline
from sklearn.preprocessing import StandardScaler
from skops.io.exceptions import UntrustedTypesFoundException

from emfm import threads
from emfm.errors import EmfmError, first_line

KINDS = ("forest", "logistic")
FORMAT = "emfm pixel classifier"
VERSION = 1
TRUSTED = ["sklearn.tree._tree.Tree"]   # the trees of a forest: data, no code; skops asks for it to be named


class PixelClassifier:
    """Class probabilities of pixels from their features (C, *spatial), learned from a few labelled pixels.

    Args:
        kind: "forest" (ilastik's: ``trees`` trees grown to ``max_depth``, None for full depth) or "logistic" (on
            standardised features).
        balanced: weigh classes inversely to their share of the samples (scikit-learn's ``class_weight``).
        max_pixels: at most this many labelled pixels are drawn to train on, each class in its share (None: all).
        seed: seed of the sampling and of the forest.
    """

    def __init__(self, kind: str = "forest", *, trees: int = 100, max_depth: int | None = None,
                 balanced: bool = False, max_pixels: int | None = 20_000, seed: int = 0) -> None:
        if kind not in KINDS:
            raise EmfmError(f"pixel classifier: kind={kind!r}; expected one of {', '.join(KINDS)}")
        weight = "balanced" if balanced else None
        self.estimator: RandomForestClassifier | Pipeline = (
            RandomForestClassifier(trees, max_depth=max_depth, class_weight=weight, n_jobs=threads.cores(),
                                   random_state=seed) if kind == "forest"
            else make_pipeline(StandardScaler(), LogisticRegression(max_iter=1000, class_weight=weight)))
        self.kind, self.max_pixels, self.seed = kind, max_pixels, seed
        self.classes: list[int] = []     # label value of each output channel, once fitted
        self.channels = 0                # feature channels it was fitted on

    def fit(self, features: np.ndarray, labels: np.ndarray, ignore: int | None = 0) -> PixelClassifier:
        """Learn from the pixels of ``labels`` (*spatial, integer classes) that are not ``ignore`` (scribbles:
        0 = unlabelled; None when every pixel is labelled), with ``features`` (C, *spatial) of the same place.
        Several slices or volumes train together stacked along an axis."""
        if features.shape[1:] != labels.shape:
            raise EmfmError(f"pixel classifier: features of shape {list(features.shape)} (C, *spatial) do not "
                            f"cover labels of shape {list(labels.shape)}")
        flat = labels.reshape(-1)
        classes = np.unique(flat if ignore is None else flat[flat != ignore])
        if len(classes) < 2:
            raise EmfmError(f"pixel classifier: the labels hold {len(classes)} class(es) {classes.tolist()} besides "
                            f"ignore={ignore}; it needs at least 2 (a binary mask's 0 is a class: pass ignore=None)")
        pixels = [np.flatnonzero(flat == c) for c in classes]
        share = min(1.0, (self.max_pixels or math.inf) / sum(map(len, pixels)))
        rng = np.random.default_rng(self.seed)
        picked = np.sort(np.concatenate([rng.choice(p, math.ceil(share * len(p)), replace=False) for p in pixels]))
        self.estimator.fit(features.reshape(len(features), -1)[:, picked].T, flat[picked])   # [N, C]
        self.classes, self.channels = [int(c) for c in classes], len(features)
        return self

    def predict_proba(self, features: np.ndarray) -> np.ndarray:
        """Probability of each class (in the order of :attr:`classes`) at every pixel: float32 (K, *spatial)."""
        if not self.classes:
            raise EmfmError("pixel classifier: not fitted; fit it on labelled pixels or load a saved one")
        if len(features) != self.channels:
            raise EmfmError(f"pixel classifier: trained on {self.channels} feature channels, got {len(features)} "
                            f"(features of shape {list(features.shape)}); use the features it was trained on")
        proba = self.estimator.predict_proba(features.reshape(self.channels, -1).T)   # [N, K]
        return proba.T.reshape(len(self.classes), *features.shape[1:]).astype(np.float32)

    def save(self, path: str | Path) -> None:
        """Write the fitted classifier as a skops file that :meth:`load` reads."""
        state = {"format": FORMAT, "version": VERSION, "kind": self.kind, "max_pixels": self.max_pixels,
                 "seed": self.seed, "classes": self.classes, "channels": self.channels, "estimator": self.estimator}
        skops.io.dump(state, path)

    @classmethod
    def load(cls, path: str | Path) -> PixelClassifier:
        """The classifier :meth:`save` wrote; any other file, or one asking for an untrusted type, is refused."""
        try:
            state: Any = skops.io.load(path, trusted=TRUSTED)
        except FileNotFoundError:
            raise EmfmError(f"{path}: no such pixel classifier file") from None
        except (zipfile.BadZipFile, UntrustedTypesFoundException, ValueError, KeyError) as err:
            raise EmfmError(first_line(f"{path}: not a readable {FORMAT} ({type(err).__name__}: {err})")) from None
        if not isinstance(state, dict) or state.get("format") != FORMAT or state.get("version") != VERSION:
            raise EmfmError(f"{path}: not an {FORMAT} file of version {VERSION}")
        classifier = cls(state["kind"], max_pixels=state["max_pixels"], seed=state["seed"])
        classifier.estimator, classifier.classes, classifier.channels = (
            state["estimator"], state["classes"], state["channels"])
        if isinstance(classifier.estimator, RandomForestClassifier):
            classifier.estimator.n_jobs = threads.cores()     # this machine's cores, not the trainer's
        return classifier

