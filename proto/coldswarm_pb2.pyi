from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Capabilities(_message.Message):
    __slots__ = ("device", "accelerator_name", "memory_bytes", "accelerator_memory_bytes", "free_disk_bytes", "bandwidth_bytes_per_s", "cpu_count", "software_version", "torch_version", "supports_bf16", "supports_4bit")
    DEVICE_FIELD_NUMBER: _ClassVar[int]
    ACCELERATOR_NAME_FIELD_NUMBER: _ClassVar[int]
    MEMORY_BYTES_FIELD_NUMBER: _ClassVar[int]
    ACCELERATOR_MEMORY_BYTES_FIELD_NUMBER: _ClassVar[int]
    FREE_DISK_BYTES_FIELD_NUMBER: _ClassVar[int]
    BANDWIDTH_BYTES_PER_S_FIELD_NUMBER: _ClassVar[int]
    CPU_COUNT_FIELD_NUMBER: _ClassVar[int]
    SOFTWARE_VERSION_FIELD_NUMBER: _ClassVar[int]
    TORCH_VERSION_FIELD_NUMBER: _ClassVar[int]
    SUPPORTS_BF16_FIELD_NUMBER: _ClassVar[int]
    SUPPORTS_4BIT_FIELD_NUMBER: _ClassVar[int]
    device: str
    accelerator_name: str
    memory_bytes: int
    accelerator_memory_bytes: int
    free_disk_bytes: int
    bandwidth_bytes_per_s: float
    cpu_count: int
    software_version: str
    torch_version: str
    supports_bf16: bool
    supports_4bit: bool
    def __init__(self, device: _Optional[str] = ..., accelerator_name: _Optional[str] = ..., memory_bytes: _Optional[int] = ..., accelerator_memory_bytes: _Optional[int] = ..., free_disk_bytes: _Optional[int] = ..., bandwidth_bytes_per_s: _Optional[float] = ..., cpu_count: _Optional[int] = ..., software_version: _Optional[str] = ..., torch_version: _Optional[str] = ..., supports_bf16: _Optional[bool] = ..., supports_4bit: _Optional[bool] = ...) -> None: ...

class FileEntry(_message.Message):
    __slots__ = ("path", "size", "sha256")
    PATH_FIELD_NUMBER: _ClassVar[int]
    SIZE_FIELD_NUMBER: _ClassVar[int]
    SHA256_FIELD_NUMBER: _ClassVar[int]
    path: str
    size: int
    sha256: str
    def __init__(self, path: _Optional[str] = ..., size: _Optional[int] = ..., sha256: _Optional[str] = ...) -> None: ...

class Version(_message.Message):
    __slots__ = ("number", "parent", "round_id", "method", "state", "files", "manifest_json", "created_at", "is_current")
    NUMBER_FIELD_NUMBER: _ClassVar[int]
    PARENT_FIELD_NUMBER: _ClassVar[int]
    ROUND_ID_FIELD_NUMBER: _ClassVar[int]
    METHOD_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    FILES_FIELD_NUMBER: _ClassVar[int]
    MANIFEST_JSON_FIELD_NUMBER: _ClassVar[int]
    CREATED_AT_FIELD_NUMBER: _ClassVar[int]
    IS_CURRENT_FIELD_NUMBER: _ClassVar[int]
    number: int
    parent: int
    round_id: int
    method: str
    state: str
    files: _containers.RepeatedCompositeFieldContainer[FileEntry]
    manifest_json: str
    created_at: float
    is_current: bool
    def __init__(self, number: _Optional[int] = ..., parent: _Optional[int] = ..., round_id: _Optional[int] = ..., method: _Optional[str] = ..., state: _Optional[str] = ..., files: _Optional[_Iterable[_Union[FileEntry, _Mapping]]] = ..., manifest_json: _Optional[str] = ..., created_at: _Optional[float] = ..., is_current: _Optional[bool] = ...) -> None: ...

