"""`OpenMythosForCausalLM`: our `OpenMythos` behind the transformers causal-LM interface
(`from_pretrained`, `generate`, `pipeline`, the `labels` loss), with the loop-aware `KVCache` as
its cache.

Parameters keep the core model's names under the prefix `model.`, so `hf.model.state_dict()` is
exactly an `OpenMythos` state dict. The LM head is `model.embed.weight` used transposed: there is
no head parameter, so saving and loading have nothing to tie and nothing to drop.

Like the config, this file is saved next to exported weights for `trust_remote_code=True`
loading; `save_pretrained` makes the saved copy self-contained (see `openmythos.hf.vendor`).
"""

from __future__ import annotations

import importlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import transformers
from safetensors import safe_open
from transformers import GenerationMixin, PreTrainedModel
from transformers.modeling_outputs import CausalLMOutputWithPast

from openmythos.config import is_int
from openmythos.generation import check_left_padding
from openmythos.hf.configuration_openmythos import OpenMythosHFConfig
from openmythos.model.cache import KVCache
from openmythos.model.model import IGNORE_INDEX, OpenMythos, check_targets

# transformers 5 renamed the cache argument and output field from `past_key_values` to `cache`
CACHE_FIELD = "cache" if "cache" in CausalLMOutputWithPast.__dataclass_fields__ else "past_key_values"
# the cache grows in whole blocks of this many positions, doubling when a step overflows it
_CACHE_BLOCK = 64
# keyword arguments transformers' Trainer and generate may pass besides the named ones
_PLUMBING = ("num_items_in_batch", "output_attentions", "output_hidden_states")


def check_depth(n_loops: Any) -> int | None:
    if n_loops is None:
        return None
    if is_int(n_loops) and n_loops >= 1:
        return int(n_loops)
    raise ValueError(f"n_loops must be a positive integer or None, got {n_loops!r}")


# transformers 4's generate passes the whole sequence at every step; 5's passes the new tokens
# (or says how many are new: next_sequence_length), which also allows chunked prefill
_WHOLE_SEQUENCE_EVERY_STEP = int(transformers.__version__.split(".")[0]) < 5


class OpenMythosCache:
    """The transformers-side handle on a `KVCache`, passed between `generate`'s forward steps.

    Storage is allocated by the first forward, when the batch size is known (after beams and
    `num_return_sequences` expand the batch), and doubled whenever a step would overflow it, so
    `generate` needs no length up front. The cache is built for one depth, a slot per loop:
    `n_loops` (default `max_loop_iters`), which is also the depth of every step that runs on it
    without an explicit `n_loops`.
    """

    # read by transformers' generate to choose its code paths: an attention cache that cannot be
    # compiled or cropped
    is_compileable = False
    is_croppable = False
    is_linear = (False,)

    def __init__(self, n_loops: int | None = None):
        self.n_loops = check_depth(n_loops)
        self.kv: KVCache | None = None

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return 0 if self.kv is None else self.kv.length

    def storage(self, model: OpenMythos, batch_size: int, new_tokens: int) -> KVCache:
        """The KVCache, with room for `new_tokens` more columns up to max_seq_len (past that, the
        model's own length check reports the overflow)."""
        need = self.get_seq_length() + new_tokens
        limit = model.cfg.max_seq_len
        if self.kv is None:
            depth = self.n_loops or model.cfg.max_loop_iters
            self.kv = model.new_cache(batch_size, min(_round_up(need), limit), depth)
        elif need > self.kv.max_len and self.kv.max_len < limit:
            self.kv = _grown(self.kv, model, min(_round_up(max(need, 2 * self.kv.max_len)), limit))
        return self.kv

    def reorder_cache(self, beam_idx: torch.Tensor) -> None:
        """Beam search: row i of the batch continues from row beam_idx[i]."""
        kv = self.kv
        if kv is None:
            return
        kv.select_rows(beam_idx.to(kv.valid.device))


