"""Near-duplicate text by MinHash (datasketch): the one query-and-verify rule that clean (drop repeats) and split
(keep similar answers on one side, find leaks) share. LSH proposes candidates; the estimated Jaccard of the
word 3-gram sets verifies them against the threshold."""

from __future__ import annotations

NUM_PERM = 128  # MinHash permutations: Jaccard estimates within about +-0.09 (1/sqrt(128))


def minhash(text: str):
    """MinHash of the text's word 3-grams (lower-cased)."""
    from datasketch import MinHash

    words = text.lower().split() or [""]
    m = MinHash(num_perm=NUM_PERM, seed=1)
    m.update_batch([" ".join(words[i:i + 3]).encode() for i in range(max(1, len(words) - 2))])
    return m


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
