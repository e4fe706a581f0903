"""Incremental detokenization with stop strings: the text deltas a stream hands out concatenate to the final text.

Each step decodes only a short window of the output ids (the ids since the last emitted boundary, with the token
before it for context), so the cost per token does not grow with the output. Text that could still turn out to be
the start of a stop string is held back until it cannot (or the request ends).
"""
from __future__ import annotations


class Detokenizer:
    """Per-request state: ``update(output_ids)`` after each new token -> (text so far, stop position or -1)."""

    def __init__(self, tokenizer, stop: tuple[str, ...] = ()):
        self.tok, self.stop = tokenizer, tuple(s for s in stop if s)
        self.prefix = self.read = 0          # decode window: ids[prefix:] minus ids[prefix:read]
        self.text = ""

    def _decode(self, ids: list[int]) -> str:
        return self.tok.decode(ids, skip_special_tokens=True)

    def update(self, ids: list[int]) -> int:
        """Extend ``self.text`` with the newly decodable text of ``ids``; return where a stop string starts in the
        text (-1 if none)."""
        before = self._decode(ids[self.prefix:self.read])
        now = self._decode(ids[self.prefix:])
        if len(now) > len(before) and not now.endswith("\ufffd") and now.startswith(before):
            self.text += now[len(before):]
            self.prefix, self.read = self.read, len(ids)
        elif not now.startswith(before):      # the window's decoding changed its head: decode everything once
            self.text, self.prefix, self.read = self._decode(ids), max(0, len(ids) - 1), len(ids)
        if not self.stop:
            return -1
        cuts = [self.text.find(s) for s in self.stop if s in self.text]
        return min(cuts) if cuts else -1

    def safe_length(self) -> int:
        """How much of ``self.text`` can be handed out now: all but a tail that may begin a stop string."""
        n = keep = len(self.text)
        for s in self.stop:
            for k in range(min(len(s) - 1, n), 0, -1):
                if s.startswith(self.text[n - k:]):
                    keep = min(keep, n - k)
                    break
        return keep
