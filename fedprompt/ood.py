"""Out-of-distribution detection: scores from a classifier's logits, AUROC and FPR at 95 % TPR, negative labels.

Pure functions, used by the evaluation for every method (``eval.ood``) and by FOCoOp for its OOD prompts' words.

**Scores** (higher = more in-distribution), from the logits ``[n, C]`` over the C in-distribution classes (a model
may give more columns: its own negative labels, FOCoOp's OOD prompts):

- ``msp``: the maximum softmax probability (Hendrycks and Gimpel, 2017);
- ``energy``: the negative free energy ``T logsumexp(z / T)``, T = 1 (Liu et al., 2020);
- ``mcm``: the maximum softmax of the cosine similarities ``z / tau`` at temperature T = 1, tau the model's logit
  scale (Ming et al., 2022, "MCM");
- ``neglabel``: the softmax mass of the in-distribution columns among them and the negative labels' columns,
  ``sum_i exp z_i / (sum_i exp z_i + sum_j exp z~_j)`` (Jiang et al., 2024, "NegLabel"; the logits are CLIP's scaled
  cosines, so this is NegLabel's temperature 0.01).

**Metrics**, in-distribution as the positive class: the area under the ROC curve and the false-positive rate (the
share of OOD images taken for in-distribution) at the threshold that keeps 95 % of the in-distribution images, both
from torchmetrics.

**Negative labels** (NegLabel's NegMining as FOCoOp releases it, ``src/models/clip_fedlapt.py``): candidate words
from WordNet lists (adjectives and nouns), each scored by the 95th percentile over the in-distribution classes of
its cosine similarity to them (CLIP text features of "This is a {adjective} photo.", "The nice {noun}." and "The
nice {class}."), and the ``count`` least similar kept, split between adjectives and nouns in proportion to their
numbers.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import torch

from fedprompt.errors import FedPromptError

#: the scores :func:`ood_scores` computes
SCORES = ("msp", "energy", "mcm", "neglabel")
#: the sentences the candidate words and the class names are encoded in (FOCoOp's ``clip_for_wordnet_prepare.py``)
ADJECTIVE_SENTENCE = "This is a {} photo."
NOUN_SENTENCE = "The nice {}."


# --------------------------------------------------------------------------------------------------- scores
def msp(logits: torch.Tensor) -> torch.Tensor:
    """The maximum softmax probability ``[n]`` of logits ``[n, C]``."""
    return logits.float().softmax(dim=-1).amax(dim=-1)


def energy(logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """The negative free energy ``T logsumexp(z / T)`` ``[n]`` (higher for in-distribution images)."""
    return temperature * torch.logsumexp(logits.float() / temperature, dim=-1)


def mcm(logits: torch.Tensor, logit_scale: float, temperature: float = 1.0) -> torch.Tensor:
    """MCM ``[n]``: the maximum softmax of the cosine similarities ``logits / logit_scale`` at ``temperature``."""
    return (logits.float() / (logit_scale * temperature)).softmax(dim=-1).amax(dim=-1)


def neglabel(id_logits: torch.Tensor, negative_logits: torch.Tensor) -> torch.Tensor:
    """NegLabel ``[n]``: the softmax mass of the in-distribution columns ``[n, C]`` among them and the negative
    labels' columns ``[n, M]``."""
    id_logits = id_logits.float()
    both = torch.cat([id_logits, negative_logits.float()], dim=-1)
    return (torch.logsumexp(id_logits, dim=-1) - torch.logsumexp(both, dim=-1)).exp()


def ood_scores(logits: torch.Tensor, num_classes: int, names: tuple[str, ...], logit_scale: float,
               negative_logits: torch.Tensor | None = None, all_columns: bool = False) -> dict[str, torch.Tensor]:
    """The scores ``names`` (of :data:`SCORES`) of every image ``[n]`` from its logits ``[n, C (+ M)]``.

    Args:
        logits: the model's logits; columns past ``num_classes`` are its own negative labels (FOCoOp).
        num_classes: C, the in-distribution classes.
        names: which scores.
        logit_scale: the model's logit scale (MCM's cosine similarities are ``logits / logit_scale``).
        negative_logits: ``[n, M]``, the negative labels' logits when the model has no columns of its own (needed
            by ``neglabel`` then).
        all_columns: msp, energy and mcm over every column, the model's negative labels included (FOCoOp's released
            evaluation); by default over the C in-distribution columns.
    """
    id_logits = logits[:, :num_classes]
    negatives = logits[:, num_classes:] if logits.shape[1] > num_classes else negative_logits
    pooled = logits if all_columns else id_logits
    out = {}
    for name in names:
        if name == "msp":
            out[name] = msp(pooled)
        elif name == "energy":
            out[name] = energy(pooled)
        elif name == "mcm":
            out[name] = mcm(pooled, logit_scale)
        elif name == "neglabel":
            if negatives is None:
                raise FedPromptError("eval.ood_scores: neglabel needs negative labels: set eval.ood_negatives (a "
                                     "folder of WordNet word lists), or use a method with its own (FOCoOp).")
            out[name] = neglabel(id_logits, negatives)
        else:
            raise FedPromptError(f"eval.ood_scores: unknown score {name!r}; choose from {', '.join(SCORES)}.")
    return out


