"""Text: ByteTokenizer, HFTokenizer (tokenizers library), TextPreprocessor and the text fields of
PreprocessingConfig."""

from __future__ import annotations

import json
import sys

import numpy as np
import pytest

from mmcore.config import PreprocessingConfig
from mmcore.errors import ArgumentError, ConfigError, MMCoreError, ModelFormatError, ShapeError
from mmcore.preprocess import ByteTokenizer, HFTokenizer, TextPreprocessor, load_tokenizer

# --------------------------------------------------------------------------------------------
# ByteTokenizer

@pytest.mark.parametrize("text", [
    "", "a", "hello world", "héllo wörld", "日本語のテキスト", "emoji 🙂👍🏽", "tab\tnew\nline",
    "\x00nul inside", "mixed: ü, ß, ç, 한국어, العربية",
])
def test_byte_round_trip(text):
    tok = ByteTokenizer()
    ids = tok.encode(text)
    assert ids.dtype == np.int64 and ids.ndim == 1
    raw = text.encode("utf-8")
    np.testing.assert_array_equal(ids, np.frombuffer(raw, np.uint8).astype(np.int64) + 3)
    assert tok.decode(ids) == text
    assert tok.decode(ids.tolist()) == text
    assert tok.decode(tok.encode(text, add_eos=True)) == text


def test_byte_ids_and_specials():
    tok = ByteTokenizer()
    assert (tok.pad_id, tok.eos_id, tok.unk_id, tok.vocab_size) == (0, 1, 2, 259)
    assert tok.encode("A").tolist() == [65 + 3]
    assert tok.encode("é").tolist() == [0xC3 + 3, 0xA9 + 3]
    assert tok.encode("hi", add_eos=True).tolist() == [107, 108, 1]
    assert tok.encode("", add_eos=True).tolist() == [1]
    ids = tok.encode(bytes(range(256)))
    assert ids.tolist() == list(range(3, 259))           # every byte has its own id
    assert ids.min() >= 3 and ids.max() == 258


def test_byte_invalid_utf8_bytes_keep_their_bytes():
    tok = ByteTokenizer()
    raw = b"ok \xff\xfe and \xc3( end"
    ids = tok.encode(raw)
    np.testing.assert_array_equal(ids - 3, np.frombuffer(raw, np.uint8))
    assert tok.decode(ids) == raw.decode("utf-8", errors="replace")
    assert tok.decode(ids) == "ok \ufffd\ufffd and \ufffd( end"
    assert tok.encode(bytearray(raw)).tolist() == ids.tolist()
    assert tok.encode(memoryview(raw)).tolist() == ids.tolist()


def test_byte_lone_surrogate_is_unk():
    tok = ByteTokenizer()
    ids = tok.encode("a\ud800b")
    assert ids.tolist() == [97 + 3, 2, 98 + 3]
    assert tok.decode(ids) == "a\ufffdb"


def test_byte_decode_skips_pad_and_eos_and_replaces_the_rest():
    tok = ByteTokenizer()
    assert tok.decode([107, 108, 1, 0, 0]) == "hi"
    assert tok.decode([0, 0, 107, 108]) == "hi"
    assert tok.decode([107, 2, 108]) == "h\ufffdi"
    assert tok.decode([107, 300, -4, 108]) == "h\ufffd\ufffdi"      # outside the vocabulary
    assert tok.decode([]) == ""
    assert tok.decode(np.array([107, 108], np.int32)) == "hi"
    with pytest.raises(ShapeError, match="ids"):
        tok.decode([[107]])
    with pytest.raises(ShapeError, match="ids"):
        tok.decode([1.5])


def test_byte_max_length_keeps_eos_last():
    tok = ByteTokenizer()
    assert tok.encode("abcdef", max_length=3).tolist() == [100, 101, 102]
    assert tok.encode("abcdef", add_eos=True, max_length=3).tolist() == [100, 101, 1]
    assert tok.encode("abcdef", add_eos=True, max_length=1).tolist() == [1]
    assert tok.encode("ab", add_eos=True, max_length=10).tolist() == [100, 101, 1]
    with pytest.raises(ArgumentError, match="max_length"):
        tok.encode("ab", max_length=0)
    with pytest.raises(ArgumentError, match="text"):
        tok.encode(123)


