"""Tiny CLIP tokenizers built from a word list, loaded by transformers' CLIPTokenizer like a
real SD one, and the placeholder / super-category / prompt checks personalization relies on."""
from __future__ import annotations

import json

import numpy as np
import pytest

from spacetime_jax.models.builtin import TOYWORLD_DIR
from spacetime_jax.models.tokenizer import (BOS_TOKEN, EOS_TOKEN, TokenizerError, TokenizerInfo,
                                            add_placeholder_tokens, build_clip_tokenizer_files,
                                            check_prompt_length, find_token_positions,
                                            load_tokenizer, resize_token_embedding,
                                            single_token_id, super_category_words, tokenize,
                                            unknown_words, warn_unknown_words, whole_words)

WORDS = "a photo of red star on green background close-up cat teddy bear".split()


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tokenizer")
    info = build_clip_tokenizer_files(WORDS, folder)
    return folder, info


@pytest.fixture
def tokenizer(built):
    """A fresh tokenizer per test: adding placeholders mutates it."""
    return load_tokenizer(built[0])


def test_every_word_is_one_token_and_close_up_splits_like_clip(tokenizer):
    for word in ["a", "photo", "of", "red", "star", "on", "green", "background", "cat"]:
        assert tokenizer.tokenize(word) == [word + "</w>"]
    # CLIP's pre-tokenizer splits on punctuation: each piece of "close-up" is its own token.
    assert tokenizer.tokenize("Close-Up") == ["close</w>", "-</w>", "up</w>"]


def test_vocab_has_clip_layout(built):
    folder, info = built
    vocab = json.loads((folder / "vocab.json").read_text())
    merges = (folder / "merges.txt").read_text().splitlines()
    tokens = sorted(vocab, key=vocab.get)
    assert sorted(vocab.values()) == list(range(len(vocab)))
    assert tokens[:4] == ["!", '"', "#", "$"] and tokens[256:258] == ["!</w>", '"</w>']
    assert tokens[255] == "Ń"  # byte 0xAD, the last byte remapped by GPT-2's table
    assert all(t == tokens[i - 256] + "</w>" for i, t in enumerate(tokens[256:512], 256))
    assert tokens[-2:] == [BOS_TOKEN, EOS_TOKEN]
    assert merges[0] == "#version: 0.2"
    assert {"".join(m.split(" ")) for m in merges[1:]} == set(tokens[512:-2])
    config = json.loads((folder / "tokenizer_config.json").read_text())
    assert config["model_max_length"] == 77 and config["pad_token"] == EOS_TOKEN
    assert info == TokenizerInfo(vocab_size=len(vocab), bos_token_id=len(vocab) - 2,
                                 eos_token_id=len(vocab) - 1, pad_token_id=len(vocab) - 1)


def test_special_ids_match_info(tokenizer, built):
    info = built[1]
    assert len(tokenizer) == info.vocab_size
    assert tokenizer.model_max_length == 77
    assert (tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id) == (
        info.bos_token_id, info.eos_token_id, info.pad_token_id)


def test_prompt_is_bos_words_eos_then_eos_padding(tokenizer, built):
    info = built[1]
    ids = tokenize(tokenizer, ["a photo of a red star", "cat"])
    assert ids.shape == (2, 77) and ids.dtype == np.int32
    words = [tokenizer.convert_tokens_to_ids(w + "</w>")
             for w in ["a", "photo", "of", "a", "red", "star"]]
    assert ids[0, :8].tolist() == [info.bos_token_id, *words, info.eos_token_id]
    assert (ids[0, 8:] == info.pad_token_id).all()
    assert (ids[1, 3:] == info.eos_token_id).all()


def test_unknown_word_splits_into_pieces_and_round_trips(tokenizer):
    pieces = tokenizer.tokenize("zebra")
    assert len(pieces) > 1 and "".join(pieces) == "zebra</w>"
    ids = tokenize(tokenizer, ["a zebra on green background"])[0]
    assert tokenizer.decode(ids, skip_special_tokens=True) == "a zebra on green background"


@pytest.mark.parametrize("words", [
    ["to", "photo", "top", "stop", "tops", "potato", "tot", "otto"],
    list(reversed(["to", "photo", "top", "stop", "tops", "potato", "tot", "otto"])),
    ["".join(np.random.default_rng(seed).choice(list("abcdeo"), size=n))
     for seed, n in enumerate(np.random.default_rng(7).integers(1, 9, size=150))],
])
def test_words_with_conflicting_merges_still_become_one_token(words, tmp_path):
    # Earlier words' merges ("to" -> "t o</w>") pre-empt later words' chains; the builder must
    # add the merges that finish each word, checked here by the real tokenizer.
    info = build_clip_tokenizer_files(words, tmp_path)
    tokenizer = load_tokenizer(tmp_path)
    assert len(tokenizer) == info.vocab_size
    for word in words:
        assert tokenizer.tokenize(word) == [word + "</w>"], word


