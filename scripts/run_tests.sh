#!/usr/bin/env bash
# Run the whole test suite in the project's venv, isolated from any other ROS 2 graph on the
# machine: loopback discovery only and a ROS domain chosen per run (tests pick distinct ones).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
export ROS_AUTOMATIC_DISCOVERY_RANGE=LOCALHOST
export MUJOCO_GL="${MUJOCO_GL:-egl}"
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
exec "$ROOT/.venv/bin/python" -m pytest "$@"