def test_byte_matches_byt5_scheme():
    # ByT5: ids = utf-8 byte + 3 (pad 0, eos 1, unk 2), eos appended
    tok = ByteTokenizer()
    assert tok.encode("Life is like a box of chocolates.", add_eos=True).tolist() == [
        79, 108, 105, 104, 35, 108, 118, 35, 111, 108, 110, 104, 35, 100, 35, 101, 114, 123,
        35, 114, 105, 35, 102, 107, 114, 102, 114, 111, 100, 119, 104, 118, 49, 1]


# --------------------------------------------------------------------------------------------
# TextPreprocessor with the byte tokenizer

def test_single_string_is_a_batch_of_one():
    out = TextPreprocessor(max_length=None)("hi")
    assert out["input_ids"].tolist() == [[107, 108, 1]]            # eos by default (ByT5)
    assert out["attention_mask"].tolist() == [[True, True, True]]
    assert out["input_ids"].dtype == np.int64 and out["attention_mask"].dtype == np.bool_
    out = TextPreprocessor(max_length=None)(b"\xff")                # bytes: one text
    assert out["input_ids"].tolist() == [[258, 1]]


def test_longest_padding_right_and_left():
    pre = TextPreprocessor("byte", max_length=16, add_eos=False)
    out = pre(["abc", "a", ""])
    assert out["input_ids"].tolist() == [[100, 101, 102], [100, 0, 0], [0, 0, 0]]
    assert out["attention_mask"].tolist() == [[True] * 3, [True, False, False], [False] * 3]
    left = TextPreprocessor("byte", max_length=16, add_eos=False, padding_side="left")(
        ["abc", "a", ""])
    assert left["input_ids"].tolist() == [[100, 101, 102], [0, 0, 100], [0, 0, 0]]
    assert left["attention_mask"].tolist() == [[True] * 3, [False, False, True], [False] * 3]


def test_max_length_padding():
    pre = TextPreprocessor(max_length=6, padding="max_length")
    out = pre(["ab", "abcdefghij"])
    assert out["input_ids"].shape == (2, 6)
    assert out["input_ids"].tolist() == [[100, 101, 1, 0, 0, 0],
                                         [100, 101, 102, 103, 104, 1]]   # cut, eos kept
    assert out["attention_mask"].sum(axis=1).tolist() == [3, 6]


def test_truncation_with_longest_padding():
    out = TextPreprocessor(max_length=4, add_eos=False)(["abcdefgh", "ab"])
    assert out["input_ids"].tolist() == [[100, 101, 102, 103], [100, 101, 0, 0]]


def test_truncation_false_raises_naming_the_item():
    pre = TextPreprocessor(max_length=4, truncation=False)
    assert pre(["abc"])["input_ids"].shape == (1, 4)                   # 3 bytes + eos fits
    with pytest.raises(ShapeError, match=r"texts\[1\] has 5 tokens.*max_length=4"):
        pre(["ab", "abcd"])
    pre = TextPreprocessor(max_length=4, truncation=False, padding="max_length", add_eos=False)
    with pytest.raises(ShapeError, match=r"texts\[0\]"):
        pre("abcde")


def test_empty_strings_and_batches():
    pre = TextPreprocessor(max_length=8, add_eos=False)
    out = pre(["", ""])
    assert out["input_ids"].shape == (2, 0) and out["attention_mask"].shape == (2, 0)
    out = pre([])
    assert out["input_ids"].shape == (0, 0) and out["input_ids"].dtype == np.int64
    assert out["attention_mask"].shape == (0, 0) and out["attention_mask"].dtype == np.bool_
    out = pre("")
    assert out["input_ids"].shape == (1, 0)
    fixed = TextPreprocessor(max_length=5, padding="max_length", add_eos=False)
    out = fixed([])
    assert out["input_ids"].shape == (0, 5)
    out = fixed(["", "a"])
    assert out["input_ids"].tolist() == [[0] * 5, [100, 0, 0, 0, 0]]
    assert not out["attention_mask"][0].any()
    # with eos an empty string still has one real token
    out = TextPreprocessor(max_length=8)([""])
    assert out["input_ids"].tolist() == [[1]] and out["attention_mask"].tolist() == [[True]]


