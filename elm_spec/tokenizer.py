"""Llama-2-layout SentencePiece tokenizers: training, checking, and the files a model dir carries.

Ids: unk 0, bos 1, eos 2 (docs/reference.md). Every model directory carries `tokenizer.model`
and a `tokenizer.json` built from it here, so that SentencePiece, transformers 4 and 5
(`AutoTokenizer`), mlx-lm and lm-eval all produce the same ids: transformers 5 rebuilds a
`LlamaTokenizer` from `tokenizer.model` with a Metaspace pre-tokenizer that drops the dummy
prefix before leading whitespace and ignores the model's normalizer, so the config names the
generic `PreTrainedTokenizerFast`, which reads `tokenizer.json` as written.

Special-token strings (`<s>`, `</s>`, `<unk>`) inside text are read as those tokens, as every
transformers tokenizer does by default (chat templates rely on it); `Tokenizer.encode` does
the same, so the PyTorch side and evaluation agree with the MLX side on such text.
"""

from __future__ import annotations

import base64
import os
import re
import shutil
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from elm_spec.errors import ElmError
from elm_spec.jsonl import write_json

SENTENCEPIECE_FILE = "tokenizer.model"
TOKENIZER_CONFIG_FILE = "tokenizer_config.json"
SPECIAL_TOKENS_FILE = "special_tokens_map.json"
FAST_TOKENIZER_FILE = "tokenizer.json"
TOKENIZER_FILES = (SENTENCEPIECE_FILE, TOKENIZER_CONFIG_FILE, SPECIAL_TOKENS_FILE, FAST_TOKENIZER_FILE)

UNK_ID, BOS_ID, EOS_ID = 0, 1, 2
SPECIAL_PIECES = {"<unk>": UNK_ID, "<s>": BOS_ID, "</s>": EOS_ID}
_SPECIAL_SPLIT = re.compile("(" + "|".join(re.escape(p) for p in SPECIAL_PIECES) + ")")
MIN_VOCAB_SIZE = 3 + 256 + 1  # special pieces, 256 byte-fallback pieces, at least one merge


class Tokenizer:
    """A SentencePiece model with the Llama-2 id layout; what the PyTorch side encodes with."""

    def __init__(self, model_file: str | os.PathLike[str]):
        import sentencepiece as spm

        path = Path(model_file)
        if path.is_dir():
            path = path / SENTENCEPIECE_FILE
        if not path.is_file():
            raise ElmError(f"{path}: tokenizer not found (a model directory needs {SENTENCEPIECE_FILE})")
        self.path = path
        self.processor = spm.SentencePieceProcessor()
        try:
            self.processor.Load(str(path))
        except (OSError, RuntimeError):
            raise ElmError(f"{path}: not a SentencePiece model") from None
        check_llama_layout(self.processor, path)

    @property
    def vocab_size(self) -> int:
        return int(self.processor.GetPieceSize())

    @property
    def bos_id(self) -> int:
        return BOS_ID

    @property
    def eos_id(self) -> int:
        return EOS_ID

    def encode(self, text: str, bos: bool = False, eos: bool = False) -> list[int]:
        return ([BOS_ID] if bos else []) + self._encode_text(text) + ([EOS_ID] if eos else [])

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        plain = [i for i, text in enumerate(texts) if not _SPECIAL_SPLIT.search(text)]
        encoded: list[list[int]] = [[] for _ in texts]
        for i, ids in zip(plain, self.processor.EncodeAsIds([texts[i] for i in plain]), strict=True):
            encoded[i] = ids
        for i in sorted(set(range(len(texts))) - set(plain)):
            encoded[i] = self._encode_text(texts[i])
        return encoded

    def _encode_text(self, text: str) -> list[int]:
        """SentencePiece ids, with special-token strings read as those tokens. Each stretch
        between them is encoded on its own (dummy prefix included), as transformers does."""
        ids: list[int] = []
        for part in _SPECIAL_SPLIT.split(text):
            if part in SPECIAL_PIECES:
                ids.append(SPECIAL_PIECES[part])
            elif part:
                ids += self.processor.EncodeAsIds(part)
        return ids

    def decode(self, ids: Iterable[int]) -> str:
        """The text of IDS without special tokens (transformers' `skip_special_tokens=True`)."""
        return self.processor.DecodeIds([int(i) for i in ids if int(i) != UNK_ID])


