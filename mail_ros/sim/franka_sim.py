"""The simulated FR3 test bed: MuJoCo physics, headless cameras, a JTC-style arm and a gripper.

The scene is composed at run time with ``mujoco.MjSpec`` from the FR3 + Panda hand model that
the ``franky-sim`` package ships (``franky_sim/assets/fr3.xml``): a table whose top is the
world's z = 0 plane with the robot base on it, three coloured cubes on free joints, an
``agentview`` camera in front of the table and a ``wrist`` camera on the hand. Everything here
is ROS-free and faster than real time (no sleeps); ``mail_ros.nodes`` wraps it.

Deviations from the shipped model, with reasons:

- The hand actuator is replaced by a stiff position servo on the finger tendon. The original
  squeezes a 4.5 cm cube with about 2 N, and the cube slips out when lifted.
- The finger joints are renamed ``fr3_finger_joint1/2`` to match ``mail_ros.spec``.
- Cameras render the low-poly collision meshes (geom group 3, a few hundred faces per link)
  instead of the visual meshes (group 2, up to 25k faces per part), and shadows, reflections
  and the skybox are off: that takes a 128x128 camera pair from ~50 ms to a few ms on a CPU.
"""

from __future__ import annotations

import importlib.resources
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import mujoco  # mail_ros.sim/__init__.py has set MUJOCO_GL=egl (headless) before this import
import numpy as np

from mail_ros.control.limits import fr3_limits
from mail_ros.control.smoothness import CONTROLLER_PERIOD, SetpointMonitor
from mail_ros.sim import CAMERA_SIZE
from mail_ros.sim.jtc import JOINS, JointTrajectoryController, TrajectoryRejected
from mail_ros.sim.tasks import COLOURS, CUBE_SIZE, TABLE_HEIGHT, SceneState, Task, TaskProgress, judge
from mail_ros.spec import FR3_ARM_JOINTS, FR3_FINGER_JOINTS, FR3_HOME, FR3_GRIPPER_MAX_WIDTH, GRIPPER_COMMAND_PER_WIDTH

__all__ = [
    "CAMERAS",
    "FR3_LIMITS",
    "HOME_Q",
    "CubePose",
    "FrankaSim",
    "SimConfig",
    "SimError",
    "TrajectoryRejected",
    "build_model",
    "fr3_model_path",
]

FR3_LIMITS = fr3_limits()
# Franka's "ready" pose: hand pointing down above the table centre, fingers along world y.
HOME_Q = np.array(FR3_HOME)
CAMERAS: tuple[str, ...] = ("agentview", "wrist")
TCP_SITE = "tcp"
# Between the fingertip pads: the hand origin to pad centre distance along the hand's z axis.
TCP_OFFSET = 0.1034

# Cube spawn region on the table (robot base at the origin, x away from the robot).
CUBE_X_RANGE = (0.36, 0.62)
CUBE_Y_RANGE = (-0.22, 0.22)
# Centre distance between cubes: an open hand (8 cm + fingers) aligned with one cube clears the others.
CUBE_MIN_DISTANCE = 0.11
CUBE_RGBA = {"red": (0.85, 0.1, 0.1, 1.0), "green": (0.1, 0.65, 0.15, 1.0), "blue": (0.1, 0.25, 0.85, 1.0)}
CUBE_MASS = 0.06

# The gripper servo acts on the tendon length L = (q_finger1 + q_finger2) / 2, each finger's share
# of the width: L = GRIPPER_COMMAND_PER_WIDTH * width.
GRIPPER_KP = 2000.0  # N/m on L: closing on a 4.5 cm cube saturates the force limit
GRIPPER_KV = 60.0
GRIPPER_MAX_FORCE = 70.0  # N squeezed by each finger (Franka hand's continuous force)
GRIPPER_MAX_SPEED = 0.2  # m/s of opening width


class SimError(ValueError):
    """Invalid simulator configuration or command."""


def fr3_model_path() -> Path:
    """Path of the FR3 + hand MJCF shipped by the ``franky-sim`` package."""
    path = Path(str(importlib.resources.files("franky_sim") / "assets" / "fr3.xml"))
    if not path.is_file():
        raise SimError(f"franky-sim does not ship {path}; reinstall franky-sim")
    return path


