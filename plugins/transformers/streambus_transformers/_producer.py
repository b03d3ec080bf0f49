"""The ``transformers`` producer: ``generate`` in a worker thread, text onto the bus."""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Literal

import anyio
import anyio.to_thread
import msgspec
import structlog

from streambus import PluginBase, Usage
from streambus.plugins import NonNegativeFloat, NonNegativeInt, PositiveFloat, PositiveInt, check_bounds

from ._handoff import Handoff

if TYPE_CHECKING:
    import torch

    from streambus import Bus, StreamWriter

    from ._hf import HandoffStreamer

__all__ = ["TransformersProducer"]

log = structlog.get_logger("streambus.transformers")

_DTYPES = ("auto", "float32", "float16", "bfloat16")


class TransformersProducer(PluginBase):
    """Stream a Hugging Face ``transformers`` model running in this process onto the bus.

    Build it from objects (``TransformersProducer(model=model, tokenizer=tok,
    prompt="Hi")``) or from a local checkpoint path in a pipeline file
    (``type = "transformers"``, ``model = "/models/tiny"``). ``run(bus)``
    publishes one stream for the configured ``prompt`` or ``messages``; call
    :meth:`generate` to publish more with other inputs. ``generate`` runs in a
    worker thread; aborting the stream (``bus.abort``) or cancelling stops it
    after the current token and joins the thread before the ``abort`` event.
    """

    class Options(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
        """Config keys of the ``transformers`` producer."""

        model: str = ""
        """Local checkpoint directory or cached model name (loaded with ``AutoModelForCausalLM``)."""
        tokenizer: str | None = None
        """Tokenizer directory or name; defaults to ``model``."""
        prompt: str | None = None
        """Plain prompt text, tokenised as is."""
        messages: list[dict[str, str]] | None = None
        """Chat messages (``role``/``content``), rendered with the tokenizer's chat template."""
        chat_template: str | None = None
        """A Jinja chat template to use instead of the tokenizer's own."""
        max_new_tokens: PositiveInt = 256
        do_sample: bool | None = None
        temperature: NonNegativeFloat | None = None
        top_p: Annotated[float, msgspec.Meta(gt=0, le=1)] | None = None
        top_k: NonNegativeInt | None = None
        repetition_penalty: PositiveFloat | None = None
        seed: int | None = None
        """Seed torch's generator before each generation (reproducible sampling)."""
        generation: dict[str, Any] = {}
        """Further keyword arguments passed to ``model.generate``."""
        skip_special_tokens: bool = True
        device: str | None = None
        dtype: Literal["auto", "float32", "float16", "bfloat16"] | None = None
        local_files_only: bool = True
        """Never download: load only what is on disk or in the local cache."""
        model_name: str | None = None
        """The ``model`` written on ``start`` events (default: the checkpoint's name)."""
        provider: str = "transformers"
        meta: dict[str, Any] = {}
        buffer: PositiveInt = 64
        """How many text pieces may wait between the worker thread and the bus."""

        def __post_init__(self) -> None:
            check_bounds(self)
            if self.max_new_tokens < 1:
                raise ValueError(f"max_new_tokens: must be at least 1, got {self.max_new_tokens}")
            if self.buffer < 1:
                raise ValueError(f"buffer: must be at least 1, got {self.buffer}")
            if self.temperature is not None and self.temperature < 0:
                raise ValueError(f"temperature: must be >= 0, got {self.temperature}")
            if self.top_p is not None and not 0 < self.top_p <= 1:
                raise ValueError(f"top_p: must be within (0, 1], got {self.top_p}")
            if self.top_k is not None and self.top_k < 0:
                raise ValueError(f"top_k: must be >= 0, got {self.top_k}")
            if self.repetition_penalty is not None and self.repetition_penalty <= 0:
                raise ValueError(f"repetition_penalty: must be > 0, got {self.repetition_penalty}")
            if self.prompt is not None and self.messages is not None:
                raise ValueError("messages: give either prompt or messages, not both")
            if self.messages is not None:
                _check_messages(self.messages, "messages")
            for reserved in ("streamer", "stopping_criteria", "input_ids", "attention_mask"):
                if reserved in self.generation:
                    raise ValueError(f"generation.{reserved}: is set by the producer and cannot be given")

    def __init__(
        self,
        options: Options | None = None,
        *,
        model: Any = None,
        tokenizer: Any = None,
        **option_keys: Any,
    ) -> None:
        if isinstance(model, str | Path):
            option_keys["model"] = str(model)
            model = None
        if isinstance(tokenizer, str | Path):
            option_keys["tokenizer"] = str(tokenizer)
            tokenizer = None
        self.options: TransformersProducer.Options = self.resolve_options(options, option_keys)
        if model is None and not self.options.model:
            raise ValueError("model: give a model object or a checkpoint path")
        if model is not None and tokenizer is None and self.options.tokenizer is None:
            raise ValueError("tokenizer: give a tokenizer object (or path) with a model object")
        self.model: Any = model
        self.tokenizer: Any = tokenizer
        self._lock = anyio.Lock()
        self._load_lock = anyio.Lock()
        self.stream_ids: list[str] = []
        """Ids of the streams produced so far, in start order."""

    # -- loading ---------------------------------------------------------------
    async def load(self) -> None:
        """Load the model and tokenizer named in the options (in a worker thread), if not given as objects."""
        async with self._load_lock:  # concurrent first generations load once
            if self.model is not None and self.tokenizer is not None:
                return
            await anyio.to_thread.run_sync(self._load_sync)

    def _load_sync(self) -> None:
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        o = self.options
        if self.tokenizer is None:
            source = o.tokenizer or o.model
            try:
                self.tokenizer = AutoTokenizer.from_pretrained(source, local_files_only=o.local_files_only)
            except OSError as exc:
                raise ValueError(f"tokenizer: cannot load {source!r}: {exc}") from None
        if self.model is None:
            kwargs: dict[str, Any] = {"local_files_only": o.local_files_only}
            if o.dtype is not None:
                kwargs["dtype"] = o.dtype if o.dtype == "auto" else getattr(torch, o.dtype)
            try:
                model: Any = AutoModelForCausalLM.from_pretrained(o.model, **kwargs)
            except OSError as exc:
                raise ValueError(f"model: cannot load {o.model!r}: {exc}") from None
            if o.device is not None:
                model = model.to(o.device)
            self.model = model.eval()

    @property
    def model_name(self) -> str:
        """The name written on ``start`` events."""
        if self.options.model_name:
            return self.options.model_name
        name = getattr(getattr(self.model, "config", None), "name_or_path", "") or self.options.model
        return Path(name).name if name else type(self.model).__name__

    # -- inputs ----------------------------------------------------------------------
    def encode(
        self, prompt: str | None = None, messages: Sequence[Mapping[str, str]] | None = None
    ) -> dict[str, torch.Tensor]:
        """Tokenise a prompt, or chat messages with the chat template; return ``generate`` inputs.

        Without a chat template, messages are rendered as ``role: content``
        lines followed by ``assistant:``.
        """
        tok = self.tokenizer
        if (prompt is None) == (messages is None):
            raise ValueError("give exactly one of prompt or messages")
        if messages is not None:
            _check_messages(messages, "messages")
            template = self.options.chat_template or getattr(tok, "chat_template", None)
            if template:
                enc = tok.apply_chat_template(
                    [dict(m) for m in messages],
                    chat_template=template,
                    add_generation_prompt=True,
                    return_dict=True,
                    return_tensors="pt",
                )
                return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}
            prompt = "".join(f"{m['role']}: {m['content']}\n" for m in messages) + "assistant:"
        enc = tok(prompt, return_tensors="pt")
        return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}

    def _generation_kwargs(self, overrides: Mapping[str, Any]) -> dict[str, Any]:
        o = self.options
        kwargs: dict[str, Any] = {"max_new_tokens": o.max_new_tokens}
        for key in ("do_sample", "temperature", "top_p", "top_k", "repetition_penalty"):
            value = getattr(o, key)
            if value is not None:
                kwargs[key] = value
        kwargs.update(o.generation)
        kwargs.update(overrides)
        for reserved in ("streamer", "stopping_criteria", "input_ids", "attention_mask"):
            if reserved in overrides:
                raise ValueError(f"{reserved}: is set by the producer and cannot be given")
        if "pad_token_id" not in kwargs and getattr(self.tokenizer, "pad_token_id", None) is None:
            eos = getattr(self.tokenizer, "eos_token_id", None)
            if eos is not None:
                kwargs["pad_token_id"] = eos
        return kwargs

    def _eos_ids(self, kwargs: Mapping[str, Any]) -> set[int]:
        eos = kwargs.get("eos_token_id")
        if eos is None:
            eos = getattr(getattr(self.model, "generation_config", None), "eos_token_id", None)
        if eos is None:
            eos = getattr(self.tokenizer, "eos_token_id", None)
        if eos is None:
            return set()
        return {int(e) for e in eos} if isinstance(eos, list | tuple) else {int(eos)}

    # -- producing ---------------------------------------------------------------------
    async def run(self, bus: Bus) -> None:
        """Publish one stream for the configured ``prompt`` or ``messages``."""
        o = self.options
        if o.prompt is None and o.messages is None:
            raise ValueError("prompt: give a prompt or messages to generate from")
        await self.generate(bus, prompt=o.prompt, messages=o.messages)

    async def generate(
        self,
        bus: Bus,
        *,
        prompt: str | None = None,
        messages: Sequence[Mapping[str, str]] | None = None,
        meta: Mapping[str, Any] | None = None,
        stream: str | None = None,
        **generation: Any,
    ) -> str:
        """Generate one response onto *bus* and return its stream id.

        *generation* overrides the configured ``generate`` keyword arguments
        (``max_new_tokens=``, ``temperature=``, ...). Generations of one
        producer run one at a time (the model is shared). The stream ends
        with ``reason`` ``stop`` (an end-of-sequence token or a stop string)
        or ``length`` (``max_new_tokens`` reached), counted ``usage`` and
        ``timings`` (``total_duration``, ``time_to_first_token``, in seconds);
        a failing ``generate`` ends it with ``error(kind="generation_failed")``.
        """
        await self.load()
        inputs = self.encode(prompt, messages)
        kwargs = self._generation_kwargs(generation)
        device = getattr(self.model, "device", None)
        if device is not None:
            inputs = {k: v.to(device) for k, v in inputs.items()}
        prompt_tokens = int(inputs["input_ids"].shape[-1])
        o = self.options
        tags = {**o.meta, **(meta or {})}
        async with self._lock, bus.stream(model=self.model_name, provider=o.provider, meta=tags, stream=stream) as w:
            self.stream_ids.append(w.stream)
            handoff = Handoff(o.buffer)
            from ._hf import AbortCriterion, HandoffStreamer, StoppingCriteriaList, torch

            criterion = AbortCriterion()
            streamer = HandoffStreamer(self.tokenizer, handoff, criterion, skip_special_tokens=o.skip_special_tokens)
            outcome: dict[str, Any] = {}

            def work() -> None:
                started = time.perf_counter()
                try:
                    if o.seed is not None:
                        torch.manual_seed(o.seed)
                    with torch.inference_mode():
                        outcome["output"] = self.model.generate(
                            **inputs,
                            streamer=streamer,
                            stopping_criteria=StoppingCriteriaList([criterion]),
                            **kwargs,
                        )
                except Exception as exc:
                    outcome["error"] = exc
                finally:
                    outcome["started"] = started
                    outcome["finished"] = time.perf_counter()
                    handoff.close()

            async def join_worker() -> None:
                # Not abandoned on cancellation: leaving the task group joins the thread.
                await anyio.to_thread.run_sync(work)

            async with anyio.create_task_group() as tg:
                tg.start_soon(join_worker)
                try:
                    while (batch := await handoff.take()) is not None:
                        for text in batch:
                            await w.delta(text)
                finally:
                    # Runs on abort/cancellation too: stop after the current token.
                    criterion.flag.set()
                    handoff.cancel()

            error = outcome.get("error")
            if error is not None:
                log.error("transformers.generate_failed", stream=w.stream, error=f"{type(error).__name__}: {error}")
                await w.error("generation_failed", f"{type(error).__name__}: {error}")
            else:
                await self._end(w, outcome, streamer, kwargs, prompt_tokens)
        # An aborted stream leaves the block quietly (the writer published ``abort``).
        return w.stream

    async def _end(
        self,
        w: StreamWriter,
        outcome: dict[str, Any],
        streamer: HandoffStreamer,
        kwargs: dict[str, Any],
        prompt_tokens: int,
    ) -> None:
        """Publish ``end`` with the reason, counted usage and timings of a finished generation."""
        output = outcome["output"]
        sequences = output.sequences if hasattr(output, "sequences") else output
        # A batch of one is never padded: every id after the prompt was generated.
        generated = [int(t) for t in sequences[0, prompt_tokens:].tolist()]
        completion = len(generated)
        if generated and generated[-1] in self._eos_ids(kwargs):
            reason = "stop"
        elif completion >= int(kwargs["max_new_tokens"]):
            reason = "length"
        else:
            reason = "stop"  # a stop string or another stopping criterion
        timings = {"total_duration": outcome["finished"] - outcome["started"]}
        if streamer.first_token_at is not None:
            timings["time_to_first_token"] = streamer.first_token_at - outcome["started"]
        await w.end(
            reason,
            usage=Usage(
                prompt_tokens=prompt_tokens,
                completion_tokens=completion,
                total_tokens=prompt_tokens + completion,
                source="counted",
            ),
            timings=timings,
        )


def _check_messages(messages: Sequence[Mapping[str, Any]], key: str) -> None:
    if not messages:
        raise ValueError(f"{key}: must not be empty")
    for i, m in enumerate(messages):
        if not isinstance(m, Mapping):
            raise ValueError(f"{key}[{i}]: expected a table with role and content, got {type(m).__name__}")
        for field in ("role", "content"):
            if not isinstance(m.get(field), str):
                raise ValueError(f"{key}[{i}].{field}: expected a string")
