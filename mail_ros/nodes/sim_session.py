"""One process, one ROS graph around the simulated FR3: what ``mail-ros collect`` and ``mail-ros demo`` share.

A :class:`SimSession` is an :class:`InProcessGraph` (an rclpy context spun on background threads)
with ``franka_sim_node`` owning ROS time (``publish_clock``: simulated time, paced by
``real_time_factor``) and a small operator node that talks to the graph through its public
interfaces only: ``/mail/instruction``, ``franka_sim_node/reset``, ``franka_sim_node/task`` and
``franka_sim_node/task_success``. Other nodes (the pipeline, the expert, a recorder) are added
with :meth:`add`; :meth:`parameters` gives their parameter overrides with ``use_sim_time``.
Messages travel over real DDS (intra-process delivery is off in rclpy), as between processes.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from rclpy.node import Node
from rclpy.parameter import Parameter
from std_msgs.msg import String
from std_srvs.srv import Trigger

from mail_ros.nodes.common import GOAL_QOS
from mail_ros.nodes.franka_sim_node import FrankaSimNode
from mail_ros.nodes.graph import GraphError, InProcessGraph
from mail_ros.sim.tasks import Task, TaskError, TaskProgress

__all__ = ["SessionError", "SimSession"]


class SessionError(GraphError):
    """The simulated graph did not respond as expected (a service timed out, a node failed)."""


class SimSession(InProcessGraph):
    """franka_sim_node + an operator in a fresh context; use as a context manager."""

    error_type = SessionError

    def __init__(self, *, seed: int, cameras: list[str], image_size: tuple[int, int], real_time_factor: float,
                 camera_rate_hz: float = 20.0, joint_state_rate_hz: float = 100.0, physics_period: float = 0.01,
                 domain_id: int | None = None, threads: int = 6) -> None:
        super().__init__(threads=threads, domain_id=domain_id, name="sim_session")
        self.sim = self.add(FrankaSimNode(context=self.context, parameter_overrides=[
            Parameter("seed", value=int(seed)), Parameter("publish_clock", value=True),
            Parameter("real_time_factor", value=float(real_time_factor)),
            Parameter("cameras", value=list(cameras)), Parameter("camera_rate_hz", value=float(camera_rate_hz)),
            Parameter("joint_state_rate_hz", value=float(joint_state_rate_hz)),
            Parameter("physics_period", value=float(physics_period)),
            Parameter("image_height", value=int(image_size[0])), Parameter("image_width", value=int(image_size[1])),
        ]))
        self.operator = self.add(Node("mail_operator", context=self.context,
                                      parameter_overrides=[Parameter("use_sim_time", value=True)]))
        self._reset = self.operator.create_client(Trigger, "/franka_sim_node/reset")
        self._success = self.operator.create_client(Trigger, "/franka_sim_node/task_success")
        self._task = self.operator.create_publisher(String, "/franka_sim_node/task", GOAL_QOS)
        # Created once: destroying a publisher while the executor waits on its QoS events
        # invalidates a handle under the executor (rclpy raises InvalidHandle).
        self._instruction = self.operator.create_publisher(String, "/mail/instruction", GOAL_QOS)
        for client in (self._reset, self._success):
            if not client.wait_for_service(timeout_sec=10.0):
                raise SessionError(f"service {client.srv_name} did not appear within 10 s")

    @staticmethod
    def parameters(**values: Any) -> list[Parameter]:
        """parameter_overrides for a node of this session: ``values`` plus use_sim_time."""
        return [Parameter("use_sim_time", value=True)] + [Parameter(k, value=v) for k, v in values.items()]

    # --- time -----------------------------------------------------------------------------------
    def now(self) -> float:
        """Simulated ROS time in seconds."""
        return self.sim.privileged_state()[0]

    def sleep(self, seconds: float) -> None:
        """Let ``seconds`` of simulated time pass."""
        end = self.now() + seconds
        self.wait_until(lambda: self.now() >= end, 60.0 + 10.0 * seconds, f"{seconds:g} s of simulated time")

    # --- operator -------------------------------------------------------------------------------
    def _call(self, client, timeout: float = 10.0) -> Trigger.Response:
        future = client.call_async(Trigger.Request())
        self.wait_until(future.done, timeout, f"a response from {client.srv_name}")
        return future.result()

    def reset(self) -> str:
        """New episode: arm home, hand open, cubes at the next seed's layout."""
        response = self._call(self._reset)
        if not response.success:
            raise SessionError(f"franka_sim_node reset failed: {response.message}")
        return response.message

    def instruct(self, text: str, task: Task, ready: Callable[[], bool] = lambda: True) -> None:
        """Name ``task`` as the one ~/task_success judges this episode (franka_sim_node/task; ``text``
        may be a paraphrase of it, and the simulator does not read /mail/instruction), then publish
        ``text`` on /mail/instruction once it has subscribers and ``ready()`` holds."""
        self._task.publish(String(data=task.instruction))
        publisher = self._instruction
        self.wait_until(lambda: publisher.get_subscription_count() > 0 and ready(), 10.0,
                        "subscribers of /mail/instruction")
        publisher.publish(String(data=text))

    def task_progress(self) -> TaskProgress:
        """The simulator's verdict on the judged task, now: success, or the stage it is at."""
        response = self._call(self._success)
        try:
            return TaskProgress.from_message(response.success, response.message)
        except TaskError as exc:
            raise SessionError(f"{self._success.srv_name} answered {response.message!r}: {exc}") from exc
