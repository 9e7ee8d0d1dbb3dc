"""Reward-model backend: a Hugging Face sequence-classification model scores each completion.

Each completion is formatted as the prompt's chat turns plus the answer as the assistant turn,
with the reward model's own chat template (Skywork-Reward-V2 and most reward models are chat
models with a score head). Sequences from all groups in flight are pooled and run in batches
bounded by a token budget (padded tokens per forward pass), so small groups still fill the
accelerator. Inputs over ``max_length`` are cut from the left, keeping the end of the answer
where the score is read, and counted in ``onpolicy_judge_truncated_total``.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, field

import torch
from transformers import AutoModelForSequenceClassification, AutoTokenizer

from onpolicy import messages as m
from onpolicy_judge.backend import BackendScores
from onpolicy_judge.chat import prompt_messages
from onpolicy_judge.metrics import JudgeMetrics
from onpolicy_judge.settings import RewardModelSettings

log = logging.getLogger(__name__)

_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


def pick_device_dtype(settings: RewardModelSettings) -> tuple[torch.device, torch.dtype]:
    """bf16 on a GPU, fp32 on the CPU, unless the settings say otherwise."""
    cuda = torch.cuda.is_available()
    name = ("cuda" if cuda else "cpu") if settings.device == "auto" else settings.device
    device = torch.device(name)
    if device.type == "cuda" and not cuda:
        raise ValueError("reward_model.device is cuda but no GPU is available")
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", 0)
    if settings.dtype != "auto":
        return device, _DTYPES[settings.dtype]
    return device, torch.bfloat16 if device.type == "cuda" else torch.float32


class RewardModel:
    """The model and tokenizer; synchronous encode and forward (run off the event loop)."""

    def __init__(self, settings: RewardModelSettings, metrics: JudgeMetrics | None = None):
        if not settings.model:
            raise ValueError("reward_model.model is required for the reward_model backend")
        self.settings = settings
        self.metrics = metrics
        self.device, self.dtype = pick_device_dtype(settings)
        self.tokenizer = AutoTokenizer.from_pretrained(
            settings.model, trust_remote_code=settings.trust_remote_code
        )
        self.model = AutoModelForSequenceClassification.from_pretrained(
            settings.model, dtype=self.dtype, trust_remote_code=settings.trust_remote_code
        )
        if self.model.config.num_labels != 1:
            log.warning("reward model has %d labels; using the first", self.model.config.num_labels)
        # The classification head reads the last non-pad token, so a pad id must be known.
        if self.tokenizer.pad_token_id is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        if self.model.config.pad_token_id is None:
            self.model.config.pad_token_id = self.tokenizer.pad_token_id
        self.pad_id = self.model.config.pad_token_id
        self.model.to(self.device).eval()
        self.truncated = 0
        log.info("reward model %s on %s (%s)", settings.model, self.device, self.dtype)

    @property
    def name(self) -> str:
        return str(self.settings.model).rstrip("/").split("/")[-1]

    def format(self, prompt: m.Prompt, answer: str) -> str:
        turns = [*prompt_messages(prompt), {"role": "assistant", "content": answer}]
        if self.tokenizer.chat_template:
            return self.tokenizer.apply_chat_template(turns, tokenize=False)
        # No template: a plain transcript keeps the model usable (and is logged once).
        if not getattr(self, "_warned", False):
            log.warning("reward model has no chat template; using a plain transcript")
            self._warned = True
        return "".join(f"{t['role']}: {t['content']}\n" for t in turns)

    def encode(self, group: m.CompletionGroup) -> list[list[int]]:
        texts = [self.format(group.prompt, c.text) for c in group.completions]
        # The template already holds the special tokens (BOS etc.): add none twice.
        encoded = self.tokenizer(texts, add_special_tokens=False)["input_ids"]
        out = []
        for seq in encoded:
            if len(seq) > self.settings.max_length:
                self.truncated += 1
                if self.metrics:
                    self.metrics.truncated.inc()
                seq = seq[-self.settings.max_length :]
            out.append(list(seq))
        return out

    @torch.inference_mode()
    def forward(self, batch: list[list[int]]) -> list[float]:
        width = max(len(s) for s in batch)
        ids = torch.full((len(batch), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(batch), width), dtype=torch.long)
        for i, seq in enumerate(batch):
            ids[i, : len(seq)] = torch.tensor(seq, dtype=torch.long)
            mask[i, : len(seq)] = 1
        logits = self.model(
            input_ids=ids.to(self.device), attention_mask=mask.to(self.device)
        ).logits
        return logits[:, 0].float().cpu().tolist()


@dataclass
class _Item:
    ids: list[int]
    future: asyncio.Future[float]
    queued: float = field(default_factory=time.monotonic)


def plan_batch(lengths: list[int], batch_tokens: int, max_batch_size: int) -> int:
    """How many of the oldest items fit one batch: padded tokens <= budget (at least one)."""
    width = 0
    for count, length in enumerate(lengths):
        width = max(width, length)
        if count >= max_batch_size or (count + 1) * width > batch_tokens:
            return max(count, 1)
    return len(lengths)


class RewardModelBackend:
    """Pools the sequences of every group in flight into token-budgeted forward passes."""

    name = "reward_model"

    def __init__(
        self,
        settings: RewardModelSettings,
        metrics: JudgeMetrics | None = None,
        model: RewardModel | None = None,
    ):
        self.settings = settings
        self.metrics = metrics
        self.model = model or RewardModel(settings, metrics)
        self.judge_id = f"rm:{self.model.name}"
        self._pending: list[_Item] = []
        self._wake: asyncio.Event | None = None
        self._worker: asyncio.Task[None] | None = None

    async def score(self, group: m.CompletionGroup) -> BackendScores:
        loop = asyncio.get_running_loop()
        encoded = await asyncio.to_thread(self.model.encode, group)
        items = [_Item(seq, loop.create_future()) for seq in encoded]
        self._ensure_worker()
        self._pending.extend(items)
        assert self._wake is not None
        self._wake.set()
        return BackendScores(list(await asyncio.gather(*(i.future for i in items))))

    def _ensure_worker(self) -> None:
        if self._worker is None or self._worker.done():
            self._wake = asyncio.Event()
            self._worker = asyncio.get_running_loop().create_task(self._run())

    async def _run(self) -> None:
        assert self._wake is not None
        while True:
            await self._wake.wait()
            self._wake.clear()
            while self._pending:
                if (
                    len(self._pending) < self.settings.max_batch_size
                    and self.settings.batch_wait_ms
                ):
                    # Groups arriving together share a batch: wait a moment for the others.
                    await asyncio.sleep(self.settings.batch_wait_ms / 1000)
                count = plan_batch(
                    [len(i.ids) for i in self._pending],
                    self.settings.batch_tokens,
                    self.settings.max_batch_size,
                )
                batch, self._pending = self._pending[:count], self._pending[count:]
                live = [i for i in batch if not i.future.done()]  # skip cancelled callers
                if not live:
                    continue
                try:
                    scores = await asyncio.to_thread(self.model.forward, [i.ids for i in live])
                except Exception as exc:  # every caller of the batch sees the error (retried)
                    for item in live:
                        if not item.future.done():
                            item.future.set_exception(exc)
                    continue
                if self.metrics:
                    self.metrics.batch_size.observe(len(live))
                for item, score in zip(live, scores, strict=True):
                    if not item.future.done():
                        item.future.set_result(score)

    async def aclose(self) -> None:
        if self._worker is not None:
            self._worker.cancel()
            self._worker = None
