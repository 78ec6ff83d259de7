"""Per-request sampling for the embedded engine: libllama's samplers, a grammar, and log-probabilities.

    sampler = build_sampler(model, request.sampling)   # None: a plain greedy argmax will do
    sampled = sampler.sample(ctx, idx)                  # Sampled(token, logprob, top)
    sampler.free()

The chain is libllama's, in llama.cpp's order: logit bias, penalties, then top-k, top-p, min-p,
temperature and a seeded draw (or greedy). A grammar (structured output, tool calls) is kept out
of the chain and checked the way llama.cpp's common sampler does it: the chain picks a token from
the unconstrained logits, the grammar checks that one token, and only when it refuses is the
grammar applied to the candidates and the chain run again. Applying a grammar means decoding and
matching every candidate's text, about 49k of them for SmolLM2 (262k for Gemma 3), once per token;
the check costs one. forged goes further than llama.cpp before paying that: greedy requests apply
the grammar to the 256 most likely tokens first (exact: the most likely allowed token is among
them whenever any of them is allowed), and sampled requests draw up to SAMPLED_DRAWS times (each
draw refused by the grammar is rejection sampling: without top-k/top-p/min-p the accepted draw
follows exactly the grammar-masked distribution; with them, the same approximation llama.cpp's
first draw makes). The whole vocabulary goes through the grammar only when those fail.
The step loop samples its sequences one after another, so what a grammar costs is added to the
step of every other sequence in the batch; docs/benchmarks.md has the measurement.

Log-probabilities are the model's own distribution: a log-softmax of the raw logits row, before
bias, penalties, grammar and temperature (vLLM's default, "raw_logprobs").

A grammar is only ever told about tokens it allowed: libllama aborts the process when a grammar
accepts an end-of-generation token before it is complete.
"""

from __future__ import annotations

import ctypes
import math
from dataclasses import dataclass
from typing import Any

import llama_cpp as ll
import numpy as np

from forged.engine.base import EngineError, SamplingParams
from forged.engine.llama_cpp.grammar import to_gbnf

# llama_token_data: {int32 id; float logit; float p}
TOKEN_DATA = np.dtype([("id", np.int32), ("logit", np.float32), ("p", np.float32)], align=True)
GREEDY_GRAMMAR_CANDIDATES = 256
SAMPLED_DRAWS = 4


@dataclass(frozen=True)
class Sampled:
    token: int
    logprob: float | None = None  # None unless the request asked for logprobs
    top: tuple[tuple[int, float], ...] = ()  # the most likely tokens, most likely first


def build_sampler(model: Any, params: SamplingParams) -> Sampler | None:
    """The request's sampler; None when a plain argmax over the logits is all it needs."""
    greedy = params.temperature <= 0
    plain_greedy = greedy and not (params.logit_bias or _penalised(params) or params.constraint
                                   or params.logprobs is not None)
    return None if plain_greedy else Sampler(model, params)


def _penalised(params: SamplingParams) -> bool:
    return params.presence_penalty != 0 or params.frequency_penalty != 0 or params.repeat_penalty != 1