@dataclass(frozen=True)
class SimConfig:
    """Simulator settings.

    The arm and gripper controllers update once per ``control_substeps`` physics steps, i.e.
    every ``timestep * control_substeps`` seconds (default 10 ms, 100 Hz).
    """

    cameras: tuple[str, ...] = CAMERAS
    image_size: tuple[int, int] = CAMERA_SIZE  # (H, W)
    timestep: float = 0.002  # physics step in seconds
    control_substeps: int = 5
    visual_meshes: bool = False  # render the detailed visual meshes (~10x slower) instead of collision meshes
    # How the arm controller joins a new trajectory (see mail_ros.sim.jtc): "desired" as
    # config/fr3_controllers.yaml sets it up (interpolate_from_desired_state), or "measured".
    jtc_join: str = "desired"

    def __post_init__(self) -> None:
        object.__setattr__(self, "cameras", tuple(self.cameras))
        object.__setattr__(self, "image_size", tuple(int(v) for v in self.image_size))
        unknown = [c for c in self.cameras if c not in CAMERAS]
        if unknown or len(set(self.cameras)) != len(self.cameras):
            raise SimError(f"cameras must be distinct names from {list(CAMERAS)}, got {list(self.cameras)}")
        if len(self.image_size) != 2 or not all(8 <= v <= 2048 for v in self.image_size):
            raise SimError(f"image_size must be (height, width) within [8, 2048], got {self.image_size}")
        if not (math.isfinite(self.timestep) and 1e-4 <= self.timestep <= 0.01):
            raise SimError(f"timestep must be within [1e-4, 0.01] s, got {self.timestep}")
        if self.control_substeps < 1:
            raise SimError(f"control_substeps must be >= 1, got {self.control_substeps}")
        if self.jtc_join not in JOINS:
            raise SimError(f"jtc_join must be one of {list(JOINS)}, got {self.jtc_join!r}")

    @property
    def control_period(self) -> float:
        return self.timestep * self.control_substeps


@dataclass(frozen=True)
class CubePose:
    """A cube's centre (3,) in metres and orientation quaternion (4,) as (w, x, y, z), world frame."""

    position: np.ndarray
    quaternion: np.ndarray

    @property
    def yaw(self) -> float:
        """Rotation about the world z axis in radians (exact while the cube lies flat)."""
        w, x, y, z = self.quaternion
        return math.atan2(2.0 * (w * z + x * y), 1.0 - 2.0 * (y * y + z * z))


def _look_at_quat(pos: np.ndarray, target: np.ndarray, up: np.ndarray) -> np.ndarray:
    """Quaternion of a MuJoCo camera (looking along its -z, y up in the image) at ``pos`` facing ``target``."""
    forward = np.asarray(target, float) - np.asarray(pos, float)
    forward /= np.linalg.norm(forward)
    x = np.cross(forward, up)
    x /= np.linalg.norm(x)
    z = -forward
    y = np.cross(z, x)
    quat = np.empty(4)
    mujoco.mju_mat2Quat(quat, np.column_stack([x, y, z]).ravel())
    return quat


