"""What policy_node does with an ICIL checkpoint: :class:`PolicyRunner`'s rules, plus the prompt.

:class:`ICILRunner` is a :class:`~mail_ros.policy.runner.PolicyRunner` (goals, the stamp gate
and age limit, the history, chunk checks: all unchanged) around the policy's streaming
interface, with the prompt as part of the goal:

* a prompt (:meth:`ICILRunner.load_prompt`, paths as :func:`mail_ros.data.prompts.read_prompt`
  takes them) is read, checked against the checkpoint's contract and prefilled into the
  policy's recurrent state; a refused prompt (:class:`PromptError`) leaves the previous one,
  and the episode, as they were;
* an accepted prompt is a NEW GOAL (:meth:`ICILRunner.use_prompt`): its identity
  (:func:`prompt_goal`: the demonstrations' common instruction, or their labels, with the time
  the prompt was set) is what the chunks carry and what the node announces on
  /mail/instruction_embedding, the one goal channel the executor listens to, so chunks of the
  old prompt are discarded there as for any new goal;
* no chunk is made without a prompt (K = 0 is a policy with nothing to imitate); an instruction
  goal from language_node starts a new episode and keeps the prompt (the policy has no
  language input: ``language`` on is refused);
* a goal equal to the current one (same text and stamp: the node's own announcement coming
  back) is not a new episode.

Each live observation is committed to the stream when its chunk is computed; observations that
arrive while a chunk is being computed are not (the history holds one, T = 1), so the policy
should keep up with the observation rate, as every measured configuration does. An observation
stamped before the last committed one (a simulator restart) starts a new episode from the prompt.

Not thread-safe, like PolicyRunner: the caller serialises :meth:`predict` and
:meth:`load_prompt` (both use the policy) and every other call.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from mail_ros.data.hdf5 import DataError
from mail_ros.data.prompts import PromptDemonstration, read_prompt
from mail_ros.policy.icil_policy import ICILPolicy, PromptInfo
from mail_ros.policy.mail_policy import PolicyInputError
from mail_ros.policy.runner import Goal, PolicyRunner, RunnerSettings
from mail_ros.spec import Observation

__all__ = ["ICILRunner", "Prompt", "PromptError", "StreamingPolicy", "prompt_goal", "MAX_GOAL_TEXT"]

MAX_GOAL_TEXT = 200  # characters of demonstration labels in a prompt's goal text


class PromptError(ValueError):
    """A prompt cannot be used; the message says which path or demonstration and why."""


@dataclass(frozen=True)
class Prompt:
    """The prompt in use: its demonstrations (labels and instructions) and what prefilling cost."""

    paths: tuple[str, ...]
    labels: tuple[str, ...]
    instructions: tuple[str, ...]
    info: PromptInfo
    read_s: float  # reading and converting the files

    @property
    def k(self) -> int:
        return self.info.demonstrations

    @property
    def frames(self) -> int:
        return self.info.frames

    def describe(self) -> str:
        return (f"K={self.k} demonstrations, {self.frames} prompt frames ({self.info.tokens} tokens): read "
                f"{self.read_s * 1e3:.0f} ms, encode {self.info.encode_s * 1e3:.0f} ms, prefill "
                f"{self.info.prefill_s * 1e3:.1f} ms")


def prompt_goal(prompt: Prompt, stamp: int) -> Goal:
    """The goal a prompt starts at ``stamp`` (ns): the demonstrations' instruction when they all
    share one (what the test bed judges), else ``prompt: LABEL, ...`` (shortened)."""
    instructions = set(prompt.instructions)
    if len(instructions) == 1 and next(iter(instructions)).strip():
        text = next(iter(instructions))
    else:
        text = "prompt: " + ", ".join(prompt.labels)
        if len(text) > MAX_GOAL_TEXT:
            text = text[: MAX_GOAL_TEXT - 3] + "..."
    return Goal(text=text, vector=None, encoder=None, stamp=stamp)


class StreamingPolicy:
    """An :class:`ICILPolicy` behind the interface PolicyRunner drives (``reset(seed)``,
    ``predict_chunk(history, embedding)``, ``config``, ``backend``): the newest observation of the
    history is committed to the stream and the chunk predicted from there."""

    def __init__(self, policy: ICILPolicy) -> None:
        self.policy = policy
        self.config = policy.config
        self._last_stamp = -math.inf

    @property
    def backend(self) -> str:
        return self.policy.backend

    def reset(self, seed: int | None = None) -> None:  # noqa: ARG002 - the policy draws no noise
        self.policy.reset()
        self._last_stamp = -math.inf

    def predict_chunk(self, history: Sequence[Observation],
                      embedding: np.ndarray | None = None) -> np.ndarray:  # noqa: ARG002 - no language input
        observation = history[-1]
        if observation.stamp <= self._last_stamp:
            self.reset()  # time went back (a restarted simulator): a new episode from the prompt
        actions = self.policy.predict_chunk(observation)
        self._last_stamp = observation.stamp
        return actions


class ICILRunner(PolicyRunner):
    """PolicyRunner for an ICILPolicy, with its prompt; see the module docstring."""

    def __init__(self, policy: ICILPolicy, settings: RunnerSettings = RunnerSettings()) -> None:
        if policy.config.language.enabled:
            raise ValueError("this ICIL checkpoint also takes an instruction; the runtime supports prompt-only "
                             "ICIL policies (language off)")
        super().__init__(StreamingPolicy(policy), settings)
        self.icil = policy
        self.prompt: Prompt | None = None

    @property
    def ready(self) -> bool:
        return super().ready and self.prompt is not None

    def set_goal(self, goal: Goal) -> str | None:
        current = self.goal
        if current is not None and (current.text, current.stamp) == (goal.text, goal.stamp):
            return None  # the same goal again (our own announcement): not a new episode
        return super().set_goal(goal)

    def load_prompt(self, paths: Sequence[str]) -> Prompt:
        """Read, check and prefill the demonstrations at ``paths`` (uses the policy); raises
        :class:`PromptError` and keeps the previous prompt and episode on any problem. Takes
        effect for chunks once :meth:`use_prompt` makes it the goal."""
        paths = tuple(paths)
        if not paths:
            raise PromptError("no demonstrations given (to clear the prompt, use clear_prompt)")
        start = time.perf_counter()
        try:
            demonstrations: list[PromptDemonstration] = read_prompt(paths, self.icil.config)
        except (DataError, ValueError, OSError) as exc:
            raise PromptError(str(exc)) from exc
        read_s = time.perf_counter() - start
        try:
            info = self.icil.set_prompt([d.demonstration for d in demonstrations])
        except PolicyInputError as exc:
            raise PromptError(f"{exc} ({demonstrations_named(demonstrations)})") from exc
        return Prompt(paths, tuple(d.label for d in demonstrations), tuple(d.instruction for d in demonstrations),
                      info, read_s)

    def use_prompt(self, prompt: Prompt, goal: Goal) -> None:
        """Make the prefilled ``prompt`` current, with ``goal`` (:func:`prompt_goal`): a new episode."""
        self.prompt = prompt
        super().set_goal(goal)

    def clear_prompt(self) -> None:
        """No prompt: no chunk until the next one (uses the policy)."""
        self.icil.clear_prompt()
        self.prompt = None
        self._reset = True


def demonstrations_named(demonstrations: Sequence[PromptDemonstration]) -> str:
    """'demonstration 0 is FILE:demo_0, 1 is ...' for an error message."""
    return "; ".join(f"demonstration {i} is {d.label}" for i, d in enumerate(demonstrations))
