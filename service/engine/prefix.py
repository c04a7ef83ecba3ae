"""PrefixCache: the KV of finished requests, kept so that a new prompt that starts the same way
skips prefilling that part (a shared system prompt, the next turn of a chat, a retried request).

An entry is the token ids a request's cache held when it finished (its prompt and its answer but
the last token) and the runner's copy of that cache (`Runner.save`). Entries are found by the
hashes of their first 16, 32, ... tokens, and a match is always confirmed on the token ids
themselves, so a hash collision can only cost a miss, never hand one request another's cache. The
least recently used entries go first when the kept copies would pass `budget` bytes (the engine
sets it to what its KV budget leaves free, `fit`).

Every entry belongs to a scope, its requests' `cache_salt` (None: unsalted): a prompt only finds
entries of its own scope, so whoever does not know a salt cannot learn, from the time to a first
token, what its requests sent.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from itertools import count
from typing import Any

BLOCK = 16  # entries are indexed by their prefixes of a multiple of this many tokens


@dataclass(eq=False)
class PrefixEntry:
    tokens: list[int]  # what the saved cache holds, position by position
    saved: Any  # the runner's copy of those positions (`Runner.save`)
    nbytes: int
    salt: str | None = None  # its scope


def block_keys(tokens: list[int], salt: str | None = None) -> list[int]:
    """Chained hashes of tokens[:16], tokens[:32], ... in scope `salt`: key i stands for the first
    (i + 1) * BLOCK tokens."""
    keys, key = [], hash(salt)
    for end in range(BLOCK, len(tokens) + 1, BLOCK):
        key = hash((key, *tokens[end - BLOCK : end]))
        keys.append(key)
    return keys


def common_length(a: list[int], b: list[int], known: int = 0) -> int:
    """How many leading tokens `a` and `b` share, given that the first `known` are equal."""
    n = known
    for x, y in zip(a[known:], b[known:], strict=False):
        if x != y:
            break
        n += 1
    return n


class PrefixCache:
    """Finished requests' caches by their token ids, least recently used out first; see the module docstring."""

    def __init__(self, budget: int) -> None:
        self.budget = budget
        self.nbytes = 0
        self._entries: OrderedDict[int, PrefixEntry] = OrderedDict()  # by id, least recently used first
        self._by_key: dict[int, dict[int, None]] = {}  # block key -> ids of entries with that prefix
        self._ids = count()

    def __len__(self) -> int:
        return len(self._entries)

    def match(self, prompt: list[int], salt: str | None = None) -> tuple[PrefixEntry, int] | None:
        """The entry of scope `salt` sharing the longest start with `prompt` and how many tokens it
        covers, leaving at least the prompt's last token to run (its logits give the first new
        token); None below BLOCK."""
        head = prompt[:-1]
        deepest = None
        for i, key in enumerate(block_keys(head, salt)):  # key i held implies keys 0..i-1 held (chained)
            if key not in self._by_key:
                break
            deepest = (i + 1) * BLOCK, key
        if deepest is None:
            return None
        end, key = deepest
        for entry_id in reversed(self._by_key[key]):  # the most recent entry with this prefix first
            entry = self._entries[entry_id]
            if entry.salt == salt and entry.tokens[:end] == head[:end]:  # a hash says "maybe"; these decide
                self._entries.move_to_end(entry_id)
                return entry, common_length(entry.tokens, head, end)
        return None

    def covers(self, tokens: list[int], salt: str | None = None) -> bool:
        """Whether some entry of scope `salt` already holds all of `tokens` (keeping them again would add nothing)."""
        keys = block_keys(tokens, salt)
        if not keys:
            return True
        for entry_id in reversed(self._by_key.get(keys[-1], {})):
            entry = self._entries[entry_id]
            if entry.salt == salt and len(entry.tokens) >= len(tokens) and entry.tokens[: len(tokens)] == tokens:
                self._entries.move_to_end(entry_id)
                return True
        return False

    def add(self, tokens: list[int], saved: Any, nbytes: int, salt: str | None = None) -> None:
        """Keep `saved` (the cache of `tokens`) in scope `salt`, dropping the least recently used
        entries past the budget."""
        if nbytes > self.budget or len(tokens) < BLOCK:
            return
        entry_id = next(self._ids)
        self._entries[entry_id] = PrefixEntry(list(tokens), saved, nbytes, salt)
        for key in block_keys(tokens, salt):
            self._by_key.setdefault(key, {})[entry_id] = None
        self.nbytes += nbytes
        self.fit(self.budget)

    def fit(self, budget: int) -> None:
        """Change the budget, dropping the least recently used entries past it."""
        self.budget = budget
        while self.nbytes > self.budget:
            self._drop(next(iter(self._entries)))

    def _drop(self, entry_id: int) -> None:
        entry = self._entries.pop(entry_id)
        self.nbytes -= entry.nbytes
        for key in block_keys(entry.tokens, entry.salt):
            held = self._by_key.get(key)
            if held is not None:
                held.pop(entry_id, None)
                if not held:
                    del self._by_key[key]
