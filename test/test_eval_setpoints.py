"""The 1 kHz setpoint of recorded commands (mail_ros.eval.setpoints) on motions with a closed form.

A minimum-jerk motion over distance D and duration T has peak acceleration 10 / sqrt(3) * D / T^2
and peak jerk 60 * D / T^3. Sent as points with positions, velocities and accelerations, the JTC
model interpolates it with quintics, which reproduce it exactly: the 1 ms differences must find
those peaks. Sent as positions only, the setpoint is piecewise linear and its acceleration
spikes at every point.
"""

from __future__ import annotations

import math

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from mail_ros.eval.setpoints import SetpointPlayback
from mail_ros.spec import FR3_ARM_JOINTS, FR3_HOME

EPOCH = 1_764_000_000_123_456_789  # ns: bag times since the epoch (their float seconds would round at 0.24 us)
HOME = np.array(FR3_HOME)


def min_jerk(t: np.ndarray, distance: np.ndarray, duration: float):
    """Position, velocity, acceleration (N, J) of a min-jerk motion from HOME, at rest outside [0, T]."""
    s = np.clip(np.asarray(t) / duration, 0.0, 1.0)[:, None]
    q = HOME + distance * (10 * s**3 - 15 * s**4 + 6 * s**5)
    v = distance / duration * (30 * s**2 - 60 * s**3 + 30 * s**4)
    a = distance / duration**2 * (60 * s - 180 * s**2 + 120 * s**3)
    return q, v, a


def play(distance: np.ndarray, duration: float, fields: int, rate: float = 20.0, spacing: float = 0.01,
         ahead: float = 0.2):
    playback = SetpointPlayback(FR3_ARM_JOINTS)
    # From 0.5 s before the motion (the first command finds the arm at rest) to 0.5 s after it.
    for k in range(-int(0.5 * rate), int((duration + 0.5) * rate)):
        receive = EPOCH + round(k / rate * 1e9)
        t = k / rate + spacing * np.arange(1, int(ahead / spacing) + 1)  # points ahead of the arrival
        q, v, a = min_jerk(t, distance, duration)
        points = [(float(t[i] - k / rate), q[i], v[i], a[i])[:fields + 1] for i in range(len(t))]
        playback.command(receive, 0, FR3_ARM_JOINTS, points)
    return playback.finish()


@settings(max_examples=10, deadline=None)
@given(st.floats(0.05, 0.6), st.integers(100, 300))
def test_smooth_commands_give_the_motions_own_peaks(length, centiseconds):
    # The motion starts and ends on points (a segment across its end is no longer one quintic).
    duration = centiseconds / 100
    distance = length * np.linspace(1.0, -0.5, 7)
    summary = play(distance, duration, fields=3)
    assert summary.commands == 10 + int((duration + 0.5) * 20) and not summary.rejected
    peak_acceleration = 10 / math.sqrt(3) * np.abs(distance) / duration**2
    peak_jerk = 60 * np.abs(distance) / duration**3
    np.testing.assert_allclose(summary.acceleration, peak_acceleration, rtol=0.01)
    np.testing.assert_allclose(summary.jerk, peak_jerk, rtol=0.03)


def test_positions_only_commands_show_acceleration_spikes_at_every_point():
    distance = 0.5 * np.ones(7)
    smooth, linear = play(distance, 2.0, fields=3), play(distance, 2.0, fields=1)
    # Piecewise linear through points 10 ms apart: the velocity steps at every point, within
    # one 1 ms cycle, by up to the motion's acceleration times 10 ms.
    assert np.all(linear.acceleration > 4 * smooth.acceleration)
    assert np.all(linear.jerk > 100 * smooth.jerk)


def test_commands_the_controller_would_refuse_are_counted_not_played():
    playback = SetpointPlayback(FR3_ARM_JOINTS)
    playback.command(EPOCH, 0, FR3_ARM_JOINTS, [(0.1, HOME)])
    playback.command(EPOCH + 50_000_000, 0, FR3_ARM_JOINTS, [(0.1, HOME + 10.0)])  # beyond the limits
    playback.command(EPOCH + 100_000_000, 0, FR3_ARM_JOINTS[:6], [(0.1, HOME[:6])])  # a joint missing
    summary = playback.finish()
    assert summary.commands == 1 and len(summary.rejected) == 2
    assert "outside its limits" in summary.rejected[0]
    assert np.all(summary.acceleration == 0.0) and np.all(summary.jerk == 0.0)
    assert summary.to_dict()["acceleration_max"] == 0.0
