"""Near-duplicate text by MinHash (datasketch): the one query-and-verify rule that clean (drop repeats) and split
(keep similar answers on one side, find leaks) share. LSH proposes candidates; the estimated Jaccard of the
word 3-gram sets verifies them against the threshold."""

from __future__ import annotations

import multiprocessing
import os

NUM_PERM = 128  # MinHash permutations: Jaccard estimates within about +-0.09 (1/sqrt(128))


def shingles(text: str) -> list[bytes]:
    """The text's word 3-grams (lower-cased): what near-duplicate text shares."""
    words = text.lower().split() or [""]
    return [" ".join(words[i:i + 3]).encode() for i in range(max(1, len(words) - 2))]


PER_PROCESS = 1000  # texts per worker process at least: fewer do not repay starting it


def minhashes(texts: list[str]) -> list:
    """MinHash of each text's word 3-grams (datasketch; frozen as LeanMinHash). Hashing every 3-gram is the cost
    (a few million on a 13k-row pool), so large inputs are hashed by one process per core, each with datasketch's
    bulk form, which sets up the permutations once; equal texts are hashed once. The signatures do not depend on
    the number of processes."""
    from datasketch import LeanMinHash

    unique = list(dict.fromkeys(texts))
    workers = min(os.cpu_count() or 1, len(unique) // PER_PROCESS)
    if workers > 1:
        chunks = [unique[i::workers] for i in range(workers)]
        with multiprocessing.get_context("fork").Pool(workers) as pool:
            parts = pool.map(_hashvalues, chunks)
        values = [None] * len(unique)
        for i, part in enumerate(parts):
            values[i::workers] = part
    else:
        values = _hashvalues(unique)
    sigs = {x: LeanMinHash(seed=1, hashvalues=v, scheme=scheme) for x, (v, scheme) in zip(unique, values)}
    return [sigs[x] for x in texts]


def _hashvalues(texts: list[str]) -> list:
    from datasketch import MinHash

    return [(m.hashvalues, m.scheme) for m in MinHash.bulk([shingles(x) for x in texts], num_perm=NUM_PERM, seed=1)]


def minhash(text: str):
    """MinHash of one text (minhashes for many)."""
    return minhashes([text])[0]


class NearDups:
    """An index of signatures; `matches` lists the keys whose Jaccard with a signature reaches the threshold."""

    def __init__(self, threshold: float):
        from datasketch import MinHashLSH

        self.threshold, self.lsh, self.sigs = threshold, MinHashLSH(threshold=threshold, num_perm=NUM_PERM), {}

    def add(self, key: str, sig) -> None:
        if sig is not None:
            self.lsh.insert(key, sig)
            self.sigs[key] = sig

    def matches(self, sig) -> list[str]:
        if sig is None:
            return []
        return sorted(k for k in self.lsh.query(sig) if sig.jaccard(self.sigs[k]) >= self.threshold)
