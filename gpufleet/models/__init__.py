"""gpufleet's domain, as typed models: one base (CoreModel, unknown fields refused), status enums,
fleets and their resolved hosts, host facts, runs, and what the state store keeps.

Data flows one way: YAML -> these models -> inventory and ssh_config -> runner -> facts ->
allocator and state -> what the CLI shows."""

from gpufleet.models.core import (
    ACTIVE_RUN_STATUSES,
    LIVE_RUN_STATUSES,
    SYSTEM_ACTOR,
    CoreModel,
    HostStatus,
    InstanceStatus,
    ProjectRole,
    Range,
    RunStatus,
    ServerRole,
)
from gpufleet.models.env import Env, split_env
from gpufleet.models.facts import CPU, GPU, UNKNOWN_RUNTIME, Container, Disk, HostFacts, Problem, Runtime
from gpufleet.models.fleet import (
    AdminPolicy,
    Fleet,
    FleetConfig,
    FleetPolicy,
    Hop,
    HostParams,
    ProxyJump,
    SSHParams,
    Target,
    normal_host_path,
    path_is_under,
    target_aliases,
)
from gpufleet.models.run import (
    RETRY_DURATION_DEFAULT,
    RUN_CONFIG,
    RUN_PRIORITY_DEFAULT,
    STOP_DURATION_DEFAULT,
    DevEnvironmentConfig,
    GPUSpec,
    ResourcesSpec,
    RetryEvent,
    RetryPolicy,
    RetrySpec,
    RunConfig,
    RunConfigType,
    RunRequest,
    RunType,
    ServiceConfig,
    TaskConfig,
    parse_duration,
)
from gpufleet.models.state import (
    DEFAULT_PROJECT,
    Event,
    FleetState,
    Instance,
    Member,
    Project,
    Quota,
    Run,
    RunNode,
    UsageRecord,
    User,
)

__all__ = [
    "ACTIVE_RUN_STATUSES", "AdminPolicy", "CPU", "DEFAULT_PROJECT", "Member", "Project", "ProjectRole", "Quota",
    "SYSTEM_ACTOR", "ServerRole", "UsageRecord", "User", "GPU", "LIVE_RUN_STATUSES", "RETRY_DURATION_DEFAULT",
    "RUN_CONFIG",
    "RUN_PRIORITY_DEFAULT", "STOP_DURATION_DEFAULT", "UNKNOWN_RUNTIME", "Container", "CoreModel",
    "DevEnvironmentConfig", "Disk", "Env", "Event", "Fleet", "FleetConfig", "FleetPolicy", "FleetState", "GPUSpec",
    "Hop", "HostFacts", "HostParams", "HostStatus", "Instance", "InstanceStatus", "Problem", "ProxyJump", "Range",
    "ResourcesSpec", "RetryEvent", "RetryPolicy", "RetrySpec", "Run", "RunConfig", "RunConfigType", "RunNode",
    "RunRequest", "RunStatus", "RunType", "Runtime", "SSHParams", "ServiceConfig", "Target", "TaskConfig",
    "normal_host_path", "parse_duration", "path_is_under", "split_env", "target_aliases",
]
