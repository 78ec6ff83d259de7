"""A loaded GGUF model through libllama: tokenizer, token pieces, metadata and the chat template."""

from __future__ import annotations

import ctypes
import json
import logging
from pathlib import Path
from typing import Any

import jinja2
import jinja2.sandbox
import llama_cpp as ll
import markupsafe

from forged.engine.base import EngineError, RequestRejected
from forged.engine.llama_cpp.backends import LOAD_LOG
from forged.engine.model_files import check_gguf

log = logging.getLogger(__name__)

_backend_ready = False
_errors: list[str] = []  # libllama's error lines since the current model load began


def init_backend() -> None:
    global _backend_ready
    if not _backend_ready:
        ll.llama_backend_init()
        ll.llama_log_set(_quiet_log, ctypes.c_void_p(0))
        _backend_ready = True


@ll.llama_log_callback
def _quiet_log(level: int, text: bytes, user_data: ctypes.c_void_p) -> None:
    # libllama narrates every tensor it loads: that goes to debug. Its errors are kept so that a
    # failed load can be reported in forged's own one-line message.
    msg = text.decode("utf-8", "replace").strip()
    if not msg:
        return
    if level == 4 and len(_errors) < 8:  # GGML_LOG_LEVEL_ERROR; the first few are the ones that tell
        _errors.append(msg)
    LOAD_LOG.feed(msg)  # where the layers and the KV went (backends.py)
    log.debug("libllama: %s", msg)


SPLIT_MODES = {"none": ll.LLAMA_SPLIT_MODE_NONE, "layer": ll.LLAMA_SPLIT_MODE_LAYER, "row": ll.LLAMA_SPLIT_MODE_ROW}


class LlamaModel:
    def __init__(self, path: Path, n_gpu_layers: int, *, split_mode: str | None = None, main_gpu: int = 0,
                 tensor_split: tuple[float, ...] = ()) -> None:
        """`split_mode`, `main_gpu`, `tensor_split` (CUDA order) spread the model over several GPUs
        (forged.gpus); without them libllama's defaults apply."""
        init_backend()
        check_gguf(path)
        params = ll.llama_model_default_params()
        params.n_gpu_layers = n_gpu_layers
        if split_mode is not None:
            params.split_mode = SPLIT_MODES[split_mode]
            params.main_gpu = main_gpu
            # libllama reads llama_max_devices() floats through this pointer: the array stays alive with the model.
            self._tensor_split = (ctypes.c_float * ll.llama_max_devices())(*tensor_split)
            params.tensor_split = self._tensor_split
        _errors.clear()
        model = ll.llama_model_load_from_file(str(path).encode(), params)
        if not model:
            # The first error is the cause (a bad header, a tensor past the end of the file); the
            # ones after it only say that the load failed.
            detail = f": {_errors[0]}" if _errors else ""
            raise EngineError(f"{path}: libllama could not load this model file (corrupt or unsupported "
                              f"GGUF){detail}")
        self.path = path
        self.ptr = model
        self.vocab = ll.llama_model_get_vocab(model)
        self.n_ctx_train = ll.llama_model_n_ctx_train(model)
        self.n_vocab = ll.llama_vocab_n_tokens(self.vocab)
        self.n_params = ll.llama_model_n_params(model)
        self.size_bytes = ll.llama_model_size(model)
        self.add_bos = bool(ll.llama_vocab_get_add_bos(self.vocab))
        self.metadata = read_metadata(model)
        self._piece_buf = ctypes.create_string_buffer(256)
        self._template = self._compile_template()

    def free(self) -> None:
        if self.ptr:
            ll.llama_model_free(self.ptr)
            self.ptr = None

    # ------------------------------------------------------------ tokens

    def tokenize(self, text: str, *, add_special: bool, parse_special: bool) -> list[int]:
        data = text.encode("utf-8", "surrogatepass")
        cap = len(data) + 8
        buf = (ll.llama_token * cap)()
        n = ll.llama_tokenize(self.vocab, data, len(data), buf, cap, add_special, parse_special)
        if n < 0:
            cap = -n
            buf = (ll.llama_token * cap)()
            n = ll.llama_tokenize(self.vocab, data, len(data), buf, cap, add_special, parse_special)
        if n < 0:
            raise RequestRejected("the prompt could not be tokenized")
        return list(buf[:n])

    def piece(self, token: int) -> bytes:
        """The raw bytes of one token (may be part of a UTF-8 character). Not thread-safe: step thread only."""
        n = ll.llama_token_to_piece(self.vocab, token, self._piece_buf, len(self._piece_buf), 0, False)
        if n < 0:
            big = ctypes.create_string_buffer(-n)
            n = ll.llama_token_to_piece(self.vocab, token, big, len(big), 0, False)
            return big.raw[:n]
        return self._piece_buf.raw[:n]

    def is_eog(self, token: int) -> bool:
        return bool(ll.llama_vocab_is_eog(self.vocab, token))

    def token_text(self, token: int) -> str:
        buf = ctypes.create_string_buffer(256)
        n = ll.llama_token_to_piece(self.vocab, token, buf, len(buf), 0, True)
        return buf.raw[: max(n, 0)].decode("utf-8", "replace")

    # ------------------------------------------------------------ chat template

    def _compile_template(self) -> jinja2.Template | None:
        source = ll.llama_model_chat_template(self.ptr, None)
        self.chat_template_text = ""
        if not source:
            self.builtin_template = _builtin_template_for(self.metadata.get("general.architecture", ""))
            self.chat_template_source = f"libllama built-in '{self.builtin_template}' (the GGUF has none)"
            log.info("%s has no chat template in its metadata; using libllama's built-in %r template",
                     self.path.name, self.builtin_template)
            return None
        self.builtin_template = None
        self.chat_template_source = "GGUF metadata tokenizer.chat_template"
        self.chat_template_text = source.decode("utf-8", "replace")
        env = jinja2.sandbox.ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
        env.globals["raise_exception"] = _raise_template_error
        env.filters["tojson"] = _tojson  # Hugging Face's: unicode kept, keys in order (tool definitions)
        try:
            return env.from_string(self.chat_template_text)
        except jinja2.TemplateError as exc:
            raise EngineError(f"{self.path}: the chat template in its metadata does not compile: {exc}") from None

    def render_chat(self, messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None = None) -> str:
        if self._template is None:
            if tools:
                raise RequestRejected(f"the {self.builtin_template} chat template takes no tools")
            return self._render_builtin(messages)
        bos = self.token_text(ll.llama_vocab_bos(self.vocab)) if self.add_bos else ""
        eos = self.token_text(ll.llama_vocab_eos(self.vocab))
        extra = {"tools": tools} if tools else {}
        try:
            return self._template.render(messages=messages, add_generation_prompt=True,
                                         bos_token=bos, eos_token=eos, **extra)
        except (jinja2.TemplateError, TypeError) as exc:  # TypeError: e.g. None + str for a missing content
            raise RequestRejected(f"the model's chat template refused these messages: {exc}") from None

    def _render_builtin(self, messages: list[dict[str, Any]]) -> str:
        chat = (ll.llama_chat_message * len(messages))()
        keep = []  # the C strings must outlive the call
        for i, msg in enumerate(messages):
            role, content = msg["role"].encode(), msg["content"].encode("utf-8", "surrogatepass")
            keep += [role, content]
            chat[i].role, chat[i].content = role, content
        name = (self.builtin_template or "chatml").encode()
        size = 2 * sum(len(b) for b in keep) + 1024
        buf = ctypes.create_string_buffer(size)
        n = ll.llama_chat_apply_template(name, chat, len(messages), True, buf, size)
        if n > size:
            buf = ctypes.create_string_buffer(n)
            n = ll.llama_chat_apply_template(name, chat, len(messages), True, buf, n)
        if n < 0:
            raise RequestRejected(f"the {self.builtin_template} chat template refused these messages")
        # Gemma-style templates start with the BOS text; tokenizing with parse_special keeps it one token.
        bos = self.token_text(ll.llama_vocab_bos(self.vocab)) if self.add_bos else ""
        return bos + buf.raw[:n].decode("utf-8", "replace")


