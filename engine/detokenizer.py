"""Incremental detokenization and stop-string matching.

Decoding a growing token list one token at a time breaks multi-byte
characters and SentencePiece-style leading spaces; the standard remedy (as in
vLLM and TGI) decodes a short window twice, with and without the newest
tokens, and emits the difference once it no longer ends in U+FFFD.
"""

from __future__ import annotations

_REPLACEMENT = "\ufffd"


class IncrementalDetokenizer:
    def __init__(self, tokenizer, prompt_token_ids: list[int], stop: list[str]):
        self.tokenizer = tokenizer
        self.stop = stop
        self.max_stop_len = max((len(s) for s in stop), default=0)
        self.tokens: list[int] = list(prompt_token_ids[-6:])  # a little context for leading spaces
        self.prefix_offset = 0
        self.read_offset = len(self.tokens)
        self.text = ""
        self.emitted = 0  # characters of `text` handed out so far

    def add(self, token_ids: list[int]) -> tuple[str, str | None]:
        """Append tokens; returns (text safe to emit now, the stop string hit or None).

        With stop strings, the last `len(longest stop) - 1` characters are held
        back until they can no longer begin a stop string, so streamed text
        never has to be retracted; `flush()` releases them at the end. On a
        hit the text is cut before the stop string (OpenAI semantics)."""
        self.tokens.extend(token_ids)
        decode = self.tokenizer.decode
        prefix = decode(self.tokens[self.prefix_offset:self.read_offset], skip_special_tokens=True)
        full = decode(self.tokens[self.prefix_offset:], skip_special_tokens=True)
        if len(full) > len(prefix) and not full.endswith(_REPLACEMENT):
            self.text += full[len(prefix):]
            self.prefix_offset = self.read_offset
            self.read_offset = len(self.tokens)
        hit = None
        if self.stop:
            search_from = max(0, self.emitted - self.max_stop_len + 1)
            found = [(i, s) for s in self.stop if (i := self.text.find(s, search_from)) >= 0]
            if found:
                pos, hit = min(found)
                self.text = self.text[:pos]
                return self._emit(len(self.text)), hit
            return self._emit(len(self.text) - self.max_stop_len + 1), None
        return self._emit(len(self.text)), None

    def replay(self, token_ids: list[int]) -> None:
        """Advance past tokens whose text was already streamed (by another worker, before a handover
        or a migration), one at a time so the state matches the incremental run's exactly."""
        for t in token_ids:
            self.add([t])

    def flush(self) -> str:
        """The held-back tail, once the sequence has finished."""
        return self._emit(len(self.text))

    def _emit(self, upto: int) -> str:
        if upto <= self.emitted:
            return ""
        out = self.text[self.emitted:upto]
        self.emitted = upto
        return out
