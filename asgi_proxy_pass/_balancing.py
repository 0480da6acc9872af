"""Load-balancing strategies: pure functions that choose one server among the candidates.

The caller (`Upstream.select`) passes only the servers that may take the request now (not down,
not draining, not failed, not unhealthy, not already tried by this request); these functions
update the per-server counters nginx keeps, and do no I/O and read no clock.

    round_robin  smooth weighted round robin, nginx's default (ngx_http_upstream_get_peer)
    least_conn   fewest in-flight requests per unit of weight, ties by round robin (least_conn)
    random_two   two random picks by weight, the less loaded wins (random two least_conn)
    hash         a consistent hash ring of the key (hash $key consistent, ketama)
    ip_hash      the same ring, keyed by the client's whole IP address
"""

from __future__ import annotations

import bisect
import hashlib
import random
from collections.abc import Collection, Iterable, Sequence
from typing import Generic, Protocol, TypeVar

__all__ = ["STRATEGIES", "Peer", "Ring", "least_conn", "random_two", "smooth_weighted"]

STRATEGIES = ("round_robin", "least_conn", "random_two", "hash", "ip_hash")


class Peer(Protocol):
    """What a strategy reads and updates on a server."""

    weight: int
    effective_weight: int
    current_weight: int
    in_flight: int


P = TypeVar("P", bound=Peer)


def smooth_weighted(candidates: Sequence[P]) -> P:
    """nginx's smooth weighted round robin.

    Each candidate adds its effective weight to its current weight; the highest current weight
    wins (the first one on a tie) and gives back the sum of the effective weights. Weights 5:1:1
    give `a a b a c a a`. Every pass also returns one point of effective weight to a candidate
    whose weight was cut by failures, so it comes back gradually.
    """
    best = candidates[0]
    total = 0
    for peer in candidates:
        peer.current_weight += peer.effective_weight
        total += peer.effective_weight
        if peer.effective_weight < peer.weight:
            peer.effective_weight += 1
        if peer.current_weight > best.current_weight:
            best = peer
    best.current_weight -= total
    return best


def least_conn(candidates: Sequence[P]) -> P:
    """The candidate with the fewest in-flight requests per unit of weight (nginx `least_conn`).

    Candidates tied on that ratio share requests by smooth weighted round robin, as in nginx.
    """
    best = candidates[0]
    ties = [best]
    for peer in candidates[1:]:
        # Cross-multiplied, as nginx does, to compare in_flight / weight without fractions.
        mine, theirs = peer.in_flight * best.weight, best.in_flight * peer.weight
        if mine < theirs:
            best, ties = peer, [peer]
        elif mine == theirs:
            ties.append(peer)
    return best if len(ties) == 1 else smooth_weighted(ties)


def random_two(candidates: Sequence[P], rng: random.Random) -> P:
    """Power of two choices (nginx `random two least_conn`).

    Two different candidates are drawn at random, in proportion to their weights, and the one
    with fewer in-flight requests per unit of weight wins (the first drawn on a tie).
    """
    if len(candidates) == 1:
        return candidates[0]
    first = rng.choices(candidates, weights=[p.weight for p in candidates])[0]
    rest = [p for p in candidates if p is not first]
    second = rng.choices(rest, weights=[p.weight for p in rest])[0]
    if second.in_flight * first.weight < first.in_flight * second.weight:
        return second
    return first


class Ring(Generic[P]):
    """A consistent hash ring (ketama), as nginx's `hash $key consistent`.

    Each server gets `POINTS` points per unit of weight, placed by hashing its name, so adding a
    server to N others moves about 1/(N+1) of the keys, all of them to the new server, and a key
    whose server cannot be used goes to the next server clockwise instead.

    Args:
        members: `(name, weight, server)` for every server of the tier, usable or not: the ring
            must not move when a server is only temporarily out.
    """

    POINTS = 160  # per unit of weight, like nginx

    def __init__(self, members: Iterable[tuple[str, int, P]]) -> None:
        points: list[tuple[int, int, P]] = []
        for order, (name, weight, peer) in enumerate(members):
            for i in range(self.POINTS * weight // 4):
                # One 16-byte digest gives four 32-bit points, as in libketama.
                digest = hashlib.blake2b(f"{name}-{i}".encode(), digest_size=16).digest()
                for j in range(0, 16, 4):
                    points.append((int.from_bytes(digest[j : j + 4], "big"), order, peer))
        points.sort(key=lambda point: point[:2])
        self._hashes = [point[0] for point in points]
        self._peers = [point[2] for point in points]

    def __len__(self) -> int:
        return len(self._hashes)

    def lookup(self, key: bytes, candidates: Collection[P]) -> P | None:
        """The first server clockwise from `key`'s point that is among `candidates`."""
        usable = set(map(id, candidates))
        start = bisect.bisect_left(self._hashes, _key_hash(key))
        size = len(self._peers)
        for step in range(size):
            peer = self._peers[(start + step) % size]
            if id(peer) in usable:
                return peer
        return None


def _key_hash(key: bytes) -> int:
    return int.from_bytes(hashlib.blake2b(key, digest_size=4).digest(), "big")
