"""CLIP tokenizer: build a tiny one from a word list, load any (tiny or real SD), and the
checks that personalization needs (placeholder tokens, one-token super-categories, prompt
words the model does not know).

A built tokenizer has CLIP's file layout, so transformers' CLIPTokenizer loads it the same way
as openai/clip-vit-large-patch14's: vocab = 256 byte-level characters, the same 256 with
"</w>", one entry per merge result, then "<|startoftext|>" and "<|endoftext|>".
"""
from __future__ import annotations

import dataclasses
import difflib
import json
import logging
import os
import re
import sys
from typing import Collection, Iterable, Optional, Sequence

import numpy as np


def _no_torch_notice(record: logging.LogRecord) -> bool:
    return "PyTorch was not found" not in record.getMessage()


# transformers announces at import that, without torch, only its tokenizers work: all this
# package takes from it (torch is an extra, for the tests and the importers), so a user who
# installed without torch has nothing to act on.
logging.getLogger("transformers").addFilter(_no_torch_notice)
from transformers import AddedToken, CLIPTokenizer  # noqa: E402

from spacetime_jax.errors import UserError
from spacetime_jax.paths import as_path, local_folder

BOS_TOKEN = "<|startoftext|>"
EOS_TOKEN = "<|endoftext|>"
END_OF_WORD = "</w>"
MAX_LENGTH = 77  # CLIP's context: 75 prompt tokens + bos + eos.
# Nouns a super-category is often chosen from, the most general first. A model offers those
# that are one token of its tokenizer, then the toy world's shape names that are: a real
# SD's vocabulary has all of these nouns, the toy-world model's only its world's shapes.
COMMON_NOUNS = ("object", "cat", "dog", "toy", "person", "car", "house", "bag", "cup",
                "bottle", "chair", "flower", "bird", "shoe")
SUGGESTED_WORDS = 9  # words an error offers at most
_WORD = re.compile(r"[^\W\d_]+")  # a run of letters: CLIP's pre-tokenizer keeps it whole


class TokenizerError(UserError, ValueError):
    """A tokenizer folder, prompt or placeholder that cannot be used as asked."""


@dataclasses.dataclass(frozen=True)
class TokenizerInfo:
    """What a CLIP text config must agree with (vocab_size >= this one, same special ids)."""
    vocab_size: int
    bos_token_id: int
    eos_token_id: int
    pad_token_id: int


def _bytes_to_unicode() -> list[str]:
    """GPT-2's byte -> printable character table, in CLIP's vocabulary order."""
    byte_values = (list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
                   + list(range(ord("®"), ord("ÿ") + 1)))
    chars = list(byte_values)
    extra = 0
    for b in range(256):
        if b not in byte_values:
            byte_values.append(b)
            chars.append(256 + extra)
            extra += 1
    return [chr(c) for c in chars]


def _bpe(piece: str, ranks: dict[tuple[str, str], int]) -> list[str]:
    """CLIP's BPE on one pre-token: merge the lowest-ranked adjacent pair until none is left."""
    parts = list(piece[:-1]) + [piece[-1] + END_OF_WORD]
    while len(parts) > 1:
        rank, i = min((ranks.get(pair, len(ranks)), i)
                      for i, pair in enumerate(zip(parts, parts[1:])))
        if rank == len(ranks):
            break
        parts[i:i + 2] = [parts[i] + parts[i + 1]]
    return parts


def _word_pieces(words: Iterable[str]) -> list[str]:
    """The distinct pre-tokens CLIP sees in `words` ("close-up" -> "close", "-", "up"),
    byte-level encoded, in first-seen order."""
    backend = CLIPTokenizer().backend_tokenizer
    pieces: dict[str, None] = {}
    for word in words:
        text = backend.normalizer.normalize_str(word)
        pieces.update((piece, None) for piece, _ in backend.pre_tokenizer.pre_tokenize_str(text))
    return list(pieces)


