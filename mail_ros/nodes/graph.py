"""Several nodes in one process: an rclpy context spun by executors on background threads.

What the one-process tools (``mail-ros demo``, ``mail-ros collect``) and the node tests share.
Messages between the nodes still travel over real DDS (rclpy has no intra-process delivery).
A callback that raises stops its executor; the error is kept and re-raised by :meth:`check`, so
a caller polling the graph fails with the node's error instead of timing out.
"""

from __future__ import annotations

import sys
import threading
import time
from collections.abc import Callable

import rclpy
from rclpy.executors import MultiThreadedExecutor, SingleThreadedExecutor
from rclpy.node import Node

from mail_ros.nodes.common import GIL_SWITCH_INTERVAL, shutdown_executor

__all__ = ["GraphError", "InProcessGraph"]


class GraphError(RuntimeError):
    """A node of the graph failed, or the graph did not respond in time."""


class InProcessGraph:
    """A fresh rclpy context whose nodes spin on a MultiThreadedExecutor thread; a context manager."""

    error_type: type[Exception] = GraphError

    def __init__(self, threads: int = 4, domain_id: int | None = None, name: str = "mail_graph") -> None:
        # Every node shares one interpreter: with the default 5 ms GIL switch interval a busy
        # callback kept timers waiting (a 10 ms policy chunk took a second; see run_node).
        sys.setswitchinterval(GIL_SWITCH_INTERVAL)
        self.context = rclpy.Context()
        rclpy.init(context=self.context, domain_id=domain_id)
        self.executor = MultiThreadedExecutor(num_threads=threads, context=self.context)
        self.nodes: list[Node] = []
        self.error: BaseException | None = None
        self._dedicated: list[tuple[SingleThreadedExecutor, threading.Thread]] = []
        self._closing = False
        self._thread = threading.Thread(target=self._spin, args=(self.executor,), name=name, daemon=True)
        self._thread.start()

    def _spin(self, executor) -> None:
        try:
            executor.spin()
        except BaseException as exc:  # a callback raised: reported by the next check()
            if not self._closing:
                self.error = exc

    def check(self) -> None:
        """Raise if a node callback has raised (its executor has stopped)."""
        if self.error is not None:
            raise self.error_type(f"a node callback raised: {self.error!r}") from self.error

    def add(self, node: Node, dedicated: bool = False) -> Node:
        """Spin ``node`` with the others, or (``dedicated``) on an executor and thread of its own.

        A recorder gets its own: it must take every message as it arrives, and one shared
        executor serves each subscription once per wait cycle, so a busy graph backs up the
        fast topics (joint states) and skews their receive times.
        """
        self.nodes.append(node)
        if dedicated:
            executor = SingleThreadedExecutor(context=self.context)
            executor.add_node(node)
            thread = threading.Thread(target=self._spin, args=(executor,), name=f"spin_{node.get_name()}", daemon=True)
            thread.start()
            self._dedicated.append((executor, thread))
        else:
            self.executor.add_node(node)
        return node

    def remove(self, node: Node) -> None:
        """Stop spinning ``node`` (a node of the shared executor only): it gets no more callbacks.

        It is destroyed by :meth:`close`, once no executor spins: the executor may be building
        its wait set from the node's entities right now, and destroying them under it raises
        InvalidHandle in the spinning thread, which stops every other node too.
        """
        self.executor.remove_node(node)

    def wait_until(self, predicate: Callable[[], bool], timeout: float, what: str, period: float = 0.005) -> None:
        """Poll ``predicate`` until true, checking the graph; ``timeout`` in wall seconds."""
        deadline = time.monotonic() + timeout
        while not predicate():
            self.check()
            if time.monotonic() > deadline:
                raise self.error_type(f"timed out after {timeout:g} s waiting for {what}")
            time.sleep(period)

    def close(self) -> None:
        """Stop spinning, destroy every node (the first added last), shut the context down (idempotent)."""
        if self._closing:
            return
        self._closing = True
        for executor, thread in [(self.executor, self._thread)] + self._dedicated:
            shutdown_executor(executor)  # callbacks in flight finish first
            thread.join(timeout=5.0)
        # Nodes never go away while an executor spins (rclpy raises InvalidHandle then).
        for node in reversed(self.nodes):
            node.destroy_node()
        self.nodes.clear()
        rclpy.try_shutdown(context=self.context)

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()