class Round(_message.Message):
    __slots__ = ("id", "kind", "base_version", "state", "quorum", "deadline", "method", "options_json", "contributions", "result_version", "error", "opened_at", "closed_at", "run_id", "swarm_participants")
    ID_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    BASE_VERSION_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    QUORUM_FIELD_NUMBER: _ClassVar[int]
    DEADLINE_FIELD_NUMBER: _ClassVar[int]
    METHOD_FIELD_NUMBER: _ClassVar[int]
    OPTIONS_JSON_FIELD_NUMBER: _ClassVar[int]
    CONTRIBUTIONS_FIELD_NUMBER: _ClassVar[int]
    RESULT_VERSION_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    OPENED_AT_FIELD_NUMBER: _ClassVar[int]
    CLOSED_AT_FIELD_NUMBER: _ClassVar[int]
    RUN_ID_FIELD_NUMBER: _ClassVar[int]
    SWARM_PARTICIPANTS_FIELD_NUMBER: _ClassVar[int]
    id: int
    kind: str
    base_version: int
    state: str
    quorum: int
    deadline: float
    method: str
    options_json: str
    contributions: int
    result_version: int
    error: str
    opened_at: float
    closed_at: float
    run_id: str
    swarm_participants: _containers.RepeatedCompositeFieldContainer[SwarmParticipant]
    def __init__(self, id: _Optional[int] = ..., kind: _Optional[str] = ..., base_version: _Optional[int] = ..., state: _Optional[str] = ..., quorum: _Optional[int] = ..., deadline: _Optional[float] = ..., method: _Optional[str] = ..., options_json: _Optional[str] = ..., contributions: _Optional[int] = ..., result_version: _Optional[int] = ..., error: _Optional[str] = ..., opened_at: _Optional[float] = ..., closed_at: _Optional[float] = ..., run_id: _Optional[str] = ..., swarm_participants: _Optional[_Iterable[_Union[SwarmParticipant, _Mapping]]] = ...) -> None: ...

class Contribution(_message.Message):
    __slots__ = ("id", "round_id", "worker_id", "base_version", "form", "size", "sha256", "num_examples", "metrics_json", "state", "created_at")
    ID_FIELD_NUMBER: _ClassVar[int]
    ROUND_ID_FIELD_NUMBER: _ClassVar[int]
    WORKER_ID_FIELD_NUMBER: _ClassVar[int]
    BASE_VERSION_FIELD_NUMBER: _ClassVar[int]
    FORM_FIELD_NUMBER: _ClassVar[int]
    SIZE_FIELD_NUMBER: _ClassVar[int]
    SHA256_FIELD_NUMBER: _ClassVar[int]
    NUM_EXAMPLES_FIELD_NUMBER: _ClassVar[int]
    METRICS_JSON_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    CREATED_AT_FIELD_NUMBER: _ClassVar[int]
    id: int
    round_id: int
    worker_id: str
    base_version: int
    form: str
    size: int
    sha256: str
    num_examples: int
    metrics_json: str
    state: str
    created_at: float
    def __init__(self, id: _Optional[int] = ..., round_id: _Optional[int] = ..., worker_id: _Optional[str] = ..., base_version: _Optional[int] = ..., form: _Optional[str] = ..., size: _Optional[int] = ..., sha256: _Optional[str] = ..., num_examples: _Optional[int] = ..., metrics_json: _Optional[str] = ..., state: _Optional[str] = ..., created_at: _Optional[float] = ...) -> None: ...