def test_placeholders_get_the_ids_after_the_vocabulary(tokenizer, built):
    vocab_size = built[1].vocab_size
    ids = add_placeholder_tokens(tokenizer, ["<cat>", "<My-Star>"])
    assert ids == [vocab_size, vocab_size + 1]
    assert len(tokenizer) == vocab_size + 2
    row = tokenize(tokenizer, ["a photo of <cat> on <My-Star>"])[0]
    assert row[4] == ids[0] and row[6] == ids[1]
    assert tokenizer.convert_ids_to_tokens(ids) == ["<cat>", "<My-Star>"]


@pytest.mark.parametrize("tokens, message", [
    (["cat"], r"placeholder 'cat' is already a token of the vocabulary; "
              r"choose a new string such as '<my-cat>'"),
    ([EOS_TOKEN], r"placeholder '<\|endoftext\|>' is already a token of the vocabulary"),
    (["<cat>", "<cat>"], r"placeholder '<cat>' is given twice"),
    (["my cat"], r"placeholder 'my cat' must be one non-empty word without spaces"),
])
def test_bad_placeholders_are_refused(tokenizer, tokens, message):
    with pytest.raises(TokenizerError, match=message):
        add_placeholder_tokens(tokenizer, tokens)
    assert len(tokenizer) == len(tokenizer.get_vocab())  # nothing was added


def test_placeholder_added_twice_is_refused_the_second_time(tokenizer):
    add_placeholder_tokens(tokenizer, ["<cat>"])
    with pytest.raises(TokenizerError, match="'<cat>' is already a token of the vocabulary"):
        add_placeholder_tokens(tokenizer, ["<cat>"])


def test_super_category_must_be_one_token(tokenizer):
    assert single_token_id(tokenizer, "cat") == tokenizer.convert_tokens_to_ids("cat</w>")
    with pytest.raises(TokenizerError,
                       match="super-category 'teddy bear' is 2 tokens; it must be exactly one"):
        single_token_id(tokenizer, "teddy bear")


def test_a_word_that_is_not_one_token_is_offered_the_nearest_that_are(tokenizer):
    # Its own one-token words first, then the vocabulary's whole words nearest in spelling.
    with pytest.raises(TokenizerError, match=r"'teddy bear' is 2 tokens; it must be exactly "
                                             r"one \(one-token words like it: teddy, bear\)"):
        single_token_id(tokenizer, "teddy bear")
    with pytest.raises(TokenizerError, match=r"\(one-token words like it: star\)"):
        single_token_id(tokenizer, "starr")
    # Nothing near: the caller's alternatives.
    with pytest.raises(TokenizerError, match=r"'object' is 6 tokens; it must be exactly one "
                                             r"\(one-token words of this model: cat, star\)"):
        single_token_id(tokenizer, "object", alternatives=["cat", "star"])


def test_whole_words_are_the_vocabularys_word_entries(tokenizer):
    assert whole_words(tokenizer) == sorted(["background", "bear", "cat", "close", "green",
                                             "of", "on", "photo", "red", "star", "teddy", "up"])


def test_super_category_words_are_the_common_and_world_nouns_that_are_one_token(tokenizer):
    assert super_category_words(tokenizer) == ["cat", "star"]
    toy = load_tokenizer(TOYWORLD_DIR / "tokenizer")
    assert super_category_words(toy) == ["circle", "square", "triangle", "star", "hexagon",
                                         "diamond", "cross", "ring", "heart"]


def test_unknown_words_are_those_the_tokenizer_cannot_spell_whole(tokenizer):
    prompts = ["A photo of a {} on a beach", "a {} on GREEN background, close-up", "2 cats"]
    assert unknown_words(tokenizer, prompts) == ["beach", "cats"]  # "a": one byte, one token
    assert unknown_words(tokenizer, prompts, known={"a", "photo", "of", "on"}) == [
        "beach", "green", "background", "close", "up", "cats"]


def test_the_toy_model_knows_its_worlds_words_not_every_whole_word_of_its_tokenizer(capsys):
    toy = load_tokenizer(TOYWORLD_DIR / "tokenizer")
    assert toy.tokenize("beach") == ["beach</w>"]  # its tokenizer spells it, no caption had it
    reference = ["A photo of a {}", "A photo of a {} on a beach", "App icon of {}",
                 "A painting of {} in the style of Monet"]
    assert warn_unknown_words(toy, reference, "sample.prompts", "builtin:toyworld") == [
        "beach", "app", "icon", "monet"]
    (line,) = capsys.readouterr().err.splitlines()
    assert line.startswith("warning: sample.prompts: builtin:toyworld never saw 'beach', "
                           "'app', 'icon', 'monet' in pretraining")
    world = ["a photo of a small {} on a purple checkered background", "a {} close-up"]
    assert warn_unknown_words(toy, world, "validation.prompts", "builtin:toyworld") == []
    assert capsys.readouterr().err == ""


