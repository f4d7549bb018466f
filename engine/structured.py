"""Structured outputs: grammars compiled with xgrammar, applied as a token bitmask on a step's logits.

- `GrammarCompiler` turns a `StructuredOutput` (JSON schema, any JSON object, regex, choice) into
  xgrammar's compiled grammar for one tokenizer. Compiling takes milliseconds to seconds, so it is
  cached (LRU, keyed by the spec) and thread-safe, and it never runs on an engine loop thread in
  serving: the workers compile on an executor thread before they submit a request (`Worker.precompile`),
  so the loop finds it in the cache; the router compiles the same spec on its tokenize thread to answer a
  bad one with a 400 before any worker sees it. The bare engine compiles on first use.
- `GrammarState` is one request's matcher. It is built from the compiled grammar by replaying the
  tokens the request already has: a decode worker continues a request whose first token the prefill
  worker sampled under the grammar, and a migrated request brings its streamed tokens, so neither the
  hand-over nor migration carries matcher state: the tokens are the state.
- `apply_masks` fills one bitmask row per grammar row (one C++ call each: no Python loop over the
  vocabulary) and masks all of them in one kernel call (xgrammar's CPU or CUDA kernel), before the
  sampling controls and the sampler. Rows without a grammar are untouched and cost nothing.

EOS: the model's EOS ids are the grammar's stop tokens, which the mask allows only where the grammar
may end, so the output ends with EOS exactly when it is complete. A model without an EOS id (the tiny
test models) ends the request as soon as the grammar is complete (`GrammarState.terminated`).
"""

from __future__ import annotations

import json
import logging
import re
import threading
import warnings
from collections import OrderedDict

import torch

from pdserve.engine.errors import InvalidRequestError
from pdserve.engine.sampling import MAX_GUIDED_CHOICES, StructuredOutput

logger = logging.getLogger(__name__)

# Compiled grammars kept per compiler (LRU). A JSON-schema grammar for the default model is tens of KB.
CACHE_SIZE = 256
MAX_CHOICE_CHARS = 1024
# Compile time grows with repetition counts (a schema's maxLength 10,000 took 8 s on 2 cores; 1,000 about
# 0.1-0.3 s): every count in a regex and every length, item and property bound in a schema is at most this.
MAX_REPEAT = 2048
_COUNT = re.compile(r"(?<!\\)\{\s*(\d+)\s*(?:,\s*(\d*)\s*)?\}")
_BOUNDS = ("minLength", "maxLength", "minItems", "maxItems", "minProperties", "maxProperties")


class InvalidGrammarError(InvalidRequestError):
    """A structured-output spec that does not compile (an invalid schema, a bad regex, ...)."""


class GrammarCompiler:
    """Compiles `StructuredOutput`s for one tokenizer; thread-safe, cached."""

    def __init__(self, tokenizer, vocab_size: int, stop_token_ids: set[int] | frozenset[int]):
        self.tokenizer = tokenizer
        self.vocab_size = vocab_size
        self.stop_token_ids = sorted(stop_token_ids)
        self._lock = threading.Lock()
        self._compiler = None  # built on first use (reading the vocabulary takes ~0.2 s)
        self._cache: OrderedDict[tuple[str, str], object] = OrderedDict()

    def _xgr(self):
        import xgrammar as xgr

        with self._lock:
            if self._compiler is None:
                if self.tokenizer is None:
                    raise InvalidRequestError("response_format", "this model has no tokenizer, so structured "
                                              "outputs are unavailable")
                with warnings.catch_warnings():  # "no stop token ids": a model without EOS (see above)
                    warnings.simplefilter("ignore")
                    info = xgr.TokenizerInfo.from_huggingface(self.tokenizer, vocab_size=self.vocab_size,
                                                              stop_token_ids=self.stop_token_ids or None)
                self._compiler = xgr.GrammarCompiler(info, max_threads=1)
            return xgr, self._compiler

    def compile(self, so: StructuredOutput):
        """The compiled grammar of `so` (from the cache when it was compiled before), or
        `InvalidGrammarError` naming the request field it came from."""
        key = (so.kind, so.spec)
        with self._lock:
            hit = self._cache.get(key)
            if hit is not None:
                self._cache.move_to_end(key)
                return hit
        xgr, compiler = self._xgr()
        try:
            compiled = _compile(xgr, compiler, so)
        except InvalidGrammarError:
            raise
        except Exception as e:  # xgrammar raises RuntimeError/ValueError subclasses with its parser's message
            raise InvalidGrammarError(so.param, f"{so.param} does not compile: {_first_line(e)}") from None
        with self._lock:
            self._cache[key] = compiled
            while len(self._cache) > CACHE_SIZE:
                self._cache.popitem(last=False)
        return compiled

    def state(self, so: StructuredOutput, output_token_ids: list[int]) -> GrammarState:
        """A matcher for `so` that has consumed `output_token_ids` (the tokens the request already has)."""
        import xgrammar as xgr

        matcher = xgr.GrammarMatcher(self.compile(so), terminate_without_stop_token=not self.stop_token_ids)
        state = GrammarState(matcher, self.vocab_size)
        for i, tok in enumerate(output_token_ids):
            if not state.accept(tok):
                raise InvalidRequestError("output_token_ids", f"output token {i} ({tok}) does not match "
                                          f"the request's {so.param}")
        return state