def check_llama_layout(processor, path: Path) -> None:
    ids = (processor.unk_id(), processor.bos_id(), processor.eos_id())
    if ids != (UNK_ID, BOS_ID, EOS_ID):
        raise ElmError(f"{path}: unk/bos/eos ids are {ids}, expected the Llama-2 layout (0, 1, 2)")


def train_tokenizer(texts: Iterator[str], vocab_size: int, output_dir: str | os.PathLike[str],
                    max_sentence_length: int = 16384, input_sentence_size: int = 2_000_000,
                    num_threads: int | None = None) -> Path:
    """Train a SentencePiece BPE model with byte fallback in the Llama-2 layout.

    Writes the tokenizer files of a model directory into OUTPUT_DIR and returns the model path.
    """
    import sentencepiece as spm

    if vocab_size < MIN_VOCAB_SIZE:
        raise ElmError(f"vocab size {vocab_size} is too small: byte fallback needs at least {MIN_VOCAB_SIZE}")
    output = Path(output_dir)
    output.mkdir(parents=True, exist_ok=True)
    lines = (line for text in texts for line in text.splitlines() if line.strip())
    prefix = output / "tokenizer"
    try:
        spm.SentencePieceTrainer.Train(
            sentence_iterator=lines, model_prefix=str(prefix), model_type="bpe",
            vocab_size=vocab_size, byte_fallback=True, split_digits=True,
            unk_id=UNK_ID, bos_id=BOS_ID, eos_id=EOS_ID, pad_id=-1,
            unk_piece="<unk>", bos_piece="<s>", eos_piece="</s>",
            normalization_rule_name="identity", remove_extra_whitespaces=False,
            add_dummy_prefix=True, allow_whitespace_only_pieces=True,
            character_coverage=0.99995, max_sentence_length=max_sentence_length,
            input_sentence_size=input_sentence_size, shuffle_input_sentence=True,
            hard_vocab_limit=False, num_threads=num_threads or os.cpu_count() or 1,
            minloglevel=2,
        )
    except RuntimeError as error:
        raise ElmError(f"tokenizer training failed: {error}") from None
    (output / "tokenizer.vocab").unlink(missing_ok=True)
    model = prefix.with_suffix(".model")
    write_tokenizer_files(model, output)
    return output / SENTENCEPIECE_FILE