def test_non_ascii_batch_round_trips():
    tok = ByteTokenizer()
    texts = ["naïve café", "日本", "🙂"]
    out = TextPreprocessor(tok, max_length=None, padding_side="left")(texts)
    for row, mask, text in zip(out["input_ids"], out["attention_mask"], texts):
        assert tok.decode(row[mask]) == text
        assert tok.decode(row) == text                                # pad and eos skipped


@pytest.mark.parametrize("kwargs,name", [
    (dict(max_length=0), "max_length"),
    (dict(max_length=2.5), "max_length"),
    (dict(max_length=None, padding="max_length"), "padding"),
    (dict(max_length=8, padding="do_not_pad"), "padding"),
    (dict(max_length=8, padding_side="top"), "padding_side"),
    (dict(max_length=8, truncation="yes"), "truncation"),
    (dict(max_length=8, add_eos="no"), "add_eos"),
])
def test_preprocessor_argument_errors(kwargs, name):
    with pytest.raises(ConfigError, match=rf"TextPreprocessor\.{name}"):
        TextPreprocessor("byte", **kwargs)


def test_preprocessor_bad_texts():
    pre = TextPreprocessor(max_length=8)
    with pytest.raises(ArgumentError, match=r"texts\[1\]"):
        pre(["a", 3])
    with pytest.raises(ArgumentError, match="texts"):
        pre(42)
    with pytest.raises(ConfigError):
        load_tokenizer(3)


# --------------------------------------------------------------------------------------------
# config

def test_text_config_fields_and_from_config():
    cfg = PreprocessingConfig(modality="text")
    assert (cfg.tokenizer, cfg.max_length, cfg.padding, cfg.truncation, cfg.padding_side,
            cfg.add_eos) == ("byte", None, "longest", True, "right", None)
    with pytest.warns(DeprecationWarning, match="not a field of 'text' configs"):
        assert cfg.preset is None and cfg.size is None and cfg.chunk_length_s is None
    cfg = PreprocessingConfig(modality="text", tokenizer="BYTE", max_length=8,
                              padding="Max_Length", padding_side="LEFT", add_eos=False)
    assert (cfg.tokenizer, cfg.padding, cfg.padding_side) == ("byte", "max_length", "left")
    d = cfg.to_dict()
    assert json.loads(json.dumps(d)) == d and PreprocessingConfig.from_dict(d) == cfg
    pre = TextPreprocessor.from_config(cfg)
    out = pre(["ab"])
    assert out["input_ids"].tolist() == [[0, 0, 0, 0, 0, 0, 100, 101]]
    pre = TextPreprocessor.from_config({"max_length": 4})
    assert pre(["abcdef"])["input_ids"].tolist() == [[100, 101, 102, 1]]


@pytest.mark.parametrize("kwargs,field", [
    (dict(tokenizer=""), "tokenizer"),
    (dict(tokenizer=3), "tokenizer"),
    (dict(max_length=0), "max_length"),
    (dict(padding="none"), "padding"),
    (dict(padding="max_length"), "padding"),          # nothing to pad to
    (dict(padding_side="middle"), "padding_side"),
    (dict(truncation="no"), "truncation"),
    (dict(add_eos=1), "add_eos"),
    (dict(preset="clip"), "preset"),
    (dict(size=224), "size"),
    (dict(fps=2.0), "fps"),
    (dict(chunk_length_s=30.0), "chunk_length_s"),
])
def test_text_config_bad_field_names_it(kwargs, field):
    with pytest.raises(ConfigError, match=rf"PreprocessingConfig\.{field}\b"):
        PreprocessingConfig(modality="text", **kwargs)


def test_text_config_from_toml(tmp_path):
    pytest.importorskip("tomllib" if sys.version_info >= (3, 11) else "tomli")
    path = tmp_path / "pre.toml"
    path.write_text('modality = "text"\nmax_length = "none"\nadd_eos = true\n'
                    'padding_side = "left"\n')
    cfg = PreprocessingConfig.from_toml(path)
    assert cfg.max_length is None and cfg.add_eos is True and cfg.padding_side == "left"