def _compile(xgr, compiler, so: StructuredOutput):
    if so.kind == "json_object":
        return compiler.compile_builtin_json_grammar()
    if so.kind == "json":
        try:
            schema = json.loads(so.spec)
        except ValueError as e:
            raise InvalidGrammarError(so.param, f"{so.param}: the schema is not valid JSON: {e}") from None
        if not isinstance(schema, dict):
            raise InvalidGrammarError(so.param, f"{so.param}: a JSON schema must be an object")
        _check_schema(schema, so.param)
        _check_counts(schema, so.param)
        return compiler.compile_json_schema(json.dumps(_length_bounded_strings(schema)), any_whitespace=False,
                                            strict_mode=True)
    if so.kind == "regex":
        _check_regex_counts(so.spec, so.param)
        return compiler.compile_regex(so.spec)
    choices = choice_list(so.spec, so.param)  # kind == "choice"
    return compiler.compile_grammar("root ::= " + " | ".join(_ebnf_string(c) for c in choices))


def choice_list(spec: str, param: str = "guided_choice") -> list[str]:
    """guided_choice's strings, checked (non-empty list of at most MAX_GUIDED_CHOICES non-empty strings)."""
    try:
        choices = json.loads(spec)
    except ValueError:
        choices = None
    if not isinstance(choices, list) or not all(isinstance(c, str) for c in choices):
        raise InvalidGrammarError(param, f"{param} must be a list of strings")
    if not choices:
        raise InvalidGrammarError(param, f"{param} must list at least one string")
    if len(choices) > MAX_GUIDED_CHOICES:
        raise InvalidGrammarError(param, f"{param} takes at most {MAX_GUIDED_CHOICES} strings (got {len(choices)})")
    if any(not c or len(c) > MAX_CHOICE_CHARS for c in choices):
        raise InvalidGrammarError(param, f"{param}'s strings must be non-empty and at most {MAX_CHOICE_CHARS} "
                                  "characters long")
    return choices


def _ebnf_string(s: str) -> str:
    # an EBNF string literal: JSON's escapes, with every non-ASCII character spelt out as \\uXXXX
    return "".join(c if c.isascii() else f"\\u{ord(c):04x}" if ord(c) < 0x10000 else f"\\U{ord(c):08x}"
                   for c in json.dumps(s, ensure_ascii=False))


def _check_schema(schema: dict, param: str) -> None:
    """The schema against its JSON-Schema metaschema (xgrammar ignores what it does not know, e.g. a
    misspelt type)."""
    import jsonschema

    try:
        jsonschema.validators.validator_for(schema, default=jsonschema.Draft202012Validator).check_schema(schema)
    except jsonschema.SchemaError as e:
        where = "/".join(str(p) for p in e.absolute_path)
        raise InvalidGrammarError(param, f"{param}: invalid JSON schema{f' at {where}' if where else ''}: "
                                  f"{e.message}") from None