def build_model(config: SimConfig | None = None) -> mujoco.MjModel:
    """Compose and compile the test-bed scene (robot, table, cubes, cameras)."""
    config = config or SimConfig()
    spec = mujoco.MjSpec.from_file(str(fr3_model_path()))
    spec.meshdir = str(fr3_model_path().parent / "meshes")
    spec.option.timestep = config.timestep
    spec.visual.global_.offheight = max(640, config.image_size[0])
    spec.visual.global_.offwidth = max(640, config.image_size[1])

    # The shipped hand servo and its keyframe (sized for the robot alone) are replaced below.
    spec.delete(spec.actuator("hand"))
    spec.delete(spec.tendon("split"))
    spec.delete(spec.key("home"))
    for old, new in zip(("finger_joint1", "finger_joint2"), FR3_FINGER_JOINTS):
        spec.joint(old).name = new
    coupling = spec.equalities[0]
    coupling.name1, coupling.name2 = FR3_FINGER_JOINTS
    tendon = spec.add_tendon(name="finger_split")
    for joint in FR3_FINGER_JOINTS:
        tendon.wrap_joint(joint, 0.5)
    servo = spec.add_actuator(name="fr3_gripper", target="finger_split", trntype=mujoco.mjtTrn.mjTRN_TENDON)
    servo.gaintype = mujoco.mjtGain.mjGAIN_FIXED
    servo.biastype = mujoco.mjtBias.mjBIAS_AFFINE
    servo.gainprm[0] = GRIPPER_KP
    servo.biasprm[:3] = [0.0, -GRIPPER_KP, -GRIPPER_KV]
    servo.ctrllimited = True
    servo.ctrlrange = [0.0, GRIPPER_COMMAND_PER_WIDTH * FR3_GRIPPER_MAX_WIDTH]
    servo.forcelimited = True
    # Each finger receives half the tendon force.
    servo.forcerange = [-2 * GRIPPER_MAX_FORCE, 2 * GRIPPER_MAX_FORCE]

    # The real FR3 compensates gravity in its joint controllers; without it the position servos
    # sag by up to ~0.01 rad and the hand misses its targets by centimetres.
    for body in spec.bodies:
        if body.name.startswith("fr3_link") or body.name in ("hand", "left_finger", "right_finger"):
            body.gravcomp = 1.0

    # Collision meshes carry no material; give them the robot's look for the cameras.
    for geom in spec.geoms:
        if geom.group == 3:
            geom.rgba = [0.92, 0.92, 0.92, 1.0]
    for body_name in ("hand", "left_finger", "right_finger"):
        for geom in spec.body(body_name).geoms:
            if geom.group == 3:
                geom.rgba = [0.25, 0.25, 0.25, 1.0]

    hand = spec.body("hand")
    hand.add_site(name=TCP_SITE, pos=[0.0, 0.0, TCP_OFFSET], group=4)
    # Wrist camera beside the hand (x side, clear of the fingers), tilted to see the fingertips.
    wrist_pos = np.array([0.065, 0.0, 0.06])
    hand.add_camera(
        name="wrist",
        pos=wrist_pos,
        quat=_look_at_quat(wrist_pos, np.array([0.0, 0.0, 0.2]), np.array([1.0, 0.0, 0.0])),
        fovy=70.0,
    )

    world = spec.worldbody
    world.add_geom(
        name="table",
        type=mujoco.mjtGeom.mjGEOM_BOX,
        size=[0.65, 0.6, 0.02],
        pos=[0.35, 0.0, TABLE_HEIGHT - 0.02],
        rgba=[0.62, 0.5, 0.38, 1.0],
    )
    world.add_geom(
        name="floor",
        type=mujoco.mjtGeom.mjGEOM_PLANE,
        size=[3.0, 3.0, 0.1],
        pos=[0.0, 0.0, TABLE_HEIGHT - 0.75],
        rgba=[0.35, 0.37, 0.4, 1.0],
    )
    world.add_light(name="top", pos=[0.4, 0.0, 1.5], dir=[0.0, 0.0, -1.0], castshadow=False)
    # Agentview framed on the cube workspace rather than the whole robot: from farther away a 4.5 cm
    # cube was ~3x3 px in a 64x64 image, too few for a policy to tell where (or which) it is.
    agent_pos = np.array([0.95, 0.0, 0.62])
    world.add_camera(
        name="agentview",
        pos=agent_pos,
        quat=_look_at_quat(agent_pos, np.array([0.47, 0.0, 0.0]), np.array([0.0, 0.0, 1.0])),
        fovy=50.0,
    )
    half = 0.5 * CUBE_SIZE
    for colour in COLOURS:
        body = world.add_body(name=f"cube_{colour}", pos=[0.5, 0.0, TABLE_HEIGHT + half])
        body.add_freejoint(name=f"cube_{colour}")
        body.add_geom(
            name=f"cube_{colour}",
            type=mujoco.mjtGeom.mjGEOM_BOX,
            size=[half, half, half],
            mass=CUBE_MASS,
            rgba=CUBE_RGBA[colour],
            # Torsional friction keeps a cube held off-centre from spinning between the pads.
            condim=4,
            friction=[1.0, 0.01, 0.0001],
        )
    return spec.compile()