def _round_up(n: int) -> int:
    return -(-n // _CACHE_BLOCK) * _CACHE_BLOCK


def _grown(kv: KVCache, model: OpenMythos, max_len: int) -> KVCache:
    new = model.new_cache(kv.batch_size, max_len, kv.n_loops)
    kv.copy_to(new)
    return new


@dataclass
class OpenMythosCausalLMOutput(CausalLMOutputWithPast):
    """CausalLMOutputWithPast plus the recurrence's own outputs (`loss` is cross-entropy only)."""

    aux_loss: torch.Tensor | None = None  # MoE balance loss
    ponder_loss: torch.Tensor | None = None  # ACT ponder cost
    loops: torch.Tensor | None = None  # (B, T) loops run per position
    # (E,) tokens routed to each expert: a training loop of its own keeps the aux-loss-free balancing
    # with `model.model.update_router_bias(expert_load)` after each optimizer step (transformers'
    # Trainer: openmythos.hf.RouterBiasCallback)
    expert_load: torch.Tensor | None = None


class OpenMythosForCausalLM(PreTrainedModel, GenerationMixin):
    config_class = OpenMythosHFConfig
    base_model_prefix = "model"
    main_input_name = "input_ids"
    _no_split_modules = ["TransformerBlock", "RecurrentBlock"]
    supports_gradient_checkpointing = True  # through the core's own, per loop iteration

    def __init__(self, config: OpenMythosHFConfig):
        super().__init__(config)
        self.model = OpenMythos(config.to_mythos())
        self.post_init()

    @classmethod
    def from_openmythos(cls, model: OpenMythos, **config_kwargs: Any) -> OpenMythosForCausalLM:
        """Wrap an existing model; the wrapper shares its parameters, nothing is copied."""
        config = OpenMythosHFConfig.from_mythos(model.cfg, **config_kwargs)
        with torch.device("meta"):  # the placeholder built here is replaced at once
            hf = cls(config)
        hf.model = model
        return hf.train(model.training)

    def _init_weights(self, module: torch.nn.Module) -> None:
        # OpenMythos initialises itself when built on a real device, with its own scheme (ACT,
        # injection and MoE each have one), and from_pretrained refuses checkpoints with missing
        # weights, so transformers' generic initialisation must not touch anything
        return

    def _set_gradient_checkpointing(self, enable: bool = True, gradient_checkpointing_func: Any = None,
                                    **kwargs: Any) -> None:
        """What transformers' gradient/activation_checkpointing_enable and _disable (and Trainer's
        gradient_checkpointing=True) call, in 4.x and 5.x: the core's activation checkpointing,
        one loop iteration at a time with torch's non-reentrant checkpoint (the prelude and coda
        are not checkpointed; transformers' function and its every_n_layers are not used)."""
        self.model.enable_activation_checkpointing(enable)

    @property
    def is_gradient_checkpointing(self) -> bool:  # transformers 4.x reads this one,
        return self.model.recurrent.checkpoint_loops

    @property
    def is_activation_checkpointing(self) -> bool:  # 5.x this one
        return self.model.recurrent.checkpoint_loops

    def get_input_embeddings(self) -> torch.nn.Embedding:
        return self.model.embed

    def set_input_embeddings(self, value: torch.nn.Embedding) -> None:
        # resize_token_embeddings comes through here; the head follows the embedding by itself
        self.model.embed = value
        self.model.cfg = self.model.cfg.replace(vocab_size=value.num_embeddings)

    def get_output_embeddings(self) -> None:
        return None  # the head is the input embedding, transposed

    @classmethod
    def _supports_default_dynamic_cache(cls) -> bool:
        return False  # generate must not build a DynamicCache; OpenMythosCache is the cache

    def forward(self, input_ids: torch.Tensor | None = None,
                attention_mask: torch.Tensor | None = None,
                labels: torch.Tensor | None = None,
                cache: OpenMythosCache | None = None,
                past_key_values: OpenMythosCache | None = None,
                n_loops: int | torch.Tensor | None = None,
                use_cache: bool | None = None,
                return_dict: bool | None = None,
                inputs_embeds: torch.Tensor | None = None,
                logits_to_keep: int = 0,
                **kwargs: Any):
        """input_ids (B, T); attention_mask (B, T) or, with a cache, (B, cached + T): 1 for tokens,
        0 for left padding. labels (B, T): next-token targets are labels shifted left by one,
        -100 ignored. n_loops: default the cache's depth, else max_loop_iters.
        use_cache (default False without a cache): store keys in `cache`, creating one if None.
        logits_to_keep: logits for the last k positions only (0: all; generate asks for 1)."""
        unknown = sorted(set(kwargs) - set(_PLUMBING))
        if unknown:
            raise TypeError(f"OpenMythosForCausalLM.forward got unexpected arguments {unknown}")
        if kwargs.get("output_attentions") or kwargs.get("output_hidden_states"):
            raise ValueError("OpenMythos returns neither attentions nor hidden states")
        if labels is not None and logits_to_keep:
            raise ValueError(f"logits_to_keep={logits_to_keep} with labels: the loss needs every position")
        if inputs_embeds is not None or input_ids is None:
            raise ValueError("OpenMythos takes input_ids (inputs_embeds are not supported)")
        if not isinstance(input_ids, torch.Tensor):  # checked before the cache and labels read its shape
            raise TypeError(f"input_ids must be a torch.Tensor, got {type(input_ids).__name__}")
        if input_ids.dim() != 2:
            raise ValueError(f"input_ids must have shape (batch, seq_len), got {tuple(input_ids.shape)}")
        if labels is not None:
            check_targets(labels, tuple(input_ids.shape), self.config.vocab_size, "labels")
            # position t's logits predict labels[t + 1]: labels[:, 0] is never a target
            if not bool((labels[:, 1:] != IGNORE_INDEX).any()):
                raise ValueError("labels keep no position past the first: logits predict labels shifted "
                                 "left by one, so labels[:, 0] is never a target and the loss would be NaN")
        if cache is None:
            cache = past_key_values
        if cache is not None and not isinstance(cache, OpenMythosCache):
            raise TypeError(f"the cache must be an OpenMythosCache, got {type(cache).__name__}")
        if use_cache and cache is None:  # as deep as the deepest row
            cache = OpenMythosCache(int(n_loops.max()) if isinstance(n_loops, torch.Tensor) else n_loops)
        if n_loops is None and cache is not None:
            n_loops = cache.n_loops
        kv = None
        if cache is not None and use_cache is not False:
            kv = cache.storage(self.model, *input_ids.shape)
            attention_mask = _new_token_mask(attention_mask, kv.length, input_ids.shape[1])

        out = self.model(input_ids, n_loops=n_loops, cache=kv, attention_mask=attention_mask,
                         logits_to_keep=logits_to_keep)
        loss = None
        if labels is not None:
            loss = self.loss_function(logits=out.logits, labels=labels,
                                      vocab_size=self.config.vocab_size,
                                      num_items_in_batch=kwargs.get("num_items_in_batch"))
        result = OpenMythosCausalLMOutput(loss=loss, logits=out.logits, aux_loss=out.aux_loss,
                                          ponder_loss=out.ponder_loss, loops=out.loops,
                                          expert_load=out.expert_load,
                                          **{CACHE_FIELD: cache if kv is not None else None})
        if return_dict is None:
            return_dict = self.config.return_dict
        return result if return_dict else result.to_tuple()

    def prepare_inputs_for_generation(self, input_ids: torch.Tensor,
                                      cache: OpenMythosCache | None = None,
                                      past_key_values: OpenMythosCache | None = None,
                                      attention_mask: torch.Tensor | None = None,
                                      use_cache: bool = True, n_loops: int | None = None,
                                      logits_to_keep: int = 0, next_sequence_length: int | None = None,
                                      **kwargs: Any) -> dict[str, Any]:
        cache = cache if cache is not None else past_key_values
        if next_sequence_length is not None:  # transformers 5 says how many tokens are new
            if next_sequence_length == 0:  # input_ids[:, -0:] would feed the whole prompt again
                raise ValueError("the cache already holds every input token: pass the new tokens (at least "
                                 "one) after those in past_key_values")
            input_ids = input_ids[:, -next_sequence_length:]
        elif cache is not None and use_cache and _WHOLE_SEQUENCE_EVERY_STEP:
            # 4.x passes the whole sequence, except its chunked prefill, which passes one chunk
            # whose cache_position starts where the cache ends
            position, held = kwargs.get("cache_position"), cache.get_seq_length()
            chunk = (position is not None and position.numel() == input_ids.shape[1] > 0
                     and int(position[0]) == held)
            if not chunk:
                if input_ids.shape[1] <= held:
                    raise ValueError("the cache already holds every input token: pass the new tokens (at "
                                     "least one) after those in past_key_values")
                input_ids = input_ids[:, held:]  # the cache holds the rest
        return {"input_ids": input_ids, "attention_mask": attention_mask, "cache": cache,
                "use_cache": use_cache, "n_loops": n_loops, "logits_to_keep": logits_to_keep}

    def generate(self, *args: Any, n_loops: int | None = None, **kwargs: Any):
        """transformers' generate, at the depth `n_loops` of this call, else the generation
        config's `n_loops`, else max_loop_iters. The depth travels in the cache built here, out of
        reach of the generation config's own keyword handling."""
        config = kwargs.get("generation_config") or (args[1] if len(args) > 1 else None) or self.generation_config

        def asked(name: str):  # a call's argument, else its generation config's
            return kwargs[name] if name in kwargs else getattr(config, name, None)

        # refused here: transformers would return None for them, or fail deep inside
        for name in ("output_hidden_states", "output_attentions"):
            if asked(name):
                raise ValueError(f"{name}: OpenMythos returns neither attentions nor hidden states")
        if any(asked(name) for name in ("assistant_model", "prompt_lookup_num_tokens", "assistant_early_exit")):
            raise ValueError("assisted decoding needs a cache it can crop, which OpenMythosCache is not; "
                             "OpenMythos drafts with its own shallower loops instead "
                             "(openmythos.generation.speculative_generate)")
        if asked("cache_implementation"):
            raise ValueError("cache_implementation: OpenMythos builds its own cache (OpenMythosCache)")
        inputs = args[0] if args else kwargs.get("input_ids", kwargs.get("inputs"))
        mask = kwargs.get("attention_mask")
        if isinstance(mask, torch.Tensor) and mask.dim() == 2:  # right padding: the first new token
            check_left_padding(mask)  # would read a padding position's logits, silently
        limit, new, total = self.config.max_seq_len, asked("max_new_tokens"), asked("max_length")
        if isinstance(inputs, torch.Tensor) and inputs.dim() == 2:  # else it fails at the limit,
            if isinstance(new, int) and inputs.shape[1] + new > limit:  # its tokens lost
                raise ValueError(f"input length {inputs.shape[1]} + max_new_tokens {new} exceeds "
                                 f"max_seq_len={limit}")
            if new is None and isinstance(total, int) and total > max(limit, inputs.shape[1]):
                raise ValueError(f"max_length {total} exceeds max_seq_len={limit}: pass max_new_tokens "
                                 f"or a max_length <= {limit}")
        cache = kwargs["cache"] if kwargs.get("cache") is not None else kwargs.get("past_key_values")
        if cache is not None:
            if n_loops is not None:
                raise ValueError("a cache passed to generate has its own depth: build it as "
                                 "OpenMythosCache(n_loops) instead of passing n_loops")
        else:
            if n_loops is None:  # a passed generation config without one keeps the model's
                n_loops = getattr(config, "n_loops", None) or getattr(self.generation_config, "n_loops", None)
            cache = kwargs[CACHE_FIELD] = OpenMythosCache(n_loops)
        cfg = self.model.cfg
        depth = getattr(cache, "n_loops", None) or cfg.max_loop_iters
        if asked("prefill_chunk_size") and cfg.kv_cache_loop_slots(depth) < depth:
            # a later chunk would read the earlier ones through the ring, not at its own loops
            raise ValueError(f"prefill_chunk_size: a ring cache (kv_cache_policy={cfg.kv_cache_policy!r}, "
                             f"kv_cache_ring={cfg.kv_cache_ring}) shorter than the depth n_loops={depth} is "
                             "exact only for a prompt prefilled in one call")
        return super().generate(*args, **kwargs)

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str | Path | None, *args: Any,
                        **kwargs: Any):
        """transformers' from_pretrained, but a local directory that is not a complete model of
        this config (no config.json, unreadable weights, missing, extra or mis-shaped tensors: a
        mismatched vocab, say) raises ValueError saying so, before anything is allocated. Weights
        are never patched with a random init."""
        if pretrained_model_name_or_path is not None:
            path = Path(pretrained_model_name_or_path) / (kwargs.get("subfolder") or "")
            if path.is_dir():
                _check_model_dir(path, kwargs.get("config"), kwargs.get("variant"))
        want_info = kwargs.pop("output_loading_info", False)
        model, info = super().from_pretrained(pretrained_model_name_or_path, *args,
                                              output_loading_info=True, **kwargs)
        bad = {k: sorted(map(str, info.get(k) or ()))
               for k in ("missing_keys", "unexpected_keys", "mismatched_keys")}
        if any(bad.values()):  # a format the directory check does not read, such as .bin files
            details = "; ".join(f"{k.replace('_', ' ')}: {v[:5]}" for k, v in bad.items() if v)
            raise ValueError(f"the weights in {str(pretrained_model_name_or_path)!r} do not match "
                             f"its config ({details})")
        return (model, info) if want_info else model

    def save_pretrained(self, save_directory: str | Path, *args: Any, **kwargs: Any) -> None:
        if kwargs.get("push_to_hub"):
            raise ValueError("save_pretrained(push_to_hub=True) would upload the code before it is "
                             "made self-contained: save locally, then upload the directory")
        if Path(save_directory).is_file():  # transformers would only log it, and save nothing
            raise ValueError(f"save_directory {str(save_directory)!r} is a file, not a directory")
        super().save_pretrained(save_directory, *args, **kwargs)
        if __package__ == "openmythos.hf" and kwargs.get("is_main_process", True):
            # transformers copied this file and the config's verbatim, and here they import the
            # core model from the package: write it beside them. (A copy loaded from such a
            # directory imports relatively and is complete as transformers copies it.)
            importlib.import_module("openmythos.hf.vendor").vendor_core(Path(save_directory))


