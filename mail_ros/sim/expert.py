"""Scripted expert for the test bed's tasks: Cartesian phases solved by damped-least-squares IK.

The expert sees what a learned policy sees of the robot (joint positions) plus the cube poses,
and outputs what the policy outputs: seven arm joint targets and a gripper opening width, once
per control step. Each phase has a tool-centre-point (TCP) goal; the commanded TCP moves towards
it by at most ``max_linear_step`` per step, and the phase ENDS WHEN THE MEASURED HAND HAS
CONVERGED to the goal (or, for the gripper phases, when the measured opening stops changing), not
after a fixed number of steps: the arm lags its commands by a variable amount.

Phases. pick: approach (above the cube) -> descend -> close -> lift. stack adds: carry (over the
target cube) -> lower -> release, and a retreat (the open hand rising back to the lift height) only
when ``ExpertConfig.retreat`` asks for it: in a demonstration, an open hand rising from a cube
looks like what a learned policy sees just before it grasps one, and behaviour cloning mixed the
two ("go up" where it should close; checkpoints/demo/README.md, lessons 11 to 14).

The hand points down with its fingers across two faces of the cube (the cube's yaw modulo 90
degrees, picked next to the arm's natural wrist angle), and the gripper closes as soon as the hand
is in place: no waits a policy cannot see. The grasp point is the cube's centre, or
``grasp_height`` above it: fingertips then stay clear of the table by that much more, a margin for
a learned policy that descends a little too far.

Detours (``ExpertConfig.detour``, DART-style): an expert that always arrives exactly above the
cube never shows a policy how to correct a hand that arrives off-centre, which is what a learned
policy's hand does. With a detour, the EXECUTED free-space goals above a cube (approach, carry)
are offset horizontally by a random vector drawn at reset, while the RECORDED action keeps aiming
at the true goal; the descent (or lowering) that follows steers the hand back over the cube, so
the demonstrations show the correction in both cameras.

IK uses MuJoCo's own site Jacobian on a private ``MjData``, so it is consistent with the sim.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import NamedTuple

import mujoco
import numpy as np

from mail_ros.sim.franka_sim import (
    CUBE_MIN_DISTANCE,
    FR3_LIMITS,
    HOME_Q,
    TCP_SITE,
    CubePose,
    FrankaSim,
    build_model,
)
from mail_ros.sim.tasks import CUBE_SIZE, TABLE_HEIGHT, Task
from mail_ros.spec import FR3_ARM_JOINTS, FR3_GRIPPER_MAX_WIDTH

__all__ = [
    "EpisodeResult",
    "ExpertAction",
    "ExpertConfig",
    "ExpertError",
    "ExpertObservation",
    "ScriptedExpert",
    "observe",
    "run_episode",
]

PICK_PHASES = ("approach", "descend", "close", "lift")
STACK_PHASES = PICK_PHASES + ("carry", "lower", "release")
# Keep IK solutions off the hard limits, where the position servos would press against them.
_LIMIT_MARGIN = 0.02


class ExpertError(ValueError):
    """Invalid expert configuration or use."""


@dataclass(frozen=True)
class ExpertConfig:
    """Scripted expert settings (lengths in metres, angles in radians, per control step)."""

    rate_hz: float = 10.0  # control rate: one act() per 1 / rate_hz seconds
    max_linear_step: float = 0.035  # TCP command step towards the phase goal
    max_angular_step: float = 0.3
    approach_height: float = 0.08  # TCP height above the cube's top face before descending
    grasp_height: float = 0.0  # TCP height above the cube's centre when grasping (margin over the table)
    lift_height: float = 0.2  # TCP height above the table when lifting and carrying
    place_clearance: float = 0.006  # gap between the held cube and the target cube when released
    coarse_tolerance: float = 0.015  # convergence in free space (approach, lift, carry, retreat)
    fine_tolerance: float = 0.004  # convergence at the cube (descend, lower)
    angle_tolerance: float = 0.05
    width_settle: float = 0.0005  # opening change per step under which the fingers have stopped
    ik_damping: float = 0.02
    ik_iterations: int = 50
    detour: float = 0.0  # radius of the random horizontal offset of executed approach/carry goals (0: none)
    noise_std: float = 0.0  # std (rad) of Gaussian noise on every executed arm target (0: none)
    retreat: bool = False  # stack: lift the open hand after the release (otherwise the episode ends there)

    def __post_init__(self) -> None:
        for name in (
            "rate_hz",
            "max_linear_step",
            "max_angular_step",
            "approach_height",
            "lift_height",
            "place_clearance",
            "coarse_tolerance",
            "fine_tolerance",
            "angle_tolerance",
            "width_settle",
            "ik_damping",
        ):
            value = getattr(self, name)
            if not (math.isfinite(value) and value > 0):
                raise ExpertError(f"ExpertConfig.{name} must be positive, got {value}")
        # A detour past half the cube spacing would lead the hand closer to a neighbour than to its cube.
        if not (math.isfinite(self.detour) and 0.0 <= self.detour < 0.5 * CUBE_MIN_DISTANCE):
            raise ExpertError(f"ExpertConfig.detour must be in [0, {0.5 * CUBE_MIN_DISTANCE}), got {self.detour}")
        if not (math.isfinite(self.noise_std) and self.noise_std >= 0.0):
            raise ExpertError(f"ExpertConfig.noise_std must be >= 0, got {self.noise_std}")
        if not (math.isfinite(self.grasp_height) and 0.0 <= self.grasp_height < 0.5 * CUBE_SIZE):
            raise ExpertError(f"ExpertConfig.grasp_height must be in [0, {0.5 * CUBE_SIZE}), got {self.grasp_height}")
        if self.ik_iterations < 1:
            raise ExpertError(f"ExpertConfig.ik_iterations must be >= 1, got {self.ik_iterations}")
        if self.lift_height < CUBE_SIZE * 2 + self.approach_height:
            raise ExpertError(
                f"lift_height {self.lift_height} must clear a stacked cube plus approach_height "
                f"({CUBE_SIZE * 2 + self.approach_height:.3f})"
            )

    @property
    def period(self) -> float:
        return 1.0 / self.rate_hz


class ExpertAction(NamedTuple):
    """One step's decision: what to record and what to send to the arm.

    ``arm`` (7,) and ``gripper`` (m) are the expert's intent, the demonstration's label;
    ``executed_arm`` (7,) is what the arm is sent: ``arm`` itself unless a detour or execution
    noise perturbs it, always within the FR3's position limits.
    """

    arm: np.ndarray
    gripper: float
    executed_arm: np.ndarray


@dataclass(frozen=True)
class ExpertObservation:
    """What the expert reads each step: (9,) joint positions (arm, then fingers) and cube poses."""

    joint_positions: np.ndarray
    cube_poses: dict[str, CubePose]

    @property
    def gripper_width(self) -> float:
        return float(self.joint_positions[7] + self.joint_positions[8])


def observe(sim: FrankaSim) -> ExpertObservation:
    """The expert's observation of the simulator's current state."""
    _, positions, _ = sim.joint_state()
    return ExpertObservation(positions, sim.cube_poses())


def _hand_rotation(yaw: float) -> np.ndarray:
    """(3, 3) TCP orientation pointing down with the finger axis (hand y) at ``yaw`` about world z."""
    c, s = math.cos(yaw), math.sin(yaw)
    return np.array([[-s, c, 0.0], [c, s, 0.0], [0.0, 0.0, -1.0]])


def _rotation_error(target: np.ndarray, current: np.ndarray) -> np.ndarray:
    """(3,) rotation vector (world frame) taking ``current`` to ``target``."""
    quat = np.empty(4)
    mujoco.mju_mat2Quat(quat, (target @ current.T).ravel())
    vel = np.empty(3)
    mujoco.mju_quat2Vel(vel, quat, 1.0)
    return vel


def _wrap(angle: float) -> float:
    return (angle + math.pi) % (2 * math.pi) - math.pi


class ScriptedExpert:
    """Phase-based pick/stack expert: ``reset(task, observation)`` then ``act(observation)`` per step.

    ``model`` is any compiled test-bed model (for kinematics only); by default one is built.
    """

    def __init__(self, config: ExpertConfig | None = None, model: mujoco.MjModel | None = None) -> None:
        self.config = config or ExpertConfig()
        self._model = model if model is not None else build_model()
        self._data = mujoco.MjData(self._model)
        m = self._model
        self._qadr = np.array([m.jnt_qposadr[m.joint(n).id] for n in FR3_ARM_JOINTS])
        self._dadr = np.array([m.jnt_dofadr[m.joint(n).id] for n in FR3_ARM_JOINTS])
        self._site = m.site(TCP_SITE).id
        self._lower = FR3_LIMITS.position_min + _LIMIT_MARGIN
        self._upper = FR3_LIMITS.position_max - _LIMIT_MARGIN
        home_rotation = self._fk(HOME_Q)[1]
        self._home_yaw = math.atan2(home_rotation[1, 1], home_rotation[0, 1])
        self._task: Task | None = None

    # -- public --------------------------------------------------------------------------------

    @property
    def phase(self) -> str:
        """Name of the active phase."""
        return self._phases[self._phase]

    @property
    def done(self) -> bool:
        """Whether the last phase has converged."""
        return self._done

    def reset(self, task: Task, observation: ExpertObservation, rng: np.random.Generator | None = None) -> None:
        """Start an episode of ``task`` from ``observation``; fixes the grasp yaw from the cube's pose.

        ``rng`` draws this episode's perturbations of the executed (never the recorded) targets:
        the detours (uniform in a disc of radius ``config.detour``, one for the approach and one
        for the carry), drawn here, then ``config.noise_std`` noise on each step's target, drawn
        in :meth:`act`. It is required when either is configured.
        """
        if rng is None and (self.config.detour > 0 or self.config.noise_std > 0):
            raise ExpertError("ScriptedExpert.reset needs an rng when detour or noise_std is configured")
        self._task = task
        self._rng = rng
        self._detours = {"approach": np.zeros(3), "carry": np.zeros(3)}
        if self.config.detour > 0:
            for phase in self._detours:
                radius, angle = self.config.detour * math.sqrt(rng.uniform()), rng.uniform(0.0, 2 * math.pi)
                self._detours[phase] = np.array([radius * math.cos(angle), radius * math.sin(angle), 0.0])
        if task.skill == "pick":
            self._phases = PICK_PHASES
        else:
            self._phases = STACK_PHASES + (("retreat",) if self.config.retreat else ())
        self._phase = 0
        self._done = False
        self._frozen_goal: np.ndarray | None = None
        self._previous_width: float | None = None
        self._entry_width = observation.gripper_width
        cube = observation.cube_poses[task.cube]
        # Fingers may close across either pair of faces: choose the yaw nearest the wrist angle the
        # arm has when it simply turns to face the cube, which keeps joint 7 mid-range.
        natural = self._home_yaw + math.atan2(cube.position[1], cube.position[0])
        offset = _wrap(cube.yaw - natural)
        offset = (offset + math.pi / 4) % (math.pi / 2) - math.pi / 4
        self._rotation = _hand_rotation(natural + offset)

    def act(self, observation: ExpertObservation) -> ExpertAction:
        """This step's :class:`ExpertAction`; advances converged phases."""
        if self._task is None:
            raise ExpertError("call reset(task, observation) before act()")
        q = np.asarray(observation.joint_positions[:7], dtype=np.float64)
        position, rotation = self._fk(q)
        width = observation.gripper_width
        while True:
            goal, gripper = self._goal(observation, position)
            # The arm is led to the detoured goal, so that is where the phase converges.
            executed_goal = goal + self._detours.get(self.phase, 0.0)
            if self._done or not self._converged(executed_goal, position, rotation, width):
                break
            if self._phase == len(self._phases) - 1:
                self._done = True
                break
            self._phase += 1
            if self.phase in ("close", "release"):
                self._frozen_goal = goal
                self._entry_width = width
        self._previous_width = width
        turn = _rotation_error(self._rotation, rotation)
        angle = np.linalg.norm(turn)
        if angle > self.config.max_angular_step:
            turn *= self.config.max_angular_step / angle
        command_rotation = self._rotate(rotation, turn)
        arm = self._ik(q, position + self._linear_step(goal - position), command_rotation)
        executed = arm
        if not np.array_equal(executed_goal, goal):
            executed = self._ik(q, position + self._linear_step(executed_goal - position), command_rotation)
        if self.config.noise_std > 0:
            executed = np.clip(executed + self._rng.normal(0.0, self.config.noise_std, size=7),
                               FR3_LIMITS.position_min, FR3_LIMITS.position_max)
        return ExpertAction(arm, gripper, executed)

    def _linear_step(self, step: np.ndarray) -> np.ndarray:
        """``step`` (3,) shortened to at most ``max_linear_step``."""
        distance = np.linalg.norm(step)
        if distance > self.config.max_linear_step:
            return step * (self.config.max_linear_step / distance)
        return step

    # -- phases --------------------------------------------------------------------------------

    def _goal(self, obs: ExpertObservation, tcp: np.ndarray) -> tuple[np.ndarray, float]:
        """TCP goal (3,) and gripper width of the active phase."""
        cfg, task = self.config, self._task
        cube = obs.cube_poses[task.cube].position
        opened, closed = FR3_GRIPPER_MAX_WIDTH, 0.0
        lift_z = TABLE_HEIGHT + cfg.lift_height
        phase = self.phase
        if phase == "approach":
            return np.array([cube[0], cube[1], cube[2] + 0.5 * CUBE_SIZE + cfg.approach_height]), opened
        if phase == "descend":
            return cube + np.array([0.0, 0.0, cfg.grasp_height]), opened
        if phase == "close":
            return self._frozen_goal, closed
        if phase == "lift":
            return np.array([self._frozen_goal[0], self._frozen_goal[1], lift_z]), closed
        if phase == "release":
            return self._frozen_goal, opened
        if phase == "retreat":
            return np.array([self._frozen_goal[0], self._frozen_goal[1], lift_z]), opened
        # carry / lower: place the HELD cube (not the hand) over the target, so that an off-centre
        # grasp is corrected for.
        target = obs.cube_poses[task.target].position
        grip_offset = tcp - cube  # (3,) from the held cube's centre to the TCP
        above = target + np.array([0.0, 0.0, CUBE_SIZE + cfg.place_clearance])
        if phase == "carry":
            return np.array([above[0] + grip_offset[0], above[1] + grip_offset[1], lift_z]), closed
        return above + grip_offset, closed

    def _converged(self, goal: np.ndarray, position: np.ndarray, rotation: np.ndarray, width: float) -> bool:
        cfg, phase = self.config, self.phase
        if phase in ("close", "release"):
            if self._previous_width is None or abs(width - self._previous_width) > cfg.width_settle:
                return False
            # Closing has converged once the fingers have moved and stopped (on the cube or, after a
            # miss, shut); opening once they stop wide enough to clear the cube.
            if phase == "close":
                return width < self._entry_width - 0.01
            return width > CUBE_SIZE + 0.015
        tolerance = cfg.fine_tolerance if phase in ("descend", "lower") else cfg.coarse_tolerance
        angle = np.linalg.norm(_rotation_error(self._rotation, rotation))
        return bool(np.linalg.norm(goal - position) < tolerance and angle < cfg.angle_tolerance)

    # -- kinematics ----------------------------------------------------------------------------

    def _fk(self, q: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        d = self._data
        d.qpos[self._qadr] = q
        mujoco.mj_kinematics(self._model, d)
        mujoco.mj_comPos(self._model, d)  # the Jacobian needs the frames it computes
        return d.site_xpos[self._site].copy(), d.site_xmat[self._site].reshape(3, 3).copy()

    @staticmethod
    def _rotate(rotation: np.ndarray, rotvec: np.ndarray) -> np.ndarray:
        quat = np.empty(4)
        mujoco.mju_axisAngle2Quat(quat, rotvec / max(np.linalg.norm(rotvec), 1e-12), np.linalg.norm(rotvec))
        delta = np.empty(9)
        mujoco.mju_quat2Mat(delta, quat)
        return delta.reshape(3, 3) @ rotation

    def _ik(self, q_seed: np.ndarray, position: np.ndarray, rotation: np.ndarray) -> np.ndarray:
        """Joint positions (7,) reaching the TCP pose, by damped least squares from ``q_seed``."""
        cfg = self.config
        q = np.clip(q_seed, self._lower, self._upper)
        jacp = np.zeros((3, self._model.nv))
        jacr = np.zeros((3, self._model.nv))
        damping = cfg.ik_damping**2 * np.eye(6)
        for _ in range(cfg.ik_iterations):
            current, current_rotation = self._fk(q)
            error = np.concatenate([position - current, _rotation_error(rotation, current_rotation)])  # (6,)
            if np.linalg.norm(error[:3]) < 1e-4 and np.linalg.norm(error[3:]) < 1e-3:
                break
            mujoco.mj_jacSite(self._model, self._data, jacp, jacr, self._site)
            jac = np.vstack([jacp[:, self._dadr], jacr[:, self._dadr]])  # (6, 7)
            pinv = jac.T @ np.linalg.inv(jac @ jac.T + damping)  # (7, 6)
            # The seventh degree of freedom drifts towards the home posture (elbow up, wrist mid-range).
            posture = (np.eye(7) - pinv @ jac) @ (0.1 * (HOME_Q - q))
            q = np.clip(q + pinv @ error + posture, self._lower, self._upper)
        return q


@dataclass
class EpisodeResult:
    """One expert rollout: success, step count and the recorded (noise-free) commands."""

    success: bool
    steps: int
    actions: np.ndarray  # (N, 8): arm joint targets then gripper width, as the expert chose them
    joint_positions: np.ndarray  # (N, 9): observed before each action
    images: list[dict[str, np.ndarray]] = field(default_factory=list)  # per step, when rendered


def run_episode(
    sim: FrankaSim,
    expert: ScriptedExpert,
    task: Task,
    seed: int,
    *,
    max_steps: int = 300,
    render: bool = False,
) -> EpisodeResult:
    """Reset ``sim`` with ``seed`` and let ``expert`` perform ``task`` until it is done.

    The arm is sent the expert's executed targets and the clean ones are recorded, so with the
    expert's perturbations (``config.detour``, ``config.noise_std``, drawn from a generator
    seeded by ``seed``) demonstrations show recoveries from deviations. Returns after the
    expert's last phase converges or ``max_steps``.
    """
    rng = np.random.default_rng([seed, 1])
    dt = expert.config.period
    sim.reset(seed)
    obs = observe(sim)
    expert.reset(task, obs, rng)
    actions, positions, images = [], [], []
    for _ in range(max_steps):
        if render:
            images.append(sim.render())
        arm, width, executed = expert.act(obs)
        actions.append(np.append(arm, width))
        positions.append(obs.joint_positions)
        sim.set_trajectory(FR3_ARM_JOINTS, [(dt, executed)])
        sim.set_gripper(width)
        sim.step(dt)
        obs = observe(sim)
        if expert.done:
            break
    return EpisodeResult(
        success=sim.task_success(task),
        steps=len(actions),
        actions=np.array(actions),
        joint_positions=np.array(positions),
        images=images,
    )