def test_other_modalities_reject_text_fields():
    for modality in ("audio", "image", "video"):
        with pytest.raises(ConfigError, match=r"PreprocessingConfig\.max_length applies"):
            PreprocessingConfig(modality=modality, max_length=16)
        with pytest.raises(ConfigError, match=r"PreprocessingConfig\.padding_side applies"):
            PreprocessingConfig(modality=modality, padding_side="left")


# --------------------------------------------------------------------------------------------
# HFTokenizer with a tiny WordLevel tokenizer built here

tokenizers = pytest.importorskip("tokenizers")

SENTENCES = ["the cat sat on the mat", "the dog ate my homework", "a cat and a dog",
             "hello world", "the quick brown fox jumps over the lazy dog"]


def build_tokenizer(path, *, specials=("[PAD]", "[UNK]", "[CLS]", "[SEP]"), template=True,
                    padding=False):
    from tokenizers import Tokenizer, models, pre_tokenizers, processors, trainers
    tok = Tokenizer(models.WordLevel(unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.train_from_iterator(SENTENCES, trainers.WordLevelTrainer(special_tokens=list(specials)))
    if template:
        tok.post_processor = processors.TemplateProcessing(
            single="[CLS] $A [SEP]",
            special_tokens=[("[CLS]", tok.token_to_id("[CLS]")),
                            ("[SEP]", tok.token_to_id("[SEP]"))])
    if padding:
        tok.enable_padding(pad_id=tok.token_to_id("[SEP]"), pad_token="[SEP]")
    tok.save(str(path))
    return Tokenizer.from_file(str(path))


@pytest.fixture
def tok_file(tmp_path):
    path = tmp_path / "tokenizer.json"
    build_tokenizer(path)
    return path


def test_hf_encode_matches_the_library(tok_file):
    ref = tokenizers.Tokenizer.from_file(str(tok_file))
    hf = HFTokenizer(tok_file)
    assert hf.pad_id == ref.token_to_id("[PAD]") == 0
    assert hf.eos_id == ref.token_to_id("[SEP]")
    for s in SENTENCES + ["unknown words here", ""]:
        ids = hf.encode(s)
        assert ids.dtype == np.int64
        assert ids.tolist() == ref.encode(s).ids
    assert hf.encode("the cat")[0] == ref.token_to_id("[CLS]")
    assert hf.decode(hf.encode("the cat sat")) == "the cat sat"
    assert hf.vocab_size == ref.get_vocab_size()
    assert HFTokenizer(tok_file.parent).encode("the cat").tolist() == hf.encode("the cat").tolist()


def test_hf_truncation_keeps_special_tokens(tok_file):
    ref = tokenizers.Tokenizer.from_file(str(tok_file))
    ref.enable_truncation(5)
    hf = HFTokenizer(tok_file)
    s = "the quick brown fox jumps over the lazy dog"
    ids = hf.encode(s, max_length=5)
    assert ids.tolist() == ref.encode(s).ids
    assert ids[-1] == hf.eos_id and len(ids) == 5                 # [SEP] survives


def test_hf_max_length_shorter_than_special_tokens(tok_file):
    hf = HFTokenizer(tok_file)
    with pytest.raises(ShapeError, match="max_length=1"):
        hf.encode("the cat sat", max_length=1)
    with pytest.raises(ShapeError, match="max_length=1"):
        TextPreprocessor(hf, max_length=1)(["the cat sat"])
    assert hf.encode("the cat sat", max_length=2).tolist() == [hf.encode("x")[0], hf.eos_id]


def test_hf_preprocessor_matches_library_padding(tok_file):
    texts = ["the cat sat on the mat", "hello", "a dog and a cat and the fox"]
    for side in ("right", "left"):
        ref = tokenizers.Tokenizer.from_file(str(tok_file))
        ref.enable_truncation(6)
        ref.enable_padding(direction=side, pad_id=0, pad_token="[PAD]")
        want = ref.encode_batch(texts)
        out = TextPreprocessor(HFTokenizer(tok_file), max_length=6, padding_side=side)(texts)
        assert out["input_ids"].tolist() == [e.ids for e in want]
        assert out["attention_mask"].astype(int).tolist() == [e.attention_mask for e in want]
    out = TextPreprocessor(str(tok_file), max_length=10, padding="max_length")(texts[:2])
    assert out["input_ids"].shape == (2, 10)
    assert out["attention_mask"].sum(axis=1).tolist() == [8, 3]


def test_hf_truncation_false_raises(tok_file):
    pre = TextPreprocessor(HFTokenizer(tok_file), max_length=4, truncation=False)
    assert pre(["hello world"])["input_ids"].shape == (1, 4)
    with pytest.raises(ShapeError, match=r"texts\[0\]"):
        pre(["the cat sat on the mat"])


def test_hf_add_eos(tmp_path):
    path = tmp_path / "t.json"
    build_tokenizer(path, template=False)
    hf = HFTokenizer(path)
    ids = hf.encode("the cat sat", add_eos=True)
    assert ids[-1] == hf.eos_id and len(ids) == 4
    ids = hf.encode("the cat sat on the mat", add_eos=True, max_length=3)
    assert len(ids) == 3 and ids[-1] == hf.eos_id
    out = TextPreprocessor(hf, max_length=3, add_eos=True)(["the cat sat on", "a"])
    assert out["input_ids"][:, :].tolist()[1] == [hf.encode("a")[0], hf.eos_id, hf.pad_id]


def test_hf_pad_id_sources(tmp_path):
    # from the padding configuration saved in the file
    path = tmp_path / "padded.json"
    ref = build_tokenizer(path, padding=True)
    assert HFTokenizer(path).pad_id == ref.token_to_id("[SEP]")
    # explicit, as an id or a token
    assert HFTokenizer(path, pad_id=7).pad_id == 7
    assert HFTokenizer(path, pad_id="[CLS]").pad_id == ref.token_to_id("[CLS]")
    with pytest.raises(ConfigError, match="pad_id"):
        HFTokenizer(path, pad_id="<nope>")
    with pytest.raises(ConfigError, match="pad_id"):
        HFTokenizer(path, pad_id=-1)
    # none at all: TextPreprocessor refuses the tokenizer until one is given
    bare = tmp_path / "bare.json"
    build_tokenizer(bare, specials=("[UNK]",), template=False)
    hf = HFTokenizer(bare)
    assert hf.pad_id is None and hf.eos_id is None
    with pytest.raises(ConfigError, match="pad"):
        TextPreprocessor(hf, max_length=8)
    with pytest.raises(ConfigError, match="eos"):
        hf.encode("the cat", add_eos=True)
    out = TextPreprocessor(HFTokenizer(bare, pad_id=0), max_length=8)(["the cat", "dog"])
    assert out["input_ids"].shape == (2, 2)


def test_hf_file_errors(tmp_path):
    with pytest.raises(ModelFormatError, match="missing_tok.json"):
        HFTokenizer(tmp_path / "missing_tok.json")
    with pytest.raises(ModelFormatError, match="tokenizer.json"):
        HFTokenizer(tmp_path)                                   # a directory without one
    bad = tmp_path / "broken_tok.json"
    bad.write_text('{"model": {"type": "Nope"}}')
    with pytest.raises(ModelFormatError, match="broken_tok.json") as info:
        HFTokenizer(bad)
    assert isinstance(info.value, MMCoreError)
    with pytest.raises(ConfigError):
        HFTokenizer(42)


def test_hf_missing_library_is_a_clear_import_error(tok_file, monkeypatch):
    monkeypatch.setitem(sys.modules, "tokenizers", None)
    with pytest.raises(ImportError, match="pip install tokenizers"):
        HFTokenizer(tok_file)


def test_text_config_with_tokenizer_path(tok_file):
    cfg = PreprocessingConfig(modality="text", tokenizer=str(tok_file), max_length=6)
    pre = TextPreprocessor.from_config(cfg)
    assert isinstance(pre.tokenizer, HFTokenizer) and pre.add_eos is False
    out = pre(["the cat"])
    assert out["input_ids"].tolist() == [HFTokenizer(tok_file).encode("the cat").tolist()]