def _builtin_template_for(architecture: str) -> str:
    """libllama's built-in template that fits a model family (gemma3 -> gemma), else chatml."""
    count = ll.llama_chat_builtin_templates(None, 0)
    names_arr = (ctypes.c_char_p * max(count, 1))()
    ll.llama_chat_builtin_templates(names_arr, count)
    names = {n.decode() for n in names_arr[:count] if n}
    for candidate in (architecture, architecture.rstrip("0123456789"), architecture.split("-")[0]):
        if candidate in names:
            return candidate
    return "chatml"


def _raise_template_error(message: str) -> None:
    raise jinja2.TemplateError(message)


def _tojson(value: Any, ensure_ascii: bool = False, indent: int | None = None,
            separators: tuple[str, str] | None = None, sort_keys: bool = False) -> markupsafe.Markup:
    return markupsafe.Markup(json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators,
                                        sort_keys=sort_keys))


def read_metadata(model: Any, skip_prefix: str | None = None) -> dict[str, str]:
    """A loaded model's GGUF key/values, as libllama renders them to strings."""
    out: dict[str, str] = {}
    buf = ctypes.create_string_buffer(1 << 16)
    for i in range(ll.llama_model_meta_count(model)):
        n = ll.llama_model_meta_key_by_index(model, i, buf, len(buf))
        key = buf.value[:n].decode("utf-8", "replace") if n >= 0 else ""
        if not key or (skip_prefix and key.startswith(skip_prefix)):
            continue
        n = ll.llama_model_meta_val_str_by_index(model, i, buf, len(buf))
        if n >= 0:
            out[key] = buf.value[: min(n, len(buf) - 1)].decode("utf-8", "replace")
    return out