def _merges_for(pieces: Sequence[str]) -> list[tuple[str, str]]:
    """Merges that turn each piece into one token. Each piece gets merges of its current BPE
    parts, left to right, ranked after every earlier merge: those fire only once no earlier
    merge applies, so the piece ends as one token, and pieces already one token have no pairs
    left to change."""
    merges: list[tuple[str, str]] = []
    ranks: dict[tuple[str, str], int] = {}
    for piece in pieces:
        parts = _bpe(piece, ranks)
        joined = parts[0]
        for part in parts[1:]:
            if (joined, part) not in ranks:
                ranks[(joined, part)] = len(merges)
                merges.append((joined, part))
            joined += part
    return merges


def build_clip_tokenizer_files(words: Iterable[str], out_dir: str | os.PathLike) -> TokenizerInfo:
    """Writes a CLIP BPE tokenizer in which every word of `words` is one token (after CLIP's
    lowercasing and punctuation split); other words fall back to smaller pieces."""
    pieces = _word_pieces(words)
    merges = _merges_for(pieces)
    byte_chars = _bytes_to_unicode()
    # Several merges may build the same string; it is one vocabulary entry.
    tokens = dict.fromkeys(byte_chars + [c + END_OF_WORD for c in byte_chars]
                           + [a + b for a, b in merges] + [BOS_TOKEN, EOS_TOKEN])
    vocab = {token: i for i, token in enumerate(tokens)}

    out = as_path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    (out / "merges.txt").write_text(
        "#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges), encoding="utf-8")
    specials = {"bos_token": BOS_TOKEN, "eos_token": EOS_TOKEN, "unk_token": EOS_TOKEN,
                "pad_token": EOS_TOKEN}
    (out / "special_tokens_map.json").write_text(json.dumps(specials, indent=2))
    config = dict(specials, tokenizer_class="CLIPTokenizer", model_max_length=MAX_LENGTH,
                  do_lower_case=True, add_prefix_space=False, errors="replace")
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2))

    # Verify against the real tokenizer: our BPE must mirror the one that will read the files.
    tokenizer = load_tokenizer(out)
    for piece in pieces:
        got = tokenizer.backend_tokenizer.model.tokenize(piece)
        if len(got) != 1:
            raise AssertionError(f"built tokenizer splits {piece!r} into "
                                 f"{[t.value for t in got]}")
    return TokenizerInfo(vocab_size=len(vocab), bos_token_id=vocab[BOS_TOKEN],
                         eos_token_id=vocab[EOS_TOKEN], pad_token_id=vocab[EOS_TOKEN])


def load_tokenizer(folder: str | os.PathLike) -> CLIPTokenizer:
    """A diffusers `tokenizer/` folder (tiny or real SD; local or gs://) as a CLIPTokenizer of
    length 77."""
    path = as_path(folder)
    if not path.is_dir():
        raise TokenizerError(f"tokenizer folder {path} does not exist")
    has_bpe_files = (path / "vocab.json").is_file() and (path / "merges.txt").is_file()
    if not has_bpe_files and not (path / "tokenizer.json").is_file():
        raise TokenizerError(
            f"no vocab.json/merges.txt (or tokenizer.json) in {path}: a CLIP tokenizer folder "
            f"needs them; found {sorted(p.name for p in path.iterdir())}")
    try:
        # Files alone do not carry the context length; a tokenizer without it never truncates.
        # transformers reads only local files: a gs:// folder is copied once per process.
        return CLIPTokenizer.from_pretrained(local_folder(path), model_max_length=MAX_LENGTH)
    except Exception as e:  # tokenizers reports bad vocab/merges files as a bare Exception.
        raise TokenizerError(f"cannot load the CLIP tokenizer in {path}: {e}") from e


def tokenize(tokenizer: CLIPTokenizer, prompts: Sequence[str],
             max_length: int = MAX_LENGTH) -> np.ndarray:
    """(B, max_length) int32 ids: bos, prompt, eos, then padding (truncated if longer)."""
    encoded = tokenizer(list(prompts), padding="max_length", max_length=max_length,
                        truncation=True, return_tensors="np")
    return encoded["input_ids"].astype(np.int32)


