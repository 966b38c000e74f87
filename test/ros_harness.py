"""Real rclpy graphs for tests: one Context per graph, nodes spun by a MultiThreadedExecutor on a
background thread, and polling helpers. DDS isolation comes from conftest.py (loopback discovery,
a ROS domain per test session)."""

from __future__ import annotations

import sys
import threading
import time
from typing import Callable

import rclpy
from rclpy.executors import MultiThreadedExecutor
from rclpy.node import Node
from rclpy.parameter import Parameter

from mail_ros.nodes.common import GIL_SWITCH_INTERVAL


def overrides(**values) -> list[Parameter]:
    """parameter_overrides for a node constructor."""
    return [Parameter(name, value=value) for name, value in values.items()]


class RosGraph:
    def __init__(self, threads: int = 4):
        # Several nodes share one interpreter here: switch threads often (as SimSession does) so
        # a timer is not kept waiting for the GIL by a busy callback or the test thread.
        sys.setswitchinterval(GIL_SWITCH_INTERVAL)
        self.context = rclpy.Context()
        rclpy.init(context=self.context)
        self.executor = MultiThreadedExecutor(num_threads=threads, context=self.context)
        self.nodes: list[Node] = []
        self.error: Exception | None = None
        self._closing = False
        self._thread = threading.Thread(target=self._spin, daemon=True)
        self._thread.start()

    def _spin(self) -> None:
        try:
            self.executor.spin()
        except Exception as exc:  # a callback raised: keep it for the test to see
            if not self._closing:
                self.error = exc

    def add(self, node: Node) -> Node:
        self.nodes.append(node)
        self.executor.add_node(node)
        return node

    def remove(self, node: Node) -> None:
        self.executor.remove_node(node)
        self.nodes.remove(node)
        node.destroy_node()

    def node(self, name: str) -> Node:
        return self.add(rclpy.create_node(name, context=self.context))

    def shutdown(self) -> None:
        self._closing = True
        self.executor.shutdown(timeout_sec=5.0)
        self._thread.join(timeout=5.0)
        for node in list(self.nodes):
            node.destroy_node()
        rclpy.try_shutdown(context=self.context)
        if self.error is not None:
            raise AssertionError(f"a node callback raised: {self.error!r}") from self.error

    def check(self) -> None:
        """Fail now if a callback has raised (the executor thread stops at the first error)."""
        if self.error is not None:
            raise AssertionError(f"a node callback raised: {self.error!r}") from self.error


def wait_for(predicate: Callable[[], bool], timeout: float, what: str, period: float = 0.02,
             graph: RosGraph | None = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if graph is not None:
            graph.check()
        if predicate():
            return
        time.sleep(period)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")