def _check_regex_counts(pattern: str, param: str) -> None:
    for m in _COUNT.finditer(pattern):
        if max(int(n) for n in m.groups() if n) > MAX_REPEAT:
            raise InvalidGrammarError(param, f"{param}: the repetition count {m.group(0)} is over this server's "
                                      f"limit of {MAX_REPEAT}")


def _check_counts(schema, param: str) -> None:
    """Every length, item and property bound, and every pattern's repetition counts, at most MAX_REPEAT."""
    stack = [schema]
    while stack:
        v = stack.pop()
        if isinstance(v, list):
            stack.extend(v)
        elif isinstance(v, dict):
            for k, x in v.items():
                if k in _BOUNDS and isinstance(x, int) and x > MAX_REPEAT:
                    raise InvalidGrammarError(param, f"{param}: {k} {x} is over this server's limit of {MAX_REPEAT}")
                if k == "pattern" and isinstance(x, str):
                    _check_regex_counts(x, param)
                elif k not in ("enum", "const", "default", "examples"):
                    stack.append(x)


def _length_bounded_strings(schema):
    """`schema` with each length-bounded string given a `pattern` of that length over printable ASCII
    other than quote and backslash. xgrammar (0.2.9) compiles minLength/maxLength to "any character but
    quote, backslash, CR, LF", which lets raw control characters into the string (invalid JSON), and a
    pattern's negated or non-ASCII classes let stray UTF-8 bytes through (measured on a byte-level
    vocabulary). Unbounded strings are compiled right and keep all of JSON. The cost: a length-bounded
    string holds no escapes and no non-ASCII characters."""
    if isinstance(schema, list):
        return [_length_bounded_strings(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    out = {k: _length_bounded_strings(v) if k not in ("enum", "const", "default", "examples") else v
           for k, v in schema.items()}
    types = out.get("type")
    is_string = types == "string" or isinstance(types, list) and types == ["string"]
    bounded = "minLength" in out or "maxLength" in out
    if is_string and bounded and not {"pattern", "format", "enum", "const"} & out.keys():
        lo, hi = out.get("minLength", 0), out.get("maxLength", "")
        if isinstance(lo, int) and (hi == "" or isinstance(hi, int)):
            out["pattern"] = f"^[ !#-\\[\\]-~]{{{lo},{hi}}}$"
    return out


def _first_line(e: Exception) -> str:
    text = str(e).strip().splitlines()
    return text[0][:500] if text else type(e).__name__


class GrammarState:
    """One request's grammar matcher (see the module docstring)."""

    __slots__ = ("matcher", "vocab_size")

    def __init__(self, matcher, vocab_size: int):
        self.matcher = matcher
        self.vocab_size = vocab_size

    def accept(self, token: int) -> bool:
        return bool(self.matcher.accept_token(token))

    @property
    def terminated(self) -> bool:
        """The output is complete (EOS accepted, or, for a model without EOS, the grammar ended)."""
        return bool(self.matcher.is_terminated())


def apply_masks(logits: torch.Tensor, states: list[GrammarState | None]) -> None:
    """Mask, in place, every token row i's grammar `states[i]` does not allow next (rows with None pass)."""
    import xgrammar as xgr

    rows = [i for i, s in enumerate(states) if s is not None]
    if not rows:
        return
    vocab = states[rows[0]].vocab_size
    bitmask = xgr.allocate_token_bitmask(logits.shape[0], vocab)
    for i in rows:
        states[i].matcher.fill_next_token_bitmask(bitmask, i)
    # A grammar that allows nothing more (complete, on a model without EOS; or a language with no string)
    # would leave a row of -inf, which cannot be sampled: that row stays unmasked, the grammar refuses the
    # token sampled, and the request ends (`LLMEngine._append_token`).
    empty = (bitmask.index_select(0, torch.tensor(rows)) == 0).all(dim=1).tolist()
    if any(empty):
        rows = [i for i, e in zip(rows, empty, strict=True) if not e]
        if not rows:
            return
    if logits.device.type != "cpu":
        bitmask = bitmask.to(logits.device, non_blocking=True)
    xgr.apply_token_bitmask_inplace(logits, bitmask, vocab_size=min(vocab, logits.shape[-1]),
                                    indices=None if len(rows) == len(states) else rows)