def check_prompt_length(tokenizer: CLIPTokenizer, prompt: str,
                        max_length: int = MAX_LENGTH) -> None:
    """Raises when `prompt` would lose its end to truncation."""
    length = len(tokenizer(prompt, truncation=False)["input_ids"])
    if length > max_length:
        shown = prompt if len(prompt) <= 60 else prompt[:57] + "..."
        raise TokenizerError(
            f"prompt {shown!r} is {length} tokens, longer than {max_length} "
            f"({max_length - 2} + bos/eos), and would be truncated: shorten it")


def add_placeholder_tokens(tokenizer: CLIPTokenizer, tokens: Sequence[str]) -> list[int]:
    """Adds each placeholder as one unsplittable token; returns their new ids, which follow
    the current vocabulary."""
    vocab = tokenizer.get_vocab()
    seen = set()
    for token in tokens:
        if not token or any(c.isspace() for c in token):
            raise TokenizerError(f"placeholder {token!r} must be one non-empty word without "
                                 "spaces, such as '<my-cat>'")
        if token in seen:
            raise TokenizerError(f"placeholder {token!r} is given twice")
        seen.add(token)
        # A word that already tokenizes to one token ("cat" -> "cat</w>") is taken too:
        # adding it would change what that word means in every prompt.
        if token in vocab or len(tokenizer.tokenize(token)) == 1:
            raise TokenizerError(
                f"placeholder {token!r} is already a token of the vocabulary; choose a new "
                f"string such as '<my-{token.strip('<>')}>'")
    first_id = len(tokenizer)
    # normalized=False: matched on the raw prompt, so CLIP's lowercasing cannot hide it.
    tokenizer.add_tokens([AddedToken(t, normalized=False) for t in tokens])
    ids = tokenizer.convert_tokens_to_ids(list(tokens))
    if ids != list(range(first_id, first_id + len(tokens))):
        raise AssertionError(f"placeholder ids {ids} do not follow the vocabulary ({first_id})")
    return ids


def single_token_id(tokenizer: CLIPTokenizer, word: str, what: str = "super-category",
                    alternatives: Sequence[str] = ()) -> int:
    """The id of `word`, which must be exactly one token (`what` names it in the error). The
    error offers the one-token words nearest to it, else `alternatives`."""
    ids = tokenizer(word, add_special_tokens=False)["input_ids"]
    if len(ids) != 1:
        near = nearest_one_token_words(tokenizer, word)
        offer = (f"one-token words like it: {', '.join(near)}" if near else
                 f"one-token words of this model: {', '.join(alternatives)}"
                 if alternatives else "")
        raise TokenizerError(f"{what} {word!r} is {len(ids)} tokens; it must be exactly one"
                             + (f" ({offer})" if offer else ""))
    return ids[0]


def is_one_token(tokenizer: CLIPTokenizer, word: str) -> bool:
    return len(tokenizer(word, add_special_tokens=False)["input_ids"]) == 1


def whole_words(tokenizer: CLIPTokenizer) -> list[str]:
    """The vocabulary's whole words: its `word</w>` entries of two or more letters, sorted."""
    size = len(END_OF_WORD)
    return sorted({token[:-size] for token in tokenizer.get_vocab()
                   if token.endswith(END_OF_WORD) and len(token) > size + 1
                   and _WORD.fullmatch(token[:-size])})


def nearest_one_token_words(tokenizer: CLIPTokenizer, word: str,
                            limit: int = SUGGESTED_WORDS) -> list[str]:
    """One-token words like `word`: its own words that are one token ('teddy bear' ->
    'teddy', 'bear'), then the vocabulary's whole words nearest in spelling (difflib)."""
    own = [part for part in _WORD.findall(word.lower()) if is_one_token(tokenizer, part)]
    close = difflib.get_close_matches(word.lower(), whole_words(tokenizer), n=limit,
                                      cutoff=0.6)
    return list(dict.fromkeys(own + close))[:limit]


def super_category_words(tokenizer: CLIPTokenizer, limit: int = SUGGESTED_WORDS) -> list[str]:
    """Nouns a super-category may be on this model: COMMON_NOUNS, then the toy world's
    shape names, each kept if it is one token of `tokenizer`."""
    from spacetime_jax.toyworld.shapes import SHAPES  # the toy world's nouns
    nouns = dict.fromkeys((*COMMON_NOUNS, *SHAPES))
    return [noun for noun in nouns if is_one_token(tokenizer, noun)][:limit]