class WorkerInfo(_message.Message):
    __slots__ = ("id", "name", "capabilities", "registered_at", "last_seen", "state", "assignment_id", "progress_json", "swarm_samples", "swarm_rounds")
    ID_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    CAPABILITIES_FIELD_NUMBER: _ClassVar[int]
    REGISTERED_AT_FIELD_NUMBER: _ClassVar[int]
    LAST_SEEN_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    ASSIGNMENT_ID_FIELD_NUMBER: _ClassVar[int]
    PROGRESS_JSON_FIELD_NUMBER: _ClassVar[int]
    SWARM_SAMPLES_FIELD_NUMBER: _ClassVar[int]
    SWARM_ROUNDS_FIELD_NUMBER: _ClassVar[int]
    id: str
    name: str
    capabilities: Capabilities
    registered_at: float
    last_seen: float
    state: str
    assignment_id: str
    progress_json: str
    swarm_samples: int
    swarm_rounds: int
    def __init__(self, id: _Optional[str] = ..., name: _Optional[str] = ..., capabilities: _Optional[_Union[Capabilities, _Mapping]] = ..., registered_at: _Optional[float] = ..., last_seen: _Optional[float] = ..., state: _Optional[str] = ..., assignment_id: _Optional[str] = ..., progress_json: _Optional[str] = ..., swarm_samples: _Optional[int] = ..., swarm_rounds: _Optional[int] = ...) -> None: ...

class RegisterRequest(_message.Message):
    __slots__ = ("name", "capabilities")
    NAME_FIELD_NUMBER: _ClassVar[int]
    CAPABILITIES_FIELD_NUMBER: _ClassVar[int]
    name: str
    capabilities: Capabilities
    def __init__(self, name: _Optional[str] = ..., capabilities: _Optional[_Union[Capabilities, _Mapping]] = ...) -> None: ...

class RegisterResponse(_message.Message):
    __slots__ = ("worker_id", "session_token", "heartbeat_interval_s", "dht_initial_peers")
    WORKER_ID_FIELD_NUMBER: _ClassVar[int]
    SESSION_TOKEN_FIELD_NUMBER: _ClassVar[int]
    HEARTBEAT_INTERVAL_S_FIELD_NUMBER: _ClassVar[int]
    DHT_INITIAL_PEERS_FIELD_NUMBER: _ClassVar[int]
    worker_id: str
    session_token: str
    heartbeat_interval_s: float
    dht_initial_peers: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, worker_id: _Optional[str] = ..., session_token: _Optional[str] = ..., heartbeat_interval_s: _Optional[float] = ..., dht_initial_peers: _Optional[_Iterable[str]] = ...) -> None: ...

class HeartbeatRequest(_message.Message):
    __slots__ = ("assignment_id", "phase", "step", "total_steps", "loss", "samples_per_s", "metrics")
    class MetricsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: float
        def __init__(self, key: _Optional[str] = ..., value: _Optional[float] = ...) -> None: ...
    ASSIGNMENT_ID_FIELD_NUMBER: _ClassVar[int]
    PHASE_FIELD_NUMBER: _ClassVar[int]
    STEP_FIELD_NUMBER: _ClassVar[int]
    TOTAL_STEPS_FIELD_NUMBER: _ClassVar[int]
    LOSS_FIELD_NUMBER: _ClassVar[int]
    SAMPLES_PER_S_FIELD_NUMBER: _ClassVar[int]
    METRICS_FIELD_NUMBER: _ClassVar[int]
    assignment_id: str
    phase: str
    step: int
    total_steps: int
    loss: float
    samples_per_s: float
    metrics: _containers.ScalarMap[str, float]
    def __init__(self, assignment_id: _Optional[str] = ..., phase: _Optional[str] = ..., step: _Optional[int] = ..., total_steps: _Optional[int] = ..., loss: _Optional[float] = ..., samples_per_s: _Optional[float] = ..., metrics: _Optional[_Mapping[str, float]] = ...) -> None: ...

class HeartbeatResponse(_message.Message):
    __slots__ = ("cancel_assignment", "message")
    CANCEL_ASSIGNMENT_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    cancel_assignment: bool
    message: str
    def __init__(self, cancel_assignment: _Optional[bool] = ..., message: _Optional[str] = ...) -> None: ...

class GetAssignmentRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class FusionTask(_message.Message):
    __slots__ = ("shard", "peft_method", "hyperparameters_json", "statistics", "codec")
    SHARD_FIELD_NUMBER: _ClassVar[int]
    PEFT_METHOD_FIELD_NUMBER: _ClassVar[int]
    HYPERPARAMETERS_JSON_FIELD_NUMBER: _ClassVar[int]
    STATISTICS_FIELD_NUMBER: _ClassVar[int]
    CODEC_FIELD_NUMBER: _ClassVar[int]
    shard: str
    peft_method: str
    hyperparameters_json: str
    statistics: _containers.RepeatedScalarFieldContainer[str]
    codec: str
    def __init__(self, shard: _Optional[str] = ..., peft_method: _Optional[str] = ..., hyperparameters_json: _Optional[str] = ..., statistics: _Optional[_Iterable[str]] = ..., codec: _Optional[str] = ...) -> None: ...

class PretrainTask(_message.Message):
    __slots__ = ("run_id", "initial_peers", "target_batch_size", "corpus_shard", "hyperparameters_json", "epochs")
    RUN_ID_FIELD_NUMBER: _ClassVar[int]
    INITIAL_PEERS_FIELD_NUMBER: _ClassVar[int]
    TARGET_BATCH_SIZE_FIELD_NUMBER: _ClassVar[int]
    CORPUS_SHARD_FIELD_NUMBER: _ClassVar[int]
    HYPERPARAMETERS_JSON_FIELD_NUMBER: _ClassVar[int]
    EPOCHS_FIELD_NUMBER: _ClassVar[int]
    run_id: str
    initial_peers: _containers.RepeatedScalarFieldContainer[str]
    target_batch_size: int
    corpus_shard: str
    hyperparameters_json: str
    epochs: int
    def __init__(self, run_id: _Optional[str] = ..., initial_peers: _Optional[_Iterable[str]] = ..., target_batch_size: _Optional[int] = ..., corpus_shard: _Optional[str] = ..., hyperparameters_json: _Optional[str] = ..., epochs: _Optional[int] = ...) -> None: ...

class Assignment(_message.Message):
    __slots__ = ("id", "round_id", "base_version", "fusion", "pretrain", "retry_after_s", "deadline")
    ID_FIELD_NUMBER: _ClassVar[int]
    ROUND_ID_FIELD_NUMBER: _ClassVar[int]
    BASE_VERSION_FIELD_NUMBER: _ClassVar[int]
    FUSION_FIELD_NUMBER: _ClassVar[int]
    PRETRAIN_FIELD_NUMBER: _ClassVar[int]
    RETRY_AFTER_S_FIELD_NUMBER: _ClassVar[int]
    DEADLINE_FIELD_NUMBER: _ClassVar[int]
    id: str
    round_id: int
    base_version: int
    fusion: FusionTask
    pretrain: PretrainTask
    retry_after_s: float
    deadline: float
    def __init__(self, id: _Optional[str] = ..., round_id: _Optional[int] = ..., base_version: _Optional[int] = ..., fusion: _Optional[_Union[FusionTask, _Mapping]] = ..., pretrain: _Optional[_Union[PretrainTask, _Mapping]] = ..., retry_after_s: _Optional[float] = ..., deadline: _Optional[float] = ...) -> None: ...

class ReportAssignmentRequest(_message.Message):
    __slots__ = ("assignment_id", "outcome", "message", "metrics")
    class MetricsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: float
        def __init__(self, key: _Optional[str] = ..., value: _Optional[float] = ...) -> None: ...
    ASSIGNMENT_ID_FIELD_NUMBER: _ClassVar[int]
    OUTCOME_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    METRICS_FIELD_NUMBER: _ClassVar[int]
    assignment_id: str
    outcome: str
    message: str
    metrics: _containers.ScalarMap[str, float]
    def __init__(self, assignment_id: _Optional[str] = ..., outcome: _Optional[str] = ..., message: _Optional[str] = ..., metrics: _Optional[_Mapping[str, float]] = ...) -> None: ...

