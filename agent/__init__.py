"""The worker agent: probe the machine, register, heartbeat, track tasks, unregister.

Embed it in a worker process with `Agent`, or run it beside one with `agent run`.
"""

from agent.agent import Agent, AgentCutOff, AgentError, AgentSuperseded
from agent.probe import Prober
from agent.settings import AgentSettings, derive_worker_id
from agent.tasks import TaskCounts

__all__ = [
    "Agent",
    "AgentError",
    "AgentSettings",
    "AgentCutOff",
    "AgentSuperseded",
    "Prober",
    "TaskCounts",
    "derive_worker_id",
]