class FrankaSim:
    """The FR3 test bed: physics, arm trajectory controller, gripper, cameras and task checks.

    Time is simulated (``time``, seconds since the last reset); ``step`` runs as fast as the CPU
    allows. The arm follows JTC semantics (see :mod:`mail_ros.sim.jtc`), the gripper tracks a
    commanded opening width at a limited speed.
    """

    def __init__(self, config: SimConfig | None = None) -> None:
        self.config = config or SimConfig()
        self.model = build_model(self.config)
        self.data = mujoco.MjData(self.model)
        m = self.model
        self._arm_qadr = np.array([m.jnt_qposadr[m.joint(n).id] for n in FR3_ARM_JOINTS])
        self._arm_dadr = np.array([m.jnt_dofadr[m.joint(n).id] for n in FR3_ARM_JOINTS])
        self._finger_qadr = np.array([m.jnt_qposadr[m.joint(n).id] for n in FR3_FINGER_JOINTS])
        self._finger_dadr = np.array([m.jnt_dofadr[m.joint(n).id] for n in FR3_FINGER_JOINTS])
        self._arm_act = np.array([m.actuator(n).id for n in FR3_ARM_JOINTS])
        self._gripper_act = m.actuator("fr3_gripper").id
        self._cube_qadr = {c: m.jnt_qposadr[m.joint(f"cube_{c}").id] for c in COLOURS}
        self._cube_dadr = {c: m.jnt_dofadr[m.joint(f"cube_{c}").id] for c in COLOURS}
        self._cube_geom = {m.geom(f"cube_{c}").id: c for c in COLOURS}
        self._finger_body = {m.body("left_finger").id: "left", m.body("right_finger").id: "right"}
        self._tcp_site = m.site(TCP_SITE).id
        self._arm = JointTrajectoryController(
            FR3_ARM_JOINTS, FR3_LIMITS.position_min, FR3_LIMITS.position_max, HOME_Q, join=self.config.jtc_join
        )
        # The arm setpoint as the FR3's 1 kHz loop would see it (the physics applies it every
        # control period; this samples the same controller every millisecond).
        self.setpoint_monitor = SetpointMonitor(len(FR3_ARM_JOINTS))
        self._monitor_cycle = 0
        self._renderer: mujoco.Renderer | None = None
        self._scene_option = mujoco.MjvOption()
        self._scene_option.geomgroup[:] = 0
        self._scene_option.geomgroup[0] = 1  # table, floor, cubes
        self._scene_option.geomgroup[2 if self.config.visual_meshes else 3] = 1
        self._scene_option.sitegroup[:] = 0
        self.reset(0)

    # -- episode -------------------------------------------------------------------------------

    def reset(self, seed: int) -> dict[str, CubePose]:
        """Start an episode: arm at ``HOME_Q`` with the hand open, cubes at seeded random poses.

        The cube layout (positions and yaw) depends on ``seed`` alone; time restarts at 0.
        Returns the cube poses.
        """
        m, d = self.model, self.data
        mujoco.mj_resetData(m, d)
        d.qpos[self._arm_qadr] = HOME_Q
        d.qpos[self._finger_qadr] = GRIPPER_COMMAND_PER_WIDTH * FR3_GRIPPER_MAX_WIDTH
        rng = np.random.default_rng(seed)
        for colour, (xy, yaw) in zip(COLOURS, self._sample_layout(rng)):
            adr = self._cube_qadr[colour]
            d.qpos[adr : adr + 3] = [xy[0], xy[1], TABLE_HEIGHT + 0.5 * CUBE_SIZE]
            d.qpos[adr + 3 : adr + 7] = [math.cos(yaw / 2), 0.0, 0.0, math.sin(yaw / 2)]
        self._arm.hold(HOME_Q)
        self.setpoint_monitor.restart()
        self._monitor_cycle = 0
        m.actuator_forcerange[self._gripper_act] = [-2 * GRIPPER_MAX_FORCE, 2 * GRIPPER_MAX_FORCE]
        self._gripper_target = FR3_GRIPPER_MAX_WIDTH
        self._gripper_command = FR3_GRIPPER_MAX_WIDTH
        self._gripper_speed = 0.1
        self._apply_controls(0.0)
        mujoco.mj_forward(m, d)
        return self.cube_poses()

    @staticmethod
    def _sample_layout(rng: np.random.Generator) -> list[tuple[np.ndarray, float]]:
        for _ in range(1000):
            low, high = (CUBE_X_RANGE[0], CUBE_Y_RANGE[0]), (CUBE_X_RANGE[1], CUBE_Y_RANGE[1])
            xy = rng.uniform(low, high, size=(len(COLOURS), 2))  # (3, 2)
            gaps = [np.linalg.norm(xy[i] - xy[j]) for i in range(len(xy)) for j in range(i)]
            if min(gaps) >= CUBE_MIN_DISTANCE:
                yaws = rng.uniform(-math.pi, math.pi, size=len(COLOURS))
                return [(xy[i], float(yaws[i])) for i in range(len(COLOURS))]
        raise SimError("could not place the cubes without overlap; the spawn region is too small")

    @property
    def time(self) -> float:
        """Simulated seconds since the last reset."""
        return float(self.data.time)

    def step(self, duration: float) -> None:
        """Advance the physics by ``duration`` simulated seconds (rounded to whole physics steps).

        Controllers update at the start of every ``control_substeps`` chunk, so stepping in
        multiples of ``config.control_period`` keeps the control rate regular.
        """
        if not (math.isfinite(duration) and duration >= 0.0):
            raise SimError(f"step duration must be finite and >= 0, got {duration}")
        remaining = int(round(duration / self.config.timestep))
        while remaining > 0:
            n = min(self.config.control_substeps, remaining)
            self._apply_controls(n * self.config.timestep)
            mujoco.mj_step(self.model, self.data, nstep=n)
            remaining -= n

    def _apply_controls(self, dt: float) -> None:
        d = self.data
        d.ctrl[self._arm_act] = self._arm.setpoint(self.time)
        self._monitor_setpoint()
        # Ramp the width command towards the target at the commanded speed, like the real hand.
        delta = self._gripper_target - self._gripper_command
        self._gripper_command += float(np.clip(delta, -self._gripper_speed * dt, self._gripper_speed * dt))
        d.ctrl[self._gripper_act] = GRIPPER_COMMAND_PER_WIDTH * self._gripper_command

    def _monitor_setpoint(self) -> None:
        """Sample the arm setpoint every millisecond up to now (before a new trajectory replaces it)."""
        last = math.floor(self.time / CONTROLLER_PERIOD + 1e-9)
        if last >= self._monitor_cycle:
            cycles = np.arange(self._monitor_cycle, last + 1)
            self.setpoint_monitor.add(self._arm.sample_many(cycles * CONTROLLER_PERIOD)[0])
            self._monitor_cycle = last + 1

    # -- commands ------------------------------------------------------------------------------

    def set_trajectory(
        self,
        joint_names: Sequence[str],
        points: Sequence[tuple],
        start_time: float | None = None,
    ) -> None:
        """Replace the arm trajectory (JTC semantics; see :mod:`mail_ros.sim.jtc`).

        ``points`` are (time_from_start, positions[, velocities[, accelerations]]) tuples;
        ``start_time`` is in simulated seconds (``None``: now). Raises
        :class:`TrajectoryRejected` and keeps the active trajectory on invalid input.
        """
        d = self.data
        measured = (d.qpos[self._arm_qadr].copy(), d.qvel[self._arm_dadr].copy())
        self._monitor_setpoint()
        self._arm.set_trajectory(joint_names, points, start_time, self.time, measured=measured)

    def arm_setpoint(self) -> np.ndarray:
        """The (7,) joint position setpoint the arm controller outputs now."""
        return self._arm.setpoint(self.time)

    def set_gripper(self, width: float, speed: float = 0.1) -> None:
        """Move the fingers to an opening ``width`` in [0, 0.08] m at ``speed`` m/s, at full force."""
        self._command_gripper(width, speed, GRIPPER_MAX_FORCE)

    def grasp(self, force: float = 40.0, speed: float = 0.1) -> None:
        """Close the fingers at ``speed`` m/s, each finger squeezing with at most ``force`` N."""
        if not (math.isfinite(force) and 0.0 < force <= GRIPPER_MAX_FORCE):
            raise SimError(f"grasp force must be within (0, {GRIPPER_MAX_FORCE}] N, got {force}")
        self._command_gripper(0.0, speed, force)

    def stop_gripper(self) -> None:
        """Halt the fingers where they are now (franka_gripper's stop), keeping the current force limit."""
        self._gripper_target = self._gripper_command = float(np.clip(self.gripper_width(), 0.0, FR3_GRIPPER_MAX_WIDTH))

    def gripper_command_done(self) -> bool:
        """Whether the commanded width has reached its target (the fingers may still be moving)."""
        return self._gripper_command == self._gripper_target

    def _command_gripper(self, width: float, speed: float, force: float) -> None:
        if not (math.isfinite(width) and 0.0 <= width <= FR3_GRIPPER_MAX_WIDTH):
            raise SimError(f"gripper width must be within [0, {FR3_GRIPPER_MAX_WIDTH}] m, got {width}")
        if not (math.isfinite(speed) and 0.0 < speed <= GRIPPER_MAX_SPEED):
            raise SimError(f"gripper speed must be within (0, {GRIPPER_MAX_SPEED}] m/s, got {speed}")
        self._gripper_target = float(width)
        self._gripper_speed = float(speed)
        self.model.actuator_forcerange[self._gripper_act] = [-2 * force, 2 * force]

    # -- observation ---------------------------------------------------------------------------

    def joint_state(self) -> tuple[tuple[str, ...], np.ndarray, np.ndarray]:
        """(names, positions (9,), velocities (9,)): the seven arm joints, then the two fingers."""
        d = self.data
        qadr = np.concatenate([self._arm_qadr, self._finger_qadr])
        dadr = np.concatenate([self._arm_dadr, self._finger_dadr])
        return FR3_ARM_JOINTS + FR3_FINGER_JOINTS, d.qpos[qadr].copy(), d.qvel[dadr].copy()

    def gripper_width(self) -> float:
        """Measured opening between the fingers in metres."""
        return float(self.data.qpos[self._finger_qadr].sum())

    def tcp_position(self) -> np.ndarray:
        """(3,) world position of the point between the fingertip pads."""
        return self.data.site_xpos[self._tcp_site].copy()

    def cube_poses(self) -> dict[str, CubePose]:
        """Pose of each cube by colour."""
        d = self.data
        return {
            c: CubePose(d.qpos[a : a + 3].copy(), d.qpos[a + 3 : a + 7].copy()) for c, a in self._cube_qadr.items()
        }

    def scene_state(self) -> SceneState:
        """The quantities the task success checks read."""
        d = self.data
        contacts = set()
        for contact in d.contact[: d.ncon]:
            for geom, other in ((contact.geom1, contact.geom2), (contact.geom2, contact.geom1)):
                colour = self._cube_geom.get(int(geom))
                finger = self._finger_body.get(int(self.model.geom_bodyid[other]))
                if colour is not None and finger is not None:
                    contacts.add((colour, finger))
        return SceneState(
            cube_positions={c: p.position for c, p in self.cube_poses().items()},
            cube_speeds={c: float(np.linalg.norm(d.qvel[a : a + 3])) for c, a in self._cube_dadr.items()},
            gripper_width=self.gripper_width(),
            finger_contacts=frozenset(contacts),
        )

    def task_progress(self, task: Task) -> TaskProgress:
        """Whether ``task`` is accomplished in the current state, and if not why (:func:`mail_ros.sim.tasks.judge`)."""
        return judge(task, self.scene_state())

    def task_success(self, task: Task) -> bool:
        """Whether ``task`` is accomplished in the current state."""
        return self.task_progress(task).success

    def render(self) -> dict[str, np.ndarray]:
        """One (H, W, 3) uint8 RGB image per configured camera."""
        if self._renderer is None:
            height, width = self.config.image_size
            try:
                self._renderer = mujoco.Renderer(self.model, height, width)
            except mujoco.FatalError as exc:
                raise SimError(
                    f"cannot create an offscreen OpenGL context (MUJOCO_GL={os.environ.get('MUJOCO_GL')!r}): "
                    "use MUJOCO_GL=egl headless, and import mail_ros.sim before anything imports mujoco"
                ) from exc
        renderer = self._renderer
        images = {}
        for camera in self.config.cameras:
            renderer.update_scene(self.data, camera=camera, scene_option=self._scene_option)
            flags = renderer.scene.flags
            flags[mujoco.mjtRndFlag.mjRND_SHADOW] = 0
            flags[mujoco.mjtRndFlag.mjRND_REFLECTION] = 0
            flags[mujoco.mjtRndFlag.mjRND_SKYBOX] = 0
            images[camera] = renderer.render()
        return images

    def close(self) -> None:
        """Release the offscreen rendering context."""
        if self._renderer is not None:
            self._renderer.close()
            self._renderer = None
