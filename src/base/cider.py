"""CIDEr-D as a training reward: pycocoevalcap's formula, with the n-gram document frequencies fixed
once from the training references (as self-critical.pytorch does) instead of recomputed per batch.

Captions are compared as space-separated tokens, as pycocoevalcap compares them after its PTB
tokenisation. With the same tokens and the same references, `CiderD.score` equals
pycocoevalcap's per-image CIDEr (tests/test_scst.py checks it).
"""
import math
from collections import Counter

import numpy as np

from .ptb import python_tokenize

N, SIGMA = 4, 6.0  # n-grams up to 4, length-penalty width: pycocoevalcap's defaults


def ngram_counts(tokens, n=N):
    words = tokens.split()
    return Counter(tuple(words[i: i + k]) for k in range(1, n + 1) for i in range(len(words) - k + 1))


class CiderD:
    """CIDEr-D of candidate captions against fixed references {image_id: [tokenised captions]}."""

    @classmethod
    def from_training(cls, train_records):
        """CIDEr-D with the document frequencies of the training references, as the SCST reward and consensus
        decoding use it (python_tokenize: about 2 ms a caption, so ~4 min of one core for VizWiz's 117k)."""
        return cls({r.image_id: [python_tokenize(c) for c in r.captions] for r in train_records})

    def __init__(self, references):
        self.document_frequency = Counter()
        for captions in references.values():
            self.document_frequency.update({gram for caption in captions for gram in ngram_counts(caption)})
        self.log_num_images = math.log(float(len(references)))
        self.references = {image_id: [self._vector(ngram_counts(c)) for c in captions]
                           for image_id, captions in references.items()}

    def _vector(self, counts):
        """tf-idf weights per n-gram order, their norms, and the caption's length in words."""
        vec = [{} for _ in range(N)]
        for gram, tf in counts.items():
            vec[len(gram) - 1][gram] = tf * (self.log_num_images - math.log(max(1.0, self.document_frequency[gram])))
        norms = [math.sqrt(sum(w * w for w in order.values())) for order in vec]
        return vec, norms, sum(tf for gram, tf in counts.items() if len(gram) == 1)

    @staticmethod
    def _similarity(candidate, reference):
        """CIDEr-D (x10) of one vectorised candidate against one vectorised reference."""
        (vec, norms, length), (ref_vec, ref_norms, ref_length) = candidate, reference
        penalty = math.exp(-((length - ref_length) ** 2) / (2 * SIGMA ** 2))
        total = 0.0
        for order in range(N):
            ref = ref_vec[order]
            overlap = sum(min(w, ref.get(g, 0.0)) * ref.get(g, 0.0) for g, w in vec[order].items())
            if norms[order] != 0 and ref_norms[order] != 0:
                overlap /= norms[order] * ref_norms[order]
            total += overlap * penalty
        return 10.0 * total / N

    def score(self, image_id, candidate):
        """CIDEr-D (x10, as reported) of one tokenised candidate against the references of `image_id`."""
        vec = self._vector(ngram_counts(candidate))
        references = self.references[image_id]
        return sum(self._similarity(vec, reference) for reference in references) / len(references)

    def consensus(self, candidates, groups=None):
        """Each tokenised candidate's agreement with the others: its mean CIDEr-D with each other candidate as the
        one reference (the expected CIDEr-D if the others are draws of what a reference would say; minimum Bayes
        risk picks the highest). With `groups` (one label per candidate: the run that wrote it), the agreement with
        the other groups only, each weighed alike: the mean over the other groups of the mean against that group's
        candidates. A run that drew more candidates has no more say, and a run's candidates agreeing with each other
        (near-identical beams; a degenerate model repeating itself) count for nothing. A lone candidate scores 0."""
        vectors = [self._vector(ngram_counts(c)) for c in candidates]
        groups = list(range(len(candidates))) if groups is None else list(groups)  # alone: every other counts
        scores = []
        for i, vec in enumerate(vectors):
            by_group = {}
            for j, other in enumerate(vectors):
                if groups[j] != groups[i]:
                    by_group.setdefault(groups[j], []).append(self._similarity(vec, other))
            scores.append(float(np.mean([np.mean(s) for s in by_group.values()])) if by_group else 0.0)
        return scores

    def scores(self, image_ids, candidates):
        return np.array([self.score(i, c) for i, c in zip(image_ids, candidates)])
