from google.protobuf import struct_pb2 as _struct_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class ChatMessage(_message.Message):
    __slots__ = ("role", "content")
    ROLE_FIELD_NUMBER: _ClassVar[int]
    CONTENT_FIELD_NUMBER: _ClassVar[int]
    role: str
    content: str
    def __init__(self, role: _Optional[str] = ..., content: _Optional[str] = ...) -> None: ...

class SamplingParams(_message.Message):
    __slots__ = ("temperature", "top_p", "max_tokens", "seed", "stop", "top_k")
    TEMPERATURE_FIELD_NUMBER: _ClassVar[int]
    TOP_P_FIELD_NUMBER: _ClassVar[int]
    MAX_TOKENS_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    STOP_FIELD_NUMBER: _ClassVar[int]
    TOP_K_FIELD_NUMBER: _ClassVar[int]
    temperature: float
    top_p: float
    max_tokens: int
    seed: int
    stop: _containers.RepeatedScalarFieldContainer[str]
    top_k: int
    def __init__(self, temperature: _Optional[float] = ..., top_p: _Optional[float] = ..., max_tokens: _Optional[int] = ..., seed: _Optional[int] = ..., stop: _Optional[_Iterable[str]] = ..., top_k: _Optional[int] = ...) -> None: ...

class Prompt(_message.Message):
    __slots__ = ("id", "text", "messages", "system_prompt", "reference_answer", "metadata", "sampling", "num_samples", "dataset_split", "round")
    class MetadataEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    ID_FIELD_NUMBER: _ClassVar[int]
    TEXT_FIELD_NUMBER: _ClassVar[int]
    MESSAGES_FIELD_NUMBER: _ClassVar[int]
    SYSTEM_PROMPT_FIELD_NUMBER: _ClassVar[int]
    REFERENCE_ANSWER_FIELD_NUMBER: _ClassVar[int]
    METADATA_FIELD_NUMBER: _ClassVar[int]
    SAMPLING_FIELD_NUMBER: _ClassVar[int]
    NUM_SAMPLES_FIELD_NUMBER: _ClassVar[int]
    DATASET_SPLIT_FIELD_NUMBER: _ClassVar[int]
    ROUND_FIELD_NUMBER: _ClassVar[int]
    id: str
    text: str
    messages: _containers.RepeatedCompositeFieldContainer[ChatMessage]
    system_prompt: str
    reference_answer: str
    metadata: _containers.ScalarMap[str, str]
    sampling: SamplingParams
    num_samples: int
    dataset_split: str
    round: int
    def __init__(self, id: _Optional[str] = ..., text: _Optional[str] = ..., messages: _Optional[_Iterable[_Union[ChatMessage, _Mapping]]] = ..., system_prompt: _Optional[str] = ..., reference_answer: _Optional[str] = ..., metadata: _Optional[_Mapping[str, str]] = ..., sampling: _Optional[_Union[SamplingParams, _Mapping]] = ..., num_samples: _Optional[int] = ..., dataset_split: _Optional[str] = ..., round: _Optional[int] = ...) -> None: ...

class Completion(_message.Message):
    __slots__ = ("index", "text", "num_tokens", "finish_reason", "token_ids", "stop_token_id", "stop_string")
    INDEX_FIELD_NUMBER: _ClassVar[int]
    TEXT_FIELD_NUMBER: _ClassVar[int]
    NUM_TOKENS_FIELD_NUMBER: _ClassVar[int]
    FINISH_REASON_FIELD_NUMBER: _ClassVar[int]
    TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    STOP_TOKEN_ID_FIELD_NUMBER: _ClassVar[int]
    STOP_STRING_FIELD_NUMBER: _ClassVar[int]
    index: int
    text: str
    num_tokens: int
    finish_reason: str
    token_ids: _containers.RepeatedScalarFieldContainer[int]
    stop_token_id: int
    stop_string: str
    def __init__(self, index: _Optional[int] = ..., text: _Optional[str] = ..., num_tokens: _Optional[int] = ..., finish_reason: _Optional[str] = ..., token_ids: _Optional[_Iterable[int]] = ..., stop_token_id: _Optional[int] = ..., stop_string: _Optional[str] = ...) -> None: ...

