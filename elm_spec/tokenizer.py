"""Llama-2-layout SentencePiece tokenizers: training, checking, and the files a model dir carries.

Ids: unk 0, bos 1, eos 2 (FACTS.md section 2). A directory with `tokenizer.model` and a
`tokenizer_config.json` naming `LlamaTokenizer` loads in transformers' AutoTokenizer (and so in
mlx-lm) as well as in sentencepiece directly.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterable, Iterator
from pathlib import Path

from elm_spec.errors import ElmError

SENTENCEPIECE_FILE = "tokenizer.model"
TOKENIZER_CONFIG_FILE = "tokenizer_config.json"
SPECIAL_TOKENS_FILE = "special_tokens_map.json"
FAST_TOKENIZER_FILE = "tokenizer.json"
TOKENIZER_FILES = (SENTENCEPIECE_FILE, TOKENIZER_CONFIG_FILE, SPECIAL_TOKENS_FILE, FAST_TOKENIZER_FILE)

UNK_ID, BOS_ID, EOS_ID = 0, 1, 2
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
        ids = self.processor.EncodeAsIds(text)
        return ([BOS_ID] if bos else []) + ids + ([EOS_ID] if eos else [])

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return self.processor.EncodeAsIds(texts)

    def decode(self, ids: Iterable[int]) -> str:
        return self.processor.DecodeIds([int(i) for i in ids])


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
    from elm_spec.modeldir import write_json

    source = Path(sentencepiece_model)
    target = Path(directory)
    Tokenizer(source)  # refuses anything but a Llama-2-layout SentencePiece model
    if source.resolve() != (target / SENTENCEPIECE_FILE).resolve():
        shutil.copyfile(source, target / SENTENCEPIECE_FILE)
    config = {
        "tokenizer_class": "LlamaTokenizer",
        "bos_token": "<s>",
        "eos_token": "</s>",
        "unk_token": "<unk>",
        "pad_token": None,
        "add_bos_token": True,
        "add_eos_token": False,
        "clean_up_tokenization_spaces": False,
        "legacy": True,
        "model_max_length": 1_000_000,
        "sp_model_kwargs": {},
    }
    if chat_template is not None:
        config["chat_template"] = chat_template
    write_json(target / TOKENIZER_CONFIG_FILE, config)
    write_json(target / SPECIAL_TOKENS_FILE,
               {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"})
    (target / FAST_TOKENIZER_FILE).unlink(missing_ok=True)


def require_tokenizer(directory: str | os.PathLike[str]) -> Path:
    path = Path(directory) / SENTENCEPIECE_FILE
    if not path.is_file():
        raise ElmError(f"{directory}: no tokenizer ({SENTENCEPIECE_FILE} missing); "
                       "add one with `elm tokenizer train` or copy a Llama-2 tokenizer.model there")
    return path
