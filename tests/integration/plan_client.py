"""The original plan's models and WorkerClient, written its way (../shared/original-plan.md,
Steps 1 and 4), to drive the gateway as our users' existing code does.

One change, the one the issue names: the heartbeat is serialised with
`model_dump(mode="json")`; the plan's `model_dump()` leaves a datetime that
aiohttp's JSON encoder cannot send. `server_url`, the name, the capability and
the heartbeat interval (an attribute the plan sets to 30 s) are the only knobs.
"""

from __future__ import annotations

import asyncio
import socket
import uuid
from datetime import datetime
from enum import Enum

import aiohttp
import psutil
import structlog
from pydantic import BaseModel, Field

logger = structlog.get_logger("plan-client")


class WorkerCapability(str, Enum):
    CPU = "cpu"
    GPU = "gpu"
    HYBRID = "hybrid"


class WorkerStatus(str, Enum):
    ONLINE = "online"
    OFFLINE = "offline"
    BUSY = "busy"
    ERROR = "error"
    MAINTENANCE = "maintenance"


class HardwareInfo(BaseModel):
    cpu_cores: int
    memory_gb: float
    gpu_count: int = 0
    gpu_memory_gb: float = 0.0
    gpu_models: list[str] = Field(default_factory=list)
    disk_space_gb: float = 0.0


class WorkerLocation(BaseModel):
    hostname: str
    ip_address: str
    port: int = 8000
    is_remote: bool = True
    network_latency_ms: float | None = None


class WorkerMetrics(BaseModel):
    cpu_usage_percent: float = 0.0
    memory_usage_percent: float = 0.0
    gpu_usage_percent: float = 0.0
    active_tasks: int = 0
    completed_tasks: int = 0
    failed_tasks: int = 0
    avg_task_duration_seconds: float = 0.0


class WorkerRegistration(BaseModel):
    worker_id: str = Field(default_factory=lambda: str(uuid.uuid4()))
    name: str
    capability: WorkerCapability
    hardware: HardwareInfo
    location: WorkerLocation
    max_concurrent_tasks: int = 1
    supported_content_types: list[str] = Field(default_factory=list)
    tags: dict[str, str] = Field(default_factory=dict)


class WorkerHeartbeat(BaseModel):
    worker_id: str
    status: WorkerStatus
    metrics: WorkerMetrics
    timestamp: datetime = Field(default_factory=datetime.utcnow)


class WorkerClient:
    """Client for worker registration and heartbeat management."""

    def __init__(self, server_url: str, worker_name: str,
                 capability: WorkerCapability, auth_token: str | None = None):  # fmt: skip
        self.server_url = server_url.rstrip("/")
        self.worker_name = worker_name
        self.capability = capability
        self.auth_token = auth_token
        self.worker_id: str | None = None
        self.registration: WorkerRegistration | None = None
        self._heartbeat_task: asyncio.Task[None] | None = None
        self._heartbeat_interval: float = 30  # seconds
        self.heartbeats_sent = 0  # ours: what the test counts
        self.heartbeat_failures = 0

    async def register(self) -> bool:
        try:
            hardware = await self._get_hardware_info()
            location = await self._get_location_info()
            self.registration = WorkerRegistration(
                name=self.worker_name, capability=self.capability, hardware=hardware,
                location=location, supported_content_types=self._get_supported_content_types(),
            )  # fmt: skip
            async with aiohttp.ClientSession() as session:
                url = f"{self.server_url}/api/v1/workers/register"
                data = {"registration": self.registration.model_dump(),
                        "auth_token": self.auth_token}  # fmt: skip
                async with session.post(url, json=data) as response:
                    if response.status == 200:
                        result = await response.json()
                        self.worker_id = result["worker_id"]
                        logger.info("Worker registered successfully", worker_id=self.worker_id)
                        await self.start_heartbeat()
                        return True
                    logger.error("Worker registration failed", status=response.status,
                                 error=await response.text())  # fmt: skip
                    return False
        except Exception as e:  # noqa: BLE001 - the plan's way
            logger.error("Worker registration error", error=str(e))
            return False

    async def start_heartbeat(self) -> None:
        if self._heartbeat_task:
            return
        self._heartbeat_task = asyncio.create_task(self._heartbeat_loop())

    async def stop_heartbeat(self) -> None:
        if self._heartbeat_task:
            self._heartbeat_task.cancel()
            try:
                await self._heartbeat_task
            except asyncio.CancelledError:
                pass
            self._heartbeat_task = None

    async def unregister(self) -> None:
        try:
            await self.stop_heartbeat()
            if self.worker_id:
                async with aiohttp.ClientSession() as session:
                    url = f"{self.server_url}/api/v1/workers/{self.worker_id}"
                    async with session.delete(url) as response:
                        if response.status != 200:
                            logger.warning("Worker unregistration failed", status=response.status)
        except Exception as e:  # noqa: BLE001 - the plan's way
            logger.error("Worker unregistration error", error=str(e))

    async def _heartbeat_loop(self) -> None:
        while True:
            try:
                await asyncio.sleep(self._heartbeat_interval)
                await self._send_heartbeat()
            except asyncio.CancelledError:
                break
            except Exception as e:  # noqa: BLE001 - the plan's way
                logger.error("Heartbeat error", error=str(e))
                await asyncio.sleep(5)

    async def _send_heartbeat(self) -> None:
        if not self.worker_id:
            return
        try:
            metrics = await self._get_current_metrics()
            heartbeat = WorkerHeartbeat(worker_id=self.worker_id, status=WorkerStatus.ONLINE,
                                        metrics=metrics)  # fmt: skip
            async with aiohttp.ClientSession() as session:
                url = f"{self.server_url}/api/v1/workers/{self.worker_id}/heartbeat"
                data = heartbeat.model_dump(mode="json")  # the one change: the plan had model_dump()
                async with session.post(url, json=data) as response:
                    if response.status != 200:
                        self.heartbeat_failures += 1
                        logger.warning("Heartbeat failed", status=response.status)
                    else:
                        self.heartbeats_sent += 1
        except Exception as e:  # noqa: BLE001 - the plan's way
            self.heartbeat_failures += 1
            logger.error("Failed to send heartbeat", error=str(e))

    async def _get_hardware_info(self) -> HardwareInfo:
        return HardwareInfo(
            cpu_cores=psutil.cpu_count() or 1, memory_gb=psutil.virtual_memory().total / (1024**3),
            disk_space_gb=psutil.disk_usage("/").total / (1024**3),
        )  # fmt: skip

    async def _get_location_info(self) -> WorkerLocation:
        hostname = socket.gethostname()
        try:
            ip_address = socket.gethostbyname(hostname)
        except OSError:
            ip_address = "127.0.0.1"
        return WorkerLocation(hostname=hostname, ip_address=ip_address, is_remote=True)

    async def _get_current_metrics(self) -> WorkerMetrics:
        return WorkerMetrics(
            cpu_usage_percent=psutil.cpu_percent(interval=1),
            memory_usage_percent=psutil.virtual_memory().percent,
        )  # fmt: skip

    def _get_supported_content_types(self) -> list[str]:
        if self.capability == WorkerCapability.GPU:
            return ["audio", "video", "image"]
        if self.capability == WorkerCapability.CPU:
            return ["document", "web", "text"]
        return ["audio", "video", "image", "document", "web", "text"]