class PromptSource(_message.Message):
    __slots__ = ("topic", "partition", "offset")
    TOPIC_FIELD_NUMBER: _ClassVar[int]
    PARTITION_FIELD_NUMBER: _ClassVar[int]
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    topic: str
    partition: int
    offset: int
    def __init__(self, topic: _Optional[str] = ..., partition: _Optional[int] = ..., offset: _Optional[int] = ...) -> None: ...

class Timings(_message.Message):
    __slots__ = ("queued_s", "latency_s")
    QUEUED_S_FIELD_NUMBER: _ClassVar[int]
    LATENCY_S_FIELD_NUMBER: _ClassVar[int]
    queued_s: float
    latency_s: float
    def __init__(self, queued_s: _Optional[float] = ..., latency_s: _Optional[float] = ...) -> None: ...

class CompletionGroup(_message.Message):
    __slots__ = ("id", "prompt_id", "prompt", "completions", "sampling", "model", "policy_version", "timings", "prompt_tokens", "prompt_token_ids", "source")
    ID_FIELD_NUMBER: _ClassVar[int]
    PROMPT_ID_FIELD_NUMBER: _ClassVar[int]
    PROMPT_FIELD_NUMBER: _ClassVar[int]
    COMPLETIONS_FIELD_NUMBER: _ClassVar[int]
    SAMPLING_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    POLICY_VERSION_FIELD_NUMBER: _ClassVar[int]
    TIMINGS_FIELD_NUMBER: _ClassVar[int]
    PROMPT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    PROMPT_TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    SOURCE_FIELD_NUMBER: _ClassVar[int]
    id: str
    prompt_id: str
    prompt: Prompt
    completions: _containers.RepeatedCompositeFieldContainer[Completion]
    sampling: SamplingParams
    model: str
    policy_version: int
    timings: Timings
    prompt_tokens: int
    prompt_token_ids: _containers.RepeatedScalarFieldContainer[int]
    source: PromptSource
    def __init__(self, id: _Optional[str] = ..., prompt_id: _Optional[str] = ..., prompt: _Optional[_Union[Prompt, _Mapping]] = ..., completions: _Optional[_Iterable[_Union[Completion, _Mapping]]] = ..., sampling: _Optional[_Union[SamplingParams, _Mapping]] = ..., model: _Optional[str] = ..., policy_version: _Optional[int] = ..., timings: _Optional[_Union[Timings, _Mapping]] = ..., prompt_tokens: _Optional[int] = ..., prompt_token_ids: _Optional[_Iterable[int]] = ..., source: _Optional[_Union[PromptSource, _Mapping]] = ...) -> None: ...

class ScoredGroup(_message.Message):
    __slots__ = ("id", "group", "scores", "rationales", "judge_id", "latency_s", "pair_ids")
    ID_FIELD_NUMBER: _ClassVar[int]
    GROUP_FIELD_NUMBER: _ClassVar[int]
    SCORES_FIELD_NUMBER: _ClassVar[int]
    RATIONALES_FIELD_NUMBER: _ClassVar[int]
    JUDGE_ID_FIELD_NUMBER: _ClassVar[int]
    LATENCY_S_FIELD_NUMBER: _ClassVar[int]
    PAIR_IDS_FIELD_NUMBER: _ClassVar[int]
    id: str
    group: CompletionGroup
    scores: _containers.RepeatedScalarFieldContainer[float]
    rationales: _containers.RepeatedScalarFieldContainer[str]
    judge_id: str
    latency_s: float
    pair_ids: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, id: _Optional[str] = ..., group: _Optional[_Union[CompletionGroup, _Mapping]] = ..., scores: _Optional[_Iterable[float]] = ..., rationales: _Optional[_Iterable[str]] = ..., judge_id: _Optional[str] = ..., latency_s: _Optional[float] = ..., pair_ids: _Optional[_Iterable[str]] = ...) -> None: ...

