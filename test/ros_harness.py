"""Real rclpy graphs for tests: mail_ros's InProcessGraph (one context per graph, nodes spun by a
MultiThreadedExecutor on a background thread) with test-style failures, and a polling helper.
DDS isolation comes from conftest.py (loopback discovery, a ROS domain per test session)."""

from __future__ import annotations

import time
from typing import Callable

import rclpy
from rclpy.node import Node
from rclpy.parameter import Parameter

from mail_ros.nodes.graph import InProcessGraph

# A busy machine stalls a test process for seconds at a time (10 s without a single log line was
# seen with the suite beside two simulation runs and a spinner); a wait ends as soon as its event
# comes, so it costs nothing to make none shorter than this.
MIN_WAIT_S = 60.0


def overrides(**values) -> list[Parameter]:
    """parameter_overrides for a node constructor."""
    return [Parameter(name, value=value) for name, value in values.items()]


class RosGraph(InProcessGraph):
    """A graph whose node errors fail the test (AssertionError)."""

    error_type = AssertionError

    def node(self, name: str, **kwargs) -> Node:
        """A plain node (publishers, subscriptions of the test) spun with the others; ``kwargs`` go
        to ``rclpy.create_node`` (e.g. parameter_overrides)."""
        return self.add(rclpy.create_node(name, context=self.context, **kwargs))

    def shutdown(self) -> None:
        """Close the graph; fail if a node callback raised while it ran."""
        self.close()
        self.check()


def wait_for(predicate: Callable[[], bool], timeout: float, what: str, period: float = 0.02,
             graph: RosGraph | None = None) -> None:
    """Poll ``predicate`` until it holds (checking the graph's nodes for errors); ``timeout`` is
    how long the event may take on an idle machine, and the wait is at least MIN_WAIT_S."""
    timeout = max(timeout, MIN_WAIT_S)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if graph is not None:
            graph.check()
        if predicate():
            return
        time.sleep(period)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")
