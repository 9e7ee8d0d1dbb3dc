from onpolicy.v1 import messages_pb2 as _messages_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class ScoreRequest(_message.Message):
    __slots__ = ("group",)
    GROUP_FIELD_NUMBER: _ClassVar[int]
    group: _messages_pb2.CompletionGroup
    def __init__(self, group: _Optional[_Union[_messages_pb2.CompletionGroup, _Mapping]] = ...) -> None: ...

class ScoreResponse(_message.Message):
    __slots__ = ("scored", "pairs")
    SCORED_FIELD_NUMBER: _ClassVar[int]
    PAIRS_FIELD_NUMBER: _ClassVar[int]
    scored: _messages_pb2.ScoredGroup
    pairs: _containers.RepeatedCompositeFieldContainer[_messages_pb2.PreferencePair]
    def __init__(self, scored: _Optional[_Union[_messages_pb2.ScoredGroup, _Mapping]] = ..., pairs: _Optional[_Iterable[_Union[_messages_pb2.PreferencePair, _Mapping]]] = ...) -> None: ...
