"""Prefix sharing for scored requests: full KV pages of a prompt, keyed by adapter and token prefix.

The choices of one question (same adapter, same prompt) compute the prompt's K/V once. The first to be
scheduled registers the pages it is about to compute; the others hold the same pages (the page pool counts
their holders) and compute only their own tokens, attending to the shared pages through the paged prefill
kernel. That works inside one prefill batch too: every layer writes the K/V of all the batch's tokens before
any token attends. Only full pages that end before the prompt's last token are shared, so a sharer never
writes into a shared page and still computes the last prompt token, whose logits predict its first
continuation token.

A page stays keyed after its last holder finishes ("idle"): a sibling in a later batch still finds it. Idle
pages count as free; the pool takes them back, least recently released first, when it needs pages. A page
is keyed only once its K/V is computed: the pages of a batch that never ran (out of memory) are forgotten
when their holders let go. A key is a digest of the adapter id and every token up to the page's end.
"""
import hashlib
from array import array
from collections import OrderedDict


def prefix_keys(adapter_id: str | None, prompt_token_ids: list[int], block_size: int) -> list[bytes]:
    """Keys of the prompt's full pages that end before its last token, first page first."""
    keys, digest = [], hashlib.sha256((adapter_id or "").encode()).digest()   # "" is no adapter id: the base
    for end in range(block_size, len(prompt_token_ids), block_size):
        digest = hashlib.sha256(digest + array("q", prompt_token_ids[end - block_size:end]).tobytes()).digest()
        keys.append(digest)
    return keys


def siblings_together(seqs: list) -> list:
    """Sequences that may share pages next to each other (at the first one's place), so they land in one
    batch; the order is otherwise kept."""
    groups: dict[object, list] = {}
    for seq in seqs:
        groups.setdefault(seq.prefix_keys[-1] if seq.prefix_keys else id(seq), []).append(seq)
    return [seq for group in groups.values() for seq in group]


class PrefixCache:
    """Which page holds which key. The page pool owns the pages and their holder counts."""

    def __init__(self):
        self.page_of: dict[bytes, int] = {}
        self.key_of: dict[int, bytes] = {}
        self.idle: OrderedDict[int, None] = OrderedDict()   # keyed pages nobody holds, least recently released first
        self.pending: set[int] = set()                      # keyed pages the next forward pass computes

    def lookup(self, keys: list[bytes]) -> list[int]:
        """Pages of the longest run of leading keys that are cached."""
        pages = []
        for key in keys:
            page = self.page_of.get(key)
            if page is None:
                break
            pages.append(page)
        return pages

    def insert(self, keys: list[bytes], pages: list[int]) -> None:
        """Key the pages a sequence is about to compute (a key already cached keeps its page)."""
        for key, page in zip(keys, pages):
            if key not in self.page_of:
                self.page_of[key], self.key_of[page] = page, key
                self.pending.add(page)

    def mark_computed(self) -> None:
        """The forward pass that computes the pending pages has run."""
        self.pending.clear()

    def release(self, page: int) -> bool:
        """The page's last holder let go: True if it stays cached (idle), False if it is free."""
        if page not in self.key_of:
            return False
        if page in self.pending:      # never computed: nothing to share
            self._forget(page)
            return False
        self.idle[page] = None
        return True

    def revive(self, page: int) -> None:
        """An idle page is held again."""
        del self.idle[page]

    def reclaim(self) -> int:
        """Take the least recently released idle page for other use."""
        page, _ = self.idle.popitem(last=False)
        self._forget(page)
        return page

    def _forget(self, page: int) -> None:
        self.pending.discard(page)
        del self.page_of[self.key_of.pop(page)]