# ---------------------------------------------------------------- words a model does not know

def model_words(model: str) -> Optional[frozenset[str]]:
    """The words `model` was trained to read, where the project knows them: for the shipped
    toy-world model (builtin:toyworld) the words of its pretraining captions (its tokenizer
    also spells a few words whole, 'beach' say, that no caption showed it); None for any
    other model, whose tokenizer's whole words stand for what it knows."""
    if model != "builtin:toyworld":
        return None
    from spacetime_jax.toyworld.captions import world_vocabulary
    return frozenset(part for word in world_vocabulary() for part in _WORD.findall(word))


def unknown_words(tokenizer: CLIPTokenizer, prompts: Sequence[str],
                  known: Optional[Collection[str]] = None) -> list[str]:
    """The distinct words of `prompts` (the concept's slot "{}" left out, lowercased as CLIP
    reads them) that are not `known`, or, without `known`, that `tokenizer` cannot spell as
    one whole word; in order of appearance."""
    words = dict.fromkeys(word for prompt in prompts
                          for word in _WORD.findall(prompt.replace("{}", " ").lower()))
    if known is not None:
        return [word for word in words if word not in known]
    return [word for word in words if not is_one_token(tokenizer, word)]


def warn_unknown_words(tokenizer: CLIPTokenizer, prompts: Sequence[str], where: str,
                       model: str = "") -> list[str]:
    """One 'warning: ' line on stderr (process 0 only) naming the words of `prompts` that
    `model` cannot read (model_words, else its tokenizer's whole words); returns them.
    `where` names the prompts' config key."""
    from spacetime_jax.parallel.multihost import lead_print
    known = model_words(model)
    words = unknown_words(tokenizer, prompts, known)
    if words:
        named = ", ".join(repr(word) for word in words)
        why = (f"{model} never saw {named} in pretraining (it knows the toy world's shapes, "
               "colors, sizes, textures and backgrounds, as in configs/sample.py:tiny)"
               if known is not None else
               f"the model's tokenizer has no whole word for {named} and reads them in pieces")
        lead_print(f"warning: {where}: {why}; the images may not follow those words",
                   file=sys.stderr)
    return words


def find_token_positions(input_ids: np.ndarray, token_id: int,
                         prompts: Sequence[str] | None = None) -> np.ndarray:
    """(B,) int32 position of `token_id` in each row, which must hold it exactly once."""
    counts = (np.asarray(input_ids) == token_id).sum(axis=1)

    def named(row: int) -> str:
        return f"prompt {row}" + (f" ({prompts[row]!r})" if prompts is not None else "")

    for row, count in enumerate(counts):
        if count == 0:
            raise TokenizerError(f"prompt without the placeholder (token id {token_id}): "
                                 f"{named(row)}")
        if count > 1:
            raise TokenizerError(f"placeholder appears {count} times in {named(row)}; "
                                 "it must appear once")
    return np.argmax(np.asarray(input_ids) == token_id, axis=1).astype(np.int32)


def resize_token_embedding(embedding: np.ndarray, new_vocab_size: int,
                           init_rows: np.ndarray | None = None) -> np.ndarray:
    """Appends rows for added tokens to a (V, D) token embedding. `init_rows` is (D,) for
    every new row (e.g. the super-category's embedding) or (new_vocab_size - V, D); without
    it new rows start at the mean embedding."""
    embedding = np.asarray(embedding)
    old_size, dim = embedding.shape
    num_new = new_vocab_size - old_size
    if num_new < 0:
        raise ValueError(f"cannot shrink the token embedding from {old_size} to "
                         f"{new_vocab_size} rows")
    if init_rows is None:
        init_rows = embedding.mean(axis=0)
    init_rows = np.asarray(init_rows, dtype=embedding.dtype)
    if init_rows.shape not in ((dim,), (num_new, dim)):
        raise ValueError(f"init_rows has shape {init_rows.shape}; expected ({dim},) or "
                         f"({num_new}, {dim})")
    new_rows = np.broadcast_to(init_rows, (num_new, dim))
    return np.concatenate([embedding, new_rows], axis=0)