# -------------------------------------------------------------------------------------------------- metrics
def _as_probabilities(id_scores: torch.Tensor, ood_scores_: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Both score sets as one vector in [0, 1] (an order-preserving affine map in float64, so that torchmetrics
    applies no sigmoid, which would merge large scores) and the labels (1 = in-distribution)."""
    scores = torch.cat([id_scores.double().flatten(), ood_scores_.double().flatten()])
    low, high = scores.min(), scores.max()
    scaled = (scores - low) / (high - low) if high > low else torch.zeros_like(scores)
    labels = torch.cat([torch.ones(id_scores.numel(), dtype=torch.long),
                        torch.zeros(ood_scores_.numel(), dtype=torch.long)])
    return scaled, labels


def auroc(id_scores: torch.Tensor, ood_scores_: torch.Tensor) -> float:
    """The area under the ROC curve of telling in-distribution (positive) from OOD images by a score."""
    from torchmetrics.functional.classification import binary_auroc

    scores, labels = _as_probabilities(id_scores, ood_scores_)
    return float(binary_auroc(scores, labels))


def fpr_at_tpr(id_scores: torch.Tensor, ood_scores_: torch.Tensor, tpr: float = 0.95) -> float:
    """The share of OOD images scored at or above the highest threshold that keeps at least ``tpr`` of the
    in-distribution images (FPR95 for ``tpr`` 0.95)."""
    from torchmetrics.functional.classification import binary_specificity_at_sensitivity

    scores, labels = _as_probabilities(id_scores, ood_scores_)
    specificity, _ = binary_specificity_at_sensitivity(scores, labels, min_sensitivity=tpr)
    return 1.0 - float(specificity)


def detection_metrics(id_scores: torch.Tensor, ood_scores_: torch.Tensor) -> dict[str, float]:
    """``{"auroc", "fpr95"}`` of one score on one in-distribution and one OOD set (NaN when a set is empty)."""
    if id_scores.numel() == 0 or ood_scores_.numel() == 0:
        return {"auroc": float("nan"), "fpr95": float("nan")}
    return {"auroc": auroc(id_scores, ood_scores_), "fpr95": fpr_at_tpr(id_scores, ood_scores_)}


# ---------------------------------------------------------------------------------------------- negative labels
def read_word_lists(path: str | Path) -> tuple[list[str], list[str]]:
    """Candidate negative words ``(adjectives, nouns)`` from ``path``: a folder of WordNet lists (files
    ``adj*.txt`` and ``noun*.txt``, one word per line, as FOCoOp's and NegLabel's ``txtfiles``), or one text file
    (nouns). Each list in file-name then line order, without repeats; adjectives that are also nouns are dropped."""
    path = Path(path).expanduser()
    if path.is_file():
        files = {"noun": [path]}
    elif path.is_dir():
        files = {kind: sorted(p for p in path.iterdir() if p.name.startswith(kind) and p.suffix == ".txt")
                 for kind in ("adj", "noun")}
    else:
        raise FedPromptError(f"negative word lists not found: {path} (a folder of adj*.txt / noun*.txt WordNet "
                             "lists, e.g. FOCoOp's src/txtfiles, or one text file of words)")
    words = {kind: list(dict.fromkeys(w.strip() for f in fs for w in f.read_text().splitlines() if w.strip()))
             for kind, fs in files.items()}
    nouns = words.get("noun", [])
    noun_set = set(nouns)
    adjectives = [w for w in words.get("adj", []) if w not in noun_set]
    if not adjectives and not nouns:
        raise FedPromptError(f"{path}: no candidate words (expected adj*.txt / noun*.txt files of one word per line)")
    return adjectives, nouns


def select_negative_labels(adjective_sim: torch.Tensor, noun_sim: torch.Tensor, adjectives: list[str],
                           nouns: list[str], count: int, percentile: float = 0.95) -> list[str]:
    """The ``count`` candidates least similar to the in-distribution classes: each word's cosine similarities to
    the C classes (``[N_adj, C]``, ``[N_noun, C]``) sorted, the one at index ``int(C * percentile)`` is its score;
    ``int(count * N_adj / (N_adj + N_noun))`` adjectives and the rest nouns, each part in increasing score."""
    total = len(adjectives) + len(nouns)
    if count > total:
        raise FedPromptError(f"{count} negative labels asked for, but the word lists hold {total} candidates.")
    n_adj = int(count * (len(adjectives) / total))
    chosen = []
    for sim, words, take in ((adjective_sim, adjectives, n_adj), (noun_sim, nouns, count - n_adj)):
        if take == 0:
            continue
        at = int(sim.shape[1] * percentile)
        score = sim.sort(dim=1).values[:, at]
        order = score.sort(stable=True).indices[:take]
        chosen += [words[i] for i in order.tolist()]
    return chosen


def mine_negative_labels(encode: Callable[[list[str]], torch.Tensor], classnames: list[str], adjectives: list[str],
                         nouns: list[str], count: int, batch_size: int = 1000) -> list[str]:
    """:func:`select_negative_labels` with text features from ``encode`` (sentences -> L2-normalised features
    ``[n, E]``, e.g. a frozen CLIP text tower); the class names themselves are never candidates."""
    names = set(classnames)
    adjectives = [w for w in adjectives if w not in names]
    nouns = [w for w in nouns if w not in names]
    with torch.no_grad():
        classes = encode([NOUN_SENTENCE.format(c) for c in classnames]).float()

        def similarities(words: list[str], sentence: str) -> torch.Tensor:
            parts = [encode([sentence.format(w) for w in words[i:i + batch_size]]).float() @ classes.t()
                     for i in range(0, len(words), batch_size)]
            return torch.cat(parts) if parts else classes.new_zeros(0, len(classnames))

        return select_negative_labels(similarities(adjectives, ADJECTIVE_SENTENCE), similarities(nouns, NOUN_SENTENCE),
                                      adjectives, nouns, count)