class PreferencePair(_message.Message):
    __slots__ = ("id", "prompt_id", "prompt", "chosen", "rejected", "chosen_score", "rejected_score", "margin", "judge_id", "policy_version", "group_id", "scored_id", "chosen_index", "rejected_index", "prompt_token_ids", "chosen_token_ids", "rejected_token_ids", "chosen_finish_reason", "rejected_finish_reason", "sampling")
    ID_FIELD_NUMBER: _ClassVar[int]
    PROMPT_ID_FIELD_NUMBER: _ClassVar[int]
    PROMPT_FIELD_NUMBER: _ClassVar[int]
    CHOSEN_FIELD_NUMBER: _ClassVar[int]
    REJECTED_FIELD_NUMBER: _ClassVar[int]
    CHOSEN_SCORE_FIELD_NUMBER: _ClassVar[int]
    REJECTED_SCORE_FIELD_NUMBER: _ClassVar[int]
    MARGIN_FIELD_NUMBER: _ClassVar[int]
    JUDGE_ID_FIELD_NUMBER: _ClassVar[int]
    POLICY_VERSION_FIELD_NUMBER: _ClassVar[int]
    GROUP_ID_FIELD_NUMBER: _ClassVar[int]
    SCORED_ID_FIELD_NUMBER: _ClassVar[int]
    CHOSEN_INDEX_FIELD_NUMBER: _ClassVar[int]
    REJECTED_INDEX_FIELD_NUMBER: _ClassVar[int]
    PROMPT_TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    CHOSEN_TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    REJECTED_TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    CHOSEN_FINISH_REASON_FIELD_NUMBER: _ClassVar[int]
    REJECTED_FINISH_REASON_FIELD_NUMBER: _ClassVar[int]
    SAMPLING_FIELD_NUMBER: _ClassVar[int]
    id: str
    prompt_id: str
    prompt: Prompt
    chosen: str
    rejected: str
    chosen_score: float
    rejected_score: float
    margin: float
    judge_id: str
    policy_version: int
    group_id: str
    scored_id: str
    chosen_index: int
    rejected_index: int
    prompt_token_ids: _containers.RepeatedScalarFieldContainer[int]
    chosen_token_ids: _containers.RepeatedScalarFieldContainer[int]
    rejected_token_ids: _containers.RepeatedScalarFieldContainer[int]
    chosen_finish_reason: str
    rejected_finish_reason: str
    sampling: SamplingParams
    def __init__(self, id: _Optional[str] = ..., prompt_id: _Optional[str] = ..., prompt: _Optional[_Union[Prompt, _Mapping]] = ..., chosen: _Optional[str] = ..., rejected: _Optional[str] = ..., chosen_score: _Optional[float] = ..., rejected_score: _Optional[float] = ..., margin: _Optional[float] = ..., judge_id: _Optional[str] = ..., policy_version: _Optional[int] = ..., group_id: _Optional[str] = ..., scored_id: _Optional[str] = ..., chosen_index: _Optional[int] = ..., rejected_index: _Optional[int] = ..., prompt_token_ids: _Optional[_Iterable[int]] = ..., chosen_token_ids: _Optional[_Iterable[int]] = ..., rejected_token_ids: _Optional[_Iterable[int]] = ..., chosen_finish_reason: _Optional[str] = ..., rejected_finish_reason: _Optional[str] = ..., sampling: _Optional[_Union[SamplingParams, _Mapping]] = ...) -> None: ...