def _new_token_mask(mask: torch.Tensor | None, cached: int, new: int) -> torch.Tensor | None:
    """transformers passes the mask of the whole sequence; the core model takes the new columns
    (its cache remembers which earlier ones were padding)."""
    if mask is None or mask.shape[-1] == new:
        return mask
    if mask.shape[-1] == cached + new:
        return mask[:, cached:]
    raise ValueError(f"attention_mask has {mask.shape[-1]} columns; expected {new} (the new tokens) "
                     f"or {cached + new} (the {cached} cached tokens and the new ones)")


def _check_model_dir(path: Path, config: OpenMythosHFConfig | str | Path | None,
                     variant: str | None = None) -> None:
    if isinstance(config, (str, Path)):
        config = OpenMythosHFConfig.from_pretrained(config)
    if config is None:
        if not (path / "config.json").is_file():
            raise ValueError(f"{str(path)!r} has no config.json: it is not a model directory")
        try:
            config = OpenMythosHFConfig.from_pretrained(path)
        except OSError as e:  # transformers reports unparsable JSON this way
            raise ValueError(f"{str(path / 'config.json')!r} is unreadable: {e}") from e
    # transformers' own order: the single file first, then a sharded checkpoint's index
    single = path / _with_variant("model.safetensors", variant)
    index_file = path / _with_variant("model.safetensors.index.json", variant)
    if single.is_file():
        files = [single]
    elif index_file.is_file():
        try:
            index = json.loads(index_file.read_text())
            files = sorted({path / name for name in index["weight_map"].values()})
        except (json.JSONDecodeError, KeyError, TypeError, AttributeError) as e:
            raise ValueError(f"{str(index_file)!r} is corrupt: {e!r}") from e
    elif any(path.glob("*.bin")):
        return  # the legacy pickle format: transformers checks it as it loads
    else:
        raise ValueError(f"{str(path)!r} has no weights (model.safetensors)")
    found: dict[str, tuple[int, ...]] = {}
    for file in files:
        try:
            with safe_open(file, framework="pt") as f:
                found.update({k: tuple(f.get_slice(k).get_shape()) for k in f.keys()})  # noqa: SIM118
        except Exception as e:  # safetensors raises its own error type, or OSError
            raise ValueError(f"weights file {str(file)!r} is unreadable (corrupt or truncated): {e}") from e
    with torch.device("meta"):
        want = {f"model.{k}": tuple(v.shape) for k, v in OpenMythos(config.to_mythos()).state_dict().items()}
    embed = found.get("model.embed.weight")
    if embed is not None and embed[0] != config.vocab_size:
        raise ValueError(f"{str(path)!r}: the embedding has {embed[0]} rows but config.json has "
                         f"vocab_size={config.vocab_size}: the vocabularies do not match")
    problems = [f"missing {sorted(want.keys() - found.keys())[:5]}" if want.keys() - found.keys() else "",
                f"unexpected {sorted(found.keys() - want.keys())[:5]}" if found.keys() - want.keys() else "",
                *(f"{k} has shape {found[k]}, the config needs {want[k]}"
                  for k in sorted(want.keys() & found.keys()) if found[k] != want[k])]
    problems = [p for p in problems if p]
    if problems:
        raise ValueError(f"the weights in {str(path)!r} do not fit its config.json: "
                         + "; ".join(problems[:5]))


def _with_variant(name: str, variant: str | None) -> str:
    """transformers' _add_variant: model.safetensors -> model.VARIANT.safetensors."""
    if not variant:
        return name
    parts = name.split(".")
    return ".".join([*parts[:-1], variant, parts[-1]])