def write_tokenizer_files(sentencepiece_model: str | os.PathLike[str],
                          directory: str | os.PathLike[str],
                          chat_template: str | None = None) -> None:
    """Copy a SentencePiece model into DIRECTORY with the configs AutoTokenizer needs."""
    source = Path(sentencepiece_model)
    target = Path(directory)
    Tokenizer(source)  # refuses anything but a Llama-2-layout SentencePiece model
    if source.resolve() != (target / SENTENCEPIECE_FILE).resolve():
        shutil.copyfile(source, target / SENTENCEPIECE_FILE)
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": "<s>",
        "eos_token": "</s>",
        "unk_token": "<unk>",
        "pad_token": None,
        "add_bos_token": True,
        "add_eos_token": False,
        "clean_up_tokenization_spaces": False,
        # tokenizer.json's normalizer adds the dummy prefix to every stretch of text between
        # special tokens, as SentencePiece does for each stretch: the "legacy" Llama behaviour.
        "legacy": True,
    }
    if chat_template is not None:
        config["chat_template"] = chat_template
    write_json(target / TOKENIZER_CONFIG_FILE, config)
    write_json(target / SPECIAL_TOKENS_FILE,
               {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"})
    write_json(target / FAST_TOKENIZER_FILE, fast_tokenizer_json(source))


def fast_tokenizer_json(sentencepiece_model: str | os.PathLike[str]) -> dict[str, Any]:
    """A `tokenizers` tokenizer.json that reproduces the SentencePiece BPE model's ids.

    The normalizer redoes SentencePiece's: its precompiled character map (none for
    `identity`), `remove_extra_whitespaces`, then the dummy prefix and spaces as `▁`. BPE merges
    are the pairs of pieces that form another piece, ranked by that piece's score, which is
    the order SentencePiece's BPE applies them in.
    """
    from sentencepiece import sentencepiece_model_pb2

    proto = sentencepiece_model_pb2.ModelProto()
    proto.ParseFromString(Path(sentencepiece_model).read_bytes())
    if proto.trainer_spec.model_type != sentencepiece_model_pb2.TrainerSpec.BPE:
        raise ElmError(f"{sentencepiece_model}: only BPE SentencePiece models are supported")
    if not proto.trainer_spec.byte_fallback:
        raise ElmError(f"{sentencepiece_model}: the SentencePiece model has no byte fallback")
    pieces = [piece.piece for piece in proto.pieces]
    vocab = {piece: index for index, piece in enumerate(pieces)}
    kinds = sentencepiece_model_pb2.ModelProto.SentencePiece
    mergeable = {piece.piece for piece in proto.pieces
                 if piece.type in (kinds.NORMAL, kinds.USER_DEFINED)}
    scored = sorted((piece for piece in proto.pieces if piece.piece in mergeable),
                    key=lambda piece: -piece.score)
    merges = []
    for piece in scored:
        text = piece.piece
        splits = [(text[:k], text[k:]) for k in range(1, len(text))
                  if text[:k] in mergeable and text[k:] in mergeable]
        merges += sorted(splits, key=lambda pair: (vocab[pair[0]], vocab[pair[1]]))
    return {
        "version": "1.0",
        "truncation": None,
        "padding": None,
        "added_tokens": [
            {"id": index, "content": piece, "single_word": False, "lstrip": False,
             "rstrip": False, "normalized": False, "special": True}
            for piece, index in SPECIAL_PIECES.items()
        ],
        "normalizer": _normalizer(proto.normalizer_spec),
        "pre_tokenizer": None,
        "post_processor": {
            "type": "TemplateProcessing",
            "single": [{"SpecialToken": {"id": "<s>", "type_id": 0}},
                       {"Sequence": {"id": "A", "type_id": 0}}],
            "pair": [{"SpecialToken": {"id": "<s>", "type_id": 0}},
                     {"Sequence": {"id": "A", "type_id": 0}},
                     {"SpecialToken": {"id": "<s>", "type_id": 1}},
                     {"Sequence": {"id": "B", "type_id": 1}}],
            "special_tokens": {"<s>": {"id": "<s>", "ids": [BOS_ID], "tokens": ["<s>"]}},
        },
        "decoder": {"type": "Sequence", "decoders": [
            {"type": "Replace", "pattern": {"String": "\u2581"}, "content": " "},
            {"type": "ByteFallback"},
            {"type": "Fuse"},
            *([{"type": "Strip", "content": " ", "start": 1, "stop": 0}]
              if proto.normalizer_spec.add_dummy_prefix else []),
        ]},
        "model": {
            "type": "BPE", "dropout": None, "unk_token": "<unk>",
            "continuing_subword_prefix": None, "end_of_word_suffix": None,
            "fuse_unk": True, "byte_fallback": True, "ignore_merges": False,
            "vocab": vocab, "merges": [list(pair) for pair in merges],
        },
    }


def _normalizer(spec) -> dict[str, Any]:
    steps: list[dict[str, Any]] = []
    if spec.precompiled_charsmap:
        steps.append({"type": "Precompiled",
                      "precompiled_charsmap": base64.b64encode(spec.precompiled_charsmap).decode()})
    if spec.remove_extra_whitespaces:
        steps += [{"type": "Replace", "pattern": {"Regex": "\\A +| +\\z"}, "content": ""},
                  {"type": "Replace", "pattern": {"Regex": " {2,}"}, "content": " "}]
    if spec.add_dummy_prefix:
        steps.append({"type": "Prepend", "prepend": "\u2581"})
    steps.append({"type": "Replace", "pattern": {"String": " "}, "content": "\u2581"})
    return {"type": "Sequence", "normalizers": steps}


def require_tokenizer(directory: str | os.PathLike[str]) -> Path:
    path = Path(directory) / SENTENCEPIECE_FILE
    if not path.is_file():
        raise ElmError(f"{directory}: no tokenizer ({SENTENCEPIECE_FILE} missing); "
                       "add one with `elm tokenizer train` or copy a Llama-2 tokenizer.model there")
    return path