class PolicyUpdate(_message.Message):
    __slots__ = ("id", "version", "adapter_uri", "checkpoint_uri", "base_model", "metrics", "created_unix_ms", "num_pairs", "restored_version", "rejected_version")
    ID_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    ADAPTER_URI_FIELD_NUMBER: _ClassVar[int]
    CHECKPOINT_URI_FIELD_NUMBER: _ClassVar[int]
    BASE_MODEL_FIELD_NUMBER: _ClassVar[int]
    METRICS_FIELD_NUMBER: _ClassVar[int]
    CREATED_UNIX_MS_FIELD_NUMBER: _ClassVar[int]
    NUM_PAIRS_FIELD_NUMBER: _ClassVar[int]
    RESTORED_VERSION_FIELD_NUMBER: _ClassVar[int]
    REJECTED_VERSION_FIELD_NUMBER: _ClassVar[int]
    id: str
    version: int
    adapter_uri: str
    checkpoint_uri: str
    base_model: str
    metrics: _struct_pb2.Struct
    created_unix_ms: int
    num_pairs: int
    restored_version: int
    rejected_version: int
    def __init__(self, id: _Optional[str] = ..., version: _Optional[int] = ..., adapter_uri: _Optional[str] = ..., checkpoint_uri: _Optional[str] = ..., base_model: _Optional[str] = ..., metrics: _Optional[_Union[_struct_pb2.Struct, _Mapping]] = ..., created_unix_ms: _Optional[int] = ..., num_pairs: _Optional[int] = ..., restored_version: _Optional[int] = ..., rejected_version: _Optional[int] = ...) -> None: ...

class EvalLabelStats(_message.Message):
    __slots__ = ("label", "prompts", "mean", "se")
    LABEL_FIELD_NUMBER: _ClassVar[int]
    PROMPTS_FIELD_NUMBER: _ClassVar[int]
    MEAN_FIELD_NUMBER: _ClassVar[int]
    SE_FIELD_NUMBER: _ClassVar[int]
    label: str
    prompts: int
    mean: float
    se: float
    def __init__(self, label: _Optional[str] = ..., prompts: _Optional[int] = ..., mean: _Optional[float] = ..., se: _Optional[float] = ...) -> None: ...

class EvalResult(_message.Message):
    __slots__ = ("id", "version", "mean", "se", "prompts", "expected", "samples", "finished_rate", "mean_tokens", "labels", "complete", "verdict", "best_version", "best_mean", "best_se", "judge_id", "created_unix_ms")
    ID_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    MEAN_FIELD_NUMBER: _ClassVar[int]
    SE_FIELD_NUMBER: _ClassVar[int]
    PROMPTS_FIELD_NUMBER: _ClassVar[int]
    EXPECTED_FIELD_NUMBER: _ClassVar[int]
    SAMPLES_FIELD_NUMBER: _ClassVar[int]
    FINISHED_RATE_FIELD_NUMBER: _ClassVar[int]
    MEAN_TOKENS_FIELD_NUMBER: _ClassVar[int]
    LABELS_FIELD_NUMBER: _ClassVar[int]
    COMPLETE_FIELD_NUMBER: _ClassVar[int]
    VERDICT_FIELD_NUMBER: _ClassVar[int]
    BEST_VERSION_FIELD_NUMBER: _ClassVar[int]
    BEST_MEAN_FIELD_NUMBER: _ClassVar[int]
    BEST_SE_FIELD_NUMBER: _ClassVar[int]
    JUDGE_ID_FIELD_NUMBER: _ClassVar[int]
    CREATED_UNIX_MS_FIELD_NUMBER: _ClassVar[int]
    id: str
    version: int
    mean: float
    se: float
    prompts: int
    expected: int
    samples: int
    finished_rate: float
    mean_tokens: float
    labels: _containers.RepeatedCompositeFieldContainer[EvalLabelStats]
    complete: bool
    verdict: str
    best_version: int
    best_mean: float
    best_se: float
    judge_id: str
    created_unix_ms: int
    def __init__(self, id: _Optional[str] = ..., version: _Optional[int] = ..., mean: _Optional[float] = ..., se: _Optional[float] = ..., prompts: _Optional[int] = ..., expected: _Optional[int] = ..., samples: _Optional[int] = ..., finished_rate: _Optional[float] = ..., mean_tokens: _Optional[float] = ..., labels: _Optional[_Iterable[_Union[EvalLabelStats, _Mapping]]] = ..., complete: _Optional[bool] = ..., verdict: _Optional[str] = ..., best_version: _Optional[int] = ..., best_mean: _Optional[float] = ..., best_se: _Optional[float] = ..., judge_id: _Optional[str] = ..., created_unix_ms: _Optional[int] = ...) -> None: ...