class Sampler:
    def __init__(self, model: Any, params: SamplingParams) -> None:
        self.n_vocab: int = model.n_vocab
        self.greedy = params.temperature <= 0
        self.logprobs = params.logprobs
        self._grammar: Any = None
        self._chain: Any = None
        self._ids = np.arange(self.n_vocab, dtype=np.int32)
        self._one = np.zeros(1, dtype=TOKEN_DATA)
        try:
            if params.constraint is not None:
                gbnf = to_gbnf(params.constraint)
                self._grammar = ll.llama_sampler_init_grammar(model.vocab, gbnf.encode(), b"root")
                if not self._grammar:
                    raise EngineError("libllama could not parse the grammar for this request")
            self._chain = _chain(self.n_vocab, params)
        except BaseException:
            self.free()
            raise

    def sample(self, ctx: Any, idx: int) -> Sampled:
        row = ll.llama_get_logits_ith(ctx, idx)
        if not row:
            raise EngineError(f"libllama has no logits for batch position {idx}")
        logits = np.ctypeslib.as_array(row, shape=(self.n_vocab,))
        token = self.choose(logits)
        if self._grammar:
            if not self._allows(token):  # never hand a grammar a token it refused (see the docstring)
                raise EngineError(f"sampled token {token} is not allowed by the request's grammar")
            ll.llama_sampler_accept(self._grammar, token)
        if self._chain:
            ll.llama_sampler_accept(self._chain, token)  # the penalties count what was generated
        return self._with_logprobs(logits, token)

    def choose(self, logits: np.ndarray) -> int:
        """The next token for this logits row, accepted by nothing yet (sample() does that)."""
        if self._chain is None:  # greedy, with a grammar or logprobs only
            token = int(logits.argmax())
            if self._grammar and not self._allows(token):
                token = self._greedy_in_grammar(logits)
            return token
        token = self._run_chain(logits, grammar=False)
        draws = SAMPLED_DRAWS if self.greedy else 1  # a greedy chain would only draw the same token again
        while self._grammar and not self._allows(token):
            token = self._run_chain(logits, grammar=draws >= SAMPLED_DRAWS)
            draws += 1
        return token

    def free(self) -> None:
        for name in ("_grammar", "_chain"):
            sampler = getattr(self, name)
            if sampler:
                ll.llama_sampler_free(sampler)
                setattr(self, name, None)

    # ------------------------------------------------------------ internals

    def _apply(self, sampler: Any, cur: np.ndarray) -> ll.llama_token_data_array:
        arr = ll.llama_token_data_array(data=cur.ctypes.data_as(ll.llama_token_data_p), size=len(cur),
                                        selected=-1, sorted=False)
        ll.llama_sampler_apply(sampler, ctypes.byref(arr))
        return arr

    def _allows(self, token: int) -> bool:
        one = self._one
        one["id"], one["logit"], one["p"] = token, 0.0, 0.0
        self._apply(self._grammar, one)
        return bool(np.isfinite(one["logit"][0]))

    def _candidates(self, logits: np.ndarray) -> np.ndarray:
        cur = np.empty(self.n_vocab, dtype=TOKEN_DATA)
        cur["id"] = self._ids
        cur["logit"] = logits
        cur["p"] = 0.0
        return cur

    def _run_chain(self, logits: np.ndarray, grammar: bool) -> int:
        cur = self._candidates(logits)
        if grammar:
            self._apply(self._grammar, cur)
            if not np.isfinite(cur["logit"]).any():
                raise EngineError("the request's grammar allows no token here")
        arr = self._apply(self._chain, cur)
        if not 0 <= arr.selected < arr.size:
            raise EngineError("libllama's sampler chain selected no token")
        # The chain may have moved the data pointer (samplers may); read through it.
        return int(arr.data[arr.selected].id)

    def _greedy_in_grammar(self, logits: np.ndarray) -> int:
        """The most likely token the grammar allows: among the top candidates first, which is exact
        for greedy decoding (a less likely token is only needed when all of those are refused)."""
        k = min(GREEDY_GRAMMAR_CANDIDATES, self.n_vocab)
        top = np.argpartition(logits, -k)[-k:]
        top = top[np.argsort(logits[top])[::-1]]
        cur = np.empty(k, dtype=TOKEN_DATA)
        cur["id"], cur["logit"], cur["p"] = top, logits[top], 0.0
        self._apply(self._grammar, cur)
        allowed = np.flatnonzero(np.isfinite(cur["logit"]))
        if len(allowed):
            return int(cur["id"][allowed[0]])
        cur = self._candidates(logits)
        self._apply(self._grammar, cur)
        masked = cur["logit"]
        if not np.isfinite(masked).any():
            raise EngineError("the request's grammar allows no token here")
        return int(cur["id"][int(masked.argmax())])

    def _with_logprobs(self, logits: np.ndarray, token: int) -> Sampled:
        if self.logprobs is None:
            return Sampled(token)
        top_logit = float(logits.max())
        log_z = top_logit + math.log(float(np.exp(logits - top_logit, dtype=np.float64).sum()))
        top: tuple[tuple[int, float], ...] = ()
        if self.logprobs > 0:
            k = min(self.logprobs, self.n_vocab)
            ids = np.argpartition(logits, -k)[-k:]
            ids = ids[np.argsort(logits[ids])[::-1]]
            top = tuple((int(t), float(logits[t]) - log_z) for t in ids)
        return Sampled(token, float(logits[token]) - log_z, top)


def _chain(n_vocab: int, params: SamplingParams) -> Any:
    """bias, penalties, then greedy or top-k/top-p/min-p/temperature/dist; None when greedy needs
    no chain (a grammar and logprobs are handled outside it)."""
    samplers = []
    if params.logit_bias:
        bias = (ll.llama_logit_bias * len(params.logit_bias))()
        for i, (token, value) in enumerate(params.logit_bias):
            bias[i].token, bias[i].bias = token, value
        samplers.append(ll.llama_sampler_init_logit_bias(n_vocab, len(params.logit_bias), bias))
    if _penalised(params):
        # OpenAI's penalties count every token the request generated, so the window is max_tokens.
        samplers.append(ll.llama_sampler_init_penalties(n_vocab, params.max_tokens, params.repeat_penalty,
                                                        params.frequency_penalty, params.presence_penalty))
    if params.temperature <= 0:
        if not samplers:
            return None
        samplers.append(ll.llama_sampler_init_greedy())
    else:
        if params.top_k > 0:
            samplers.append(ll.llama_sampler_init_top_k(params.top_k))
        if params.top_p < 1.0:
            samplers.append(ll.llama_sampler_init_top_p(params.top_p, 1))
        if params.min_p > 0:
            samplers.append(ll.llama_sampler_init_min_p(params.min_p, 1))
        samplers.append(ll.llama_sampler_init_temp(params.temperature))
        seed = ll.LLAMA_DEFAULT_SEED if params.seed is None else params.seed & 0xFFFFFFFF
        samplers.append(ll.llama_sampler_init_dist(seed))
    chain_params = ll.llama_sampler_chain_default_params()
    chain_params.no_perf = True
    chain = ll.llama_sampler_chain_init(chain_params)
    for sampler in samplers:
        ll.llama_sampler_chain_add(chain, sampler)  # the chain owns and frees them
    return chain
