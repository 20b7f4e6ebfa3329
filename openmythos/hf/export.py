"""Export to, and load from, a Hugging Face model directory that `AutoModelForCausalLM`,
`AutoTokenizer` and `pipeline("text-generation")` read offline:

    config.json                  OpenMythosHFConfig: every MythosConfig field, plus auto_map
    generation_config.json       EOS/BOS/PAD and the default depth `n_loops`
    model.safetensors            the OpenMythos state dict under the prefix `model.`
    tokenizer.json               the tokenizer as a PreTrainedTokenizerFast, left padding
    tokenizer_config.json        ... and its EOS/BOS/PAD
    tokenizer_meta.json          its kind, so that our own `load_tokenizer(dir)` reads it too
    *.py                         self-contained model code, for trust_remote_code=True
    mythos_train_config.json     the run's TrainConfig, when exported from a training checkpoint
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from tokenizers import AddedToken, decoders, models, pre_tokenizers
from tokenizers import Tokenizer as TokenizersBackend
from transformers import GenerationConfig, PreTrainedTokenizerFast
from transformers.convert_slow_tokenizer import bytes_to_unicode

from openmythos.data.tokenizer import (
    BPE_FILE,
    EOS_TOKEN,
    META_FILE,
    PAD_TOKEN,
    BPETokenizer,
    Tokenizer,
    check_fits,
    gpt2_files_dir,
    load_tokenizer,
)
from openmythos.hf.modeling_openmythos import OpenMythosForCausalLM, check_depth
from openmythos.model import OpenMythos
from openmythos.training.checkpoint import is_hf_export, load_model, readable_as_umask

if TYPE_CHECKING:
    from openmythos.training.config import TrainConfig

TRAIN_CONFIG_FILE = "mythos_train_config.json"
# encoded by both tokenizers after a conversion; they must agree on every id
_PROBE = "OpenMythos loops 16× — naïve café, 1790–2000!\n\tdon't  stop"


def to_hf_tokenizer(tokenizer: Tokenizer, model_max_length: int | None = None) -> PreTrainedTokenizerFast:
    """Our tokenizer (any kind) as a PreTrainedTokenizerFast with the same ids, EOS = BOS and PAD
    set, and left padding for batched generation. transformers' convention differs from ours in
    one way: a literal special token in a text ("<|endoftext|>", and "<|pad|>" where the
    tokenizer has one) becomes its id rather than plain characters."""
    hf = PreTrainedTokenizerFast(
        tokenizer_object=_backend(tokenizer),
        eos_token=EOS_TOKEN,
        bos_token=EOS_TOKEN,  # our documents are separated by EOS, which serves as BOS too
        pad_token=EOS_TOKEN if tokenizer.pad_id == tokenizer.eos_id else PAD_TOKEN,  # GPT-2 has no PAD
        unk_token=None,
        padding_side="left",
        clean_up_tokenization_spaces=False,
        # what the model takes: transformers 4.x adds token_type_ids by default, which it refuses
        model_input_names=["input_ids", "attention_mask"],
    )
    ids = (hf.eos_token_id, hf.bos_token_id, hf.pad_token_id, len(hf))
    want = (tokenizer.eos_id, tokenizer.bos_id, tokenizer.pad_id, tokenizer.vocab_size)
    assert ids == want, f"converted (eos, bos, pad, vocab) {ids} != {want}"
    assert hf.encode(_PROBE, add_special_tokens=False) == tokenizer.encode(_PROBE), (
        f"the converted {tokenizer.name} tokenizer encodes differently")
    if model_max_length is not None:  # set after the probe, which may be longer
        hf.model_max_length = model_max_length
    return hf


def _backend(tokenizer: Tokenizer) -> TokenizersBackend:
    if isinstance(tokenizer, BPETokenizer):
        with tempfile.TemporaryDirectory() as tmp:  # through its saved file: no private state
            tokenizer.save(tmp)
            return TokenizersBackend.from_file(str(Path(tmp) / BPE_FILE))
    if tokenizer.kind == "gpt2":  # byte-level BPE from the same files tiktoken reads
        data = gpt2_files_dir()
        backend = TokenizersBackend(models.BPE.from_file(str(data / "encoder.json"),
                                                         str(data / "vocab.bpe")))
        backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        backend.decoder = decoders.ByteLevel()
        backend.add_special_tokens([AddedToken(EOS_TOKEN, special=True, normalized=False)])
        return backend
    if tokenizer.kind == "byte":  # ids 0..255 are the bytes themselves, as byte-level characters
        # (byte-level decoding, like ours, replaces only the bytes no character can hold; a
        # ByteFallback decoder would turn a whole run of bytes into U+FFFD for one bad byte)
        vocab = {char: b for b, char in bytes_to_unicode().items()}
        backend = TokenizersBackend(models.BPE(vocab=vocab, merges=[]))
        backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
        backend.decoder = decoders.ByteLevel()
        backend.add_special_tokens([AddedToken(t, special=True, normalized=False)
                                    for t in (EOS_TOKEN, PAD_TOKEN)])
        return backend
    raise ValueError(f"cannot convert a {tokenizer.name!r} tokenizer to the Hugging Face format")


def save_hf(model: OpenMythos, out_dir: str | Path, tokenizer: Tokenizer | None = None,
            n_loops: int | None = None, train_cfg: TrainConfig | None = None) -> Path:
    """Write `model` (and its tokenizer) as a Hugging Face model directory; returns its path.
    n_loops: the default generation depth (default: the model's max_loop_iters)."""
    check_depth(n_loops)
    model = getattr(model, "_orig_mod", model)  # torch.compile(model): its weights, without the prefix
    special: dict[str, Any] = {}
    if tokenizer is not None:
        check_fits(tokenizer, model.cfg.vocab_size)
        special = {"bos_token_id": tokenizer.bos_id, "eos_token_id": tokenizer.eos_id,
                   "pad_token_id": tokenizer.pad_id}
    out = Path(out_dir).expanduser()
    # a new or empty folder, or an earlier export: never a file, a checkpoint or a run folder
    if out.exists() and not (out.is_dir() and (is_hf_export(out) or not any(out.iterdir()))):
        raise ValueError(f"export folder {str(out)!r} is a file or holds files that are not an earlier "
                         "export (a run or checkpoint folder?): export into a new or empty folder")
    hf = OpenMythosForCausalLM.from_openmythos(model, **special)
    if tokenizer is not None and tokenizer.vocab_size < model.cfg.vocab_size:
        # a padded vocabulary (GPT-2's 50257 to 50304): its extra ids decode to nothing, so HF's
        # generate never samples them, as ours (vocab_size=) and the server do not
        special["suppress_tokens"] = list(range(tokenizer.vocab_size, model.cfg.vocab_size))
    # max_length: pipeline() otherwise asks for 256 new tokens, past a short context
    hf.generation_config = GenerationConfig(**special, n_loops=n_loops or model.cfg.max_loop_iters,
                                            max_length=model.cfg.max_seq_len)
    hf.save_pretrained(out)
    for weights in out.glob("*.safetensors"):
        readable_as_umask(weights)
    # a folder that held an earlier export keeps nothing of it that this one does not rewrite:
    # load_pretrained would pair this model with that tokenizer or run config
    stale = [] if tokenizer is not None else [*out.glob("tokenizer*.json"), *out.glob("special_tokens_map.json")]
    for path in stale + ([out / TRAIN_CONFIG_FILE] if train_cfg is None else []):
        path.unlink(missing_ok=True)
    if tokenizer is not None:
        to_hf_tokenizer(tokenizer, model.cfg.max_seq_len).save_pretrained(out)
        # transformers 5 names its class TokenizersBackend, which 4.x lacks; both load this one
        _update_json(out / "tokenizer_config.json", tokenizer_class="PreTrainedTokenizerFast")
        # tokenizer_meta.json for our own loader; a BPE is re-read from the file transformers
        # wrote, so the recorded fingerprint is that of the file in this directory
        if isinstance(tokenizer, BPETokenizer):
            tokenizer = BPETokenizer(TokenizersBackend.from_file(str(out / BPE_FILE)))
        tokenizer.save(out)
    if train_cfg is not None:
        (out / TRAIN_CONFIG_FILE).write_text(json.dumps(train_cfg.to_dict(), indent=2) + "\n")
    return out


def export_hf(checkpoint_dir: str | Path, out_dir: str | Path, n_loops: int | None = None) -> Path:
    """`mythos export-hf`: convert a training checkpoint (a checkpoint directory, or a run
    directory for its newest complete checkpoint) into a Hugging Face model directory."""
    model, tokenizer, train_cfg = load_model(checkpoint_dir)
    return save_hf(model, out_dir, tokenizer, n_loops, train_cfg)


def load_pretrained(path: str | Path, device: str | torch.device = "cpu"
                    ) -> tuple[OpenMythos, Tokenizer | None, TrainConfig | None]:
    """The core model (eval mode), its tokenizer and its run's TrainConfig from a directory
    written by `save_hf`/`export_hf`; the last two are None when the directory has none."""
    path = Path(path).expanduser()
    model = OpenMythosForCausalLM.from_pretrained(path).model.to(device).eval()
    tokenizer = load_tokenizer(path) if (path / META_FILE).is_file() else None
    if tokenizer is not None:
        check_fits(tokenizer, model.cfg.vocab_size)
    train_cfg = None
    if (path / TRAIN_CONFIG_FILE).is_file():
        from openmythos.training.config import TrainConfig

        try:
            train_cfg = TrainConfig.from_dict(json.loads((path / TRAIN_CONFIG_FILE).read_text()))
        except (json.JSONDecodeError, TypeError, KeyError) as e:
            raise ValueError(f"{str(path / TRAIN_CONFIG_FILE)!r} is corrupt: {e!r}") from e
    return model, tokenizer, train_cfg


def _update_json(path: Path, **changes: Any) -> None:
    path.write_text(json.dumps({**json.loads(path.read_text()), **changes}, indent=2) + "\n")