def test_placeholder_positions(tokenizer):
    (cat_id,) = add_placeholder_tokens(tokenizer, ["<cat>"])
    prompts = ["a photo of <cat>", "<cat> on green background"]
    positions = find_token_positions(tokenize(tokenizer, prompts), cat_id, prompts)
    assert positions.tolist() == [4, 1] and positions.dtype == np.int32
    without_text = tokenize(tokenizer, ["a photo of <cat>", "a cat"])
    with pytest.raises(TokenizerError, match=r"placeholder \(token id \d+\): prompt 1$"):
        find_token_positions(without_text, cat_id)


@pytest.mark.parametrize("prompts, message", [
    (["a photo of <cat>", "a photo of a cat"],
     r"prompt without the placeholder \(token id \d+\): prompt 1 \('a photo of a cat'\)"),
    (["<cat> and <cat>"], r"placeholder appears 2 times in prompt 0 \('<cat> and <cat>'\)"),
])
def test_placeholder_missing_or_repeated_is_refused(tokenizer, prompts, message):
    (cat_id,) = add_placeholder_tokens(tokenizer, ["<cat>"])
    with pytest.raises(TokenizerError, match=message):
        find_token_positions(tokenize(tokenizer, prompts), cat_id, prompts)


def test_prompt_longer_than_75_tokens_is_refused(tokenizer):
    check_prompt_length(tokenizer, " ".join(["cat"] * 75))
    too_long = " ".join(["cat"] * 76)
    with pytest.raises(TokenizerError, match=r"is 78 tokens, longer than 77 \(75 \+ bos/eos\), "
                                             r"and would be truncated: shorten it"):
        check_prompt_length(tokenizer, too_long)
    assert tokenize(tokenizer, [too_long])[0, -1] == tokenizer.eos_token_id  # truncated


def test_folder_without_bpe_files_is_refused(tmp_path):
    (tmp_path / "tokenizer_config.json").write_text("{}")
    with pytest.raises(TokenizerError, match=rf"no vocab.json/merges.txt .*in {tmp_path}: .*"
                                             r"found \['tokenizer_config.json'\]"):
        load_tokenizer(tmp_path)
    with pytest.raises(TokenizerError, match="does not exist"):
        load_tokenizer(tmp_path / "missing")


def test_corrupt_vocab_is_refused(built, tmp_path):
    for name in ["vocab.json", "merges.txt", "tokenizer_config.json"]:
        (tmp_path / name).write_text((built[0] / name).read_text())
    (tmp_path / "vocab.json").write_text("{}")
    with pytest.raises(TokenizerError, match=rf"cannot load the CLIP tokenizer in {tmp_path}"):
        load_tokenizer(tmp_path)


def test_folder_with_only_tokenizer_json_loads(tokenizer, tmp_path):
    # Hub folders saved by recent transformers carry tokenizer.json instead of vocab/merges.
    tokenizer.save_pretrained(tmp_path)
    for name in ["vocab.json", "merges.txt"]:
        (tmp_path / name).unlink(missing_ok=True)
    reloaded = load_tokenizer(tmp_path)
    prompts = ["a photo of a zebra, close-up"]
    assert (tokenize(reloaded, prompts) == tokenize(tokenizer, prompts)).all()


def test_resize_token_embedding_appends_initialized_rows():
    embedding = np.arange(12, dtype=np.float32).reshape(4, 3)
    from_one_row = resize_token_embedding(embedding, 6, embedding[2])
    assert from_one_row.shape == (6, 3) and from_one_row.dtype == np.float32
    np.testing.assert_array_equal(from_one_row[:4], embedding)
    np.testing.assert_array_equal(from_one_row[4:], [embedding[2], embedding[2]])
    per_row = resize_token_embedding(embedding, 6, embedding[[3, 0]])
    np.testing.assert_array_equal(per_row[4:], embedding[[3, 0]])
    by_mean = resize_token_embedding(embedding, 5)
    np.testing.assert_array_equal(by_mean[4], [4.5, 5.5, 6.5])
    np.testing.assert_array_equal(resize_token_embedding(embedding, 4), embedding)


def test_resize_token_embedding_refuses_bad_shapes():
    embedding = np.zeros((4, 3), np.float32)
    with pytest.raises(ValueError, match="cannot shrink the token embedding from 4 to 3 rows"):
        resize_token_embedding(embedding, 3)
    with pytest.raises(ValueError, match=r"init_rows has shape \(3, 3\); expected \(3,\) or "
                                         r"\(2, 3\)"):
        resize_token_embedding(embedding, 6, np.zeros((3, 3)))
