"""The worker agent: probe the machine, register, heartbeat, track tasks, unregister.

Embed it in a worker process with `Agent`, or run it beside one with `agent run`.
"""

from agent.agent import Agent, AgentError, AgentSettings, TaskCounts, derive_worker_id
from agent.probe import Prober

__all__ = ["Agent", "AgentError", "AgentSettings", "Prober", "TaskCounts", "derive_worker_id"]