class ReportAssignmentResponse(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class GetVersionRequest(_message.Message):
    __slots__ = ("version",)
    VERSION_FIELD_NUMBER: _ClassVar[int]
    version: str
    def __init__(self, version: _Optional[str] = ...) -> None: ...

class DownloadRequest(_message.Message):
    __slots__ = ("version", "path", "offset")
    VERSION_FIELD_NUMBER: _ClassVar[int]
    PATH_FIELD_NUMBER: _ClassVar[int]
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    version: str
    path: str
    offset: int
    def __init__(self, version: _Optional[str] = ..., path: _Optional[str] = ..., offset: _Optional[int] = ...) -> None: ...

class DataChunk(_message.Message):
    __slots__ = ("path", "offset", "data")
    PATH_FIELD_NUMBER: _ClassVar[int]
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    path: str
    offset: int
    data: bytes
    def __init__(self, path: _Optional[str] = ..., offset: _Optional[int] = ..., data: _Optional[bytes] = ...) -> None: ...

class BeginUploadRequest(_message.Message):
    __slots__ = ("assignment_id", "round_id", "base_version", "total_size", "codec", "num_examples", "metrics_json")
    ASSIGNMENT_ID_FIELD_NUMBER: _ClassVar[int]
    ROUND_ID_FIELD_NUMBER: _ClassVar[int]
    BASE_VERSION_FIELD_NUMBER: _ClassVar[int]
    TOTAL_SIZE_FIELD_NUMBER: _ClassVar[int]
    CODEC_FIELD_NUMBER: _ClassVar[int]
    NUM_EXAMPLES_FIELD_NUMBER: _ClassVar[int]
    METRICS_JSON_FIELD_NUMBER: _ClassVar[int]
    assignment_id: str
    round_id: int
    base_version: int
    total_size: int
    codec: str
    num_examples: int
    metrics_json: str
    def __init__(self, assignment_id: _Optional[str] = ..., round_id: _Optional[int] = ..., base_version: _Optional[int] = ..., total_size: _Optional[int] = ..., codec: _Optional[str] = ..., num_examples: _Optional[int] = ..., metrics_json: _Optional[str] = ...) -> None: ...

class BeginUploadResponse(_message.Message):
    __slots__ = ("upload_id", "offset", "max_chunk_bytes")
    UPLOAD_ID_FIELD_NUMBER: _ClassVar[int]
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    MAX_CHUNK_BYTES_FIELD_NUMBER: _ClassVar[int]
    upload_id: str
    offset: int
    max_chunk_bytes: int
    def __init__(self, upload_id: _Optional[str] = ..., offset: _Optional[int] = ..., max_chunk_bytes: _Optional[int] = ...) -> None: ...

class UploadChunk(_message.Message):
    __slots__ = ("upload_id", "offset", "data", "sha256")
    UPLOAD_ID_FIELD_NUMBER: _ClassVar[int]
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    SHA256_FIELD_NUMBER: _ClassVar[int]
    upload_id: str
    offset: int
    data: bytes
    sha256: str
    def __init__(self, upload_id: _Optional[str] = ..., offset: _Optional[int] = ..., data: _Optional[bytes] = ..., sha256: _Optional[str] = ...) -> None: ...

class UploadResponse(_message.Message):
    __slots__ = ("contribution_id", "sha256", "size")
    CONTRIBUTION_ID_FIELD_NUMBER: _ClassVar[int]
    SHA256_FIELD_NUMBER: _ClassVar[int]
    SIZE_FIELD_NUMBER: _ClassVar[int]
    contribution_id: int
    sha256: str
    size: int
    def __init__(self, contribution_id: _Optional[int] = ..., sha256: _Optional[str] = ..., size: _Optional[int] = ...) -> None: ...

class LeaveRequest(_message.Message):
    __slots__ = ("reason",)
    REASON_FIELD_NUMBER: _ClassVar[int]
    reason: str
    def __init__(self, reason: _Optional[str] = ...) -> None: ...

class LeaveResponse(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class SwarmCredentialRequest(_message.Message):
    __slots__ = ("assignment_id", "public_key")
    ASSIGNMENT_ID_FIELD_NUMBER: _ClassVar[int]
    PUBLIC_KEY_FIELD_NUMBER: _ClassVar[int]
    assignment_id: str
    public_key: bytes
    def __init__(self, assignment_id: _Optional[str] = ..., public_key: _Optional[bytes] = ...) -> None: ...

class SwarmCredential(_message.Message):
    __slots__ = ("access_token", "authority_public_key", "expires_at", "renew_after_s", "peer_id", "run_id")
    ACCESS_TOKEN_FIELD_NUMBER: _ClassVar[int]
    AUTHORITY_PUBLIC_KEY_FIELD_NUMBER: _ClassVar[int]
    EXPIRES_AT_FIELD_NUMBER: _ClassVar[int]
    RENEW_AFTER_S_FIELD_NUMBER: _ClassVar[int]
    PEER_ID_FIELD_NUMBER: _ClassVar[int]
    RUN_ID_FIELD_NUMBER: _ClassVar[int]
    access_token: bytes
    authority_public_key: bytes
    expires_at: float
    renew_after_s: float
    peer_id: str
    run_id: str
    def __init__(self, access_token: _Optional[bytes] = ..., authority_public_key: _Optional[bytes] = ..., expires_at: _Optional[float] = ..., renew_after_s: _Optional[float] = ..., peer_id: _Optional[str] = ..., run_id: _Optional[str] = ...) -> None: ...

class SwarmParticipant(_message.Message):
    __slots__ = ("worker_id", "peer_id", "samples", "steps", "epoch")
    WORKER_ID_FIELD_NUMBER: _ClassVar[int]
    PEER_ID_FIELD_NUMBER: _ClassVar[int]
    SAMPLES_FIELD_NUMBER: _ClassVar[int]
    STEPS_FIELD_NUMBER: _ClassVar[int]
    EPOCH_FIELD_NUMBER: _ClassVar[int]
    worker_id: str
    peer_id: str
    samples: int
    steps: int
    epoch: int
    def __init__(self, worker_id: _Optional[str] = ..., peer_id: _Optional[str] = ..., samples: _Optional[int] = ..., steps: _Optional[int] = ..., epoch: _Optional[int] = ...) -> None: ...

class StatusRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class StatusResponse(_message.Message):
    __slots__ = ("coordinator_version", "current_version", "versions", "open_round", "workers_total", "workers_active", "dht_maddrs", "uptime_s")
    COORDINATOR_VERSION_FIELD_NUMBER: _ClassVar[int]
    CURRENT_VERSION_FIELD_NUMBER: _ClassVar[int]
    VERSIONS_FIELD_NUMBER: _ClassVar[int]
    OPEN_ROUND_FIELD_NUMBER: _ClassVar[int]
    WORKERS_TOTAL_FIELD_NUMBER: _ClassVar[int]
    WORKERS_ACTIVE_FIELD_NUMBER: _ClassVar[int]
    DHT_MADDRS_FIELD_NUMBER: _ClassVar[int]
    UPTIME_S_FIELD_NUMBER: _ClassVar[int]
    coordinator_version: str
    current_version: int
    versions: int
    open_round: Round
    workers_total: int
    workers_active: int
    dht_maddrs: _containers.RepeatedScalarFieldContainer[str]
    uptime_s: float
    def __init__(self, coordinator_version: _Optional[str] = ..., current_version: _Optional[int] = ..., versions: _Optional[int] = ..., open_round: _Optional[_Union[Round, _Mapping]] = ..., workers_total: _Optional[int] = ..., workers_active: _Optional[int] = ..., dht_maddrs: _Optional[_Iterable[str]] = ..., uptime_s: _Optional[float] = ...) -> None: ...

class ListWorkersRequest(_message.Message):
    __slots__ = ("include_gone", "page_size", "page_token")
    INCLUDE_GONE_FIELD_NUMBER: _ClassVar[int]
    PAGE_SIZE_FIELD_NUMBER: _ClassVar[int]
    PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    include_gone: bool
    page_size: int
    page_token: str
    def __init__(self, include_gone: _Optional[bool] = ..., page_size: _Optional[int] = ..., page_token: _Optional[str] = ...) -> None: ...

class ListWorkersResponse(_message.Message):
    __slots__ = ("workers", "next_page_token")
    WORKERS_FIELD_NUMBER: _ClassVar[int]
    NEXT_PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    workers: _containers.RepeatedCompositeFieldContainer[WorkerInfo]
    next_page_token: str
    def __init__(self, workers: _Optional[_Iterable[_Union[WorkerInfo, _Mapping]]] = ..., next_page_token: _Optional[str] = ...) -> None: ...

class ListVersionsRequest(_message.Message):
    __slots__ = ("page_size", "page_token")
    PAGE_SIZE_FIELD_NUMBER: _ClassVar[int]
    PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    page_size: int
    page_token: str
    def __init__(self, page_size: _Optional[int] = ..., page_token: _Optional[str] = ...) -> None: ...

class ListVersionsResponse(_message.Message):
    __slots__ = ("versions", "next_page_token")
    VERSIONS_FIELD_NUMBER: _ClassVar[int]
    NEXT_PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    versions: _containers.RepeatedCompositeFieldContainer[Version]
    next_page_token: str
    def __init__(self, versions: _Optional[_Iterable[_Union[Version, _Mapping]]] = ..., next_page_token: _Optional[str] = ...) -> None: ...

class ListRoundsRequest(_message.Message):
    __slots__ = ("page_size", "page_token")
    PAGE_SIZE_FIELD_NUMBER: _ClassVar[int]
    PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    page_size: int
    page_token: str
    def __init__(self, page_size: _Optional[int] = ..., page_token: _Optional[str] = ...) -> None: ...

class ListRoundsResponse(_message.Message):
    __slots__ = ("rounds", "next_page_token")
    ROUNDS_FIELD_NUMBER: _ClassVar[int]
    NEXT_PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    rounds: _containers.RepeatedCompositeFieldContainer[Round]
    next_page_token: str
    def __init__(self, rounds: _Optional[_Iterable[_Union[Round, _Mapping]]] = ..., next_page_token: _Optional[str] = ...) -> None: ...

class ListContributionsRequest(_message.Message):
    __slots__ = ("round_id", "page_size", "page_token")
    ROUND_ID_FIELD_NUMBER: _ClassVar[int]
    PAGE_SIZE_FIELD_NUMBER: _ClassVar[int]
    PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    round_id: int
    page_size: int
    page_token: str
    def __init__(self, round_id: _Optional[int] = ..., page_size: _Optional[int] = ..., page_token: _Optional[str] = ...) -> None: ...

class ListContributionsResponse(_message.Message):
    __slots__ = ("contributions", "next_page_token")
    CONTRIBUTIONS_FIELD_NUMBER: _ClassVar[int]
    NEXT_PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    contributions: _containers.RepeatedCompositeFieldContainer[Contribution]
    next_page_token: str
    def __init__(self, contributions: _Optional[_Iterable[_Union[Contribution, _Mapping]]] = ..., next_page_token: _Optional[str] = ...) -> None: ...

class TokenInfo(_message.Message):
    __slots__ = ("id", "kind", "label", "created_at", "revoked")
    ID_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    LABEL_FIELD_NUMBER: _ClassVar[int]
    CREATED_AT_FIELD_NUMBER: _ClassVar[int]
    REVOKED_FIELD_NUMBER: _ClassVar[int]
    id: str
    kind: str
    label: str
    created_at: float
    revoked: bool
    def __init__(self, id: _Optional[str] = ..., kind: _Optional[str] = ..., label: _Optional[str] = ..., created_at: _Optional[float] = ..., revoked: _Optional[bool] = ...) -> None: ...

class CreateTokenRequest(_message.Message):
    __slots__ = ("label",)
    LABEL_FIELD_NUMBER: _ClassVar[int]
    label: str
    def __init__(self, label: _Optional[str] = ...) -> None: ...

class CreateTokenResponse(_message.Message):
    __slots__ = ("info", "token")
    INFO_FIELD_NUMBER: _ClassVar[int]
    TOKEN_FIELD_NUMBER: _ClassVar[int]
    info: TokenInfo
    token: str
    def __init__(self, info: _Optional[_Union[TokenInfo, _Mapping]] = ..., token: _Optional[str] = ...) -> None: ...

class RevokeTokenRequest(_message.Message):
    __slots__ = ("id",)
    ID_FIELD_NUMBER: _ClassVar[int]
    id: str
    def __init__(self, id: _Optional[str] = ...) -> None: ...

class RevokeTokenResponse(_message.Message):
    __slots__ = ("info",)
    INFO_FIELD_NUMBER: _ClassVar[int]
    info: TokenInfo
    def __init__(self, info: _Optional[_Union[TokenInfo, _Mapping]] = ...) -> None: ...

class ListTokensRequest(_message.Message):
    __slots__ = ("page_size", "page_token")
    PAGE_SIZE_FIELD_NUMBER: _ClassVar[int]
    PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    page_size: int
    page_token: str
    def __init__(self, page_size: _Optional[int] = ..., page_token: _Optional[str] = ...) -> None: ...

class ListTokensResponse(_message.Message):
    __slots__ = ("tokens", "next_page_token")
    TOKENS_FIELD_NUMBER: _ClassVar[int]
    NEXT_PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    tokens: _containers.RepeatedCompositeFieldContainer[TokenInfo]
    next_page_token: str
    def __init__(self, tokens: _Optional[_Iterable[_Union[TokenInfo, _Mapping]]] = ..., next_page_token: _Optional[str] = ...) -> None: ...

class OpenRoundRequest(_message.Message):
    __slots__ = ("kind", "base_version", "quorum", "deadline_s", "method", "options_json")
    KIND_FIELD_NUMBER: _ClassVar[int]
    BASE_VERSION_FIELD_NUMBER: _ClassVar[int]
    QUORUM_FIELD_NUMBER: _ClassVar[int]
    DEADLINE_S_FIELD_NUMBER: _ClassVar[int]
    METHOD_FIELD_NUMBER: _ClassVar[int]
    OPTIONS_JSON_FIELD_NUMBER: _ClassVar[int]
    kind: str
    base_version: int
    quorum: int
    deadline_s: float
    method: str
    options_json: str
    def __init__(self, kind: _Optional[str] = ..., base_version: _Optional[int] = ..., quorum: _Optional[int] = ..., deadline_s: _Optional[float] = ..., method: _Optional[str] = ..., options_json: _Optional[str] = ...) -> None: ...

class CloseRoundRequest(_message.Message):
    __slots__ = ("round_id", "cancel")
    ROUND_ID_FIELD_NUMBER: _ClassVar[int]
    CANCEL_FIELD_NUMBER: _ClassVar[int]
    round_id: int
    cancel: bool
    def __init__(self, round_id: _Optional[int] = ..., cancel: _Optional[bool] = ...) -> None: ...

class MergeRequest(_message.Message):
    __slots__ = ("round_id", "method", "options_json")
    ROUND_ID_FIELD_NUMBER: _ClassVar[int]
    METHOD_FIELD_NUMBER: _ClassVar[int]
    OPTIONS_JSON_FIELD_NUMBER: _ClassVar[int]
    round_id: int
    method: str
    options_json: str
    def __init__(self, round_id: _Optional[int] = ..., method: _Optional[str] = ..., options_json: _Optional[str] = ...) -> None: ...

class PublishRequest(_message.Message):
    __slots__ = ("version",)
    VERSION_FIELD_NUMBER: _ClassVar[int]
    version: int
    def __init__(self, version: _Optional[int] = ...) -> None: ...

class RollbackRequest(_message.Message):
    __slots__ = ("version",)
    VERSION_FIELD_NUMBER: _ClassVar[int]
    version: int
    def __init__(self, version: _Optional[int] = ...) -> None: ...