class OffsetRange(_message.Message):
    __slots__ = ("partition", "start", "end")
    PARTITION_FIELD_NUMBER: _ClassVar[int]
    START_FIELD_NUMBER: _ClassVar[int]
    END_FIELD_NUMBER: _ClassVar[int]
    partition: int
    start: int
    end: int
    def __init__(self, partition: _Optional[int] = ..., start: _Optional[int] = ..., end: _Optional[int] = ...) -> None: ...

class RoundPlan(_message.Message):
    __slots__ = ("id", "round", "sample_version", "ranges", "seq", "train_prompts", "created_unix_ms")
    ID_FIELD_NUMBER: _ClassVar[int]
    ROUND_FIELD_NUMBER: _ClassVar[int]
    SAMPLE_VERSION_FIELD_NUMBER: _ClassVar[int]
    RANGES_FIELD_NUMBER: _ClassVar[int]
    SEQ_FIELD_NUMBER: _ClassVar[int]
    TRAIN_PROMPTS_FIELD_NUMBER: _ClassVar[int]
    CREATED_UNIX_MS_FIELD_NUMBER: _ClassVar[int]
    id: str
    round: int
    sample_version: int
    ranges: _containers.RepeatedCompositeFieldContainer[OffsetRange]
    seq: int
    train_prompts: int
    created_unix_ms: int
    def __init__(self, id: _Optional[str] = ..., round: _Optional[int] = ..., sample_version: _Optional[int] = ..., ranges: _Optional[_Iterable[_Union[OffsetRange, _Mapping]]] = ..., seq: _Optional[int] = ..., train_prompts: _Optional[int] = ..., created_unix_ms: _Optional[int] = ...) -> None: ...

class DeadLetter(_message.Message):
    __slots__ = ("id", "source_topic", "partition", "offset", "error_kind", "error_message", "attempts", "original_key", "original_value", "original_headers", "consumer_group", "failed_unix_ms")
    class OriginalHeadersEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    ID_FIELD_NUMBER: _ClassVar[int]
    SOURCE_TOPIC_FIELD_NUMBER: _ClassVar[int]
    PARTITION_FIELD_NUMBER: _ClassVar[int]
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    ERROR_KIND_FIELD_NUMBER: _ClassVar[int]
    ERROR_MESSAGE_FIELD_NUMBER: _ClassVar[int]
    ATTEMPTS_FIELD_NUMBER: _ClassVar[int]
    ORIGINAL_KEY_FIELD_NUMBER: _ClassVar[int]
    ORIGINAL_VALUE_FIELD_NUMBER: _ClassVar[int]
    ORIGINAL_HEADERS_FIELD_NUMBER: _ClassVar[int]
    CONSUMER_GROUP_FIELD_NUMBER: _ClassVar[int]
    FAILED_UNIX_MS_FIELD_NUMBER: _ClassVar[int]
    id: str
    source_topic: str
    partition: int
    offset: int
    error_kind: str
    error_message: str
    attempts: int
    original_key: bytes
    original_value: bytes
    original_headers: _containers.ScalarMap[str, str]
    consumer_group: str
    failed_unix_ms: int
    def __init__(self, id: _Optional[str] = ..., source_topic: _Optional[str] = ..., partition: _Optional[int] = ..., offset: _Optional[int] = ..., error_kind: _Optional[str] = ..., error_message: _Optional[str] = ..., attempts: _Optional[int] = ..., original_key: _Optional[bytes] = ..., original_value: _Optional[bytes] = ..., original_headers: _Optional[_Mapping[str, str]] = ..., consumer_group: _Optional[str] = ..., failed_unix_ms: _Optional[int] = ...) -> None: ...
